"""Where a run's log goes: the tracker interface, its registry, and Weights & Biases.

Layer 2 of the design (harness). A run's log (:class:`sparse_cl_jax.logs.RunLog`) hands every
event to a list of trackers: ``metrics.csv`` and TensorBoard (:class:`sparse_cl_jax.logs.CsvLog`,
:class:`sparse_cl_jax.logs.TensorBoardLog`) always, then one tracker from each factory registered
here that accepts the run's config: :class:`WandbTracker` when ``config.wandb.mode`` is
``"offline"`` or ``"online"``. A tracker is one small class; every method has a no-op default:

* ``start(run)``: once, before any other call (:class:`RunInfo`: workdir, where the run resumes,
  the config as a plain dict).
* ``epoch(row)``: every training epoch, the ``metrics.csv`` row with its numbers unformatted.
* ``task_end(task, accuracies, average=, epoch_index=)``: after each task (0-based), the test
  accuracy on every task.
* ``finish(results)``: once, when the results are final (``results.json`` is written).
* ``close()``: always, however the run ends.
* ``where()``: ``(what, where)`` lines for the summary a finished run prints.

A run resumed from a checkpoint taken after its ``k``-th logged epoch starts with
``run.resume_index == k`` and logs epochs ``k + 1, ...`` again: epochs a killed attempt logged
after that checkpoint come once more (the same values: a resumed run repeats itself exactly), and
each tracker decides what to do with them (the CSV supersedes them, W&B skips them).

Weights & Biases (``pip install 'sparse_cl_jax[wandb]'``; ``wandb`` is imported only when a run
asks for it) keeps its files in ``WORKDIR/wandb/`` under a run named after the workdir, with the
config; it logs per epoch the ``metrics.csv`` fields (``train/loss``, ``train/accuracy``,
``train/learning_rate``, ``train/density`` as in TensorBoard, and ``task``, ``phase``,
``operation``, ``epoch``, ``epochs``, ``seconds``), after each task ``test/average_accuracy`` and
``test/task_<j>``, all at step ``epoch_index``; at the end the accuracy matrix as a table
(``accuracy_matrix``) and ``acc``, ``bwt``, ``forgetting``, ``final_density``, ``train_seconds``
in the summary. ``WORKDIR/wandb_run.json`` holds the W&B run id and how far it was logged, so a
resumed run continues the same W&B run and logs no epoch twice (a run that starts afresh, or that
turns W&B on only when it resumes, starts a new W&B run). ``offline`` never touches the network
(``wandb sync WORKDIR/wandb/offline-run-*`` uploads later); ``config.wandb`` is not part of the
run's fingerprint.

Example (another tracker)::

  from sparse_cl_jax import trackers

  class PrintLoss(trackers.Tracker):
    def epoch(self, row):
      print(row["epoch_index"], row["loss"])

  trackers.register(lambda config: PrintLoss())  # every later experiment.run uses it
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import secrets
import string
from collections import abc
from typing import Any, Callable

WANDB_DIR = "wandb"
WANDB_STATE_FILE = "wandb_run.json"


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What a tracker learns when a run's log starts.

  Attributes:
    workdir: the run's directory (exists; the run holds its lock).
    resume_index: None for a run that starts afresh; ``k`` for one resumed from a checkpoint taken
      after its ``k``-th logged epoch (the next ``epoch`` row has ``epoch_index == k + 1``).
    config: the run's config as a plain dict (``sparse_cl_jax.config.to_dict``), or None.
  """

  workdir: pathlib.Path
  resume_index: int | None
  config: dict[str, Any] | None = None


class Tracker:
  """One destination of a run's log; subclasses override the events they record."""

  def start(self, run: RunInfo) -> None:
    """Called once, before any other event."""

  def epoch(self, row: abc.Mapping[str, Any]) -> None:
    """One training epoch: ``row`` has the keys of ``logs.CSV_FIELDS`` (numbers unformatted)."""

  def task_end(self, task: int, accuracies: abc.Sequence[float], *, average: float,
               epoch_index: int) -> None:
    """The test accuracies on every task after training ``task`` (0-based)."""

  def finish(self, results: abc.Mapping[str, Any]) -> None:
    """The run's final results (what ``results.json`` holds)."""

  def close(self) -> None:
    """Releases what the tracker holds; called however the run ends."""

  def where(self) -> list[tuple[str, str]]:
    """``(what, where)`` lines for the paths a finished run prints."""
    return []


Factory = Callable[[Any], "Tracker | None"]
_FACTORIES: list[Factory] = []


def register(factory: Factory) -> Factory:
  """Adds ``factory(config) -> Tracker | None`` for every later run; returns it (a decorator)."""
  _FACTORIES.append(factory)
  return factory


def unregister(factory: Factory) -> None:
  """Removes a factory :func:`register` added."""
  _FACTORIES.remove(factory)


def from_config(config) -> list[Tracker]:
  """The trackers the registered factories give for ``config`` (besides CSV and TensorBoard).

  Called before a run touches its workdir, so a tracker that cannot work (``wandb`` not
  installed) stops the run with one line before anything else happens.
  """
  return [t for t in (f(config) for f in list(_FACTORIES)) if t is not None]


# --------------------------------------------------------------------------------------------------
# Weights & Biases.


def _new_run_id() -> str:
  """8 random characters from ``[a-z0-9]``, as W&B's own run ids."""
  return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _finite_or_none(x):
  return float(x) if x is not None and math.isfinite(float(x)) else None


class WandbTracker(Tracker):
  """Logs a run to Weights & Biases (module docstring); ``import wandb`` happens here only.

  Args:
    mode: ``"offline"`` or ``"online"``.
    project: the W&B project.
    entity: the W&B entity (user or team); ``""`` = the default of your login.

  Raises:
    ValueError: ``wandb`` is not installed (the one line names the extra to install).
  """

  def __init__(self, *, mode: str, project: str, entity: str = ""):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError(f"config.wandb.mode={mode} needs the wandb package: "
                       "pip install 'sparse_cl_jax[wandb]'") from e
    self._wandb = wandb
    self.mode, self.project, self.entity = mode, project, entity
    self.run = None
    self._state_path: pathlib.Path | None = None
    self._state: dict[str, Any] = {}

  @classmethod
  def from_config(cls, config) -> WandbTracker | None:
    """The tracker ``config.wandb`` asks for; None when its mode is ``"disabled"``."""
    w = config.get("wandb")
    if w is None or w.get("mode", "disabled") == "disabled":
      return None
    return cls(mode=w.mode, project=w.get("project", ""), entity=w.get("entity", ""))

  def start(self, run: RunInfo) -> None:
    wandb = self._wandb
    workdir = pathlib.Path(run.workdir).absolute()
    self._state_path = workdir / WANDB_STATE_FILE
    state = {}
    if run.resume_index is not None and self._state_path.exists():
      with open(self._state_path, encoding="utf-8") as f:
        state = json.load(f)
    # epochs: the highest epoch_index logged; tasks: how many tasks' accuracies were logged.
    self._state = {"id": state.get("id") or _new_run_id(),
                   "epochs": max(int(state.get("epochs", 0)), int(run.resume_index or 0)),
                   "tasks": int(state.get("tasks", 0))}
    (workdir / WANDB_DIR).mkdir(exist_ok=True)
    self.run = wandb.init(
        project=self.project or None, entity=self.entity or None, dir=str(workdir),
        id=self._state["id"], name=workdir.name, mode=self.mode, resume="allow",
        reinit="create_new", config=run.config, allow_val_change=True,
        # console="off": the terminal shows what it shows without W&B (progress bars included).
        settings=wandb.Settings(silent=True, console="off"))
    self._save_state()

  def _save_state(self) -> None:
    tmp = self._state_path.with_name(f".{WANDB_STATE_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(self._state) + "\n", encoding="utf-8")
    os.replace(tmp, self._state_path)

  def epoch(self, row: abc.Mapping[str, Any]) -> None:
    step = int(row["epoch_index"])
    if step <= self._state["epochs"]:  # logged by an attempt killed after its newest checkpoint
      return
    metrics = ("loss", "accuracy", "learning_rate", "density")
    data = {f"train/{k}": float(row[k]) for k in metrics}
    data.update({k: row[k] for k in ("task", "phase", "operation", "epoch", "epochs", "seconds")})
    self.run.log(data, step=step)
    self._state["epochs"] = step
    self._save_state()

  def task_end(self, task: int, accuracies: abc.Sequence[float], *, average: float,
               epoch_index: int) -> None:
    if task < self._state["tasks"]:
      return
    data = {"test/average_accuracy": float(average)}
    data.update({f"test/task_{j + 1}": float(a) for j, a in enumerate(accuracies)
                 if _finite_or_none(a) is not None})
    self.run.log(data, step=max(int(epoch_index), self._state["epochs"]))
    self._state["tasks"] = task + 1
    self._save_state()

  def finish(self, results: abc.Mapping[str, Any]) -> None:
    R = results["accuracy_matrix"]
    table = self._wandb.Table(
        columns=["after task"] + [f"task {j + 1}" for j in range(len(R))],
        data=[[i + 1] + [_finite_or_none(a) for a in row] for i, row in enumerate(R)])
    self.run.log({"accuracy_matrix": table}, step=self._state["epochs"])
    density = results.get("density_per_task") or [None]
    summary = {"acc": results.get("acc"), "bwt": results.get("bwt"),
               "forgetting": results.get("forgetting"), "final_density": density[-1],
               "train_seconds": results.get("train_seconds")}
    self.run.summary.update({k: v for k, v in summary.items() if v is not None})

  def close(self) -> None:
    if self.run is not None:
      self.run.finish()

  def where(self) -> list[tuple[str, str]]:
    if self.run is None:
      return []
    if self.mode == "offline":
      return [("W&B (offline)", f"wandb sync {os.path.dirname(self.run.dir)}")]
    return [("W&B", str(self.run.url))]


register(WandbTracker.from_config)
