"""Storage faults (issue 25): a write that fails for a reason of the disk ends the run in one line.

* The issue's bar, on a real full disk (a 120 KiB tmpfs; needs root to mount, skipped otherwise):
  the launcher stops with one ``error:`` line naming the full file system and no traceback from
  any thread; the workdir copied to a roomy disk resumes to exactly the uninterrupted results.
  A read-only workdir (the same tmpfs remounted read-only): one line, nothing written.
* Simulated (``OSError`` raised where the disk would): a failed checkpoint write (inside orbax's
  commit, and after it, in the checksums), ``metrics.csv`` (quota), TensorBoard (I/O error),
  ``results.json`` (read-only): one line naming the path and the cause, the previous checkpoint
  intact, no half-written step left to restore, and the rerun resumes identical.
* No orbax thread is left to print at exit (a run whose dataset is missing: one line), a
  background thread's storage fault prints nothing, and an error never lands on a progress bar.
"""

import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import uuid
from unittest import mock

import numpy as np
import pytest

from sparse_cl_jax import checkpoint
from sparse_cl_jax import cli
from sparse_cl_jax import experiment
from sparse_cl_jax import logs
from sparse_cl_jax import reliability
from sparse_cl_jax.checkpoint import checkpointer as checkpointer_lib
from sparse_cl_jax.checkpoint import checksums

import test_signals  # its helpers: the lines a terminal shows, the checkpoint steps

_REPO = pathlib.Path(__file__).resolve().parent.parent
PACKNET = _REPO / "configs" / "packnet.py"
BAR_FLAGS = ["--config.epochs=40", "--config.checkpoint_every_epochs=0"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(_REPO)}


def small(**overrides):
  """PackNet runlocal, 2 tasks, a checkpoint every epoch (the fault lands after several)."""
  c = cli.load_config_file(f"{PACKNET}:runlocal")
  c.num_tasks, c.checkpoint_every_epochs, c.progress = 2, 1, False
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def comparable(results):
  kept = {k: v for k, v in results.items() if k not in ("train_seconds", "trace_counts")}
  kept["config"] = {k: v for k, v in kept["config"].items() if k != "progress"}
  return json.dumps(kept, sort_keys=True, default=str)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  return experiment.run(small(), str(tmp_path_factory.mktemp("clean")), print_summary=False)


def raising(code):
  """A function that fails as a write does with ``code``."""
  def fail(*_, **__):
    raise OSError(code, os.strerror(code))
  return fail


enospc = raising(errno.ENOSPC)


# --------------------------------------------------------------------------------------------------
# Simulated faults, in-process.


def test_a_full_disk_inside_orbax_commit(clean, tmp_path):
  """The 4th save fails inside orbax's write: its temporary directory half written."""
  calls = []
  commit = checkpointer_lib.commit

  def failing_commit(manager, step, args):
    calls.append(step)
    if len(calls) == 4:
      tmp = pathlib.Path(manager.directory) / f"{step}{checkpointer_lib.TMP_MARK}" / "state"
      tmp.mkdir(parents=True)
      (tmp / "half").write_bytes(b"x" * 100)
      raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{tmp}/half": '
                       "No space left on device [os_error_code='28']")
    commit(manager, step, args)

  with mock.patch.object(checkpointer_lib, "commit", failing_commit), \
       pytest.raises(reliability.StorageError) as info:
    experiment.run(small(), str(tmp_path), print_summary=False)
  message = str(info.value)
  assert "\n" not in message
  folder = tmp_path / "checkpoints"
  assert message.startswith(f"cannot write checkpoint step 4 to {folder}: No space left on "
                            "device on /"), message
  assert message.endswith("(the previous checkpoint, step 3 (task 2, operation 1, after epoch 1), "
                          "is intact; free space or move the workdir, then rerun the same "
                          "command)"), message
  assert info.value.errno == errno.ENOSPC
  assert test_signals.steps(tmp_path) == [1, 2, 3]
  assert sorted(p.name for p in folder.iterdir()) == ["1", "2", "3"]  # nothing half-written left
  resumed = experiment.run(small(), str(tmp_path), print_summary=False)
  assert comparable(resumed) == comparable(clean)


def test_a_full_disk_after_orbax_commit_sets_the_step_aside(clean, tmp_path):
  """The checksums of the 3rd save fail: the step orbax renamed into place is no checkpoint."""
  calls = []
  write = checksums.write

  def failing_write(step_dir, items):
    calls.append(step_dir)
    if len(calls) == 3:
      enospc()
    write(step_dir, items)

  with mock.patch.object(checksums, "write", failing_write), \
       pytest.raises(reliability.StorageError, match=r"^cannot write checkpoint step 3 to .*"
                     r"No space left on device.*the previous checkpoint, step 2 "):
    experiment.run(small(), str(tmp_path), print_summary=False)
  assert test_signals.steps(tmp_path) == [1, 2]
  aside = [p.name for p in (tmp_path / checkpoint.CORRUPT_DIR).iterdir()]
  assert len(aside) == 1 and aside[0].startswith("incomplete-step-3-"), aside
  resumed = experiment.run(small(), str(tmp_path), print_summary=False)
  assert comparable(resumed) == comparable(clean)


@pytest.mark.parametrize("target, code, path", [
    ("metrics.csv", errno.EDQUOT, "metrics.csv"),
    ("tensorboard", errno.EIO, "tensorboard"),
    ("results.json", errno.EROFS, "results.json"),
])
def test_a_failing_log_or_results_write_names_its_file(clean, tmp_path, target, code, path):
  calls = []

  def fail_after(n, original):
    def wrapped(*args, **kwargs):
      calls.append(1)
      if len(calls) == n:
        raise OSError(code, os.strerror(code))
      return original(*args, **kwargs)
    return wrapped

  if target == "metrics.csv":
    patch = mock.patch.object(logs, "_write_rows", fail_after(5, logs._write_rows))
  elif target == "tensorboard":
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    patch = mock.patch.object(SummaryWriter, "flush", fail_after(5, SummaryWriter.flush))
  else:  # only results.json's write fails (the checkpoints' JSON files are written as usual)
    original = checkpoint.Checkpointer.finish

    def finish(self, results):
      with mock.patch.object(checkpoint.jsonfiles, "write_json_atomic", raising(code)):
        return original(self, results)

    patch = mock.patch.object(checkpoint.Checkpointer, "finish", finish)
  with patch, pytest.raises(reliability.StorageError) as info:
    experiment.run(small(), str(tmp_path), print_summary=False)
  message = str(info.value)
  assert message.startswith(f"cannot write {tmp_path / path}: {os.strerror(code)}"), message
  assert "the newest checkpoint, step " in message and "is intact" in message
  assert "\n" not in message and info.value.errno == code
  assert not (tmp_path / "results.json").exists()
  resumed = experiment.run(small(), str(tmp_path), print_summary=False)
  assert comparable(resumed) == comparable(clean)


def test_checkpointer_save_failure_leaves_it_usable(tmp_path):
  state = {"w": np.arange(4, dtype=np.float32)}
  with checkpoint.Checkpointer(tmp_path, fingerprint={"a": 1}) as ckpt:
    ckpt.save(1, state, {"i": 1})
    with mock.patch.object(checkpointer_lib, "commit", enospc), \
         pytest.raises(reliability.StorageError,
                       match=r"step 2 .*\(the previous checkpoint, step 1, is intact; free space"):
      ckpt.save(2, state, {"i": 2})
    assert ckpt.latest_step() == 1
    ckpt.save(2, state, {"i": 2})  # space again: the same step saves
    assert ckpt.all_steps() == [1, 2]


def test_storage_fault_reads_tensorstore_and_chained_errors():
  assert reliability.storage_fault(ValueError("x [os_error_code='122']")) == (
      errno.EDQUOT, os.strerror(errno.EDQUOT))
  try:
    try:
      raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    except OSError as inner:
      raise RuntimeError("wrapped") from inner
  except RuntimeError as e:
    assert reliability.storage_fault(e)[0] == errno.EROFS
  assert reliability.storage_fault(ValueError("no such file")) is None
  assert reliability.storage_fault(OSError(errno.ENOENT, "gone")) is None


# --------------------------------------------------------------------------------------------------
# Threads and exit.


def test_opening_a_workdir_leaves_no_thread_behind(tmp_path):
  """Orbax cleaned temporary directories in a thread nothing waited for: it printed at exit."""
  (tmp_path / "checkpoints" / f"7{checkpointer_lib.TMP_MARK}").mkdir(parents=True)
  before = set(threading.enumerate())
  ckpt = checkpoint.Checkpointer(tmp_path, fingerprint={"a": 1})
  assert not (tmp_path / "checkpoints" / f"7{checkpointer_lib.TMP_MARK}").exists()  # removed now
  ckpt.close()
  assert set(threading.enumerate()) <= before


def test_a_background_storage_fault_prints_nothing(monkeypatch):
  def fail():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def other():
    raise KeyError("not storage")

  printed = []  # what the process's own hook (it prints a traceback) is handed
  monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_type))
  with reliability.quiet_storage_faults_in_threads():
    for target in (fail, other):
      t = threading.Thread(target=target, name=f"bg-{target.__name__}")
      t.start()
      t.join()
  assert printed == [KeyError]
  assert any(name == "bg-fail" for name, _ in reliability.thread_storage_faults())
  assert threading.excepthook is not reliability._thread_hook  # restored


def test_missing_dataset_prints_its_line_and_nothing_at_exit(tmp_path):
  cmd = [sys.executable, str(_REPO / "experiments" / "main.py"), f"--config={PACKNET}:runlocal",
         f"--workdir={tmp_path}", "--config.dataset=tiny_imagenet"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=ENV)
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: tiny_imagenet "), out.stderr[-3000:]


def test_a_diverging_run_prints_its_error_on_a_line_of_its_own(tmp_path):
  """A diverging run (``--config.learning_rate=1e30``; ``inf`` is refused before the run) with the
  progress bars on: the bar is cleared first."""
  cmd = [sys.executable, str(_REPO / "experiments" / "main.py"), f"--config={PACKNET}:runlocal",
         f"--workdir={tmp_path}", "--config.learning_rate=1e30", "--config.progress=true"]
  out = subprocess.run(cmd, capture_output=True, timeout=300, check=False, env=ENV)
  stderr = out.stderr.decode()
  assert out.returncode == 1 and "\r" in stderr  # a bar was drawn
  last = test_signals.rendered(stderr)[-1]
  assert last.startswith("error: training diverged at task 1 train epoch 1/"), last
  assert "Traceback" not in stderr


# --------------------------------------------------------------------------------------------------
# A real full disk and a read-only one (root: tmpfs mounts).


@pytest.fixture
def tmpfs(tmp_path):
  """A fresh 120 KiB tmpfs: full before a run's first checkpoint (skips unless this process may
  mount one)."""
  yield from _mounted(tmp_path, "120k")


@pytest.fixture
def roomy_tmpfs(tmp_path):
  """A fresh 4 MiB tmpfs: room for a short run (every file takes whole 4 KiB pages there, so a
  run that fits 120 KiB on disk may not fit a 120 KiB tmpfs)."""
  yield from _mounted(tmp_path, "4m")


def _mounted(tmp_path, size: str):
  if os.geteuid() != 0 or not shutil.which("mount"):
    pytest.skip("mounting a tmpfs needs root")
  mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
  mnt.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                        capture_output=True, text=True, check=False)
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def launcher(workdir, *flags):
  cmd = [sys.executable, str(_REPO / "experiments" / "main.py"), f"--config={PACKNET}:runlocal",
         f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, capture_output=True, timeout=300, check=False, env=ENV)


def test_a_full_tmpfs_stops_in_one_line_and_its_copy_resumes_identical(tmpfs, tmp_path):
  out = launcher(tmpfs / "w", *BAR_FLAGS)  # progress bars on, as a user runs it
  stderr = out.stderr.decode()
  assert out.returncode == 1, stderr[-3000:]
  assert "Traceback" not in stderr and "Exception ignored" not in stderr
  shown = [line for line in test_signals.rendered(stderr)
           if not line.startswith(("I1", "I0", "W1", "W0"))]
  assert len(shown) == 1, shown
  assert re.match(rf"error: cannot write (checkpoint step \d+ to )?{re.escape(str(tmpfs))}/w[/:]",
                  shown[0]), shown[0]
  assert f"No space left on device on {tmpfs}, " in shown[0], shown[0]
  assert shown[0].endswith("free space or move the workdir, then rerun the same command)")
  # The workdir copied to a roomy disk resumes to exactly the uninterrupted results.
  roomy = tmp_path / "roomy"
  shutil.copytree(tmpfs / "w", roomy)
  assert launcher(roomy, *BAR_FLAGS, "--config.progress=false").returncode == 0
  config = small(epochs=40, checkpoint_every_epochs=0, num_tasks=5)
  reference = experiment.run(config, str(tmp_path / "reference"), print_summary=False)
  assert comparable(experiment.load_results(str(roomy))) == comparable(reference)


def test_a_read_only_workdir_is_refused_in_one_line(roomy_tmpfs):
  tmpfs = roomy_tmpfs
  first = launcher(tmpfs / "w", "--stop_after_task=1", "--config.progress=false")
  assert first.returncode == 0, first.stderr.decode()[-2000:]
  before = sorted(str(p) for p in tmpfs.rglob("*"))
  subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
  out = launcher(tmpfs / "w", "--config.progress=false")
  stderr = out.stderr.decode()
  assert out.returncode == 1 and "Traceback" not in stderr
  assert stderr.strip().splitlines() == [
      f"error: cannot write {tmpfs}/w/run.lock: Read-only file system (make the file system "
      "writable or move the workdir, then rerun the same command)"]
  assert sorted(str(p) for p in tmpfs.rglob("*")) == before
