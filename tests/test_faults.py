"""Fault injection (issue 16): each case ends identical to a clean run or with the promised refusal.

* Kills: every method's small run (``configs/<name>.py:runlocal``, 2 tasks, a checkpoint every
  epoch) is killed once at a seeded random point, inside a task where the method resumes inside
  tasks, and resumed: same results as the clean run, resumed from the checkpoint the kill left
  (not from scratch). In-process, a kill is a ``BaseException`` nothing catches, raised during the
  training after a checkpoint, between orbax's commit and the checksums, or right after a save:
  the three states a kill leaves on disk (a kill inside orbax's own write leaves a temporary
  directory that is never restored; ``test_checkpoint.py`` covers it). One real SIGKILL of a
  launcher process covers what only a process kill shows: its lock does not block the resume.
* Concurrent runs: a second run on a workdir in use is refused at once, naming the first process.
* Corrupt checkpoints: the newest step's array data or meta overwritten; all steps corrupt.
* Divergence: the issue's ``--config.learning_rate=1e8`` through the launcher (exit status 1, one
  line, nothing written), and a divergence after a checkpoint, which stays valid.
"""

import contextlib
import importlib.util
import json
import os
import pathlib
import random
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest

from sparse_cl_jax import checkpoint
from sparse_cl_jax import experiment
from sparse_cl_jax import methods
from sparse_cl_jax import reliability

_REPO = pathlib.Path(__file__).resolve().parent.parent
SEED = 16
# One xdist group per method: a method's tests share one worker and its cached clean run.
METHODS = [pytest.param(n, marks=pytest.mark.xdist_group(f"faults_{n}"))
           for n in sorted(methods.REGISTRY)]


def small(name, **overrides):
  spec = importlib.util.spec_from_file_location(f"faults_cfg_{name}",
                                                _REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.num_tasks, c.checkpoint_every_epochs, c.progress = 2, 1, False
  if "llt" in c:  # the paper's curriculum is for 5 tasks: give the 2-task stream its own
    c.llt.curriculum = "1,1"
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


LAUNCH_FLAGS = ["--config.num_tasks=2", "--config.checkpoint_every_epochs=1",
                "--config.progress=False"]  # = small(name) on the command line


class Killed(BaseException):
  """Stands in for SIGKILL in-process: not an Exception, so nothing on the way catches it."""


def position(meta):
  return (meta["task"], meta["op"], meta["epoch"])


@contextlib.contextmanager
def recording_saves():
  """Records the (task, op, epoch) of every checkpoint saved inside the block."""
  saved = []
  original = checkpoint.Checkpointer.save

  def save(self, step, state, meta):
    original(self, step, state, meta)
    saved.append(position(meta))

  with mock.patch.object(checkpoint.Checkpointer, "save", save):
    yield saved


def comparable(results):
  """Everything of a results dict except wall times and trace counts, NaN-safe."""
  kept = {k: v for k, v in results.items() if k not in ("train_seconds", "trace_counts")}
  return json.dumps(kept, sort_keys=True, default=str)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      with recording_saves() as saved:
        r = experiment.run(small(name), str(tmp_path_factory.mktemp(f"clean_{name}")),
                           print_summary=False)
      cache[name] = (r, saved)
    return cache[name]

  return get


def flip_bytes(path, at=0.5, n=8):
  data = bytearray(path.read_bytes())
  i = min(int(len(data) * at), len(data) - n)
  data[i:i + n] = bytes(b ^ 0x5A for b in data[i:i + n])
  path.write_bytes(bytes(data))


def snapshot(root):
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def corrupt_lines(caplog):
  return [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]


# --------------------------------------------------------------------------------------------------
# Kills.


# Where a kill lands, relative to the last checkpoint k it leaves committed. "during training":
# in the epochs after save k, i.e. anywhere before save k + 1 starts (nothing else is written in
# between, so the disk is the same wherever in those epochs the kill lands).
WHENS = ("during training", "after commit, before checksums", "after save")


@pytest.mark.parametrize("name", METHODS)
def test_kill_at_a_random_point_then_resume_is_identical(name, clean, tmp_path):
  results, positions = clean(name)
  # Seeded per method: the last checkpoint before the kill is inside a task for the methods that
  # resume inside tasks; the three kinds of kill points rotate over the methods.
  inside = [k for k, p in enumerate(positions) if p[1] or p[2]]
  k = random.Random(f"{SEED}:{name}").choice(inside or range(len(positions)))
  when = WHENS[sorted(methods.REGISTRY).index(name) % len(WHENS)]
  if when == "during training" and k + 1 == len(positions):
    when = "after save"  # No training after the last checkpoint.
  calls = {"save": 0, "checksums": 0}
  save, write_checksums = checkpoint.Checkpointer.save, checkpoint.Checkpointer._write_checksums

  def killing_save(self, step, state, meta):
    calls["save"] += 1
    if when == "during training" and calls["save"] == k + 2:
      raise Killed(f"in the epochs after save {k}")
    save(self, step, state, meta)
    if when == "after save" and calls["save"] == k + 1:
      raise Killed(f"after save {k}")

  def killing_checksums(self, step):
    calls["checksums"] += 1
    if when.startswith("after commit") and calls["checksums"] == k + 1:
      raise Killed(f"after the commit of save {k}")
    write_checksums(self, step)

  with mock.patch.object(checkpoint.Checkpointer, "save", killing_save), \
       mock.patch.object(checkpoint.Checkpointer, "_write_checksums", killing_checksums), \
       pytest.raises(Killed):
    experiment.run(small(name), str(tmp_path), print_summary=False)
  assert not (tmp_path / "results.json").exists()

  with recording_saves() as resumed_saves:
    resumed = experiment.run(small(name), str(tmp_path), print_summary=False)
  what = f"killed {when} (save {k}, at {positions[k]})"
  # A step without checksums never finished its save: set aside, resumed from the one before.
  first = k if when.startswith("after commit") else k + 1
  assert resumed_saves == positions[first:], f"{what}: resumed from the wrong checkpoint"
  assert comparable(resumed) == comparable(results), what


@pytest.mark.xdist_group("faults_packnet")
def test_sigkill_second_run_refused_then_resume_is_identical(clean, tmp_path):
  """A real launcher process: killed (SIGKILL) after orbax committed a step, before its checksums.

  While it is alive a second run on its workdir is refused at once, naming it; after the kill its
  lock does not block the resume, and the step it committed without checksums is set aside as
  incomplete: the run resumes from the one before.
  """
  results, positions = clean("packnet")
  k = random.Random(f"{SEED}:sigkill").randrange(1, len(positions) - 1)
  mark = tmp_path / "committed"
  workdir = tmp_path / "run"
  child = tmp_path / "child.py"
  child.write_text(f"""
import pathlib, runpy, sys, time
from sparse_cl_jax import checkpoint
original, calls = checkpoint.Checkpointer._write_checksums, []
def write_checksums(self, step):
  calls.append(step)
  if len(calls) == {k + 1}:  # Save {k} is committed by orbax; hold here until killed.
    pathlib.Path({str(mark)!r}).write_text(str(step))
    time.sleep(600)
  original(self, step)
checkpoint.Checkpointer._write_checksums = write_checksums
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path({str(_REPO / "experiments" / "main.py")!r}, run_name="__main__")
""")
  with open(tmp_path / "child.log", "w") as log:
    proc = subprocess.Popen(
        [sys.executable, str(child), f"--config={_REPO / 'configs' / 'packnet.py'}:runlocal",
         f"--workdir={workdir}", *LAUNCH_FLAGS], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(_REPO)})
  try:
    deadline = time.time() + 300
    while not mark.exists():
      assert proc.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
      assert time.time() < deadline, "the child never reached its kill point"
      time.sleep(0.05)
    step = int(mark.read_text())

    t0 = time.time()
    with pytest.raises(reliability.WorkdirInUseError) as info:
      experiment.run(small("packnet"), str(workdir), print_summary=False)
    assert time.time() - t0 < 10
    message = str(info.value)
    assert "\n" not in message and f"in use by process {proc.pid} on " in message
    assert "packnet.py" in message  # the holder's command
  finally:
    proc.kill()  # SIGKILL
    proc.wait()
  assert not (workdir / "checkpoints" / str(step) / "checksums.json").exists()
  assert json.loads((workdir / "run.lock").read_text())["pid"] == proc.pid  # left behind

  with recording_saves() as resumed_saves:
    resumed = experiment.run(small("packnet"), str(workdir), print_summary=False)
  assert resumed_saves == positions[k:]  # save k (no checksums) set aside as incomplete
  assert comparable(resumed) == comparable(results)


# --------------------------------------------------------------------------------------------------
# Corrupt checkpoints.


@pytest.mark.xdist_group("faults_packnet")
@pytest.mark.parametrize("target", ["array data", "meta"])
def test_corrupt_newest_checkpoint_set_aside_and_older_resumed(target, clean, tmp_path, caplog):
  results, positions = clean("packnet")
  assert experiment.run(small("packnet"), str(tmp_path), stop_after_task=1,
                        print_summary=False) is None
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  newest = tmp_path / "checkpoints" / str(steps[-1])
  if target == "meta":
    victim = newest / "meta" / "metadata"
  else:  # The largest array data file (TensorStore's chunk data under a d/ folder).
    data = [p for p in (newest / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    victim = max(data, key=lambda p: p.stat().st_size)
  flip_bytes(victim)
  corrupted = snapshot(newest)

  with caplog.at_level("WARNING"), recording_saves() as resumed_saves:
    resumed = experiment.run(small("packnet"), str(tmp_path), print_summary=False)
  assert comparable(resumed) == comparable(results)
  assert resumed_saves == positions[len(steps) - 1:]  # From the step before the corrupt one.
  lines = corrupt_lines(caplog)
  assert len(lines) == 1 and "\n" not in lines[0]
  assert lines[0].startswith(f"checkpoint step {steps[-1]} in ")
  assert f": {victim.relative_to(newest).as_posix()}: checksum mismatch" in lines[0]
  assert "corrupt-checkpoints" in lines[0] and f"trying step {steps[-2]}" in lines[0]
  (moved,) = (tmp_path / "corrupt-checkpoints").iterdir()
  assert moved.name.startswith(f"step-{steps[-1]}-")
  assert snapshot(moved) == corrupted  # Set aside as it was, never deleted.


def test_all_checkpoints_corrupt_refused_in_one_line(tmp_path, caplog):
  assert experiment.run(small("finetune"), str(tmp_path), stop_after_task=1,
                        print_summary=False) is None
  for step_dir in (tmp_path / "checkpoints").iterdir():
    if step_dir.name.isdigit():
      flip_bytes(step_dir / "meta" / "metadata", at=0.0, n=1)
  for _ in range(2):  # Again on a second try: never a silent restart from scratch.
    with pytest.raises(reliability.NoValidCheckpointError) as info:
      experiment.run(small("finetune"), str(tmp_path), print_summary=False)
    message = str(info.value)
    assert "\n" not in message and "--overwrite" in message and "corrupt-checkpoints" in message
  assert not (tmp_path / "results.json").exists()
  assert len(list((tmp_path / "corrupt-checkpoints").iterdir())) == 2


# --------------------------------------------------------------------------------------------------
# Divergence.


def test_diverging_launcher_run_exits_nonzero_in_one_line(tmp_path):
  cmd = [sys.executable, str(_REPO / "experiments" / "main.py"),
         f"--config={_REPO / 'configs' / 'finetune.py'}:runlocal", f"--workdir={tmp_path}",
         *LAUNCH_FLAGS, "--config.learning_rate=1e8"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(_REPO)})
  assert out.returncode == 1, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: training diverged at task 1 train epoch 1/2: mean loss "), last
  assert "> config.divergence_threshold=10000" in last and "no checkpoint was written" in last
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "results.json").exists()
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_divergence_after_a_checkpoint_keeps_it_valid(tmp_path, caplog):
  # Epoch 1 of task 1 trains normally and is checkpointed; the lr x1e9 in epoch 2 diverges.
  c = small("finetune", lr_milestones=(0.5,), lr_decay=1e9)
  for attempt in range(2):
    with caplog.at_level("INFO"), pytest.raises(reliability.DivergenceError) as info:
      experiment.run(c, str(tmp_path), print_summary=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("training diverged at task 1 train epoch 2/2: mean loss ")
    assert ("; the newest checkpoint, step 1 (task 1, operation 0, after epoch 1), is intact"
            in message)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["1"]
    assert not (tmp_path / "results.json").exists()
  # The second attempt resumed from that checkpoint (it restored) and diverged at the same epoch.
  assert any("resuming" in r.getMessage() and "from step 1" in r.getMessage()
             for r in caplog.records)
  # A larger threshold is not part of the fingerprint: the same workdir resumes and goes on until
  # the loss is no longer finite.
  c.divergence_threshold = 0
  with pytest.raises(reliability.DivergenceError, match="not finite|NaN or inf"):
    experiment.run(c, str(tmp_path), print_summary=False)


def test_nonfinite_state_is_never_checkpointed(tmp_path, monkeypatch):
  # With the loss check switched off, the guard on the checkpoint itself still stops the run.
  monkeypatch.setattr(reliability, "check_loss", lambda *args, **kwargs: None)
  c = small("finetune", learning_rate=1e30)
  with pytest.raises(reliability.DivergenceError) as info:
    experiment.run(c, str(tmp_path), print_summary=False)
  message = str(info.value)
  assert "\n" not in message and "holds NaN or inf in params/" in message
  assert "not saved" in message and "no checkpoint was written" in message
  assert message.endswith(reliability.NONFINITE_ADVICE)
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_check_loss_thresholds():
  c = small("finetune")
  assert c.divergence_threshold == reliability.DEFAULT_DIVERGENCE_THRESHOLD
  where = {"task": 0, "phase": "train", "epoch": 0, "epochs": 1}
  reliability.check_loss(2.3, c, **where)
  reliability.check_loss(1e4, c, **where)
  for bad in (1.01e4, float("nan"), float("inf")):
    with pytest.raises(reliability.DivergenceError):
      reliability.check_loss(bad, c, **where)
  c.divergence_threshold = 0
  reliability.check_loss(1e30, c, **where)
  with pytest.raises(reliability.DivergenceError, match="is not finite") as info:
    reliability.check_loss(float("nan"), c, **where)
  assert "learning_rate" in str(info.value) and "divergence_threshold (" not in str(info.value)
  assert reliability.first_nonfinite([("a", np.ones(2)), ("b", np.arange(3))]) is None
  assert reliability.first_nonfinite([("a", np.ones(2)), ("b", np.array([1.0, np.nan]))]) == "b"
