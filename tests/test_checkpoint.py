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


def saved_once(path, fingerprint=FINGERPRINT, **kwargs):
  with checkpoint.Checkpointer(path, fingerprint=fingerprint, **kwargs) as ckpt:
    ckpt.save(0, {"x": jnp.ones(2)}, {})


def test_mismatched_fingerprint_names_keys(tmp_path):
  saved_once(tmp_path)
  changed = {**FINGERPRINT, "epochs": 3, "model": {"width": 16}}
  with pytest.raises(ValueError, match="different config") as info:
    checkpoint.Checkpointer(tmp_path, fingerprint=changed)
  message = str(info.value)
  assert "epochs 5 != 3" in message and "model.width 8 != 16" in message
  assert "lr" not in message and "--workdir" in message


def test_ignored_keys_are_not_compared(tmp_path):
  saved_once(tmp_path)
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
    assert not (tmp_path / "run.json").exists()  # Bound with the first checkpoint.
    ckpt.save(0, make_state(0), {"task": 0})
  assert previous is not None and previous.parent == tmp_path
  assert previous.name.startswith("previous-")
  # Everything moved aside except the lock file, which belongs to the workdir, not to a run.
  assert sorted(os.listdir(previous)) == [n for n in before if n != "run.lock"]
  assert (tmp_path / "run.lock").exists()
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


def test_fingerprint_binds_with_the_first_checkpoint_only(tmp_path):
  # An attempt that saved nothing (failed, or killed before its first checkpoint) binds nothing.
  checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT).close()
  assert not (tmp_path / "run.json").exists()
  changed = {**FINGERPRINT, "epochs": 3}
  checkpoint.Checkpointer(tmp_path, fingerprint=changed).close()
  # A run.json left without any checkpoint (as older versions wrote it) binds nothing either and
  # is replaced by the first save.
  (tmp_path / "run.json").write_text(json.dumps({"fingerprint": FINGERPRINT}))
  saved_once(tmp_path, changed)
  assert json.loads((tmp_path / "run.json").read_text())["fingerprint"] == changed
  # From then on the fingerprint is bound.
  with pytest.raises(ValueError, match="epochs 3 != 5"):
    checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT)
  # finish() binds too (results are the run's), even without a checkpoint.
  with checkpoint.Checkpointer(tmp_path / "f", fingerprint=FINGERPRINT) as ckpt:
    ckpt.finish({"acc": 0.5})
  assert json.loads((tmp_path / "f" / "run.json").read_text())["fingerprint"] == FINGERPRINT


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


# --------------------------------------------------------------------------------------------------
# Integrity (issue 16): checksums, corrupt steps set aside, run.json, the workdir lock.


def flip_bytes(path, at: float = 0.5, n: int = 4):
  """Overwrites ``n`` bytes of ``path`` at fraction ``at`` of its length (XOR 0x5A)."""
  data = bytearray(path.read_bytes())
  i = min(int(len(data) * at), len(data) - n)
  data[i:i + n] = bytes(b ^ 0x5A for b in data[i:i + n])
  path.write_bytes(bytes(data))


def largest_state_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def big_state(seed):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32), "b": jnp.ones(3)}


def snapshot(root):
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_checksums_catch_corrupt_array_data(tmp_path):
  # A flipped byte inside compressed array data is not detected by TensorStore itself (it would
  # restore as different numbers); the checksums written after the commit catch it.
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, big_state(0), {"task": 0})
    sums = json.loads((tmp_path / "checkpoints" / "0" / "checksums.json").read_text())
    assert sums["algorithm"] == "sha256"
    assert "meta/metadata" in sums["files"] and any(f.startswith("state/") for f in sums["files"])
    target = largest_state_file(tmp_path / "checkpoints" / "0")
    flip_bytes(target, at=0.3)
    with pytest.raises(checkpoint.reliability.CorruptCheckpointError) as info:
      ckpt.restore(0, like=big_state(0))
  name = target.relative_to(tmp_path / "checkpoints" / "0").as_posix()
  assert info.value.step == 0 and info.value.file == name
  assert str(info.value) == (f"checkpoint step 0 in {tmp_path / 'checkpoints'} is corrupt: {name}: "
                             "checksum mismatch (changed after it was written)")


def test_corrupt_steps_set_aside_newest_valid_restored(tmp_path, caplog):
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    for step in range(3):
      ckpt.save(step, make_state(step), {"task": step})
  flip_bytes(largest_state_file(tmp_path / "checkpoints" / "2"))
  flip_bytes(tmp_path / "checkpoints" / "1" / "meta" / "metadata", at=0.0, n=1)
  corrupted = {s: snapshot(tmp_path / "checkpoints" / str(s)) for s in (1, 2)}
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    with caplog.at_level("WARNING"):
      step, state, meta = ckpt.restore_newest_valid(like=make_state(0))
    assert step == 0 and meta == {"task": 0} and ckpt.all_steps() == [0]
    assert_bit_identical(state, make_state(0))
    ckpt.save(1, make_state(1), {"task": 1})  # The step numbers of set-aside steps are free again.
  lines = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
  assert len(lines) == 2 and all("\n" not in line for line in lines)
  assert lines[0].startswith("checkpoint step 2 ") and ": state/" in lines[0]
  assert "trying step 1" in lines[0]
  assert lines[1].startswith("checkpoint step 1 ")
  assert "meta/metadata: checksum mismatch" in lines[1]
  # Set aside as they were, never deleted.
  moved = sorted(os.listdir(tmp_path / "corrupt-checkpoints"))
  assert [m.split("-")[1] for m in moved] == ["1", "2"]
  for m in moved:
    assert snapshot(tmp_path / "corrupt-checkpoints" / m) == corrupted[int(m.split("-")[1])]


def test_no_valid_checkpoint_refused_in_one_line(tmp_path):
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    for step in range(2):
      ckpt.save(step, make_state(step), {"task": step})
  for step in range(2):
    flip_bytes(largest_state_file(tmp_path / "checkpoints" / str(step)))
  for _ in range(2):  # Refused again later: the run never silently restarts from scratch.
    with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt, \
         pytest.raises(checkpoint.reliability.NoValidCheckpointError) as info:
      ckpt.restore_newest_valid(like=make_state(0))
    message = str(info.value)
    assert "\n" not in message and "no valid checkpoint" in message and "--overwrite" in message
  assert len(os.listdir(tmp_path / "corrupt-checkpoints")) == 2
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT, overwrite=True) as ckpt:
    assert ckpt.restore_newest_valid(like=make_state(0)) is None  # A fresh start...
    assert (ckpt.previous_dir / "corrupt-checkpoints").is_dir()  # ...with the old run kept.


# When TensorStore fails a read, orbax's per-call asyncio loop is closed before a pending callback
# of TensorStore's fires ("Event loop is closed", ignored in a thread): orbax's noise, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unverified_step_reports_orbax_errors_in_one_line(tmp_path):
  # A process killed between orbax's commit and the checksums leaves a step without them; it is
  # restored unverified, and read errors still name the step and the file.
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    for step in range(3):
      ckpt.save(step, make_state(step), {"task": step})
  for step in (1, 2):
    (tmp_path / "checkpoints" / str(step) / "checksums.json").unlink()
  (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text('{"task": ')
  flip_bytes(tmp_path / "checkpoints" / "1" / "state" / "manifest.ocdbt")
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    with pytest.raises(checkpoint.reliability.CorruptCheckpointError) as info:
      ckpt.restore(2, like=make_state(0))
    assert info.value.file == "meta/metadata" and "step 2" in str(info.value)
    with pytest.raises(checkpoint.reliability.CorruptCheckpointError) as info:
      ckpt.restore(1, like=make_state(0))
    assert info.value.file.startswith("state") and "\n" not in str(info.value)
    step, state, _ = ckpt.restore_newest_valid(like=make_state(0))
  assert step == 0
  assert_bit_identical(state, make_state(0))


def test_tree_mismatch_is_not_corruption(tmp_path):
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, make_state(0), {})
    like = make_state(0)
    like["extra"] = jnp.zeros(2)
    with pytest.raises(ValueError, match="extra: in `like` but not in the checkpoint"):
      ckpt.restore_newest_valid(like=like)
    assert ckpt.all_steps() == [0] and not (tmp_path / "corrupt-checkpoints").exists()


def test_corrupt_run_json_refused_in_one_line(tmp_path):
  saved_once(tmp_path)
  (tmp_path / "run.json").write_text('{"fingerprint": {"method": "pack')
  with pytest.raises(checkpoint.reliability.CorruptCheckpointError) as info:
    checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT)
  message = str(info.value)
  assert "\n" not in message and "run.json is unreadable" in message
  assert "--overwrite" in message
  # The refusal released the lock; --overwrite moves the unreadable file aside.
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT, overwrite=True) as ckpt:
    assert (ckpt.previous_dir / "run.json").read_text().startswith('{"fingerprint": {"method"')


def test_atomic_json_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  checkpoint._write_json_atomic(path, {"acc": 0.5})

  def killed(fd):
    raise KeyboardInterrupt("killed while writing")

  monkeypatch.setattr(checkpoint.os, "fsync", killed)
  with pytest.raises(KeyboardInterrupt):
    checkpoint._write_json_atomic(path, {"acc": 0.75})
  monkeypatch.undo()
  assert json.loads(path.read_text()) == {"acc": 0.5}
  assert os.listdir(tmp_path) == ["results.json"]  # No partial temporary file left.


def test_second_open_of_a_workdir_refused_naming_the_process(tmp_path):
  first = checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT)
  with pytest.raises(checkpoint.reliability.WorkdirInUseError) as info:
    checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT)
  message = str(info.value)
  assert "\n" not in message and f"in use by process {os.getpid()} on " in message
  assert "another --workdir" in message
  with pytest.raises(checkpoint.reliability.WorkdirInUseError):  # overwrite moves nothing
    checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT, overwrite=True)
  assert not [p for p in os.listdir(tmp_path) if p.startswith("previous-")]
  first.close()
  assert (tmp_path / "run.lock").read_text() == ""  # Released cleanly.
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as second:
    assert second._lock.previous is None
    second.save(0, {"x": jnp.ones(2)}, {})  # binds the fingerprint
  # A refused open (here: another config) releases the lock at once.
  with pytest.raises(ValueError, match="different config"):
    checkpoint.Checkpointer(tmp_path, fingerprint={**FINGERPRINT, "epochs": 1})
  checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT).close()


def test_lock_left_by_an_ended_process_does_not_block(tmp_path):
  checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT).close()
  # What a killed holder leaves: its details in the file, but no flock (the kernel dropped it).
  stale = {"pid": 999999, "host": "elsewhere", "started": "2024-01-01T00:00:00", "command": "x"}
  (tmp_path / "run.lock").write_text(json.dumps(stale))
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    assert ckpt._lock.previous == stale
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


def test_dropped_checkpointer_releases_the_lock(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT)
  ckpt._manager.close()
  del ckpt  # Never closed: the lock goes with the object.
  checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT).close()
