"""Experiment trackers: the interface a run's log feeds, its registry, and Weights & Biases.

The interface is tested without wandb (a recording tracker across a stop and a resume, the one-line
error when wandb is missing); the W&B tests run in offline mode only (never the network) and skip
when wandb is not installed (CI installs the dev and tfds extras only).
"""

import glob
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from sparse_cl_jax import cli
from sparse_cl_jax import config as config_lib
from sparse_cl_jax import experiment
from sparse_cl_jax import logs
from sparse_cl_jax import trackers

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(_REPO, "experiments", "main.py")


def packnet(num_tasks=5, **wandb):
  c = cli.load_config_file(os.path.join(_REPO, "configs", "packnet.py") + ":runlocal")
  c.progress = False
  c.num_tasks = num_tasks
  for k, v in wandb.items():
    c.wandb[k] = v
  return c


class Recorder(trackers.Tracker):
  """Appends every call it gets to a list shared by all its instances."""

  def __init__(self, events):
    self.events = events

  def start(self, run):
    self.events.append(("start", run.resume_index, run.config["num_tasks"]))

  def epoch(self, row):
    self.events.append(("epoch", dict(row)))

  def task_end(self, task, accuracies, *, average, epoch_index):
    self.events.append(("task_end", task, list(accuracies), average, epoch_index))

  def finish(self, results):
    self.events.append(("finish", results["accuracy_matrix"]))

  def close(self):
    self.events.append(("close",))


@pytest.fixture
def recorded():
  events = []
  factory = trackers.register(lambda config: Recorder(events))
  try:
    yield events
  finally:
    trackers.unregister(factory)


def test_a_registered_tracker_gets_every_event_once_across_a_stop_and_resume(tmp_path, recorded):
  c = packnet()
  assert experiment.run(c, str(tmp_path), stop_after_task=1, print_summary=False) is None
  first = len([e for e in recorded if e[0] == "epoch"])
  assert recorded[0] == ("start", None, 5) and recorded[-1] == ("close",) and first > 0
  results = experiment.run(c, str(tmp_path), print_summary=False)
  kinds = [e[0] for e in recorded]
  assert kinds.count("start") == kinds.count("close") == 2 and kinds.count("finish") == 1
  assert ("start", first, 5) in recorded  # the resumed run starts after the epochs logged
  # Every epoch once, and the same rows as metrics.csv (which rounds to 6 digits).
  rows = [e[1] for e in recorded if e[0] == "epoch"]
  csv_rows = logs.read_metrics(tmp_path)
  assert [r["epoch_index"] for r in rows] == list(range(1, len(csv_rows) + 1))
  for row, on_disk in zip(rows, csv_rows):
    assert set(row) == set(logs.CSV_FIELDS)
    for k in ("task", "phase", "operation", "epoch", "epochs"):
      assert row[k] == on_disk[k]
    for k in ("loss", "accuracy", "learning_rate", "density"):
      assert row[k] == pytest.approx(on_disk[k], rel=1e-5)
  # Each task's accuracies once, at the epoch_index of its last epoch; then the final matrix.
  ends = [e for e in recorded if e[0] == "task_end"]
  assert [e[1] for e in ends] == [0, 1, 2, 3, 4]
  R = np.asarray(results["accuracy_matrix"])
  for task, acc, average, index in (e[1:] for e in ends):
    np.testing.assert_allclose(acc, R[task])
    assert average == pytest.approx(np.mean(R[task, :task + 1]))
    assert index == max(r["epoch_index"] for r in rows if r["task"] == task + 1)
  assert recorded[kinds.index("finish")] == ("finish", results["accuracy_matrix"])
  assert kinds.index("finish") > max(i for i, k in enumerate(kinds) if k == "task_end")


def test_wandb_config_is_validated_and_off_by_default(tmp_path):
  c = config_lib.base("packnet")
  assert c.wandb.mode == "disabled" and trackers.from_config(c) == []
  c.wandb.mode = "offlin"
  with pytest.raises(ValueError, match=r"config\.wandb\.mode='offlin' is not valid"):
    config_lib.validate(c)
  c.wandb.mode, c.wandb.project = "offline", ""
  with pytest.raises(ValueError, match=r"config\.wandb\.project='' must be a non-empty string"):
    config_lib.validate(c)


MISSING = "config.wandb.mode=offline needs the wandb package: pip install 'sparse_cl_jax[wandb]'"


def test_without_wandb_the_run_stops_at_once_in_one_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    experiment.run(packnet(mode="offline"), str(workdir), print_summary=False)
  assert str(e.value) == MISSING and isinstance(e.value, cli.RUN_ERRORS)  # exit status 1
  assert not workdir.exists()  # before the workdir was touched
  # The launcher: exit status 1 and that line (a wandb that cannot be imported on the path).
  fake = tmp_path / "site" / "wandb"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ModuleNotFoundError('No module named wandb')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(tmp_path / "site"), _REPO, os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, MAIN, "--config=configs/packnet.py:runlocal",
                        f"--workdir={workdir}", "--config.wandb.mode=offline"], cwd=_REPO,
                       env=env, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 1, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == f"error: {MISSING}"


# --------------------------------------------------------------------------------------------------
# Weights & Biases, offline.


@pytest.fixture
def wandb_offline(monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_MODE", "offline")
  for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
    monkeypatch.delenv(name, raising=False)


def wandb_records(path):
  """The protobuf records of a W&B transaction log (``run-<id>.wandb``: LevelDB's log format)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  pos, block, chunk = 7, 32768, b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if length == 0 and kind == 0:
      pos += block - pos % block
      continue
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # FULL or LAST
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      chunk = b""
      yield record


def offline_runs(workdir):
  """Per offline W&B run under ``workdir/wandb``: its id, history {step: row}, summary, config."""
  def started(path):  # runs in the order they were written (two may start in the same second,
    # which the folder names offline-run-<date>_<time>-<id> cannot order)
    return os.stat(path).st_mtime_ns, path

  out = []
  paths = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
  for path in sorted(paths, key=started):
    history, summary, config, run_id = {}, {}, {}, None
    for r in wandb_records(path):
      kind = r.WhichOneof("record_type")
      if kind == "run":
        run_id = r.run.run_id
        config = {i.key: json.loads(i.value_json) for i in r.run.config.update}
      elif kind == "history":
        row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        history.setdefault(r.history.step.num, {}).update(row)
      elif kind == "summary":
        summary.update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
    out.append({"id": run_id, "history": history, "summary": summary, "config": config,
                "dir": os.path.dirname(path)})
  return out


@pytest.mark.slow
def test_packnet_runlocal_with_wandb_offline_leaves_an_offline_run(tmp_path, wandb_offline):
  workdir = tmp_path / "pn"
  out = subprocess.run([sys.executable, MAIN, "--config=configs/packnet.py:runlocal",
                        f"--workdir={workdir}", "--config.wandb.mode=offline",
                        "--config.progress=false"], cwd=_REPO, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  (run,) = offline_runs(workdir)
  assert f"wandb sync {run['dir']}" in out.stdout
  with open(workdir / trackers.WANDB_STATE_FILE) as f:
    assert json.load(f)["id"] == run["id"]
  results = experiment.load_results(str(workdir))
  rows = logs.read_metrics(workdir)
  assert sorted(run["history"]) == [r["epoch_index"] for r in rows]
  for r in rows:
    h = run["history"][r["epoch_index"]]
    assert h["train/loss"] == pytest.approx(r["loss"], rel=1e-5)
    assert h["train/density"] == pytest.approx(r["density"], rel=1e-5)
    assert (h["task"], h["phase"], h["epoch"]) == (r["task"], r["phase"], r["epoch"])
  R = results["accuracy_matrix"]
  last = run["history"][rows[-1]["epoch_index"]]
  assert last["test/average_accuracy"] == pytest.approx(results["acc"])
  assert last["test/task_2"] == pytest.approx(R[-1][1])
  assert run["summary"]["acc"] == pytest.approx(results["acc"])
  assert run["summary"]["final_density"] == pytest.approx(results["density_per_task"][-1])
  assert run["config"]["num_tasks"] == results["config"]["num_tasks"]
  assert run["config"]["wandb"]["mode"] == "offline"
  with open(os.path.join(run["dir"], "files", last["accuracy_matrix/path"])) as f:
    table = json.load(f)
  assert table["columns"][0] == "after task" and len(table["data"]) == len(R)
  for got, want in zip(table["data"], R):
    assert got[0] is not None and [None if g is None else pytest.approx(g) for g in got[1:]] == [
        None if not math.isfinite(w) else pytest.approx(w) for w in want]


def test_a_resumed_run_continues_its_wandb_run_and_logs_no_epoch_twice(tmp_path, wandb_offline):
  c = packnet(num_tasks=2, mode="offline")
  experiment.run(c, str(tmp_path), stop_after_task=1, print_summary=False)
  experiment.run(c, str(tmp_path), print_summary=False)
  first, second = offline_runs(tmp_path)
  assert first["id"] == second["id"] and first["dir"] != second["dir"]
  steps = sorted(first["history"]) + sorted(second["history"])
  assert steps == [r["epoch_index"] for r in logs.read_metrics(tmp_path)]
  assert "test/task_1" in first["history"][max(first["history"])]
  assert "acc" in second["summary"] and "acc" not in first["summary"]


def test_wandb_skips_epochs_a_killed_attempt_logged_after_its_checkpoint(tmp_path, wandb_offline):
  row = {"task": 1, "phase": "train", "operation": 0, "epoch": 1, "epochs": 9, "loss": 1.0,
         "accuracy": 0.5, "learning_rate": 0.1, "density": 1.0, "seconds": 0.1, "time": "t"}
  killed = trackers.WandbTracker(mode="offline", project="p")
  killed.start(trackers.RunInfo(tmp_path, resume_index=None, config={"a": 1}))
  for i in range(1, 5):
    killed.epoch({**row, "epoch_index": i})
  killed.close()  # (a SIGKILL would not close it; the state file is written per epoch)
  # The resumed attempt restarts after epoch 2 (its newest checkpoint) and logs 3, 4, 5 again.
  resumed = trackers.WandbTracker(mode="offline", project="p")
  resumed.start(trackers.RunInfo(tmp_path, resume_index=2, config={"a": 1}))
  for i in range(3, 6):
    resumed.epoch({**row, "epoch_index": i, "loss": 2.0})
  resumed.task_end(0, [0.9], average=0.9, epoch_index=5)
  resumed.close()
  first, second = offline_runs(tmp_path)
  assert first["id"] == second["id"]
  assert sorted(first["history"]) == [1, 2, 3, 4] and sorted(second["history"]) == [5]
  assert second["history"][5]["test/task_1"] == pytest.approx(0.9)
  # A run that starts afresh (no checkpoint) is a new W&B run.
  fresh = trackers.WandbTracker(mode="offline", project="p")
  fresh.start(trackers.RunInfo(tmp_path, resume_index=None))
  fresh.close()
  assert offline_runs(tmp_path)[-1]["id"] != first["id"]
