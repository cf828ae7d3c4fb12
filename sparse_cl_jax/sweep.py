"""Sweeps: a grid of runs over config fields, run together with shared compiled programs.

Layer 4 of the design (experiment), beside :mod:`sparse_cl_jax.experiment`; the launcher
``experiments/sweep.py`` calls :func:`run`. A sweep is the product of the values of a grid
``{field: [values]}`` over any config fields (dotted for nested ones: ``dst.sparsity``,
``packnet.prune_fraction``, ``model_kwargs.fc_layers``). Every cell of the grid is a normal
:func:`experiment.run` in its own folder ``WORKDIR/<cell name>/`` and its own thread; their
trainer programs go through one :class:`sparse_cl_jax.train.lockstep.Lockstep`, which runs the
calls of cells whose programs are the same computation as one vmapped program. A cell ends
exactly as it would alone (bit for bit on XLA:CPU for dense networks, see the Lockstep).

* Cell names: ``FIELD-VALUE`` for each swept field, joined by ``_``, e.g.
  ``seed-0_learning_rate-0.05``; booleans ``true``/``false``, floats as Python writes them
  (``1e-06``), tuples with their elements joined by ``,`` (``hidden-64,64``; ``empty`` for
  ``()``). Characters outside ``[A-Za-z0-9._,+-]`` become ``-``; a name that then repeats another
  gets ``-2``, ``-3`` ...; a name over 180 characters is cut and ends with a hash of the whole.
  The cell of a sweep with no swept field is ``base``.
* Program classes (:func:`program_class`): cells whose configs are equal except for the fields
  in :data:`DATA_FIELDS` are expected to compile the same programs. The Lockstep checks the first
  two cells of each class and splits a class whose programs differ (``split_programs``), so a
  wrong entry costs speed, never correctness.
* ``--max_parallel=N`` (``max_parallel``): at most N cells run at a time, in waves: the next N
  start when every cell of the wave has ended; one Lockstep serves all waves (its compiled
  programs are reused). 0 runs every cell at once.
* ``WORKDIR/sweep.json`` is written before the first cell starts (every cell ``pending``),
  rewritten as each cell ends and at the end: ``command``, ``grid``, ``base_overrides``,
  ``base_config`` (the config every cell starts from), ``status`` (``running``; at the end
  ``done``, ``incomplete``, or ``pending`` when cells stopped early), ``cells`` (per cell:
  ``name``, ``overrides``, ``workdir``, ``program``, ``cells_in_program``, ``shared_with``,
  ``calls``, ``batched_calls``, ``largest_group`` (over every invocation that ran the cell: calls
  summed, the largest group the largest), ``status`` (``done``, ``diverged``, ``failed``,
  ``pending``), ``error`` (one line), ``traceback`` (``failed`` only), ``acc``, ``bwt`` (the
  run's own accuracy view) and ``acc_task_aware``, ``acc_task_agnostic``, ``bwt_task_aware``,
  ``bwt_task_agnostic`` (both views)),
  ``split_programs``, ``wall_seconds`` (of this invocation) and ``max_parallel``.
* At the end: ``WORKDIR/summary.md`` (printed too): one row per combination of the swept fields
  other than ``seed``, ACC and BWT (the runs' own view, then task-aware and task-agnostic) as
  mean ± sample sd over the finished seeds (n shown); and
  ``WORKDIR/compare.{md,csv,png}`` over the finished cells (:func:`logs.write_compare_files`).
* Faults stay in their cell: a cell that diverges is ``diverged``, one that raises anything else
  ``failed``; the others go on, every file is written, and :func:`run` then raises
  :class:`SweepIncompleteError` naming them (the launcher: one line, exit status 1).
* Stopping: SIGTERM or SIGINT (the first) asks every running cell to stop: each saves a checkpoint
  at the end of the epoch it is in (as ``experiment.run`` does), no further wave starts,
  ``sweep.json`` is written with those cells ``pending``, and :func:`run` prints one line naming
  the cells and where each was saved, then raises :class:`reliability.RunInterrupted` (exit status
  143 or 130); rerunning the same command resumes them. A second signal exits at once.
* Resume: running the same sweep again continues it: a cell with ``results.json`` is read back,
  not rerun; an unfinished one resumes from its checkpoints. A workdir holding a sweep of another
  grid or base config (the fields that never change results aside) is refused, naming the
  differences, unless ``overwrite=True``, which moves its content into
  ``WORKDIR/previous-<time>/`` (nothing is deleted). One process at a time (``WORKDIR/run.lock``).

Example::

  from sparse_cl_jax import sweep
  base = ...  # a config, e.g. configs/packnet.py get_config("runlocal")
  record = sweep.run(base, {"seed": [0, 1], "learning_rate": [0.05, 0.1]}, "/tmp/sweep")
  [(c["name"], c["acc"]) for c in record["cells"]]
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
import sys
import threading
import time
import traceback
from collections import abc
from typing import Any

import jax
import ml_collections
import numpy as np

from sparse_cl_jax import checkpoint
from sparse_cl_jax import config as config_lib
from sparse_cl_jax import distributed
from sparse_cl_jax import experiment
from sparse_cl_jax import logs
from sparse_cl_jax import metrics
from sparse_cl_jax import reliability
from sparse_cl_jax import runtime
from sparse_cl_jax.train import lockstep as lockstep_lib

# Fields whose values are data of the compiled programs (not their structure): cells that differ
# only in these share a program class. Dotted paths name nested fields. Decided field by field by
# lowering each method's :runlocal step and evaluation programs with two values of the field and
# comparing the StableHLO (tests/test_sweep_fields.py keeps a sample of them checked). Not in the
# list because they are constants of the compiled step: weight_decay and momentum (inside the
# optax chain), cpg.weight_decay, cpg.mask_threshold, piggyback.threshold, llt.l1, and LLT's loss
# weights and temperature (llt.gamma1, llt.gamma2, llt.temperature, inside the multi-source step);
# fields that change shapes (width_multiplier, hidden, batch sizes, epochs, caps, llt.knn,
# llt.exemplars_per_class, prac.queue_length, prac.rounds) separate programs anyway.
DATA_FIELDS = (
    "seed", "learning_rate", "lr_decay", "lr_milestones", "divergence_threshold", "val_fraction",
    "packnet.prune_fraction", "packnet.retrain_lr",
    "cpg.goal_finetune_lr", "cpg.goal_repeats", "cpg.goal_tolerance", "cpg.mask_init",
    "cpg.mask_lr", "cpg.min_train_acc", "cpg.prune_every", "cpg.prune_lr", "cpg.retrain_lr",
    "cpg.retrain_mask_lr", "cpg.retrain_patience",
    "piggyback.lr", "piggyback.mask_init", "piggyback.mask_lr", "piggyback.mask_lr_decay",
    "clnp.finetune_lr", "clnp.margin",
    "dst.sparsity", "dst.drop_fraction", "dst.drop_fraction_final", "dst.t_end", "dst.update_every",
    "llt.prune_fraction", "llt.retrain_lr", "llt.late_epoch", "llt.bu_accept",
    "llt.bu_base_sparsity", "llt.bu_max_drop", "llt.bu_max_rounds", "llt.bu_regrow",
    "llt.knn_memory_mb",
    "prac.rate", "prac.data_rate", "prac.eb_eps", "prac.rewind_epoch", "prac.score_batches",
    "prac.threshold",
)
# Fields a sweep cannot vary, and why.
FIXED_FIELDS = {
    "method": "it changes the config's structure; run one sweep per config file",
    "progress": "cells never show progress bars (the sweep prints a line as each cell ends)",
    "compilation_cache": "one process has one compilation cache",
    "num_devices": "a sweep cell runs on one device for now",
    "data_dir": "set it once with --config.data_dir",
}
SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.md"
BASE_CELL = "base"  # the name of the only cell of a sweep with no swept field
STATUSES = ("done", "diverged", "failed", "pending")
# Base-config fields that never change results: a rerun may change them and still continue.
_NOT_COMPARED = ("progress", "checkpoint_every_epochs", "epoch_loop", "compilation_cache",
                 "divergence_threshold")
_MAX_NAME = 180


class GridError(ValueError):
  """A grid that cannot run (unknown or fixed field, bad value, invalid cell): nothing ran."""


class WorkdirMismatchError(ValueError):
  """The workdir holds another sweep (or something that is not a sweep) and no ``overwrite``."""


class SweepIncompleteError(reliability.FaultError):
  """Some cells diverged or failed; every other cell's results and the sweep's files exist."""

  def __init__(self, message: str, record: dict):
    super().__init__(message)
    self.record = record


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid: its name, the swept values, its config and its program class."""
  name: str
  overrides: dict
  config: ml_collections.ConfigDict
  program: str


# --------------------------------------------------------------------------------------------------
# The grid.


def _current(config: ml_collections.ConfigDict, field: str) -> tuple[bool, Any]:
  """``(exists, value)`` of the dotted ``field``."""
  node: Any = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False, None
    node = node[part]
  return True, node


def _type_ok(value: Any, current: Any) -> bool:
  if current is None:
    return True
  if isinstance(current, bool):
    return isinstance(value, bool)
  if isinstance(current, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(current, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(current, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(current))


def _plain(value: Any) -> Any:
  """A grid value as JSON reads it back (tuples as lists)."""
  return json.loads(json.dumps(value))


def _value_text(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return ",".join(_value_text(v) for v in value) or "empty"
  if value is None or value == "":
    return "none" if value is None else "empty"
  return str(value)


def cell_names(overrides: abc.Sequence[abc.Mapping[str, Any]]) -> list[str]:
  """The folder names of cells with these swept values (see the module docstring); unique."""
  names, seen = [], set()
  for o in overrides:
    name = "_".join(f"{k}-{_value_text(v)}" for k, v in o.items()) or BASE_CELL
    name = re.sub(r"[^A-Za-z0-9._,+-]", "-", name)
    if len(name) > _MAX_NAME:
      name = name[:_MAX_NAME] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    unique, k = name, 2
    while unique in seen:
      unique, k = f"{name}-{k}", k + 1
    seen.add(unique)
    names.append(unique)
  return names


def _drop(d: dict, field: str) -> None:
  *parents, last = field.split(".")
  for p in parents:
    d = d.get(p)
    if not isinstance(d, dict):
      return
  d.pop(last, None)


def program_class(config: ml_collections.ConfigDict) -> str:
  """The program class of a cell: a hash of its config without the :data:`DATA_FIELDS`."""
  d = config_lib.to_dict(config)
  for field in DATA_FIELDS:
    _drop(d, field)
  text = json.dumps(d, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _set(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
  *parents, last = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  if isinstance(value, list):
    value = tuple(value)
  with node.unlocked() if node.is_locked else contextlib.nullcontext():
    if last not in node or node[last] is None:
      with node.ignore_type():
        node[last] = value
    else:
      node[last] = value


def _check_field(base: ml_collections.ConfigDict, field: str, values: abc.Sequence[Any]) -> None:
  """GridError if ``field`` cannot be swept over ``values``."""
  top = field.split(".")[0]
  if top in FIXED_FIELDS:
    raise GridError(f"sweep.{field} cannot vary in a sweep: {FIXED_FIELDS[top]}")
  exists, current = _current(base, field)
  model_field = field.startswith("model_kwargs.") and field.count(".") == 1
  if not exists and not model_field:
    near = config_lib.closest_fields(field, config_lib.field_paths(base))
    hint = (f"; did you mean {', '.join(f'sweep.{n}' for n in near)}?" if near else
            "; --help --config=... lists every field")
    raise GridError(f"no such field: sweep.{field}{hint}")
  if isinstance(current, ml_collections.ConfigDict) and not model_field:
    raise GridError(f"sweep.{field} is a group of fields; sweep one of them, e.g. "
                    f"sweep.{field}.FIELD=V1,V2")
  if isinstance(values, (str, bytes)) or not isinstance(values, abc.Sequence):
    raise GridError(f"sweep.{field}: give a list of values, not {values!r}")
  if not values:
    raise GridError(f"sweep.{field} has no values; list at least one: sweep.{field}=V1,V2,...")
  seen = []
  for v in values:
    if v is None or (isinstance(v, str) and not v.strip()):
      raise GridError(f"sweep.{field} has an empty value; list values, e.g. sweep.{field}=V1,V2")
    if exists and not _type_ok(v, current):
      raise GridError(f"sweep.{field}={v!r} has type {type(v).__name__}; the field's value "
                      f"{current!r} has type {type(current).__name__}")
    if _plain(v) in seen:
      raise GridError(f"sweep.{field} lists the value {v!r} twice; list each value once")
    seen.append(_plain(v))


def plan(base: ml_collections.ConfigDict, grid: abc.Mapping[str, abc.Sequence[Any]],
         ) -> list[Cell]:
  """The cells of the grid (the last field varies fastest), each config validated.

  Raises:
    GridError: naming the field or cell; nothing has run or been written.
  """
  config_lib.validate(base)
  if int(base.get("num_devices", 1)) != 1:
    raise GridError(f"config.num_devices={base.num_devices}: a sweep cell runs on one device for "
                    "now; set config.num_devices=1")
  for field, values in grid.items():
    _check_field(base, field, values)
  combos = [dict(zip(grid, vs)) for vs in itertools.product(*grid.values())]
  names = cell_names(combos)
  configs = []
  for name, overrides in zip(names, combos):
    c = copy.deepcopy(base)
    c.progress = False
    try:
      for field, value in overrides.items():
        _set(c, field, value)
      config_lib.validate(c)
      experiment.check_names(c)
    except (ValueError, TypeError) as e:
      message = reliability.one_line(e)
      for field in overrides:  # 'config.FIELD' of a swept field: the sweep's value
        message = re.sub(rf"(?<![\w.-])config\.{re.escape(field)}(?![\w.])", f"sweep.{field}",
                         message)
      raise GridError(f"cell {name}: {message}") from None
    configs.append(c)
  classes = [program_class(c) for c in configs]
  return [Cell(name=n, overrides=o, config=c, program=p)
          for n, o, c, p in zip(names, combos, configs, classes)]


def _error_line(e: BaseException) -> str:
  """The one-line error of a cell: the message, with the type for unexpected exceptions."""
  if isinstance(e, (reliability.FaultError, checkpoint.RunFinishedError, ValueError, OSError)):
    return reliability.one_line(e)
  return f"{type(e).__name__}: {reliability.one_line(e)}"


# --------------------------------------------------------------------------------------------------
# The workdir.


def _fingerprint(base: ml_collections.ConfigDict, grid) -> dict:
  conf = {k: v for k, v in config_lib.to_dict(base).items() if k not in _NOT_COMPARED}
  return {"grid": _plain({k: list(v) for k, v in grid.items()}), "base_config": conf}


def _read_record(path: pathlib.Path) -> dict:
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or not isinstance(record.get("cells"), list):
      raise TypeError("not a sweep record")
  except (ValueError, TypeError, UnicodeDecodeError) as e:
    raise WorkdirMismatchError(
        f"{path} is unreadable ({type(e).__name__}: {checkpoint.jsonfiles.first_line(e, 80)}); "
        "restore it, or pass --overwrite (moves the sweep aside, nothing is deleted), or use "
        "another --workdir") from None
  return record


def _check_workdir(workdir: pathlib.Path, fingerprint: dict, overwrite: bool) -> dict | None:
  """The stored record of the same sweep, None for a new one; refuses another sweep's folder."""
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"workdir {workdir} is a file, not a folder; pass a folder (it is created if "
                     "missing) as --workdir")
  if overwrite or not workdir.is_dir():
    return None
  path = workdir / SWEEP_FILE
  if not path.exists():
    other = sorted(p.name for p in workdir.iterdir()
                   if not p.name.startswith(checkpoint.PREVIOUS_PREFIX)
                   and p.name != reliability.LOCK_FILE)
    if other:
      listed = ", ".join(other[:5]) + (" ..." if len(other) > 5 else "")
      raise WorkdirMismatchError(
          f"workdir {workdir} is not a sweep folder (no {SWEEP_FILE}; it holds {listed}); use "
          "another --workdir, or --overwrite to move its content aside (nothing is deleted)")
    return None
  record = _read_record(path)
  stored = {"grid": record.get("grid"), "base_config": record.get("base_config")}
  diffs = checkpoint.workdir.fingerprint_diff(stored, fingerprint, ())
  if not diffs and list(stored["grid"] or {}) != list(fingerprint["grid"]):
    diffs = [f"grid fields {list(stored['grid'])} != {list(fingerprint['grid'])} (the order names "
             "the cells)"]
  if diffs:
    more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
    raise WorkdirMismatchError(
        f"workdir {workdir} holds another sweep: {'; '.join(diffs[:6])}{more} (stored != now); "
        "rerun with the stored grid and config to continue it, use another --workdir, or "
        "--overwrite to move it aside (nothing is deleted)")
  return record


# --------------------------------------------------------------------------------------------------
# Running.


class _Record:
  """``sweep.json``: the sweep's state, rewritten atomically (thread-safe) as cells end."""

  def __init__(self, workdir: pathlib.Path, data: dict):
    self.path = workdir / SWEEP_FILE
    self.data = data
    self.lock = threading.Lock()
    self.t0 = time.perf_counter()

  def cell(self, name: str) -> dict:
    return next(c for c in self.data["cells"] if c["name"] == name)

  def write(self) -> None:
    """Rewrites the file atomically, keys in the record's order (the grid's order matters).

    Only process 0 of a multi-process sweep writes it.
    """
    if not distributed.is_primary():
      return
    with self.lock, reliability.writing(self.path):
      self.data["wall_seconds"] = round(time.perf_counter() - self.t0, 3)
      text = json.dumps(self.data, indent=2) + "\n"
      tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
      try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)
      except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_entry(cell: Cell, workdir: pathlib.Path, counts: dict, old: dict | None) -> dict:
  old = old or {}
  return {"name": cell.name, "overrides": _plain(cell.overrides),
          "workdir": str((workdir / cell.name).resolve()), "program": cell.program,
          "cells_in_program": counts[cell.program],
          "shared_with": list(old.get("shared_with", [])),
          "calls": int(old.get("calls", 0)), "batched_calls": int(old.get("batched_calls", 0)),
          "largest_group": int(old.get("largest_group", 1)),
          "status": "pending", "error": None, "acc": None, "bwt": None}


def _finish_entry(entry: dict, results: dict) -> None:
  entry.update(status="done", error=None, acc=results.get("acc"), bwt=results.get("bwt"))
  for view in VIEWS:  # both accuracy views, when the run reports them
    if view in results:
      entry.update({f"{k}_{view}": results[view][k] for k in ("acc", "bwt")})
  entry.pop("traceback", None)


def _add_stats(entry: dict, stats: dict | None) -> None:
  if not stats:
    return
  entry["calls"] += stats["calls"]
  entry["batched_calls"] += stats["batched_calls"]
  entry["largest_group"] = max(entry["largest_group"], stats["largest_group"])
  entry["shared_with"] = sorted(set(entry["shared_with"]) | set(stats["shared_with"]))


def run(base: ml_collections.ConfigDict, grid: abc.Mapping[str, abc.Sequence[Any]],
        workdir: str | os.PathLike, *, command: abc.Sequence[str] | None = None,
        base_overrides: abc.Mapping[str, Any] | None = None, overwrite: bool = False,
        max_parallel: int = 0, stop_after_task: int | None = None,
        print_summary: bool = True) -> dict:
  """Runs (or continues) the sweep; returns the record written to ``workdir/sweep.json``.

  Args:
    base: the config every cell starts from (validated; ``num_devices`` must be 1).
    grid: ``{dotted field: [values]}``; values of the field's type. ``{}``: one cell, ``base``.
    workdir: the sweep's folder: ``sweep.json``, ``summary.md``, ``compare.*``, one folder per cell.
    command: recorded in ``sweep.json`` (default ``sys.argv``).
    base_overrides: recorded in ``sweep.json`` (the launcher's ``--config`` overrides).
    overwrite: move the content of ``workdir`` into ``workdir/previous-<time>/`` and start again.
    max_parallel: at most this many cells at a time, in waves (0: all at once).
    stop_after_task: stop every cell once this many tasks are done (they stay ``pending``).
    print_summary: print a line as each cell ends, the summary table and where the files are.

  Raises:
    GridError: the grid cannot run (before anything is written).
    WorkdirMismatchError: ``workdir`` holds another sweep, or something else, and no ``overwrite``.
    reliability.WorkdirInUseError: another process runs a sweep in ``workdir``.
    SweepIncompleteError: at the end, when cells diverged or failed (their record is attached).
    reliability.RunInterrupted: SIGTERM or SIGINT stopped the sweep after every running cell saved
      (its line, naming the cells, is printed on stderr when the sweep runs in the main thread).
  """
  if max_parallel < 0:
    raise GridError(f"max_parallel={max_parallel} must be >= 0 (0 = every cell at once)")
  cells = plan(base, grid)
  workdir = pathlib.Path(workdir)
  fingerprint = _fingerprint(base, grid)
  # Several processes (sparse_cl_jax.distributed): process 0 checks, locks and writes the sweep's
  # folder; the others run the same cells in the same order, computing their share of every
  # batched program, and write nothing of their own.
  primary = distributed.is_primary()
  stored = _check_workdir(workdir, fingerprint, overwrite) if primary else None
  lock = None
  if primary:
    with reliability.writing(workdir):
      workdir.mkdir(parents=True, exist_ok=True)
    lock = reliability.WorkdirLock(workdir)
  # Signals: every cell saves at its next epoch end; a second signal exits at once (the cell
  # threads would outlive a KeyboardInterrupt in this one).
  with reliability.StopSignals(second="exit") as signals, \
       reliability.quiet_storage_faults_in_threads():
    if lock is not None:
      with reliability.writing(workdir):
        lock.acquire()
    try:
      if primary and overwrite:
        with reliability.writing(workdir):
          moved = checkpoint.workdir.move_aside(workdir)
        if moved is not None and print_summary:
          print(f"moved the previous content of {workdir} to {moved}", flush=True)
      distributed.barrier(f"sweep {workdir}")  # the others start once the folder is prepared
      if not primary:
        stored = _read_stored(workdir)
      return _run_locked(cells, base, grid, workdir, fingerprint, stored, command=command,
                         base_overrides=base_overrides, max_parallel=max_parallel,
                         stop_after_task=stop_after_task,
                         print_summary=print_summary and primary)
    except reliability.RunInterrupted as e:
      if signals.installed:  # the sweep owns the signals: the one line is its to print
        print(e.message, file=sys.stderr, flush=True)
      raise
    finally:
      if lock is not None:
        lock.release()


def _read_stored(workdir: pathlib.Path) -> dict | None:
  path = workdir / SWEEP_FILE
  return _read_record(path) if path.is_file() else None


def _run_locked(cells: list[Cell], base, grid, workdir: pathlib.Path, fingerprint: dict,
                stored: dict | None, *, command, base_overrides, max_parallel, stop_after_task,
                print_summary) -> dict:
  """:func:`run` with the workdir checked and locked."""
  counts: dict[str, int] = {}
  for c in cells:
    counts[c.program] = counts.get(c.program, 0) + 1
  old = {c.get("name"): c for c in (stored or {}).get("cells", [])}
  record = _Record(workdir, {
      "command": list(sys.argv if command is None else command),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      **fingerprint,
      "base_overrides": dict(base_overrides or {}),
      "max_parallel": max_parallel, "status": "running",
      "cells": [_new_entry(c, workdir, counts, old.get(c.name)) for c in cells],
      "split_programs": list((stored or {}).get("split_programs", [])), "wall_seconds": 0.0})
  todo = []
  for c in cells:
    if checkpoint.workdir.is_finished(workdir / c.name):
      _finish_entry(record.cell(c.name), experiment.load_results(str(workdir / c.name)))
    else:
      todo.append(c)
  record.write()
  if todo:
    stopped = _run_cells(todo, record, workdir, max_parallel=max_parallel or len(todo),
                         stop_after_task=stop_after_task, print_summary=print_summary)
    if stopped is not None:
      record.data["status"] = "pending"
      record.write()
      raise stopped
  entries = record.data["cells"]
  bad = [e for e in entries if e["status"] in ("diverged", "failed")]
  # "pending": some cells stopped early (stop_after_task); rerunning the command continues them.
  record.data["status"] = ("incomplete" if bad else
                           "done" if all(e["status"] == "done" for e in entries) else "pending")
  record.write()
  if not distributed.is_primary():
    return record.data
  summary = summary_table(record.data)
  with reliability.writing(workdir):
    (workdir / SUMMARY_FILE).write_text(summary + "\n", encoding="utf-8")
  finished = [e["workdir"] for e in entries if e["status"] == "done"]
  written = [workdir / SWEEP_FILE, workdir / SUMMARY_FILE]
  if finished:
    rows = logs.compare_rows(finished)
    with reliability.writing(workdir):
      written += logs.write_compare_files(rows, workdir, title=f"sweep {workdir.name}")
  if print_summary:
    cells_text = f"{len(entries)} cell" + ("s" if len(entries) != 1 else "")
    print(f"\nsweep of {cells_text} in {workdir.resolve()}:\n{summary}", flush=True)
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
  if bad:
    named = ", ".join(f"{e['name']} {e['status']}" for e in bad)
    raise SweepIncompleteError(
        f"sweep {workdir}: {len(bad)} of {len(entries)} cells did not finish: {named} (errors in "
        f"{workdir / SWEEP_FILE}; the others' results are written; rerun the command to retry "
        "them)", record.data)
  return record.data


def run_mesh() -> jax.sharding.Mesh | None:
  """The sweep's ``'run'`` mesh axis over every device (None with one device).

  A group of cells whose size the device count divides is sharded over it: on N devices, N
  cells (or a multiple) run as one program, each device computing its share of the runs.
  """
  devices = jax.devices()
  if len(devices) < 2:
    return None
  return jax.sharding.Mesh(np.array(devices), ("run",))


def _run_cells(todo: list[Cell], record: _Record, workdir: pathlib.Path, *, max_parallel: int,
               stop_after_task, print_summary) -> reliability.RunInterrupted | None:
  """Runs ``todo`` in waves of ``max_parallel`` threads sharing one Lockstep.

  Returns None, or, when a signal asked the sweep to stop, the ``RunInterrupted`` to raise once
  ``sweep.json`` is written (its line names every stopped cell and the cells not started).
  """
  runtime.enable_compilation_cache(todo[0].config.get("compilation_cache") or None)
  ls = lockstep_lib.Lockstep(mesh=run_mesh())
  errors: list[BaseException] = []
  ended = [0]  # cells of this invocation that ended (under record.lock)
  interrupted: dict[str, reliability.RunInterrupted] = {}

  def work(cell: Cell) -> None:
    outcome, line, tb, results = "pending", None, None, None
    try:
      results = experiment.run(cell.config, str(workdir / cell.name), print_summary=False,
                               stop_after_task=stop_after_task, lockstep=ls, cell=cell.name)
      outcome = "done" if results is not None else "pending"
    except reliability.RunInterrupted as e:  # saved where it was (SIGTERM / SIGINT)
      interrupted[cell.name] = e
    except reliability.DivergenceError as e:
      outcome, line = "diverged", _error_line(e)
    except Exception as e:  # pylint: disable=broad-except  # a cell's fault stays in its cell
      outcome, line, tb = "failed", _error_line(e), traceback.format_exc()
    finally:
      ls.leave(cell.name)
    try:
      with record.lock:
        entry = record.cell(cell.name)
        _add_stats(entry, ls.report().get(cell.name))
        if outcome == "done":
          _finish_entry(entry, results)
        else:
          entry.update(status=outcome, error=line, acc=None, bwt=None)
          if tb:
            entry["traceback"] = tb
        record.data["split_programs"] = sorted(set(record.data["split_programs"]) |
                                               set(ls.split_classes()))
        ended[0] += 1
      record.write()
      if print_summary and cell.name not in interrupted:
        what = (f"ACC {entry['acc']:.4f}, BWT {entry['bwt']:.4f}" if outcome == "done" else
                line if line else f"stopped after task {stop_after_task}")
        print(f"cell {cell.name}: {outcome}, {what} ({ended[0]}/{len(todo)} ended)", flush=True)
    except BaseException as e:  # pylint: disable=broad-except  # re-raised by the main thread
      errors.append(e)

  not_started: list[str] = []
  for start in range(0, len(todo), max_parallel):
    wave = todo[start:start + max_parallel]
    if interrupted or reliability.stop_requested() is not None:
      not_started += [c.name for c in wave]
      continue
    for cell in wave:  # every cell of the wave joins before any of them starts
      ls.join(cell.name, program_class=cell.program)
    threads = [threading.Thread(target=work, args=(c,), name=f"sweep-{c.name}") for c in wave]
    for t in threads:
      t.start()
    for t in threads:
      # In short waits: the kernel may hand a signal to any thread, and Python runs the handler
      # (which asks the cells to stop) only when this, the main thread, runs bytecode again.
      while t.is_alive():
        t.join(timeout=0.1)
    if errors:
      raise errors[0]
  if not interrupted and not not_started:
    return None
  signum = (next(iter(interrupted.values())).signum if interrupted else
            reliability.stop_requested())
  return _stopped(signum, workdir, [(c.name, interrupted[c.name]) for c in todo
                                    if c.name in interrupted], not_started)


def _stopped(signum: int, workdir: pathlib.Path, cells, not_started: list[str]
             ) -> reliability.RunInterrupted:
  """The sweep's ``RunInterrupted``: one line naming each stopped cell and where it was saved."""
  parts = []
  for name, e in cells:
    if e.saved:
      parts.append(f"{name} (saved step {e.step}: {e.where})")
    elif e.step is not None:
      parts.append(f"{name} (not saved inside its task; newest step {e.step}: {e.where})")
    else:
      parts.append(f"{name} (no checkpoint yet)")
  text = f"cells {', '.join(parts)}" if parts else "no cell was running"
  later = (f"; {len(not_started)} cell{'s' if len(not_started) != 1 else ''} not started "
           f"({', '.join(not_started)})" if not_started else "")
  message = (f"stopped by {reliability.signal_name(signum)}: {text}, checkpoints in "
             f"{workdir.resolve()}/<cell>/checkpoints{later}; rerunning the same command "
             "resumes the sweep")
  return reliability.RunInterrupted(signum, message, saved=any(e.saved for _, e in cells))


# --------------------------------------------------------------------------------------------------
# The summary.


def _mean_sd(values: list[float]) -> str:
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
  if v.size == 0:
    return "-"
  if v.size == 1:
    return f"{v[0]:.4f}"
  return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"


VIEWS = metrics.ACCURACY_VIEWS
# The summary's columns of both accuracy views, and the cell entries' keys they read.
VIEW_COLUMNS = {f"{k.upper()} {v.split('_')[1]}": f"{k}_{v}" for k in ("acc", "bwt")
                for v in VIEWS}


def summary_rows(record: dict) -> list[dict]:
  """One row per combination of the swept fields other than ``seed``: values, n, ACC, BWT (the
  runs' own accuracy view) and, for runs that report them, both views (:data:`VIEW_COLUMNS`)."""
  fields = [f for f in record["grid"] if f != "seed"]
  rows: dict[str, dict] = {}
  for e in record["cells"]:
    values = [e["overrides"][f] for f in fields]
    row = rows.setdefault(json.dumps(values), {"values": values, "acc": [], "bwt": [],
                                               "not_done": {}})
    if e["status"] == "done":
      row["acc"].append(e["acc"])
      row["bwt"].append(e["bwt"])
      for key in VIEW_COLUMNS.values():
        row.setdefault(key, []).append(e.get(key))
    else:
      row["not_done"][e["status"]] = row["not_done"].get(e["status"], 0) + 1
  return [{"values": r["values"], "n": len(r["acc"]), "ACC": _mean_sd(r["acc"]),
           "BWT": _mean_sd(r["bwt"]),
           **{col: _mean_sd(r.get(key, [])) for col, key in VIEW_COLUMNS.items()},
           "not done": ", ".join(f"{n} {s}" for s, n in sorted(r["not_done"].items()))}
          for r in rows.values()]


def summary_table(record: dict) -> str:
  """:func:`summary_rows` as a Markdown table (mean ± sample sd over the finished seeds)."""
  fields = [f for f in record["grid"] if f != "seed"]
  rows = summary_rows(record)
  extra = any(r["not done"] for r in rows)
  views = [c for c in VIEW_COLUMNS if any(r[c] != "-" for r in rows)]  # runs that report them
  head = (fields or ["cells"]) + ["n", "ACC", "BWT"] + views + (["not done"] if extra else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cols = [_value_text(v) for v in r["values"]] or ["all"]
    cols += [str(r["n"]), r["ACC"], r["BWT"]] + [r[c] for c in views]
    cols += [r["not done"] or "-"] if extra else []
    lines.append("| " + " | ".join(cols) + " |")
  return "\n".join(lines)
