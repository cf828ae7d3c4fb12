"""Tests for sparse_cl_jax.checkpoint: round trips, refusals, atomicity."""

import hashlib
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
    monkeypatch.setattr(checkpoint.trees, "host_leaf", lambda path, x: x)
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
def test_orbax_read_errors_name_step_and_file_in_one_line(tmp_path):
  # Files that pass their checksums but that orbax / TensorStore cannot read (here: rewritten, and
  # their checksums recomputed, as if they had been written that way): the error still names the
  # step and the file, and the step is set aside like any corrupt one.
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    for step in range(3):
      ckpt.save(step, make_state(step), {"task": step})
  (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text('{"task": ')
  flip_bytes(tmp_path / "checkpoints" / "1" / "state" / "manifest.ocdbt")
  for step in (1, 2):
    checkpoint.checksums.write(tmp_path / "checkpoints" / str(step), ("state", "meta"))
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
  checkpoint.jsonfiles.write_json_atomic(path, {"acc": 0.5})

  def killed(fd):
    raise KeyboardInterrupt("killed while writing")

  monkeypatch.setattr(os, "fsync", killed)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.jsonfiles.write_json_atomic(path, {"acc": 0.75})
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


# --------------------------------------------------------------------------------------------------
# An unreadable or missing checksums.json is never restored unchecked.


def two_steps(path):
  with checkpoint.Checkpointer(path, fingerprint=FINGERPRINT) as ckpt:
    for step in range(2):
      ckpt.save(step, make_state(step), {"task": step})
  return path / "checkpoints" / "1"


def only_meta_listed(step_dir):
  sums = json.loads((step_dir / "checksums.json").read_text())
  sums["files"] = {k: v for k, v in sums["files"].items() if k.startswith("meta/")}
  return json.dumps(sums)


BAD_CHECKSUMS = {  # name: the new text of checksums.json, from the step directory
    "corrupt JSON": lambda d: '{"algorithm": "sha256", "files": {"meta/metadata": "ab',
    "truncated": lambda d: (d / "checksums.json").read_text()[:40],
    "empty file": lambda d: "",
    "not UTF-8": lambda d: "\udcff",
    "a list": lambda d: "[]",
    "null": lambda d: "null",
    "files a list": lambda d: '{"algorithm": "sha256", "files": []}',
    "files empty": lambda d: '{"algorithm": "sha256", "files": {}}',
    "no algorithm": lambda d: json.dumps({"files": json.loads(
        (d / "checksums.json").read_text())["files"]}),
    "digest a number": lambda d: '{"algorithm": "sha256", "files": {"meta/metadata": 5}}',
    "only meta listed": only_meta_listed,
    "a directory": None,
}


@pytest.mark.parametrize("bad", sorted(BAD_CHECKSUMS))
def test_unreadable_checksums_set_aside_and_older_restored(bad, tmp_path, caplog):
  step_dir = two_steps(tmp_path)
  path = step_dir / "checksums.json"
  if BAD_CHECKSUMS[bad] is None:
    path.unlink()
    path.mkdir()
  else:
    text = BAD_CHECKSUMS[bad](step_dir)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
  corrupted = snapshot(step_dir)
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    with pytest.raises(checkpoint.reliability.CorruptCheckpointError) as info:
      ckpt.restore(1, like=make_state(0))
    file = info.value.file
    assert info.value.step == 1 and (file.startswith("state/") if bad == "only meta listed"
                                     else file == "checksums.json")
    with caplog.at_level("WARNING"):
      step, state, meta = ckpt.restore_newest_valid(like=make_state(0))
  assert step == 0 and meta == {"task": 0}
  assert_bit_identical(state, make_state(0))
  lines = [r.getMessage() for r in caplog.records if "checkpoint step" in r.getMessage()]
  assert len(lines) == 1 and "\n" not in lines[0]
  assert lines[0].startswith(f"checkpoint step 1 in {tmp_path / 'checkpoints'} is corrupt: {file}: ")
  assert "trying step 0" in lines[0]
  [moved] = os.listdir(tmp_path / "corrupt-checkpoints")
  assert moved.startswith("step-1-") and snapshot(tmp_path / "corrupt-checkpoints" / moved) == corrupted


def test_step_without_checksums_is_incomplete_and_older_restored(tmp_path, caplog):
  # Killed between orbax's commit and the checksums: the step never finished its save.
  step_dir = two_steps(tmp_path)
  (step_dir / "checksums.json").unlink()
  left = snapshot(step_dir)
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    with pytest.raises(checkpoint.reliability.CorruptCheckpointError) as info:
      ckpt.restore(1, like=make_state(0))
    assert isinstance(info.value, checkpoint.IncompleteCheckpointError)
    assert info.value.step == 1 and info.value.file == "checksums.json"
    with caplog.at_level("WARNING"):
      step, state, meta = ckpt.restore_newest_valid(like=make_state(0))
    assert step == 0 and meta == {"task": 0} and ckpt.all_steps() == [0]
    assert_bit_identical(state, make_state(0))
    ckpt.save(1, make_state(1), {"task": 1})  # Its step number is free again.
  lines = [r.getMessage() for r in caplog.records if "checkpoint step" in r.getMessage()]
  assert lines == [f"checkpoint step 1 in {tmp_path / 'checkpoints'} is incomplete: checksums.json: "
                   "missing (the save stopped between orbax's commit and the checksums); moved it "
                   f"to {tmp_path / 'corrupt-checkpoints' / os.listdir(tmp_path / 'corrupt-checkpoints')[0]}"
                   "; trying step 0"]
  [moved] = os.listdir(tmp_path / "corrupt-checkpoints")
  assert moved.startswith("incomplete-step-1-")
  assert snapshot(tmp_path / "corrupt-checkpoints" / moved) == left


def test_only_incomplete_steps_start_afresh_corrupt_ones_refuse(tmp_path):
  # A kill between the first commit and its checksums leaves nothing to resume from: a fresh
  # start, as after a kill inside orbax's own write (not NoValidCheckpointError).
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, make_state(0), {"task": 0})
  (tmp_path / "checkpoints" / "0" / "checksums.json").unlink()
  for _ in range(2):  # Also on a later open, with the incomplete step set aside.
    with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
      assert ckpt.restore_newest_valid(like=make_state(0)) is None
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(0, make_state(0), {"task": 0})
  (tmp_path / "checkpoints" / "0" / "checksums.json").write_text("{")
  with checkpoint.Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt, \
       pytest.raises(checkpoint.reliability.NoValidCheckpointError):
    ckpt.restore_newest_valid(like=make_state(0))


# --------------------------------------------------------------------------------------------------
# The parts of the checkpointer, each alone.


def hand_made_step(root):
  """A step directory with files in and outside its items; returns {file of the items: bytes}."""
  files = {"state/a": b"alpha", "state/d/x/1": os.urandom(3 << 20), "meta/metadata": b"{}",
           "state/empty": b""}
  for name, data in {**files, "_CHECKPOINT_METADATA": b"m", "other/y": b"y"}.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  (root / "state" / "emptydir").mkdir()
  return files


def test_checksums_file_sha256_and_step_files(tmp_path):
  files = hand_made_step(tmp_path)
  assert checkpoint.checksums.step_files(tmp_path, ("state", "meta")) == [
      "meta/metadata", "state/a", "state/d/x/1", "state/empty"]
  assert checkpoint.checksums.step_files(tmp_path, ("meta", "absent")) == ["meta/metadata"]
  for name, data in files.items():  # 3 MiB spans several blocks; an empty file none.
    assert checkpoint.checksums.file_sha256(tmp_path / name) == hashlib.sha256(data).hexdigest()


def test_checksums_write_read_verify(tmp_path):
  files = hand_made_step(tmp_path)
  checkpoint.checksums.write(tmp_path, ("state", "meta"))
  expected = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
  assert json.loads((tmp_path / "checksums.json").read_text()) == {"algorithm": "sha256",
                                                                    "files": expected}
  assert checkpoint.checksums.read(tmp_path) == expected
  checkpoint.checksums.verify(tmp_path, ("state", "meta"))
  (tmp_path / "other" / "y").write_bytes(b"changed")  # Outside the items: not checked.
  checkpoint.checksums.verify(tmp_path, ("state", "meta"))

  def problem():
    with pytest.raises(checkpoint.checksums.ChecksumError) as info:
      checkpoint.checksums.verify(tmp_path, ("state", "meta"))
    return info.value.file, info.value.reason

  flip_bytes(tmp_path / "state" / "d" / "x" / "1", at=0.9, n=1)
  assert problem() == ("state/d/x/1", "checksum mismatch (changed after it was written)")
  (tmp_path / "state" / "d" / "x" / "1").write_bytes(files["state/d/x/1"])
  (tmp_path / "state" / "a").unlink()
  assert problem() == ("state/a", "missing")
  (tmp_path / "state" / "a").write_bytes(b"alpha")
  (tmp_path / "state" / "b").write_bytes(b"")
  assert problem() == ("state/b", "not in checksums.json (added after it was written)")
  (tmp_path / "state" / "b").unlink()
  (tmp_path / "checksums.json").unlink()
  with pytest.raises(checkpoint.checksums.MissingChecksumsError) as info:
    checkpoint.checksums.read(tmp_path)
  assert info.value.file == "checksums.json" and info.value.reason.startswith("missing")


@pytest.mark.parametrize("text, reason", [
    ("{", "unreadable (JSONDecodeError)"),
    ("[1]", "unreadable (a JSON list, not an object)"),
    ('{"algorithm": "md5", "files": {"a": "b"}}', "unreadable (algorithm 'md5', not 'sha256')"),
    ('{"algorithm": "sha256", "files": "a"}', "unreadable ('files' is a JSON str, not an object)"),
    ('{"algorithm": "sha256", "files": {}}', "unreadable ('files' lists no file)"),
    ('{"algorithm": "sha256", "files": {"a": null}}',
     "unreadable (the digest of a is a JSON NoneType, not a string)"),
])
def test_checksums_read_refuses_unusable_records(text, reason, tmp_path):
  (tmp_path / "checksums.json").write_text(text)
  with pytest.raises(checkpoint.checksums.ChecksumError) as info:
    checkpoint.checksums.read(tmp_path)
  assert (info.value.file, info.value.reason) == ("checksums.json", reason)
  assert not isinstance(info.value, checkpoint.checksums.MissingChecksumsError)


def test_quarantine_set_aside_and_holds_corrupt(tmp_path):
  corrupt = tmp_path / "corrupt-checkpoints"
  assert not checkpoint.quarantine.holds_corrupt(corrupt)  # Absent.
  for step, incomplete in ((3, True), (4, False)):
    step_dir = tmp_path / "checkpoints" / str(step)
    files = hand_made_step(step_dir)
    dest = checkpoint.quarantine.set_aside(step_dir, corrupt, step, incomplete=incomplete)
    assert not step_dir.exists() and dest.parent == corrupt
    assert dest.name.startswith("incomplete-step-3-" if incomplete else "step-4-")
    assert {k: v for k, v in snapshot(dest).items() if k in files} == files
    # Only a corrupt step (not an incomplete one) counts.
    assert checkpoint.quarantine.holds_corrupt(corrupt) == (not incomplete)
  again = tmp_path / "checkpoints" / "4"
  again.mkdir()
  second = checkpoint.quarantine.set_aside(again, corrupt, 4)  # Same second: a fresh name.
  assert second != dest and second.is_dir() and dest.is_dir()


def test_workdir_fingerprint_diff():
  stored = {"lr": 0.1, "model": {"width": 8, "depth": 2}, "gone": 1, "bar": True}
  given = {"lr": 0.2, "model": {"width": 8, "depth": 3}, "new": "x", "bar": False}
  assert checkpoint.workdir.flat_keys(stored) == {"lr": 0.1, "model.width": 8, "model.depth": 2,
                                                  "gone": 1, "bar": True}
  assert checkpoint.workdir.fingerprint_diff(stored, given, ("bar",)) == [
      "gone 1 != (absent)", "lr 0.1 != 0.2", "model.depth 2 != 3", 'new (absent) != "x"']
  assert checkpoint.workdir.fingerprint_diff(stored, given, ("bar", "model", "lr", "gone",
                                                             "new")) == []


def test_workdir_open_run_binds_and_moves_aside(tmp_path):
  assert checkpoint.workdir.open_run(tmp_path, FINGERPRINT, (), False) == (None, False)
  checkpoint.workdir.bind(tmp_path, FINGERPRINT)
  assert checkpoint.workdir.read_fingerprint(tmp_path) == FINGERPRINT
  assert checkpoint.workdir.open_run(tmp_path, {}, (), False) == (None, False)  # nothing saved
  (tmp_path / "checkpoints" / "0").mkdir(parents=True)
  assert checkpoint.workdir.open_run(tmp_path, FINGERPRINT, (), False) == (None, True)
  with pytest.raises(ValueError, match="lr 0.1 != 0.2"):
    checkpoint.workdir.open_run(tmp_path, {**FINGERPRINT, "lr": 0.2}, (), False)
  (tmp_path / "run.lock").write_text("")
  previous, bound = checkpoint.workdir.open_run(tmp_path, {"other": 1}, (), True)
  assert not bound and sorted(os.listdir(previous)) == ["checkpoints", "run.json"]
  assert sorted(os.listdir(tmp_path)) == [previous.name, "run.lock"]


def test_trees_nest_lookup_and_mismatches():
  state = {"a.b": np.ones(2, np.float32), "a": {"b": np.zeros(3, np.int32)},
           "t": (np.int32(1), {"x/y": np.ones((), bool)})}
  pairs, _ = checkpoint.trees.leaves(state)
  nested = checkpoint.trees.nest(pairs)
  assert set(nested) == {"a%2Eb", "a", "t"} and set(nested["t"]) == {"0", "1"}
  assert nested["t"]["1"]["x%2Fy"] is state["t"][1]["x/y"]
  back = [checkpoint.trees.lookup(nested, parts) for parts, _ in pairs]
  assert all(x is y for x, y in zip(back, jax.tree.leaves(state)))
  # Escaping is one-to-one: a key that looks escaped stays apart from the one it looks like.
  assert set(checkpoint.trees.nest(checkpoint.trees.leaves({"a%2Eb": 1, "a.b": 2})[0])) == {
      "a%252Eb", "a%2Eb"}
  abstract, _ = checkpoint.trees.abstract_like({"a": np.ones((2, 3)), "b": jnp.zeros(4, jnp.int32),
                                                "c": jnp.zeros(1)})
  stored = {"a": jax.ShapeDtypeStruct((2, 3), np.float32), "b": jax.ShapeDtypeStruct((5,), np.int32),
            "d": jax.ShapeDtypeStruct((1,), np.float32)}
  assert checkpoint.trees.mismatches(stored, abstract) == [
      "c: in `like` but not in the checkpoint", "d: in the checkpoint but not in `like`",
      "b: shape (5,) in the checkpoint, (4,) in `like`"]
  stored["b"] = jax.ShapeDtypeStruct((4,), np.uint8)
  stored["c"] = stored.pop("d")
  assert checkpoint.trees.mismatches(stored, abstract) == [
      "b: dtype uint8 in the checkpoint, int32 in `like`"]


def test_jsonfiles_jsonable_and_first_line():
  obj = {"a": (1, np.float32(0.5)), 2: np.arange(3), "n": [float("nan"), float("inf")]}
  assert checkpoint.jsonfiles.jsonable(obj, what="x", strict=True) == {
      "a": [1, 0.5], "2": [0, 1, 2], "n": [None, None]}
  loose = checkpoint.jsonfiles.jsonable(obj, what="x")["n"]
  assert np.isnan(loose[0]) and loose[1] == float("inf")
  with pytest.raises(TypeError, match=r"x: a\[1\] is a object"):
    checkpoint.jsonfiles.jsonable({"a": [1, object()]}, what="x")
  assert checkpoint.jsonfiles.first_line(ValueError("a\n  b\tc")) == "a b c"
  assert checkpoint.jsonfiles.first_line(ValueError("x" * 200), limit=10) == "xxxxxxx..."
  assert checkpoint.jsonfiles.first_line(KeyError()) == "KeyError"


def test_checkpointer_step_helpers(tmp_path):
  cp = checkpoint.checkpointer
  assert cp.check_new_step(np.int64(3), 2, tmp_path) == 3
  assert cp.check_new_step(0, None, tmp_path) == 0
  for step, latest in ((2, 2), (1, 2), (-1, None)):
    with pytest.raises(ValueError, match=f"step {step} must be > the latest step {latest}"):
      cp.check_new_step(step, latest, tmp_path)
  assert cp.step_to_restore([1, 4], None, tmp_path) == 4
  assert cp.step_to_restore([1, 4], 1, tmp_path) == 1
  with pytest.raises(FileNotFoundError, match=r"available: \[1, 4\]"):
    cp.step_to_restore([1, 4], 2, tmp_path)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    cp.step_to_restore([], None, tmp_path)
  step_dir = tmp_path / "checkpoints" / "3"
  error = ValueError(f'NOT_FOUND: Error reading "{step_dir}/state/d/abc": local file '
                     f'"{step_dir}/state/manifest.ocdbt" is bad')
  assert cp.file_in_error(error, step_dir, "state") == "state/manifest.ocdbt"
  assert cp.file_in_error(ValueError('Error reading "elsewhere"'), step_dir,
                          "state") == "state (elsewhere)"
  assert cp.file_in_error(ValueError("no name"), step_dir, "meta/metadata") == "meta/metadata"
