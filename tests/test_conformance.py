"""The conformance test every registered method passes (DESIGN.md, "Tests").

For each name in ``methods.REGISTRY`` the config ``configs/<name>.py:runlocal`` (a few seconds on
the embedded digits data) is run end to end, and:

* the run writes every results.json field and beats chance clearly on this easy stream;
* a method that promises no forgetting (module constant ``FORGETS_NOTHING = True``) has earlier
  tasks' test accuracies bit-identical after later tasks (R[i, j] == R[j, j] for i > j, BWT 0);
* a method that promises exact sparsity reports ``expected_density_per_task`` and hits it;
* the train and eval steps compile once for the whole stream (one trace per phase kind);
* a run stopped after task 1 and resumed from its checkpoint ends with the same accuracy matrix
  as the uninterrupted run; a one-task stream (single-task methods such as PrAC), which task 1
  finishes, is instead interrupted right after a checkpoint inside its task (in the second half
  of the task's checkpoints, so that finished operations are replayed) and must end with the same
  results, all of them.
"""

import importlib.util
import json
import os

from unittest import mock

import numpy as np
import pytest

from sparse_cl_jax import checkpoint
from sparse_cl_jax import experiment
from sparse_cl_jax import methods

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One xdist group per method, so that a method's runs share one worker (and its cached full run).
NAMES = [pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in sorted(methods.REGISTRY)]
REQUIRED_FIELDS = ("method", "config", "accuracy_matrix", "acc", "bwt", "fwt", "forgetting",
                   "density_per_task", "model_bytes", "train_seconds")


def load_config(name, arg="runlocal"):
  path = os.path.join(_REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.progress = False
  return config


def chance_of(results) -> float:
  """The accuracy of guessing: over a task's classes (task-IL) or over every class (class-IL)."""
  classes = results["tasks"]
  if results["config"]["incremental"] == "task":
    return float(np.mean([1.0 / len(c) for c in classes]))
  return 1.0 / sum(len(c) for c in classes)


class Interrupted(BaseException):
  """Ends a run inside its task, like a kill (not an Exception: nothing on the way catches it)."""


def saves_recorded(positions, stop_at=None):
  """Patches checkpoint saves to record (task, op, epoch); raises after saving ``stop_at``."""
  original = checkpoint.Checkpointer.save

  def save(self, step, state, meta):
    original(self, step, state, meta)
    positions.append((meta["task"], meta["op"], meta["epoch"]))
    if positions[-1] == stop_at:
      raise Interrupted(str(stop_at))

  return mock.patch.object(checkpoint.Checkpointer, "save", save)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      workdir = str(tmp_path_factory.mktemp(f"full_{name}"))
      positions = []
      with saves_recorded(positions):
        cache[name] = experiment.run(load_config(name), workdir, print_summary=False)
      with open(os.path.join(workdir, "results.json")) as f:
        cache[name]["_from_disk"] = json.load(f)
      cache[name]["_saves"] = positions
    return cache[name]

  return get


@pytest.mark.parametrize("name", NAMES)
def test_runs_reports_and_beats_chance(name, full_runs):
  r = full_runs(name)
  for field in REQUIRED_FIELDS:
    assert field in r["_from_disk"], field
  assert r["method"] == name
  R = np.asarray(r["accuracy_matrix"], dtype=float)
  T = R.shape[0]
  assert R.shape == (T, T) and np.all((R >= 0) & (R <= 1))
  chance = chance_of(r)
  assert r["acc"] > chance + 0.15, (r["acc"], chance)
  assert len(r["density_per_task"]) == T
  assert r["model_bytes"]["total"] > 0


@pytest.mark.parametrize("name", [
    p for p in NAMES if getattr(methods.module(p.values[0]), "FORGETS_NOTHING", False)])
def test_forgetting_promise(name, full_runs):
  R = np.asarray(full_runs(name)["accuracy_matrix"], dtype=float)
  for i in range(R.shape[0]):
    for j in range(i):
      assert R[i, j] == R[j, j], (i, j, R)
  assert full_runs(name)["bwt"] == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_sparsity_promise(name, full_runs):
  r = full_runs(name)
  if "expected_density_per_task" not in r:
    pytest.skip(f"{name} makes no exact sparsity promise")
  np.testing.assert_allclose(r["density_per_task"], r["expected_density_per_task"], atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_one_compile_per_phase_kind(name, full_runs):
  counts = full_runs(name)["trace_counts"]
  assert counts.get("run_steps", 0) <= 1 and counts.get("eval", 0) == 1, counts


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_task_1_gives_same_results(name, full_runs, tmp_path):
  config = load_config(name)
  workdir = str(tmp_path / "resumed")
  full = full_runs(name)
  if config.num_tasks > 1:
    assert experiment.run(config, workdir, stop_after_task=1, print_summary=False) is None
  else:  # Task 1 is the whole run: interrupt inside it instead.
    inside = [p for p in full["_saves"] if p[1] or p[2]]
    assert inside, f"{name}: a one-task run must checkpoint inside its task to be resumable"
    with saves_recorded([], stop_at=inside[len(inside) // 2]), pytest.raises(Interrupted):
      experiment.run(config, workdir, print_summary=False)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
  resumed = experiment.run(load_config(name), workdir, print_summary=False)
  np.testing.assert_array_equal(np.asarray(resumed["accuracy_matrix"]),
                                np.asarray(full["accuracy_matrix"]))
  if config.num_tasks == 1:
    skip = ("train_seconds", "trace_counts", "_from_disk", "_saves")
    assert (json.dumps({k: v for k, v in resumed.items() if k not in skip}, sort_keys=True,
                       default=str) ==
            json.dumps({k: v for k, v in full.items() if k not in skip}, sort_keys=True,
                       default=str))


# ------------------------------------------------------------------------------------------------
# The same promises with a BatchNorm model (the :runlocal presets of most methods have no norm
# layer, so evaluation in training mode or running statistics that leak between tasks would go
# unseen there).


@pytest.fixture(scope="module")
def bn_runs(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      workdir = str(tmp_path_factory.mktemp(f"bn_{name}"))
      cache[name] = experiment.run(bn_config(name), workdir, print_summary=False)
    return cache[name]

  return get


def bn_config(name):
  config = load_config(name)
  config.norm = methods.default_norm(name)  # 'task_batch' where a method isolates tasks
  if config.norm == "none":
    config.norm = "batch"
  return config


@pytest.mark.parametrize("name", NAMES)
def test_with_batchnorm_promises_hold_and_resume_is_identical(name, bn_runs, tmp_path):
  r = bn_runs(name)
  assert r["config"]["norm"] in ("batch", "task_batch")
  R = np.asarray(r["accuracy_matrix"], dtype=float)
  chance = chance_of(r)
  assert r["acc"] > chance + 0.1, (r["acc"], chance)
  if getattr(methods.module(name), "FORGETS_NOTHING", False):
    for i in range(R.shape[0]):
      for j in range(i):
        assert R[i, j] == R[j, j], (i, j, R)
  if "expected_density_per_task" in r:
    np.testing.assert_allclose(r["density_per_task"], r["expected_density_per_task"], atol=1e-12)
  config = bn_config(name)
  if config.num_tasks > 1:
    workdir = str(tmp_path / "resumed")
    assert experiment.run(config, workdir, stop_after_task=1, print_summary=False) is None
    resumed = experiment.run(bn_config(name), workdir, print_summary=False)
    np.testing.assert_array_equal(np.asarray(resumed["accuracy_matrix"]), R)
