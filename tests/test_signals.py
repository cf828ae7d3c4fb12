"""Stop signals (issue 25): SIGTERM and SIGINT save where the run is, exit 143 / 130 in one line.

* The launcher, end to end (the issue's bar): SIGTERM inside task 3 of a PackNet runlocal run with
  40 epochs and no periodic checkpoints exits within 30 s with one more checkpoint and one line
  naming it; the rerun ends exactly as the uninterrupted run (results and per-epoch metrics). SIGINT
  the same with status 130. A second SIGTERM while the first one's checkpoint is being written
  exits at once; a second SIGINT raises KeyboardInterrupt (in-process).
* In-process, at chosen epochs: the middle and the last epoch of an operation (saved as
  "operation done"), an operation that its ``epoch_end`` stopped early, the last operation of a
  task, an operation whose last-epoch statistics the method reads after it (PrAC's ticket); each
  rerun ends identical to the clean run. A method that cannot resume inside a task saves nothing
  and names its newest checkpoint. A sweep: every running cell saves, one line names them.
"""

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest

from sparse_cl_jax import checkpoint
from sparse_cl_jax import cli
from sparse_cl_jax import experiment
from sparse_cl_jax import logs
from sparse_cl_jax import reliability
from sparse_cl_jax import sweep
from sparse_cl_jax.methods import prac

_REPO = pathlib.Path(__file__).resolve().parent.parent
PACKNET = _REPO / "configs" / "packnet.py"
# The run: 40 epochs a task, no periodic checkpoint (only after every task).
BAR_FLAGS = ["--config.epochs=40", "--config.checkpoint_every_epochs=0"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(_REPO)}
SAVED_LINE = re.compile(r"stopped by (SIGTERM|SIGINT): saved checkpoint step (\d+) \((.*)\) in "
                        r"(\S+); rerunning the same command resumes from it$")


def bar_config():
  c = cli.load_config_file(f"{PACKNET}:runlocal")
  c.epochs, c.checkpoint_every_epochs, c.progress = 40, 0, False
  return c


def comparable(results):
  """Results without wall times, trace counts and the progress-bar flag (NaN-safe)."""
  kept = {k: v for k, v in results.items() if k not in ("train_seconds", "trace_counts")}
  kept["config"] = {k: v for k, v in kept["config"].items() if k != "progress"}
  return json.dumps(kept, sort_keys=True, default=str)


def epoch_rows(workdir):
  """metrics.csv without its wall-clock fields."""
  return [{k: v for k, v in r.items() if k not in ("seconds", "time")}
          for r in logs.read_metrics(workdir)]


def steps(workdir):
  folder = pathlib.Path(workdir) / checkpoint.CHECKPOINT_DIR
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def rendered(text: str) -> list[str]:
  """The lines a terminal shows for ``text`` ('\\r' returns to the line's start and overwrites)."""
  out = []
  for line in text.split("\n"):
    shown = ""
    for part in line.split("\r"):
      shown = part + shown[len(part):]
    out.append(shown.rstrip())
  return [line for line in out if line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The bar's run, uninterrupted (in-process: the same programs as the launcher's)."""
  workdir = tmp_path_factory.mktemp("reference")
  return experiment.run(bar_config(), str(workdir), print_summary=False), workdir


# --------------------------------------------------------------------------------------------------
# The launcher.


def launch(workdir, log, *flags):
  cmd = [sys.executable, str(_REPO / "experiments" / "main.py"), f"--config={PACKNET}:runlocal",
         f"--workdir={workdir}", *BAR_FLAGS, *flags]
  return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=ENV)


def wait_for_task(proc, workdir, task: int, timeout: float = 120.0) -> None:
  """Until ``metrics.csv`` has a row of ``task`` (1-based): the signal then lands inside it."""
  deadline = time.time() + timeout
  csv = pathlib.Path(workdir) / logs.CSV_FILE
  while True:
    assert proc.poll() is None, f"the run ended (status {proc.returncode}) before task {task}"
    assert time.time() < deadline, f"task {task} never started"
    lines = csv.read_text().splitlines()[1:] if csv.exists() else []
    if any(line.split(",")[1:2] == [str(task)] for line in lines):
      return
    time.sleep(0.01)


def rerun(workdir):
  cmd = [sys.executable, str(_REPO / "experiments" / "main.py"), f"--config={PACKNET}:runlocal",
         f"--workdir={workdir}", *BAR_FLAGS]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=ENV)


# SIGINT's rerun is left out (the same resume as SIGTERM's; the in-process cases cover more).
@pytest.mark.parametrize("sig, task, status, resume",
                         [(signal.SIGTERM, 3, 143, True), (signal.SIGINT, 2, 130, False)])
def test_signal_inside_a_task_saves_exits_in_one_line_and_resumes_identical(
    reference, tmp_path, sig, task, status, resume):
  results, ref_dir = reference
  workdir = tmp_path / "run"
  with open(tmp_path / "stderr", "w") as log:
    proc = launch(workdir, log)  # progress bars on (the default): the line must not land on one
    try:
      wait_for_task(proc, workdir, task)
      before = steps(workdir)
      t0 = time.time()
      proc.send_signal(sig)
      proc.wait(timeout=60)
      took = time.time() - t0
    finally:
      proc.kill()
  stderr = (tmp_path / "stderr").read_bytes().decode()
  assert proc.returncode == status, stderr[-3000:]
  assert took < 30, f"{took:.1f} s from the signal to the exit"
  assert "Traceback" not in stderr
  last = rendered(stderr)[-1]
  m = SAVED_LINE.match(last)
  assert m, last
  name, step, where, folder = m.groups()
  assert name == sig.name and folder == str(workdir / "checkpoints")
  assert steps(workdir)[-1] == int(step) == before[-1] + 1  # one more checkpoint, named
  assert where.startswith(f"task {task}, operation "), where  # inside the task
  if not resume:
    return
  # The rerun (the same command) ends exactly as the uninterrupted run.
  out = rerun(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert comparable(experiment.load_results(str(workdir))) == comparable(results)
  assert epoch_rows(workdir) == epoch_rows(ref_dir)


def test_a_second_sigterm_exits_at_once(tmp_path):
  """The second signal comes while the first one's checkpoint is being written (held there).

  A second SIGINT raises KeyboardInterrupt (Python's Ctrl-C): checked in-process below.
  """
  sig = signal.SIGTERM
  mark = tmp_path / "saving"
  child = tmp_path / "child.py"
  child.write_text(f"""
import pathlib, runpy, sys, time
from sparse_cl_jax import checkpoint
original = checkpoint.Checkpointer.save
def save(self, step, state, meta):
  if meta["epoch"]:  # only the stop's checkpoint is inside a task (no periodic ones)
    pathlib.Path({str(mark)!r}).write_text(str(step))
    time.sleep(600)
  original(self, step, state, meta)
checkpoint.Checkpointer.save = save
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path({str(_REPO / "experiments" / "main.py")!r}, run_name="__main__")
""")
  workdir = tmp_path / "run"
  with open(tmp_path / "stderr", "w") as log:
    proc = subprocess.Popen(
        [sys.executable, str(child), f"--config={PACKNET}:runlocal", f"--workdir={workdir}",
         *BAR_FLAGS, "--config.progress=false"], stdout=subprocess.DEVNULL, stderr=log, env=ENV)
    try:
      wait_for_task(proc, workdir, 2)
      proc.send_signal(sig)
      deadline = time.time() + 60
      while not mark.exists():
        assert proc.poll() is None and time.time() < deadline, "the stop never saved"
        time.sleep(0.01)
      t0 = time.time()
      proc.send_signal(sig)
      proc.wait(timeout=30)
      took = time.time() - t0
    finally:
      proc.kill()
  stderr = (tmp_path / "stderr").read_bytes().decode()
  assert took < 5, f"{took:.1f} s after the second signal"
  assert proc.returncode == 143, stderr[-3000:]
  assert "Traceback" not in stderr
  assert rendered(stderr)[-1] == (
      "stopped at once by a second SIGTERM (nothing saved since the first); rerunning the same "
      "command resumes from the newest checkpoint")
  assert steps(workdir) == [1]  # the held save never committed; task 1's checkpoint is intact


def test_sigterm_stops_a_sweep_launcher_in_one_line(tmp_path):
  """The cells run in threads; the main thread waits for them and must still see the signal."""
  workdir = tmp_path / "sweep"
  cmd = [sys.executable, str(_REPO / "experiments" / "sweep.py"), f"--config={PACKNET}:runlocal",
         f"--workdir={workdir}", "--sweep.seed=0,1,2", "--max_parallel=2", "--config.epochs=200",
         "--config.checkpoint_every_epochs=0"]
  with open(tmp_path / "stderr", "w") as log:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=ENV)
    try:
      wait_for_task(proc, workdir / "seed-0", 2)
      t0 = time.time()
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=60)
      took = time.time() - t0
    finally:
      proc.kill()
  stderr = (tmp_path / "stderr").read_bytes().decode()
  assert proc.returncode == 143, stderr[-3000:]
  assert took < 10, f"{took:.1f} s from the signal to the exit"  # not after the whole wave
  last = rendered(stderr)[-1]
  assert re.fullmatch(
      r"stopped by SIGTERM: cells seed-0 \(saved step \d+: task \d, operation \d+, after epoch "
      r"\d+\), seed-1 \(saved step \d+: task \d, operation \d+, after epoch \d+\), checkpoints in "
      + re.escape(str(workdir)) + r"/<cell>/checkpoints; 1 cell not started \(seed-2\); "
      r"rerunning the same command resumes the sweep", last), last


# --------------------------------------------------------------------------------------------------
# In-process: chosen stop points, other methods, sweeps.


def small(name, **overrides):
  c = cli.load_config_file(f"{_REPO / 'configs' / name}.py:runlocal")
  c.checkpoint_every_epochs, c.progress = 0, False
  if c.num_tasks > 1:
    c.num_tasks = 2
  if "llt" in c:
    c.llt.curriculum = "1,1"
  for k, v in overrides.items():
    node = c
    *parents, last = k.split(".")
    for p in parents:
      node = node[p]
    node[last] = v
  return c


def stop_at(task: int, phase: str, epoch: int):
  """Requests a stop (as a first SIGTERM does) at the end of that epoch (all 1-based but phase)."""
  original = reliability.check_loss

  def check_loss(loss, config, *, task: int, phase: str, epoch: int, epochs: int):
    if (task + 1, phase, epoch + 1) == want:
      reliability.request_stop(signal.SIGTERM)
    return original(loss, config, task=task, phase=phase, epoch=epoch, epochs=epochs)

  want = (task, phase, epoch)
  return mock.patch.object(reliability, "check_loss", check_loss)


_CLEAN: dict = {}


def clean(key, config, tmp_path_factory):
  if key not in _CLEAN:
    _CLEAN[key] = experiment.run(config, str(tmp_path_factory.mktemp("clean")),
                                 print_summary=False)
  return _CLEAN[key]


# (config name, overrides, where to stop: task, phase, epoch (1-based); the saved position: task,
# epochs done in the operation ("operation done": all of them, or where epoch_end stopped it).)
POINTS = {
    "packnet mid-operation": ("packnet", {"epochs": 4}, (2, "train", 2), (2, 2)),
    "packnet last epoch of an operation": ("packnet", {"epochs": 4}, (2, "train", 4), (2, 4)),
    "packnet the task's last operation": ("packnet", {"epochs": 4}, (2, "retrain", 1), (2, 1)),
    "packnet first epoch of the run": ("packnet", {"epochs": 4}, (1, "train", 1), (1, 1)),
    "prac ticket (reads its steps after)": ("prac", {}, (1, "ticket 0", 4), (1, 4)),
    # Its epoch_end ends the search after 2 of 4 epochs (clean run too): saved as done (4).
    "prac search stopped early by epoch_end": ("prac", {}, (1, "search 0", 2), (1, 4)),
}


def early_stop(point):
  """The search of PrAC ends after its second epoch in this point's runs (clean ones too)."""
  if "early" not in point:
    return contextlib.nullcontext()
  return mock.patch.object(prac, "search_should_stop", lambda epoch, **_: epoch + 1 >= 2)


@pytest.mark.parametrize("point", list(POINTS))
def test_stop_at_an_epoch_end_then_resume_is_identical(point, tmp_path, tmp_path_factory,
                                                       capsys):
  name, overrides, (task, phase, epoch), position = POINTS[point]
  with early_stop(point):
    results = clean(point.split()[0] + repr(overrides) + str("early" in point),
                    small(name, **overrides), tmp_path_factory)
  with early_stop(point), stop_at(task, phase, epoch), \
       pytest.raises(reliability.RunInterrupted) as info:
    experiment.run(small(name, **overrides), str(tmp_path), print_summary=False)
  e = info.value
  assert e.code == 143 and e.saved and e.step == steps(tmp_path)[-1]
  assert reliability.stop_requested() is None  # forgotten once run() returned
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert line == e.message and SAVED_LINE.match(line), line
  assert re.fullmatch(rf"task {position[0]}, operation \d+, after epoch {position[1]}",
                      e.where), e.where
  with early_stop(point):
    resumed = experiment.run(small(name, **overrides), str(tmp_path), print_summary=False)
  assert comparable(resumed) == comparable(results), point


def test_a_method_that_cannot_save_inside_a_task_names_its_newest_checkpoint(
    tmp_path, tmp_path_factory, capsys):
  results = clean("clnp", small("clnp"), tmp_path_factory)
  with stop_at(2, "train 1/1", 1), pytest.raises(reliability.RunInterrupted) as info:
    experiment.run(small("clnp"), str(tmp_path), print_summary=False)
  e = info.value
  assert e.code == 143 and not e.saved and e.step == 1 and steps(tmp_path) == [1]
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert line == (f"stopped by SIGTERM: clnp cannot save inside a task (a rerun repeats task 2 "
                  f"from its start); the newest checkpoint, step 1 (after task 1) in "
                  f"{tmp_path / 'checkpoints'}, is intact and rerunning the same command resumes "
                  "from it")
  resumed = experiment.run(small("clnp"), str(tmp_path), print_summary=False)
  assert comparable(resumed) == comparable(results)


def test_signal_handlers_are_restored_and_only_the_main_thread_installs(tmp_path):
  before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
  with reliability.StopSignals() as outer:
    assert outer.installed and signal.getsignal(signal.SIGTERM) == outer._handle
    with reliability.StopSignals() as inner:  # nested: the outer one keeps the signals
      assert not inner.installed
    os.kill(os.getpid(), signal.SIGTERM)  # the first signal only sets the flag
    time.sleep(0.05)
    assert reliability.stop_requested() == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):  # a second SIGINT: Python's own Ctrl-C
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
  assert reliability.stop_requested() is None


def test_a_stopped_sweep_saves_every_running_cell_and_resumes(tmp_path, tmp_path_factory, capsys):
  base = small("packnet", epochs=4)
  grid = {"seed": [0, 1]}
  ref = sweep.run(base, grid, tmp_path_factory.mktemp("sweep_ref"), print_summary=False)
  workdir = tmp_path / "sweep"
  with stop_at(2, "train", 2), pytest.raises(reliability.RunInterrupted) as info:
    sweep.run(base, grid, workdir, print_summary=False)
  e = info.value
  assert e.code == 143
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert line == e.message
  assert line.startswith("stopped by SIGTERM: cells seed-0 (saved step 2: task 2, operation 1, "
                         "after epoch 2), seed-1 (saved step 2: task 2, operation 1, after epoch "
                         "2), checkpoints in "), line
  assert line.endswith("/<cell>/checkpoints; rerunning the same command resumes the sweep")
  record = json.loads((workdir / "sweep.json").read_text())
  assert record["status"] == "pending" and {c["status"] for c in record["cells"]} == {"pending"}
  resumed = sweep.run(base, grid, workdir, print_summary=False)
  assert resumed["status"] == "done"
  for got, want in zip(resumed["cells"], ref["cells"]):
    assert got["name"] == want["name"] and got["acc"] == want["acc"]
    assert (comparable(experiment.load_results(got["workdir"])) ==
            comparable(experiment.load_results(want["workdir"])))
