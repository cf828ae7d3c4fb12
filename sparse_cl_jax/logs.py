"""What a run leaves to read: per-epoch metrics (TensorBoard event files and a CSV) and PNG plots.

Layer 5 of the design (harness); :func:`sparse_cl_jax.experiment.run` writes, next to its
checkpoints and ``results.json``::

  workdir/
    metrics.csv            one row per training epoch (columns: :data:`CSV_FIELDS`)
    metrics.superseded.csv rows of epochs a resumed run trained again (kept, never deleted)
    tensorboard/           event files (tensorboardX: no TensorFlow needed). Per epoch
                           train/{loss,accuracy,learning_rate,density}; after each task
                           test/average_accuracy and test/task_<j>. x axis: epoch_index.
    plots/                 accuracy_matrix.png, average_accuracy.png, training.png, and for
                           methods that give weights to tasks capacity.png
    unfinished-<time>/     the logs of an attempt that ended before its first checkpoint, moved
                           aside when the next attempt starts afresh

A write that fails for a reason of the storage (full disk, quota, read-only file system, I/O
error) raises :class:`sparse_cl_jax.reliability.StorageError` naming the file; TensorBoard's
writer thread dying of one prints nothing (``experiment.run`` records it, the next flush reports
it).

``epoch_index`` counts the training epochs of the run from 1 (all tasks and phases). A run resumed
from a checkpoint continues the count from that checkpoint: :class:`CsvLog` moves the CSV rows
logged after it to ``metrics.superseded.csv`` and :class:`TensorBoardLog` starts with
``purge_step``, so both show each epoch once.

:class:`RunLog` hands every event to its trackers (:mod:`sparse_cl_jax.trackers`): the CSV and
TensorBoard ones above, then any others the run's config asks for (Weights & Biases).

Plots are drawn on ``matplotlib.figure.Figure`` with the Agg canvas (no display, no pyplot state).

Example::

  from sparse_cl_jax import logs
  rows = logs.read_metrics("/tmp/packnet")     # [{'epoch_index': 1, 'task': 1, ...}, ...]
  logs.plot_accuracy_matrix(R, "/tmp/R.png", title="packnet")
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import pathlib
import sys
import time
from collections import abc
from typing import Any

import numpy as np

from sparse_cl_jax import reliability
from sparse_cl_jax import trackers as trackers_lib

CSV_FILE = "metrics.csv"
SUPERSEDED_FILE = "metrics.superseded.csv"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
UNFINISHED_PREFIX = "unfinished-"
CSV_FIELDS = ("epoch_index", "task", "phase", "operation", "epoch", "epochs", "loss", "accuracy",
              "learning_rate", "density", "seconds", "time")  # seconds: since this attempt started
_INT_FIELDS = ("epoch_index", "task", "operation", "epoch", "epochs")
_FLOAT_FIELDS = ("loss", "accuracy", "learning_rate", "density", "seconds")


# --------------------------------------------------------------------------------------------------
# Per-epoch metrics.


def _read_rows(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  out = []
  for row in rows:
    parsed: dict[str, Any] = dict(row)
    for k in _INT_FIELDS:
      if row.get(k) not in (None, ""):
        parsed[k] = int(row[k])
    for k in _FLOAT_FIELDS:
      if row.get(k) not in (None, ""):
        parsed[k] = float(row[k])
    out.append(parsed)
  return out


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of ``workdir/metrics.csv`` with numbers parsed (``[]`` if there is none)."""
  return _read_rows(pathlib.Path(workdir) / CSV_FILE)


def _write_rows(path: pathlib.Path, rows, *, append: bool) -> None:
  new = not path.exists() or path.stat().st_size == 0 or not append
  with open(path, "a" if append else "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    if new:
      w.writeheader()
    for row in rows:
      w.writerow(row)
    f.flush()


def _csv_row(row: abc.Mapping[str, Any]) -> dict[str, Any]:
  """An epoch row as ``metrics.csv`` writes it: floats to 6 significant digits, seconds to ms."""
  out = dict(row)
  for k in ("loss", "accuracy", "learning_rate", "density"):
    out[k] = f"{row[k]:.6g}"
  out["seconds"] = f"{row['seconds']:.3f}"
  return out


class CsvLog(trackers_lib.Tracker):
  """``metrics.csv``: one row per epoch; a resumed run moves the rows after its checkpoint aside.

  The rows a killed attempt logged after the checkpoint a run resumes from go to
  ``metrics.superseded.csv`` (kept, never deleted), so the CSV shows each epoch once.
  """

  def __init__(self):
    self.path: pathlib.Path | None = None

  def start(self, run: trackers_lib.RunInfo) -> None:
    self.path = pathlib.Path(run.workdir) / CSV_FILE
    if run.resume_index is not None:
      with reliability.writing(self.path):
        self._supersede_after(int(run.resume_index))

  def _supersede_after(self, index: int) -> None:
    rows = _read_rows(self.path)
    later = [r for r in rows if int(r["epoch_index"]) > index]
    if not later:
      return
    _write_rows(self.path.with_name(SUPERSEDED_FILE), later, append=True)
    kept = [r for r in rows if int(r["epoch_index"]) <= index]
    tmp = self.path.with_name(f".{CSV_FILE}.tmp-{os.getpid()}")
    _write_rows(tmp, kept, append=False)
    os.replace(tmp, self.path)

  def epoch(self, row: abc.Mapping[str, Any]) -> None:
    with reliability.writing(self.path):
      _write_rows(self.path, [_csv_row(row)], append=True)

  def where(self) -> list[tuple[str, str]]:
    return [("per-epoch metrics (CSV)", str(self.path))]


def _summary_writer_class():
  """``tensorboardX.SummaryWriter``, imported without importing PyTorch.

  tensorboardX's writer module imports ``torch`` whenever it is installed, only to accept torch
  tensors; with PyTorch installed beside the library that import costs about 1 s of every run
  (issue 27; the library hands the writer Python floats only). If neither module is loaded yet,
  ``torch`` is marked unimportable for the duration of this one import (``sys.modules['torch'] =
  None`` makes ``import torch`` raise ``ImportError``, which tensorboardX catches) and unmarked
  right after, so a later ``import torch`` works as usual.
  """
  if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if "torch" in sys.modules and sys.modules["torch"] is None:
      del sys.modules["torch"]
  return SummaryWriter


class TensorBoardLog(trackers_lib.Tracker):
  """TensorBoard event files (tensorboardX): ``train/*`` per epoch, ``test/*`` after each task.

  Args:
    config_text: written once to the text tab by a run that starts afresh.
  """

  def __init__(self, config_text: str | None = None):
    self.config_text = config_text
    self.logdir: pathlib.Path | None = None
    self._writer = None

  def start(self, run: trackers_lib.RunInfo) -> None:
    SummaryWriter = _summary_writer_class()  # noqa: N806  (a class)
    self.logdir = pathlib.Path(run.workdir) / TENSORBOARD_DIR
    index = run.resume_index or 0
    with reliability.writing(self.logdir):
      # purge_step: events of a killed attempt at or after this step are hidden by TensorBoard.
      self._writer = SummaryWriter(logdir=str(self.logdir),
                                   purge_step=index + 1 if index else None)
      if self.config_text and run.resume_index is None:
        self._writer.add_text("config", self.config_text, 0)

  def epoch(self, row: abc.Mapping[str, Any]) -> None:
    with reliability.writing(self.logdir):
      for name in ("loss", "accuracy", "learning_rate", "density"):
        self._writer.add_scalar(f"train/{name}", row[name], row["epoch_index"])
      self._writer.flush()

  def task_end(self, task: int, accuracies: abc.Sequence[float], *, average: float,
               epoch_index: int) -> None:
    del task
    with reliability.writing(self.logdir):
      self._writer.add_scalar("test/average_accuracy", average, epoch_index)
      for j, a in enumerate(accuracies):
        if a is not None and math.isfinite(a):
          self._writer.add_scalar(f"test/task_{j + 1}", a, epoch_index)
      self._writer.flush()

  def close(self) -> None:
    writer, self._writer = self._writer, None
    if writer is None:
      return
    try:
      with reliability.writing(self.logdir):
        writer.close()
    except BaseException:
      _stop_event_thread(writer)  # its final flush failed: still end the writer thread
      raise

  def where(self) -> list[tuple[str, str]]:
    return [("TensorBoard", f"tensorboard --logdir {self.logdir}")]


class RunLog:
  """One run's log: hands every epoch, task end and the final results to a list of trackers.

  The trackers are :class:`CsvLog` (``metrics.csv``), :class:`TensorBoardLog` and then
  ``trackers`` (e.g. :func:`sparse_cl_jax.trackers.from_config`: W&B), in this order.

  Args:
    workdir: the run's directory (exists; the caller holds its lock).
    resume_index: None for a run that starts afresh (logs of an earlier attempt that saved no
      checkpoint are moved to ``unfinished-<time>/``); ``k`` for a run resumed from a checkpoint
      taken after its ``k``-th logged epoch.
    config_text: written once to TensorBoard's text tab (default: ``config`` as indented JSON).
    config: the run's config as a plain dict, for the trackers.
    trackers: further :class:`sparse_cl_jax.trackers.Tracker` objects (not yet started).
    write: False for the processes other than 0 of a multi-process run: the log counts epochs
      but writes nothing (process 0 writes the run's files).
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_index: int | None,
               config_text: str | None = None, config: dict[str, Any] | None = None,
               trackers: abc.Sequence[trackers_lib.Tracker] = (), write: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.csv_path = self.workdir / CSV_FILE
    self.tensorboard_dir = self.workdir / TENSORBOARD_DIR
    self.moved_to: pathlib.Path | None = None
    if not write:
      self.index = 0 if resume_index is None else int(resume_index)
      self._t0 = time.time()
      self.trackers = []
      return
    if resume_index is None:
      self.moved_to = self._move_unfinished()
      self.index = 0
    else:
      self.index = int(resume_index)
    self._t0 = time.time()
    if config_text is None and config is not None:
      config_text = "```\n" + json.dumps(config, indent=1) + "\n```"
    self.trackers: list[trackers_lib.Tracker] = [CsvLog(), TensorBoardLog(config_text),
                                                 *trackers]
    info = trackers_lib.RunInfo(workdir=self.workdir, resume_index=resume_index, config=config)
    started = []
    try:
      for tracker in self.trackers:
        tracker.start(info)
        started.append(tracker)
    except BaseException:
      _close_all(started)
      raise

  def _move_unfinished(self) -> pathlib.Path | None:
    entries = [p for p in (self.csv_path, self.workdir / SUPERSEDED_FILE, self.tensorboard_dir,
                           self.workdir / PLOTS_DIR) if p.exists()]
    with reliability.writing(self.workdir):
      return reliability.move_into_fresh(entries, self.workdir, UNFINISHED_PREFIX)

  def epoch(self, *, task: int, phase: str, operation: int, epoch: int, epochs: int, loss: float,
            accuracy: float, learning_rate: float, density: float) -> int:
    """Logs one training epoch (task and epoch 0-based here, 1-based in the files).

    Returns:
      The epoch's ``epoch_index``.
    """
    self.index += 1
    row = {"epoch_index": self.index, "task": task + 1, "phase": phase, "operation": operation,
           "epoch": epoch + 1, "epochs": epochs, "loss": loss, "accuracy": accuracy,
           "learning_rate": learning_rate, "density": density, "seconds": time.time() - self._t0,
           "time": datetime.datetime.now().isoformat(timespec="seconds")}
    for tracker in self.trackers:
      tracker.epoch(row)
    return self.index

  def task_end(self, task: int, accuracies: abc.Sequence[float], average: float) -> None:
    """Logs the test accuracies after training ``task`` (0-based) at the current epoch_index."""
    for tracker in self.trackers:
      tracker.task_end(task, list(accuracies), average=average, epoch_index=self.index)

  def finish(self, results: abc.Mapping[str, Any]) -> None:
    """Hands the run's final results to every tracker (once, after ``results.json``)."""
    for tracker in self.trackers:
      tracker.finish(results)

  def where(self) -> list[tuple[str, str]]:
    """The ``(what, where)`` lines of every tracker, in order."""
    return [line for tracker in self.trackers for line in tracker.where()]

  def close(self) -> None:
    _close_all(self.trackers)


def _stop_event_thread(writer) -> None:
  """Ends the event thread of a tensorboardX writer whose ``close`` failed (best effort)."""
  try:
    for file_writer in (getattr(writer, "file_writer", None),
                        *(getattr(writer, "all_writers", None) or {}).values()):
      event_writer = getattr(file_writer, "event_writer", None)
      worker = getattr(event_writer, "_worker", None)
      if worker is not None and worker.is_alive():
        worker.stop()
  except Exception:  # pylint: disable=broad-except  # a daemon thread: ends with the process
    pass


def _close_all(started: abc.Sequence[trackers_lib.Tracker]) -> None:
  """Closes every tracker, even when one fails; then raises the first failure."""
  error = None
  for tracker in started:
    try:
      tracker.close()
    except Exception as e:  # pylint: disable=broad-except  # the others must still close
      error = error or e
  if error is not None:
    raise error


# --------------------------------------------------------------------------------------------------
# The progress bar and the log lines.


def exclude_first_epoch_from_rate(bar) -> None:
  """Makes a tqdm bar estimate its rate (and ETA) from the epochs after the current one.

  Call it once per bar at the end of its first epoch, before that epoch's ``bar.update(1)``: the
  epoch includes the compilation of the step, so an estimate from it is far too long. Until the
  second epoch ends the bar shows no estimate ('?'); then the rate is the plain average over the
  epochs since the first. The elapsed time it shows still counts from the start.
  """
  if getattr(bar, "disable", True):
    return
  if not isinstance(bar, _RateAfterFirstEpoch):
    bar.__class__ = _rate_after_first_epoch_class(type(bar))
  bar.after_first = (bar.n + 1, bar._time())  # pylint: disable=protected-access  # its clock


class _RateAfterFirstEpoch:
  """Mixin for tqdm bars: ``format_dict``'s rate counts only what was done after ``after_first``."""

  after_first: tuple[float, float] = (0, 0.0)  # (n at the end of the first epoch, its time)

  @property
  def format_dict(self):
    d = super().format_dict  # pytype: disable=attribute-error
    n0, t0 = self.after_first
    done, dt = self.n - n0, self._time() - t0  # pytype: disable=attribute-error
    if done > 0 and dt > 0:
      d["rate"] = done / dt
    else:  # no estimate yet: tqdm's own fallback (n - initial) / elapsed must give 0 too
      d["rate"], d["initial"] = None, d["n"]
    return d


_RATE_CLASSES: dict[type, type] = {}


def _rate_after_first_epoch_class(cls: type) -> type:
  if cls not in _RATE_CLASSES:
    _RATE_CLASSES[cls] = type(f"{cls.__name__}RateAfterFirstEpoch", (_RateAfterFirstEpoch, cls), {})
  return _RATE_CLASSES[cls]


class _TqdmStream:
  """A text stream that writes through ``tqdm.write`` (clears and redraws the bars)."""

  def __init__(self, target):
    self.target = target

  def write(self, text: str) -> int:
    import tqdm  # pylint: disable=g-import-not-at-top
    tqdm.tqdm.write(text, file=self.target, end="")
    return len(text)

  def flush(self) -> None:
    self.target.flush()


@contextlib.contextmanager
def logs_above_progress_bars():
  """Routes console log records and Python warnings through ``tqdm.write``.

  Inside the block a log line (absl's handler, plain stderr/stdout handlers) or a warning printed
  while a progress bar is shown appears above the bar instead of being written into it.
  """
  import logging  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  swapped = []
  handlers = list(logging.getLogger().handlers)
  absl_handler = absl_logging.get_absl_handler()
  if absl_handler in handlers:
    handlers.append(absl_handler.python_handler)
  for h in handlers:
    stream = getattr(h, "stream", None)
    if isinstance(h, logging.StreamHandler) and stream in (sys.stderr, sys.stdout):
      swapped.append((h, stream))
      h.setStream(_TqdmStream(stream))
  show = warnings.showwarning

  def show_above_bars(message, category, filename, lineno, file=None, line=None):
    if file is not None:  # someone else's destination: leave it
      return show(message, category, filename, lineno, file, line)
    _TqdmStream(sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))

  warnings.showwarning = show_above_bars
  try:
    yield
  finally:
    warnings.showwarning = show
    for h, stream in swapped:
      h.setStream(stream)


# --------------------------------------------------------------------------------------------------
# Plots.


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)
  return path


def plot_accuracy_matrix(R, path, *, title: str = "") -> pathlib.Path:
  """Heatmap of ``R[i, j]`` (test accuracy on task j after training task i), values written in."""
  R = np.asarray(R, dtype=float)
  T = R.shape[0]
  fig = _figure(1.6 + 0.55 * T, 1.2 + 0.5 * T)
  ax = fig.add_subplot()
  im = ax.imshow(np.ma.masked_invalid(R), vmin=0.0, vmax=1.0, cmap="viridis")
  if T <= 12:
    for i in range(T):
      for j in range(T):
        if np.isfinite(R[i, j]):
          ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=8,
                  color="white" if R[i, j] < 0.6 else "black")
  ticks = np.arange(T)
  ax.set_xticks(ticks, [str(t + 1) for t in ticks])
  ax.set_yticks(ticks, [str(t + 1) for t in ticks])
  ax.set_xlabel("evaluated on task")
  ax.set_ylabel("after training task")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="test accuracy")
  return _save(fig, path)


def plot_average_accuracy(curves: abc.Mapping[str, abc.Sequence[float]], path, *,
                          title: str = "") -> pathlib.Path:
  """Average test accuracy over the tasks seen so far, after each task, one line per run."""
  fig = _figure(6.0, 3.8)
  ax = fig.add_subplot()
  for name, curve in curves.items():
    curve = np.asarray(curve, dtype=float)
    ax.plot(np.arange(1, curve.size + 1), curve, marker="o", label=name)
  ax.set_xlabel("after training task")
  ax.set_ylabel("average accuracy on tasks seen")
  ax.set_ylim(0.0, 1.02)
  ax.grid(alpha=0.3)
  n = max((len(c) for c in curves.values()), default=1)
  ax.set_xticks(np.arange(1, n + 1))
  if len(curves) > 1:
    ax.legend(fontsize=8)
  ax.set_title(title, fontsize=9)
  return _save(fig, path)


def plot_capacity(capacity_per_layer: abc.Mapping[str, abc.Mapping[str, float]], path, *,
                  title: str = "") -> pathlib.Path:
  """Stacked bars: the fraction of each layer's maskable weights owned by each task, and free."""
  layers = list(capacity_per_layer)
  keys = [k for k in next(iter(capacity_per_layer.values()))]
  tasks = [k for k in keys if k != "free"]
  fig = _figure(7.0, 1.6 + 0.35 * len(layers))
  ax = fig.add_subplot()
  left = np.zeros(len(layers))
  colours = _task_colours(len(tasks))
  for k, colour in zip(tasks + ["free"], colours + [(0.85, 0.85, 0.85, 1.0)]):
    width = np.nan_to_num(np.array([capacity_per_layer[layer].get(k) for layer in layers],
                                   dtype=float))  # None / NaN: an empty leaf
    ax.barh(np.arange(len(layers)), width, left=left, color=colour,
            label=k.replace("task_", "task ") if k != "free" else "free")
    left += width
  ax.set_yticks(np.arange(len(layers)), layers, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlim(0.0, 1.0)
  ax.set_xlabel("fraction of the layer's maskable weights")
  fig.legend(fontsize=7, loc="outside lower center", ncols=min(len(tasks) + 1, 8))
  ax.set_title(title, fontsize=9)
  return _save(fig, path)


def _task_colours(n: int):
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  cmap = colormaps["tab10" if n <= 10 else "viridis"]
  return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def plot_training(rows: abc.Sequence[abc.Mapping[str, Any]], path, *,
                  title: str = "") -> pathlib.Path:
  """Training loss and accuracy per epoch (from :func:`read_metrics`), tasks shaded in turn."""
  fig = _figure(7.0, 4.2)
  ax_loss, ax_acc = fig.subplots(2, 1, sharex=True)
  x = np.array([r["epoch_index"] for r in rows])
  tasks = np.array([r["task"] for r in rows])
  for ax, key, label in ((ax_loss, "loss", "training loss"),
                         (ax_acc, "accuracy", "training accuracy")):
    ax.plot(x, [r[key] for r in rows], marker=".", linewidth=1)
    ax.set_ylabel(label, fontsize=8)
    ax.grid(alpha=0.3)
    for t in np.unique(tasks)[::2]:
      sel = x[tasks == t]
      ax.axvspan(sel.min() - 0.5, sel.max() + 0.5, color="0.92", zorder=0)
  ax_acc.set_xlabel("epoch (all tasks and phases; shaded: every other task)")
  ax_loss.set_title(title, fontsize=9)
  return _save(fig, path)


def write_run_plots(workdir: str | os.PathLike, results: abc.Mapping[str, Any]) -> list[pathlib.Path]:
  """The PNGs of a finished run (from its results and ``metrics.csv``) in ``workdir/plots``."""
  plots = pathlib.Path(workdir) / PLOTS_DIR
  with reliability.writing(plots):
    return _write_run_plots(workdir, plots, results)


def _write_run_plots(workdir, plots: pathlib.Path, results) -> list[pathlib.Path]:
  c = results.get("config", {})
  name = (f"{results.get('method')} on {c.get('dataset')} ({c.get('scenario')}, "
          f"{c.get('num_tasks')} tasks)")
  R = np.asarray(results["accuracy_matrix"], dtype=float)
  out = [plot_accuracy_matrix(R, plots / "accuracy_matrix.png",
                              title=f"{name}: ACC {results['acc']:.4f}, BWT {results['bwt']:.4f}"),
         plot_average_accuracy({results.get("method", "run"): results["average_accuracy_curve"]},
                               plots / "average_accuracy.png", title=name)]
  rows = read_metrics(workdir)
  if rows:
    out.append(plot_training(rows, plots / "training.png", title=name))
  if results.get("capacity_per_layer"):
    out.append(plot_capacity(results["capacity_per_layer"], plots / "capacity.png",
                             title=f"{name}: capacity per layer after the last task"))
  return out


# --------------------------------------------------------------------------------------------------
# Several runs.

COMPARE_COLUMNS = ("run", "method", "dataset", "tasks", "ACC", "BWT", "forgetting",
                   "ACC aware", "ACC agnostic", "BWT aware", "BWT agnostic",
                   "final density", "train s")
# ACC, BWT, forgetting: the run's own accuracy view; then both views (results.json's
# ``task_aware`` and ``task_agnostic``; "-" for a run written before they were kept).


def load_finished(workdir: str | os.PathLike) -> dict[str, Any]:
  """``workdir/results.json``; ValueError naming the folder if the run has not finished."""
  path = pathlib.Path(workdir) / "results.json"
  if not path.is_file():
    what = ("holds an unfinished run (no results.json yet; rerun its command to resume it)"
            if (pathlib.Path(workdir) / "checkpoints").is_dir() or
            (pathlib.Path(workdir) / CSV_FILE).exists() else
            "is not a run directory (no results.json)")
    raise ValueError(f"{workdir} {what}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def compare_rows(workdirs: abc.Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
  """One row per run directory: the columns of :data:`COMPARE_COLUMNS` and the curve."""
  rows = []
  names = _short_names([str(w) for w in workdirs])
  for name, w in zip(names, workdirs):
    r = load_finished(w)
    c = r.get("config", {})
    dens = r.get("density_per_task") or [float("nan")]
    rows.append({"run": name, "method": r.get("method"), "dataset": c.get("dataset"),
                 "tasks": len(r["accuracy_matrix"]), "ACC": r["acc"], "BWT": r["bwt"],
                 "forgetting": r.get("forgetting"),
                 **{f"{k} {v.split('_')[1]}": (r.get(v) or {}).get(k.lower())
                    for k in ("ACC", "BWT") for v in ("task_aware", "task_agnostic")},
                 "final density": dens[-1],
                 "train s": r.get("train_seconds"), "path": str(w),
                 "curve": r.get("average_accuracy_curve")})
  return rows


def _short_names(paths: list[str]) -> list[str]:
  """The shortest distinct trailing path parts (``/a/x/pn``, ``/a/y/pn`` -> ``x/pn``, ``y/pn``)."""
  parts = [pathlib.Path(p).resolve().parts for p in paths]
  for n in range(1, max(len(p) for p in parts) + 1):
    names = ["/".join(p[-n:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return paths


def _fmt(v) -> str:
  if isinstance(v, float):
    return "-" if not math.isfinite(v) else f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
  return "-" if v is None else str(v)


def compare_table(rows: abc.Sequence[abc.Mapping[str, Any]]) -> str:
  """A Markdown table of :func:`compare_rows`."""
  head = list(COMPARE_COLUMNS)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join(
        f"{r[c]:.1f}" if c == "train s" and isinstance(r[c], float) else _fmt(r[c])
        for c in head) + " |")
  return "\n".join(lines)


def write_compare_files(rows, out: str | os.PathLike, *, title: str = "") -> list[pathlib.Path]:
  """``out/compare.md``, ``compare.csv`` and ``compare.png`` for :func:`compare_rows`."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  md = out / "compare.md"
  md.write_text(compare_table(rows) + "\n\n" + "\n".join(
      f"- {r['run']}: {r['path']}" for r in rows) + "\n", encoding="utf-8")
  path = out / "compare.csv"
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(list(COMPARE_COLUMNS) + ["path"])
    for r in rows:
      w.writerow([r[c] for c in COMPARE_COLUMNS] + [r["path"]])
  png = plot_average_accuracy({r["run"]: r["curve"] for r in rows}, out / "compare.png",
                              title=title)
  return [md, path, png]
