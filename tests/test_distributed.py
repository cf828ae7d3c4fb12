"""Runs and sweeps over several JAX processes on localhost (CPU collectives: gloo).

Every multi-process case starts real launcher processes, one CPU device each, joined by
``--coordinator_address/--num_processes/--process_id`` (sparse_cl_jax/distributed.py), and
compares them with one process holding the same number of devices.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from sparse_cl_jax import distributed

pytestmark = pytest.mark.xdist_group("distributed")

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "experiments" / "main.py")
SWEEP = str(ROOT / "experiments" / "sweep.py")
RUN_FLAGS = ("--config=packnet:runlocal", "--config.num_devices=0", "--config.progress=false")


def env(devices: int) -> dict:
  e = dict(os.environ)
  flags = [f for f in e.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  e["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  e["JAX_PLATFORMS"] = "cpu"
  return e


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(script, workdir, *flags, n=2, logs=None):
  """``n`` processes of ``script`` joined on a fresh port; returns them with their log paths."""
  port = free_port()
  procs, paths = [], []
  for i in range(n):
    path = pathlib.Path(f"{workdir}.p{i}.log" if logs is None else f"{logs}.p{i}.log")
    paths.append(path)
    cmd = [sys.executable, script, f"--workdir={workdir}", *flags,
           f"--coordinator_address=localhost:{port}", f"--num_processes={n}", f"--process_id={i}"]
    with open(path, "w") as log:
      procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(1)))
  return procs, paths


def finish(procs, timeout=300):
  return [p.wait(timeout=timeout) for p in procs]


def wait_for_checkpoint(procs, workdir, step: int, timeout: float = 240.0) -> None:
  """Until ``step``'s checksums are written (the step is complete) while every process runs."""
  deadline = time.monotonic() + timeout
  while not (workdir / "checkpoints" / str(step) / "checksums.json").exists():
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.02)


def kill_all(procs) -> None:
  for p in procs:
    p.send_signal(signal.SIGKILL)
  finish(procs)


def matrix(workdir):
  with open(pathlib.Path(workdir) / "results.json") as f:
    return np.asarray(json.load(f)["accuracy_matrix"], float)


def error_lines(path) -> list[str]:
  return [line for line in pathlib.Path(path).read_text().splitlines()
          if line.startswith("error:")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same run as 2 processes x 1 device and as 1 process x 2 devices."""
  base = tmp_path_factory.mktemp("distributed")
  two = base / "two"
  procs, paths = start(MAIN, two, *RUN_FLAGS)
  codes = finish(procs)
  assert codes == [0, 0], [p.read_text()[-2000:] for p in paths]
  one = base / "one"
  subprocess.run([sys.executable, MAIN, f"--workdir={one}", *RUN_FLAGS], env=env(2), check=True,
                 capture_output=True, timeout=300)
  return {"two": two, "one": one, "logs": paths, "base": base}


@pytest.mark.parametrize("flags, needle", [
    ((None, 2, 0), "--coordinator_address missing"),
    (("localhost:1234", None, 1), "--num_processes missing"),
    (("localhost", 2, 0), "is not HOST:PORT"),
    (("localhost:99999", 2, 0), "port must be <= 65535"),
    (("localhost:1234", 2, 2), "--process_id=2 must be in 0 ... 1"),
    (("localhost:1234", 0, 0), "--num_processes=0 must be >= 1"),
])
def test_inconsistent_flags_are_refused_in_one_line(flags, needle):
  with pytest.raises(ValueError, match=needle) as e:
    distributed.check_flags(*flags)
  assert "\n" not in str(e.value)


def test_no_flags_and_one_process_are_a_plain_run():
  assert distributed.check_flags(None, None, None) is False
  assert distributed.check_flags("localhost:1234", 1, 0) is False
  assert distributed.check_flags("localhost:1234", 2, 1) is True


def test_jax_detects_a_slurm_job_of_several_tasks_unless_turned_off(monkeypatch):
  for k in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "KUBERNETES_"))]:
    monkeypatch.delenv(k)
  assert distributed.detected_cluster() is None
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
  monkeypatch.setenv("SLURM_PROCID", "1")
  monkeypatch.setenv("SLURM_LOCALID", "0")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert distributed.detected_cluster() == "SlurmCluster"
  monkeypatch.setenv("SPARSE_CL_JAX_DETECT_CLUSTER", "0")
  assert distributed.detected_cluster() is None
  monkeypatch.delenv("SPARSE_CL_JAX_DETECT_CLUSTER")
  monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: a plain run
  assert distributed.detected_cluster() is None


def test_a_flag_error_exits_2_before_anything_is_written(tmp_path):
  w = tmp_path / "w"
  r = subprocess.run([sys.executable, MAIN, f"--workdir={w}", *RUN_FLAGS, "--num_processes=2",
                      "--process_id=0"], env=env(1), capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      r.stderr.strip()] and "--coordinator_address missing" in r.stderr
  assert not w.exists()


def test_an_unreachable_coordinator_is_one_line(tmp_path):
  w = tmp_path / "w"
  t0 = time.monotonic()
  r = subprocess.run([sys.executable, MAIN, f"--workdir={w}", *RUN_FLAGS,
                      f"--coordinator_address=localhost:{free_port()}", "--num_processes=2",
                      "--process_id=1", "--coordinator_timeout=2"], env=env(1),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  lines = [x for x in r.stderr.splitlines() if x.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: process 1 of 2 cannot reach"), r.stderr
  assert time.monotonic() - t0 < 60
  assert not w.exists()


def test_two_processes_equal_one_process_with_two_devices(runs):
  two, one = matrix(runs["two"]), matrix(runs["one"])
  np.testing.assert_allclose(two, one, atol=0.005)
  with open(runs["two"] / "results.json") as f:
    assert len(json.load(f)["devices"]) == 2


def test_only_process_0_reports(runs):
  log0, log1 = (p.read_text() for p in runs["logs"])
  assert "run directory" in log0 and "test accuracy matrix" in log0
  assert "run directory" not in log1 and "test accuracy matrix" not in log1
  files = sorted(p.name for p in runs["two"].iterdir())
  assert files == ["checkpoints", "metrics.csv", "plots", "results.json", "run.json", "run.lock",
                   "tensorboard"]
  rows = (runs["two"] / "metrics.csv").read_text().splitlines()
  assert len(rows) == 1 + len(set(rows[1:]))  # each epoch once: one writer


def test_both_processes_killed_after_the_first_checkpoint_resume_identical(runs, tmp_path):
  w = tmp_path / "w"
  procs, _ = start(MAIN, w, *RUN_FLAGS, logs=tmp_path / "killed")
  wait_for_checkpoint(procs, w, 1)
  kill_all(procs)
  assert not (w / "results.json").exists()
  procs, paths = start(MAIN, w, *RUN_FLAGS, logs=tmp_path / "rerun")
  assert finish(procs) == [0, 0], [p.read_text()[-2000:] for p in paths]
  assert "resuming" in paths[0].read_text()
  np.testing.assert_array_equal(matrix(w), matrix(runs["two"]))


def test_a_process_that_dies_stops_the_other_in_one_line(tmp_path):
  w = tmp_path / "w"
  procs, paths = start(MAIN, w, *RUN_FLAGS, "--config.epochs=400")
  wait_for_checkpoint(procs, w, 1)
  procs[1].send_signal(signal.SIGKILL)
  t0 = time.monotonic()
  code = procs[0].wait(timeout=60)
  assert time.monotonic() - t0 < 30
  procs[1].wait()
  assert code == 1
  lines = error_lines(paths[0])
  assert len(lines) == 1 and lines[0].startswith("error: process 0 of 2: "), lines
  assert "rerun the same command on every process" in lines[0]
  assert "Traceback" not in paths[0].read_text()


def test_sigterm_to_one_process_stops_both_at_the_same_point_and_resumes_identical(tmp_path):
  flags = (*RUN_FLAGS, "--config.epochs=30", "--config.checkpoint_every_epochs=0")
  ref = tmp_path / "ref"
  procs, paths = start(MAIN, ref, *flags)
  assert finish(procs) == [0, 0], [p.read_text()[-2000:] for p in paths]
  w = tmp_path / "w"
  procs, paths = start(MAIN, w, *flags, logs=tmp_path / "stopped")
  wait_for_checkpoint(procs, w, 1)
  procs[1].send_signal(signal.SIGTERM)  # only one of them, as a node-local preemption would
  codes = finish(procs, timeout=120)
  assert codes == [143, 143], [p.read_text()[-2000:] for p in paths]
  steps = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) >= 2  # the task-1 checkpoint and the one saved on the way out
  for path in paths:
    assert any(line.startswith("stopped by SIGTERM") for line in path.read_text().splitlines())
  procs, paths = start(MAIN, w, *flags, logs=tmp_path / "resumed")
  assert finish(procs) == [0, 0], [p.read_text()[-2000:] for p in paths]
  np.testing.assert_array_equal(matrix(w), matrix(ref))


def test_a_sweep_over_two_processes_gives_the_cells_of_one_process(tmp_path):
  flags = ("--config=packnet:runlocal", "--sweep.seed=0,1,2,3", "--config.progress=false")
  one = tmp_path / "one"
  subprocess.run([sys.executable, SWEEP, f"--workdir={one}", *flags], env=env(1), check=True,
                 capture_output=True, timeout=300)
  two = tmp_path / "two"
  procs, paths = start(SWEEP, two, *flags)
  assert finish(procs) == [0, 0], [p.read_text()[-2000:] for p in paths]
  with open(one / "sweep.json") as f:
    cells_one = json.load(f)["cells"]
  with open(two / "sweep.json") as f:
    cells_two = json.load(f)["cells"]
  assert [c["name"] for c in cells_two] == [c["name"] for c in cells_one]
  for a, b in zip(cells_one, cells_two):
    assert b["status"] == "done" and b["cells_in_program"] == 4
    np.testing.assert_allclose(matrix(two / b["name"]), matrix(one / a["name"]), atol=0.005)
  assert "sweep of 4 cells" not in paths[1].read_text()


def test_a_corrupt_newest_checkpoint_is_set_aside_and_all_processes_resume_from_the_older(
    runs, tmp_path):
  w = tmp_path / "w"
  procs, _ = start(MAIN, w, *RUN_FLAGS, logs=tmp_path / "killed")
  wait_for_checkpoint(procs, w, 2)
  kill_all(procs)
  newest = max(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
  victim = next(p for p in sorted((w / "checkpoints" / str(newest) / "state").rglob("*"))
                if p.is_file() and p.stat().st_size > 0)
  with open(victim, "r+b") as f:
    first = f.read(1)
    f.seek(0)
    f.write(bytes([first[0] ^ 0xFF]))
  procs, paths = start(MAIN, w, *RUN_FLAGS, logs=tmp_path / "rerun")
  assert finish(procs) == [0, 0], [p.read_text()[-2000:] for p in paths]
  log0 = paths[0].read_text()
  assert f"checkpoint step {newest}" in log0 and "is corrupt" in log0
  assert any((w / "corrupt-checkpoints").iterdir())
  np.testing.assert_array_equal(matrix(w), matrix(runs["two"]))


def test_an_error_of_process_0_stops_every_process_in_one_line(runs, tmp_path):
  """Rerunning a finished run: process 0 refuses it; the other says why and stops too."""
  procs, paths = start(MAIN, runs["two"], *RUN_FLAGS, logs=tmp_path / "again")
  assert finish(procs, timeout=120) == [1, 1]
  first, second = (error_lines(p) for p in paths)
  assert len(first) == 1 and "already finished" in first[0], first
  assert len(second) == 1 and second[0].startswith(
      "error: process 1 of 2: process 0 stopped the run: run in"), second
  assert "Check failure" not in paths[1].read_text()
