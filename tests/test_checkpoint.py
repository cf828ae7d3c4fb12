"""Tests for sparse_cl_jax.checkpoint: round trips, refusals, atomicity."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_cl_jax import checkpoint

FINGERPRINT = {"method": "packnet", "epochs": 5, "lr": 0.1, "model": {"width": 8},
               "progress_bar": True}


def make_state(seed: int = 0):
  """A nested state with float32, int32, bool and uint32 leaves plus an optax Adam state."""
  rng = np.random.default_rng(seed)
  params = {
      "dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
      "head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
  }
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)
  grads = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
  _, opt_state = opt.update(grads, opt_state, params)  # Nonzero moments and count.
  return {
      "params": params,
      "opt_state": opt_state,
      "masks": jax.tree.map(lambda p: p > 0, params),
      "ownership": jax.tree.map(lambda p: jnp.asarray(rng.integers(0, 3, p.shape), jnp.int32),
                                params),
      "key": jax.random.key_data(jax.random.key(seed)),
      "task": jnp.int32(seed),
  }


def assert_bit_identical(a, b):
  leaves_a, treedef_a = jax.tree.flatten(a)
  leaves_b, treedef_b = jax.tree.flatten(b)
  assert treedef_a == treedef_b
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def test_round_trip_bit_identical(tmp_path):
  state = make_state(1)
  meta = {"task": 2, "phase": "prune", "epoch": 7, "R": [[0.5, float("nan")], [0.25, 0.75]]}
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(3, state, meta)
    assert ckpt.latest_step() == 3
  # A fresh object (as after a restart) restores from an abstract tree.
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    assert ckpt.latest_step() == 3
    restored, restored_meta = ckpt.restore(like=jax.eval_shape(lambda: make_state(0)))
  assert_bit_identical(state, restored)
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert int(restored["opt_state"][0].count) == 1
  assert restored["masks"]["dense_0"]["kernel"].dtype == jnp.bool_
  assert restored["key"].dtype == jnp.uint32
  assert restored_meta["task"] == 2 and restored_meta["phase"] == "prune"
  assert restored_meta["R"][1] == [0.25, 0.75] and np.isnan(restored_meta["R"][0][1])
  leaf = restored["params"]["dense_0"]["kernel"]
  assert isinstance(leaf, jax.Array) and leaf.devices() == {jax.devices()[0]}
  assert json.loads((tmp_path / "run.json").read_text())["fingerprint"] == FINGERPRINT


def test_steps_keep_latest_and_restore_older(tmp_path):
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT, max_to_keep=2) as ckpt:
    for step in range(4):
      ckpt.save(step, make_state(step), {"task": step})
    assert ckpt.latest_step() == 3
    assert ckpt.all_steps() == [2, 3]
    state, meta = ckpt.restore(2, like=make_state(0))
    assert_bit_identical(state, make_state(2))
    assert meta == {"task": 2}
    with pytest.raises(ValueError, match="latest step 3"):
      ckpt.save(3, make_state(0), {})
    with pytest.raises(FileNotFoundError, match="step 0"):
      ckpt.restore(0, like=make_state(0))


def test_restore_into_sharded_like(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  state = {"w": jnp.arange(8, dtype=jnp.float32), "b": jnp.ones((2, 2), jnp.int32)}
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, state, {})
    like = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding),
            "b": jax.ShapeDtypeStruct((2, 2), jnp.int32)}
    restored, _ = ckpt.restore(like=like)
  assert restored["w"].sharding == sharding
  assert restored["b"].devices() == {jax.devices()[0]}
  assert_bit_identical(state, restored)


def test_numpy_leaves_and_empty_nodes(tmp_path):
  state = {"a": np.arange(3, dtype=np.float32), "empty": optax.EmptyState(), "none": None,
           "nested": [np.array(True), {"x": np.uint32(7)}]}
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, state, {})
    restored, _ = ckpt.restore(like=state)
  assert isinstance(restored["empty"], optax.EmptyState) and restored["none"] is None
  assert_bit_identical(state, restored)


def test_keys_with_dots_do_not_alias(tmp_path):
  state = {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, state, {})
    restored, _ = ckpt.restore(like=state)
  assert_bit_identical(state, restored)


def test_mismatched_fingerprint_names_keys(tmp_path):
  checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT).close()
  changed = {**FINGERPRINT, "epochs": 3, "model": {"width": 16}}
  with pytest.raises(ValueError, match="different config") as info:
    checkpoint.Checkpointer(tmp_path, fingerprint=changed)
  message = str(info.value)
  assert "epochs 5 != 3" in message and "model.width 8 != 16" in message
  assert "lr" not in message and "--workdir" in message


def test_ignored_keys_are_not_compared(tmp_path):
  checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT).close()
  other = {**FINGERPRINT, "progress_bar": False}
  checkpoint.Checkpointer(tmp_path, fingerprint=other, ignore_keys=("progress_bar",)).close()
  del other["progress_bar"]
  checkpoint.Checkpointer(tmp_path, fingerprint=other, ignore_keys=("progress_bar",)).close()
  with pytest.raises(ValueError, match="progress_bar"):
    checkpoint.Checkpointer(tmp_path, fingerprint=other)


def test_mismatched_tree_names_paths(tmp_path):
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, make_state(0), {})
    like = make_state(0)
    like["params"]["dense_0"]["kernel"] = jnp.zeros((5, 3), jnp.float32)  # Shape.
    like["masks"]["head"]["kernel"] = jnp.zeros((3, 2), jnp.int32)  # Dtype.
    del like["ownership"]["head"]  # Missing from like.
    like["extra"] = jnp.zeros(2)  # Missing from the checkpoint.
    with pytest.raises(ValueError, match="does not match") as info:
      ckpt.restore(like=like)
  message = str(info.value)
  assert "params/dense_0/kernel: shape (4, 3)" in message
  assert "masks/head/kernel: dtype bool" in message
  assert "ownership/head/kernel: in the checkpoint but not in `like`" in message
  assert "extra: in `like` but not in the checkpoint" in message


def test_finished_run_refused_then_moved_aside(tmp_path):
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, make_state(0), {"task": 0})
    ckpt.finish({"acc": np.float32(0.5), "bwt": float("nan"), "R": np.eye(2)})
    assert ckpt.is_finished()
  results = json.loads((tmp_path / "results.json").read_text())
  assert results == {"acc": 0.5, "bwt": None, "R": [[1.0, 0.0], [0.0, 1.0]]}
  before = sorted(os.listdir(tmp_path))

  with pytest.raises(checkpoint.RunFinishedError, match="already finished") as info:
    checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT)
  assert "results.json" in str(info.value) and "--overwrite" in str(info.value)
  assert sorted(os.listdir(tmp_path)) == before  # Nothing touched.

  changed = {**FINGERPRINT, "epochs": 1}
  with checkpoint.Checkpointer(tmp_path, fingerprint=changed, overwrite=True) as ckpt:
    assert not ckpt.is_finished() and ckpt.latest_step() is None
    previous = ckpt.previous_dir
  assert previous is not None and previous.parent == tmp_path
  assert previous.name.startswith("previous-")
  assert sorted(os.listdir(previous)) == before
  assert json.loads((previous / "results.json").read_text())["acc"] == 0.5
  assert (previous / "checkpoints" / "0").is_dir()
  assert json.loads((tmp_path / "run.json").read_text())["fingerprint"]["epochs"] == 1


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, make_state(0), {"task": 0})
    # Refused before orbax is called.
    with pytest.raises(TypeError, match="bad"):
      ckpt.save(1, {"bad": np.array(["a", "b"])}, {})
    # Fails inside orbax, mid-save, after its temporary directory was created.
    monkeypatch.setattr(checkpoint, "_host_leaf", lambda path, x: x)
    with pytest.raises(ValueError):  # Raised by tensorstore through orbax.
      ckpt.save(1, {"bad": np.array([object(), object()], dtype=object)}, {})
    monkeypatch.undo()
    assert ckpt.latest_step() == 0
    state, meta = ckpt.restore(like=make_state(0))
    assert_bit_identical(state, make_state(0))
    assert meta == {"task": 0}
    ckpt.save(1, make_state(1), {"task": 1})  # Still usable, same step number.
    assert ckpt.all_steps() == [0, 1]
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    state, _ = ckpt.restore(like=make_state(0))
  assert_bit_identical(state, make_state(1))


def test_interrupted_save_leftovers_are_ignored(tmp_path):
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, make_state(0), {"task": 0})
  # What a crash mid-save leaves behind: a half-written temporary step directory.
  leftover = tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "partial").write_bytes(b"\0" * 10)
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    assert ckpt.latest_step() == 0
    state, _ = ckpt.restore(like=make_state(0))
    assert_bit_identical(state, make_state(0))
    ckpt.save(1, make_state(1), {"task": 1})
    assert ckpt.latest_step() == 1


def test_checkpoints_without_run_json_refused(tmp_path):
  (tmp_path / "checkpoints" / "0").mkdir(parents=True)
  with pytest.raises(ValueError, match="run.json"):
    checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT)


def test_bad_inputs(tmp_path):
  with pytest.raises(TypeError, match="fingerprint"):
    checkpoint.Checkpointer(tmp_path / "a", fingerprint={"f": object()})
  with checkpoint.Checkpointer(tmp_path / "b", fingerprint=FINGERPRINT) as ckpt:
    with pytest.raises(TypeError, match="PRNG key"):
      ckpt.save(0, {"key": jax.random.key(0)}, {})
    with pytest.raises(TypeError, match="meta"):
      ckpt.save(0, {"x": jnp.ones(2)}, {"when": object()})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore(like={"x": jnp.ones(2)})
