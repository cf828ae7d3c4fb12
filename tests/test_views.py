"""Both accuracy views in every run: results.json's task_aware and task_agnostic.

The run's own ``accuracy_matrix`` is its scenario's view (task-IL: task-aware, class-IL:
task-agnostic); the other view is checked against an independent computation from the model's
raw outputs (a direct ``model.apply`` per head, or the trainer's eval-mode logits), and on the
diagonal the task-aware accuracy is never below the task-agnostic one.
"""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import experiment
from sparse_cl_jax import metrics

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEWS = ("task_aware", "task_agnostic")


def load_config(name, num_tasks):
  spec = importlib.util.spec_from_file_location(
      f"cfg_views_{name}", os.path.join(_REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.progress = False
  c.num_tasks = num_tasks
  return c


def check_views(results, own_view):
  """Both views are written with their metrics; the run's matrix is its scenario's view."""
  for view in VIEWS:
    entry = results[view]
    assert set(entry) == {"accuracy_matrix", "acc", "bwt", "forgetting"}
    R = np.asarray(entry["accuracy_matrix"])
    assert entry["acc"] == pytest.approx(metrics.acc(R))
    assert entry["bwt"] == pytest.approx(metrics.bwt(R), nan_ok=True)
    assert entry["forgetting"] == pytest.approx(metrics.forgetting(R), nan_ok=True)
  assert results["accuracy_matrix"] == results[own_view]["accuracy_matrix"]
  assert results["acc"] == results[own_view]["acc"]
  aware = np.diag(results["task_aware"]["accuracy_matrix"])
  agnostic = np.diag(results["task_agnostic"]["accuracy_matrix"])
  assert (aware >= agnostic).all(), (aware, agnostic)
  assert (agnostic < aware).any()  # the views really differ
  return np.asarray(results["task_aware"]["accuracy_matrix"]), np.asarray(
      results["task_agnostic"]["accuracy_matrix"])


@pytest.fixture(scope="module")
def packnet_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("packnet_views")
  experiment.run(load_config("packnet", 5), str(workdir), print_summary=False)
  return json.loads((workdir / "results.json").read_text())


def test_packnet_writes_both_views(packnet_run):
  aware, agnostic = check_views(packnet_run, "task_aware")
  T = aware.shape[0]
  # Task-IL, task-agnostic: a head not trained yet is not among the candidates (above the
  # diagonal: 0); with one task seen, the argmax over its head's classes is the task-aware one.
  assert (agnostic[np.triu_indices(T, k=1)] == 0).all()
  assert agnostic[0, 0] == aware[0, 0]
  # The run's own figures did not move: the trace counts are those of one eval program.
  assert packnet_run["trace_counts"]["eval"] == 1


def test_llt_writes_both_views(tmp_path):
  experiment.run(load_config("llt", 5), str(tmp_path), print_summary=False)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["config"]["incremental"] == "class"
  aware, agnostic = check_views(results, "task_agnostic")
  assert agnostic[0, 0] == aware[0, 0]  # one task seen: its classes are all the classes seen
  assert (agnostic[np.triu_indices(5, k=1)] == 0).all()


def test_task_agnostic_of_a_multi_head_run_is_the_argmax_over_every_seen_head():
  """PackNet after two of five tasks: each task's task-agnostic accuracy from a direct model.apply of
  the latest task's view (every head, classes of the heads seen), against the trainer's."""
  trainer = experiment.build(load_config("packnet", 5))
  state = trainer.init_state()
  for t in range(2):
    trainer.begin_task(t)
    state = trainer.method.run_task(trainer, state, t)
  current = 1
  fp = trainer.method.forward_params(state.params, state.aux, state.method, jnp.int32(current),
                                     jnp.int32(current))
  variables = {"params": fp}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  K = trainer.stream.num_outputs
  for t in range(5):
    data = trainer.task_data(t, "test")
    n = int(data.n)
    x = trainer.stream.normalize(np.asarray(data.x)[:n])
    y = np.asarray(data.y)[:n]
    heads = [np.asarray(trainer.model.apply(variables, x, task=s, train=False))
             for s in range(current + 1)]
    usable = [np.where(trainer.stream.head_mask[s][None, :], h, -np.inf)
              for s, h in enumerate(heads)]
    pred = np.argmax(np.concatenate(usable, axis=1), axis=1)
    want = float(np.mean(pred == t * K + y)) if t <= current else 0.0
    got = trainer.accuracy(state, t, current=current, views=True)
    assert got["task_agnostic"] == pytest.approx(want, abs=1e-6), t
    assert got["task_aware"] == trainer.accuracy(state, t, current=current)


def test_task_aware_of_a_class_il_run_is_the_argmax_over_the_task_classes():
  """LLT (class-IL) after two of five tasks: task-aware accuracy from the eval-mode logits restricted to
  each task's own classes, against the trainer's."""
  trainer = experiment.build(load_config("llt", 5))
  state = trainer.init_state()
  for t in range(2):
    trainer.begin_task(t)
    state = trainer.method.run_task(trainer, state, t)
  current = 1
  for t in range(5):
    data = trainer.task_data(t, "test")
    n = int(data.n)
    logits = np.asarray(trainer.outputs(state, data, view_task=current)["logits"])[:n]
    logits = np.asarray(trainer.method.eval_logits(jnp.asarray(logits)))
    own = trainer.stream.task_mask[t]
    pred = np.argmax(np.where(own[None, :], logits, -np.inf), axis=1)
    want = float(np.mean(pred == np.asarray(data.y)[:n]))
    got = trainer.accuracy(state, t, current=current, views=True)
    assert got["task_aware"] == pytest.approx(want, abs=1e-6), t
    assert got["task_agnostic"] == trainer.accuracy(state, t, current=current)


def test_summaries_show_both_views(tmp_path):
  from sparse_cl_jax import logs  # pylint: disable=import-outside-toplevel
  from sparse_cl_jax import sweep  # pylint: disable=import-outside-toplevel
  views = {"task_aware": {"acc": 0.9, "bwt": -0.1}, "task_agnostic": {"acc": 0.4, "bwt": -0.3}}
  d = tmp_path / "pn"
  d.mkdir()
  (d / "results.json").write_text(json.dumps({
      "method": "packnet", "config": {"dataset": "digits"}, "accuracy_matrix": [[0.9]],
      "acc": 0.9, "bwt": -0.1, "forgetting": 0.0, "density_per_task": [0.4],
      "train_seconds": 3.0, "average_accuracy_curve": [0.9], **views}))
  table = logs.compare_table(logs.compare_rows([d]))
  assert "| ACC aware | ACC agnostic | BWT aware | BWT agnostic |" in table
  assert "| 0.9000 | 0.4000 | -0.1000 | -0.3000 |" in table
  entry = {"overrides": {"seed": 0}, "status": "pending"}
  sweep._finish_entry(entry, {"acc": 0.9, "bwt": -0.1, **views})  # pylint: disable=protected-access
  summary = sweep.summary_table({"grid": {"seed": [0]}, "cells": [entry]}).splitlines()
  assert summary[0] == "| cells | n | ACC | BWT | ACC aware | ACC agnostic | BWT aware | BWT agnostic |"
  assert summary[2] == "| all | 1 | 0.9000 | -0.1000 | 0.9000 | 0.4000 | -0.1000 | -0.3000 |"
