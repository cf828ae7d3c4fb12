"""Run logs and plots: metrics.csv, TensorBoard event files, PNGs, the progress bar, compare."""

import io
import json
import logging
import os
import struct
import sys
import warnings

import numpy as np
import pytest
import tqdm

from sparse_cl_jax import logs

PNG = b"\x89PNG\r\n\x1a\n"


def read_events(folder):
  """(tag, step, value) of every scalar in the TensorBoard event files under ``folder``."""
  from tensorboardX.proto import event_pb2  # the writer's own protobuf schema
  out = []
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # TFRecord: length, crc(length), payload, crc(payload)
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        if v.HasField("simple_value"):
          out.append((v.tag, event.step, v.simple_value))
  return out


def log_epochs(run_log, n, task=0, loss0=1.0):
  for e in range(n):
    run_log.epoch(task=task, phase="train", operation=0, epoch=e, epochs=n, loss=loss0 / (e + 1),
                  accuracy=0.5 + 0.1 * e, learning_rate=0.1, density=0.25)


def test_run_log_csv_and_tensorboard(tmp_path):
  run_log = logs.RunLog(tmp_path, resume_index=None, config_text="{}")
  log_epochs(run_log, 3)
  run_log.task_end(0, [0.9, 0.1], 0.9)
  run_log.close()
  rows = logs.read_metrics(tmp_path)
  assert [r["epoch_index"] for r in rows] == [1, 2, 3]
  assert [r["epoch"] for r in rows] == [1, 2, 3] and {r["task"] for r in rows} == {1}
  assert rows[1]["loss"] == pytest.approx(0.5) and rows[2]["accuracy"] == pytest.approx(0.7)
  assert rows[0]["learning_rate"] == pytest.approx(0.1) and rows[0]["density"] == 0.25
  events = read_events(tmp_path / "tensorboard")
  assert ("train/loss", 2, pytest.approx(0.5)) in events
  assert ("train/density", 3, 0.25) in events
  assert ("test/average_accuracy", 3, pytest.approx(0.9)) in events
  assert ("test/task_2", 3, pytest.approx(0.1)) in events


def test_resumed_log_supersedes_later_rows_and_fresh_start_moves_old_logs(tmp_path):
  first = logs.RunLog(tmp_path, resume_index=None)
  log_epochs(first, 4)  # killed after epoch 4; its newest checkpoint was after epoch 2
  first.close()
  resumed = logs.RunLog(tmp_path, resume_index=2)
  log_epochs(resumed, 2, loss0=9.0)
  resumed.close()
  rows = logs.read_metrics(tmp_path)
  assert [r["epoch_index"] for r in rows] == [1, 2, 3, 4]
  assert rows[2]["loss"] == pytest.approx(9.0)  # the resumed attempt's epoch 3
  superseded = logs._read_rows(tmp_path / logs.SUPERSEDED_FILE)
  assert [r["epoch_index"] for r in superseded] == [3, 4]  # kept, not deleted
  # A later attempt that starts afresh (no checkpoint) moves all of it aside.
  fresh = logs.RunLog(tmp_path, resume_index=None)
  fresh.close()
  assert fresh.moved_to is not None and fresh.moved_to.name.startswith("unfinished-")
  assert len(logs.read_metrics(fresh.moved_to)) == 4 and logs.read_metrics(tmp_path) == []


def test_plots_are_pngs(tmp_path):
  R = np.array([[0.9, np.nan], [0.8, 0.95]])
  results = {"method": "packnet", "config": {"dataset": "digits", "scenario": "split",
                                             "num_tasks": 2},
             "accuracy_matrix": R.tolist(), "acc": 0.875, "bwt": -0.1,
             "average_accuracy_curve": [0.9, 0.875],
             "capacity_per_layer": {"dense_0/kernel": {"free": 0.2, "task_1": 0.5, "task_2": 0.3},
                                    "head/kernel": {"free": 0.0, "task_1": 1.0, "task_2": 0.0}}}
  run_log = logs.RunLog(tmp_path, resume_index=None)
  log_epochs(run_log, 2)
  log_epochs(run_log, 2, task=1)
  run_log.close()
  paths = logs.write_run_plots(tmp_path, results)
  assert sorted(p.name for p in paths) == ["accuracy_matrix.png", "average_accuracy.png",
                                           "capacity.png", "training.png"]
  for p in paths:
    data = p.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
  del results["capacity_per_layer"]  # e.g. fine-tuning: no ownership, no capacity plot
  assert "capacity.png" not in [p.name for p in logs.write_run_plots(tmp_path / "b", results)]


class Clock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


def test_first_epoch_excluded_from_the_estimate(monkeypatch):
  clock = Clock()
  monkeypatch.setattr(tqdm.std, "time", clock)
  out = io.StringIO()
  # As Trainer.train drives its bar: hook, set_postfix (redraws), update(1), per epoch.
  bar = tqdm.tqdm(total=10, file=out, mininterval=0.1)
  clock.t += 60.0  # epoch 1: 59 s of compilation + 1 s of training
  logs.exclude_first_epoch_from_rate(bar)
  bar.set_postfix(loss="1.0")
  bar.update(1)
  shown = out.getvalue().split("\r")[-1]  # what the bar shows during epoch 2
  assert "01:00<?, ?it/s" in shown, shown  # no estimate yet; elapsed counts the compilation
  for _ in range(3):  # epochs 2-4: 1 s each
    clock.t += 1.0
    bar.set_postfix(loss="1.0")
    bar.update(1)
    assert "?" not in out.getvalue().split("\r")[-1]
  remaining = (bar.total - bar.n) / bar.format_dict["rate"]
  assert remaining == pytest.approx(6.0)  # not ~6 x 63/4 s
  assert "00:06" in out.getvalue().split("\r")[-1]
  assert bar.format_dict["elapsed"] == pytest.approx(63.0)  # elapsed still counts everything
  bar.close()


def test_log_lines_go_above_the_bar(monkeypatch):
  err = io.StringIO()
  handler = logging.StreamHandler(sys.stderr)
  monkeypatch.setattr(sys, "stderr", err)
  handler.setStream(err)
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    bar = tqdm.tqdm(total=3, file=err, mininterval=0)
    bar.update(1)
    with logs.logs_above_progress_bars():
      assert not isinstance(handler.stream, io.StringIO)
      root.warning("a log line")
      with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a warning", UserWarning, stacklevel=1)
    assert handler.stream is err  # restored
    bar.close()
  finally:
    root.removeHandler(handler)
  text = err.getvalue()
  # tqdm.write cleared the bar's line first: the log line starts a line of its own.
  assert "\na log line\n" in text.replace("\r", "\n")
  assert "\n" + __file__ in text.replace("\r", "\n") and "UserWarning: a warning" in text


def test_compare_rows_table_and_files(tmp_path):
  for name, acc in (("a/pn", 0.9), ("b/pn", 0.7)):
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "method": "packnet", "config": {"dataset": "digits"}, "accuracy_matrix": [[acc]],
        "acc": acc, "bwt": 0.0, "forgetting": 0.0, "density_per_task": [0.4],
        "train_seconds": 3.0, "average_accuracy_curve": [acc]}))
  rows = logs.compare_rows([tmp_path / "a/pn", tmp_path / "b/pn"])
  assert [r["run"] for r in rows] == ["a/pn", "b/pn"] and rows[1]["ACC"] == 0.7
  table = logs.compare_table(rows)
  assert "| a/pn | packnet | digits | 1 | 0.9000 | 0.0000 |" in table
  paths = logs.write_compare_files(rows, tmp_path / "out")
  assert [p.name for p in paths] == ["compare.md", "compare.csv", "compare.png"]
  assert paths[2].read_bytes().startswith(PNG)
  (tmp_path / "c" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ValueError, match="unfinished run"):
    logs.compare_rows([tmp_path / "c"])


def test_tensorboard_writer_is_imported_without_torch_and_torch_still_imports(tmp_path):
  """tensorboardX imports an installed PyTorch at import time (about 1 s of every run): the
  library's import hides it for that one import, and ``import torch`` works afterwards."""
  import subprocess  # pylint: disable=g-import-not-at-top
  fake = tmp_path / "site" / "torch"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("import os\nTensor = type('Tensor', (), {})\n"
                                    "open(os.environ['TORCH_MARK'], 'a').write('imported\\n')\n")
  mark = tmp_path / "mark"
  code = ("import sys\nfrom sparse_cl_jax import logs\nlogs._summary_writer_class()\n"
          "assert 'torch' not in sys.modules, sys.modules.get('torch')\n"
          "import tensorboardX.writer\nprint(tensorboardX.writer.numpy_compatible.__name__)\n"
          "import torch\nprint('torch', type(torch).__name__)\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.getcwd()]),
         "TORCH_MARK": str(mark)}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=False, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["ndarray", "torch", "module"]
  assert mark.read_text() == "imported\n"  # once: by the user's import, not by tensorboardX
