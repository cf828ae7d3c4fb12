"""End-to-end harness tests: runs, resumption, refusals, results, traces, TFDS and sharding."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import checkpoint
from sparse_cl_jax import config as config_lib
from sparse_cl_jax import experiment
from sparse_cl_jax import logs
from sparse_cl_jax import reliability
from sparse_cl_jax import train

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg="runlocal"):
  spec = importlib.util.spec_from_file_location(
      f"cfg_{name}", os.path.join(_REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.progress = False
  return c


def tiny(name, **overrides):
  c = load_config(name)
  c.num_tasks = 2
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_two_task_run_writes_results(tmp_path):
  r = experiment.run(tiny("finetune"), str(tmp_path), print_summary=False)
  with open(tmp_path / "results.json") as f:
    disk = json.load(f)
  for field in ("method", "config", "accuracy_matrix", "acc", "bwt", "fwt", "forgetting",
                "density_per_task", "model_bytes", "train_seconds"):
    assert field in disk
  R = np.asarray(disk["accuracy_matrix"])
  assert R.shape == (2, 2) and ((R >= 0) & (R <= 1)).all()
  assert disk["acc"] == pytest.approx(R[-1].mean())
  assert disk["bwt"] == pytest.approx(R[1, 0] - R[0, 0])
  assert set(disk["fwt"]) == {"gem", "subnetwork"}
  assert disk["config"]["epochs"] == 2 and disk["method"] == "finetune"
  assert disk["train_seconds"] > 0 and disk["model_bytes"]["total"] > 0
  assert r["acc"] > 0.5  # 5-class tasks: chance is 0.2


def test_class_incremental_run(tmp_path):
  r = experiment.run(tiny("finetune", incremental="class"), str(tmp_path), print_summary=False)
  R = np.asarray(r["accuracy_matrix"])
  # After task 1 only task 1's classes can be predicted: task 2 (unseen classes) scores 0.
  assert R[0, 1] == 0.0 and R[0, 0] > 0.4  # chance 0.2


def test_one_trace_per_phase_kind_across_tasks(tmp_path):
  c = tiny("packnet")
  c.num_tasks = 5
  r = experiment.run(c, str(tmp_path), print_summary=False)
  # Train and retrain phases of five tasks share one compiled chunk; val and test one eval.
  assert r["trace_counts"] == {"run_steps": 1, "train_step": 1, "eval": 1}


def test_packnet_earlier_weights_and_outputs_bit_identical():
  c = tiny("packnet")
  trainer = experiment.build(c)
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.method.run_task(trainer, state, 0)
  data = trainer.task_data(0, "test")
  x = trainer.stream.normalize(data.x[:64])

  def view_and_logits(state, current):
    p = trainer.method.forward_params(state.params, state.aux, state.method, jnp.int32(0),
                                      jnp.int32(current))
    logits = trainer.model.apply({"params": p, "batch_stats": state.batch_stats}
                                 if state.batch_stats else {"params": p}, x, task=0, train=False)
    return jax.device_get(p), np.asarray(logits)

  p0, l0 = view_and_logits(state, 0)
  p0 = jax.tree.map(np.copy, p0)
  trainer.begin_task(1)
  state = trainer.method.run_task(trainer, state, 1)
  p1, l1 = view_and_logits(state, 1)
  # Every weight task 1 owns (all it computes with) is bit-identical after task 2...
  own = jax.device_get(state.method["own"])
  for a, b, o in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), jax.tree.leaves(own)):
    sel = np.asarray(o) == 1
    assert sel.any()
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32)[sel],
                                  np.asarray(b).view(np.uint32)[sel])
  # ...and so are its outputs.
  np.testing.assert_array_equal(l0.view(np.uint32), l1.view(np.uint32))
  # And task 2 really trained something new.
  own = jax.device_get(state.method["own"])
  assert any((np.asarray(o) == 2).any() for o in jax.tree.leaves(own))


def test_initial_params_cached_and_untouched_by_training():
  c = tiny("individual")
  trainer = experiment.build(c)
  init = trainer.initial_params()
  assert trainer.initial_params() is init  # placed once
  expected = jax.tree.map(np.array, trainer.ctx.params)
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.method.run_task(trainer, state, 0)  # donates the state it trains
  for a, b in zip(jax.tree.leaves(trainer.initial_params()), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert any(not np.array_equal(np.asarray(a), b)
             for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)))


def test_resume_after_task_gives_same_matrix(tmp_path):
  c = tiny("packnet")
  full = experiment.run(c, str(tmp_path / "full"), print_summary=False)
  assert experiment.run(tiny("packnet"), str(tmp_path / "r"), stop_after_task=1,
                        print_summary=False) is None
  resumed = experiment.run(tiny("packnet"), str(tmp_path / "r"), print_summary=False)
  np.testing.assert_array_equal(resumed["accuracy_matrix"], full["accuracy_matrix"])


def test_resume_inside_a_task_gives_same_matrix(tmp_path, monkeypatch):
  c = tiny("packnet", checkpoint_every_epochs=1)
  c.epochs = 3
  full = experiment.run(c, str(tmp_path / "full"), print_summary=False)

  original = checkpoint.Checkpointer.save
  calls = {"n": 0}

  def crash_after_third_save(self, step, state, meta):
    original(self, step, state, meta)
    calls["n"] += 1
    if calls["n"] == 3:  # task 1: epochs 1, 2 of training, then the retrain... stop mid-task
      raise KeyboardInterrupt("simulated preemption")

  monkeypatch.setattr(checkpoint.Checkpointer, "save", crash_after_third_save)
  c2 = tiny("packnet", checkpoint_every_epochs=1)
  c2.epochs = 3
  with pytest.raises(KeyboardInterrupt):
    experiment.run(c2, str(tmp_path / "r"), print_summary=False)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original)
  assert (tmp_path / "r" / "checkpoints" / "3" / "meta" / "metadata").is_file()  # on disk
  resumed = experiment.run(c2, str(tmp_path / "r"), print_summary=False)
  np.testing.assert_array_equal(resumed["accuracy_matrix"], full["accuracy_matrix"])
  # The per-epoch log of the resumed run lists every epoch once, with the same values.
  keys = ("epoch_index", "task", "phase", "operation", "epoch", "loss", "accuracy",
          "learning_rate", "density")
  clean = [tuple(r[k] for k in keys) for r in logs.read_metrics(tmp_path / "full")]
  assert [tuple(r[k] for k in keys) for r in logs.read_metrics(tmp_path / "r")] == clean
  phases = {r[2]: r[-1] for r in clean if r[1] == 1}
  assert phases["train"] == 1.0 and phases["retrain"] < 0.5  # PackNet prunes 60% before retraining


def test_mismatched_checkpoint_refused(tmp_path):
  experiment.run(tiny("packnet"), str(tmp_path), stop_after_task=1, print_summary=False)
  other = tiny("packnet")
  other.epochs = 5
  with pytest.raises(ValueError, match=r"different config: epochs 2 != 5"):
    experiment.run(other, str(tmp_path), print_summary=False)


def test_failed_attempt_does_not_bind_its_workdir(tmp_path):
  # The first attempt fails before its first checkpoint (the lr x1e9 of epoch 2 diverges)...
  with pytest.raises(reliability.DivergenceError, match="no checkpoint was written"):
    experiment.run(tiny("finetune", lr_milestones=(0.5,), lr_decay=1e9), str(tmp_path),
                   print_summary=False)
  assert not (tmp_path / "run.json").exists()
  first_log = (tmp_path / "metrics.csv").read_text()
  assert len(logs.read_metrics(tmp_path)) == 1  # epoch 1 was logged
  # ...so the rerun with the fix runs in the same workdir; the failed attempt's log is kept aside.
  r = experiment.run(tiny("finetune"), str(tmp_path), print_summary=False)
  assert r["config"]["learning_rate"] == 0.05
  (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("unfinished-")]
  assert (aside / "metrics.csv").read_text() == first_log
  # A finished run with another seed is refused, naming the differing field.
  other = tiny("finetune", seed=1)
  with pytest.raises(checkpoint.RunFinishedError,
                     match=r"already finished by a different config: seed 0 != 1 "):
    experiment.run(other, str(tmp_path), print_summary=False)


def test_workdir_that_is_a_file_refused(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(ValueError, match=r"is a file, not a folder; .* --workdir"):
    experiment.run(tiny("finetune"), str(tmp_path / "f"), print_summary=False)


def test_finished_run_not_overwritten(tmp_path):
  experiment.run(tiny("finetune"), str(tmp_path), print_summary=False)
  before = (tmp_path / "results.json").read_text()
  with pytest.raises(checkpoint.RunFinishedError, match="already finished"):
    experiment.run(tiny("finetune"), str(tmp_path), print_summary=False)
  assert (tmp_path / "results.json").read_text() == before
  experiment.run(tiny("finetune"), str(tmp_path), overwrite=True, print_summary=False)
  moved = [p for p in os.listdir(tmp_path) if p.startswith("previous-")]
  assert len(moved) == 1
  assert (tmp_path / moved[0] / "results.json").read_text() == before


@pytest.mark.parametrize("field,value,match", [
    ("dataset", "imagenet", "config.dataset='imagenet' is not valid"),
    ("incremental", "domain", "config.incremental='domain'"),
    ("epochs", -1, "config.epochs=-1 must be an integer >= 1"),
    ("epochs", 0, "config.epochs=0 must be an integer >= 1"),
    ("num_tasks", 3, r"config.num_tasks=3 does not divide the 10 classes of "
     r"config.dataset='digits' .*choose num_tasks from \[1, 2, 5, 10\]"),
    ("batch_size", 0, "config.batch_size=0 must be an integer >= 1"),
    ("class_order", "a,b", "config.class_order='a,b'"),
])
def test_bad_config_values_named(field, value, match, tmp_path):
  c = tiny("finetune")
  setattr(c, field, value)
  with pytest.raises(ValueError, match=match):
    experiment.run(c, str(tmp_path), print_summary=False)
  assert not os.listdir(tmp_path) or not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("key,match", [
    ("fc_layer", r"model_kwargs.fc_layer: model 'mlp' has no field 'fc_layer'"),
    ("norm", r"model_kwargs.norm is set by the harness from config.norm; set --config.norm"),
])
def test_bad_model_kwargs_named(key, match, tmp_path):
  c = tiny("finetune")
  c.model_kwargs[key] = True
  with pytest.raises(ValueError, match=match):
    experiment.run(c, str(tmp_path), print_summary=False)


def test_cpg_cifar100_preset_builds_vgg_with_fc_layers():
  import types as pytypes
  c = load_config("cpg", "cifar100")
  stream = pytypes.SimpleNamespace(incremental="task", num_tasks=20, num_outputs=5)
  model = experiment.build_model(c, stream)
  assert model.fc_layers and model.num_heads == 20
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), task=0,
                                        train=False))
  # Two FC-4096 layers at the maximum width (sqrt(1.5) x 4096 units) before the heads.
  width = round(4096 * 1.5 ** 0.5)
  assert v["params"]["dense_0"]["kernel"].shape[-1] == width
  assert v["params"]["dense_1"]["kernel"].shape == (width, width)
  assert v["params"]["head"]["kernel"].shape == (20, width, 5)


def test_tfds_mnist_on_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  c = tiny("finetune", dataset="mnist")
  with tfds.testing.mock_data(num_examples=60):
    r = experiment.run(c, str(tmp_path), print_summary=False)
  assert np.asarray(r["accuracy_matrix"]).shape == (2, 2)
  assert r["config"]["dataset"] == "mnist"


def test_sharded_run_matches_single_device(tmp_path):
  assert jax.local_device_count() >= 4, "conftest should emulate 4 CPU devices"
  c1 = tiny("finetune", batch_size=32, eval_batch_size=100)
  one = experiment.build(c1)
  c4 = tiny("finetune", batch_size=32, eval_batch_size=100, num_devices=4)
  four = experiment.build(c4)
  assert four.mesh is not None and four.mesh.devices.size == 4
  results = []
  for trainer in (one, four):
    state = trainer.init_state()
    rows = []
    for t in range(2):
      trainer.begin_task(t)
      state = trainer.method.run_task(trainer, state, t)
      rows.append(trainer.accuracy_row(state, t))
    results.append((jax.device_get(state.params), np.asarray(rows)))
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(results[0][1], results[1][1], atol=0.02)
  leaf = jax.tree.leaves(four.init_state().params)[0]
  assert len(leaf.sharding.device_set) == 4


def test_launcher_with_flag_overrides(tmp_path):
  cmd = [sys.executable, os.path.join(_REPO, "experiments", "main.py"),
         f"--config={os.path.join(_REPO, 'configs', 'finetune.py')}:runlocal",
         f"--workdir={tmp_path}", "--config.num_tasks=2", "--config.epochs=1",
         "--config.progress=False"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ACC" in out.stdout and "BWT" in out.stdout
  with open(tmp_path / "results.json") as f:
    r = json.load(f)
  assert r["config"]["epochs"] == 1 and r["config"]["num_tasks"] == 2
  # Where everything is: printed at the end, and there.
  assert f"run directory {tmp_path}" in out.stdout
  for name in ("results.json", "metrics.csv", "tensorboard", "accuracy_matrix.png",
               "average_accuracy.png", "training.png"):
    assert name in out.stdout
  assert (tmp_path / "plots" / "accuracy_matrix.png").stat().st_size > 0
  assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
  assert len(logs.read_metrics(tmp_path)) == 2  # one epoch per task
  assert "TPU" not in out.stderr  # no INFO line about backends that are not installed
  bad = subprocess.run(cmd[:-3] + ["--config.incremental=domain"], capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "config.incremental='domain'" in bad.stderr


def test_lr_schedule():
  assert train.lr_for_epoch(0.1, 0, 10, (0.5, 0.75), 0.1) == pytest.approx(0.1)
  assert train.lr_for_epoch(0.1, 5, 10, (0.5, 0.75), 0.1) == pytest.approx(0.01)
  assert train.lr_for_epoch(0.1, 8, 10, (0.5, 0.75), 0.1) == pytest.approx(0.001)
  assert config_lib.class_order(config_lib.base("x")) == "natural"


def test_val_accuracy_matrix_counts_validation_examples(tmp_path):
  # Every validation accuracy is (correct examples) / (the task's validation examples): times
  # n_val it is a whole number, which the test accuracies (over n_test examples) are not.
  config = load_config("finetune")
  r = experiment.run(config, str(tmp_path / "run"), print_summary=False)
  stream = experiment.build_stream(config)
  V = np.asarray(r["val_accuracy_matrix"]) * np.asarray(stream.n_val)[None, :]
  R = np.asarray(r["accuracy_matrix"]) * np.asarray(stream.n_val)[None, :]
  np.testing.assert_allclose(V, np.round(V), atol=1e-6)
  assert not np.allclose(R, np.round(R), atol=1e-6)
