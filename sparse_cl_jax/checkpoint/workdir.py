"""The run a workdir holds: its layout, its fingerprint (``run.json``), finished or not, set aside.

Pure file-system functions of the checkpoint package (no orbax). Opening a workdir
(:func:`open_run`) refuses a finished run or one written by another config, or moves the old run
into ``previous-<timestamp>/`` when asked to overwrite; :func:`bind` writes ``run.json`` when the
run first writes something (see the package docstring for the conventions).
"""

from __future__ import annotations

import datetime
import json
import pathlib
from collections import abc
from typing import Any

from sparse_cl_jax import reliability
from sparse_cl_jax.checkpoint import jsonfiles

RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
PREVIOUS_PREFIX = "previous-"
CORRUPT_DIR = "corrupt-checkpoints"

MAX_LISTED = 10  # How many differing keys / paths an error message lists.


class RunFinishedError(RuntimeError):
  """The workdir holds a finished run and ``overwrite`` was not requested."""


def flat_keys(d: abc.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{'a.b': v}`` for nested dicts (non-dict values are leaves)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, abc.Mapping) and v:
      out.update(flat_keys(v, key))
    else:
      out[key] = v
  return out


def fingerprint_diff(stored: abc.Mapping[str, Any], given: abc.Mapping[str, Any],
                     ignore_keys: abc.Iterable[str]) -> list[str]:
  """Differences as ``'key stored != given'``; ignored keys (and their subkeys) are skipped."""
  ignore = tuple(ignore_keys)

  def ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignore)

  a, b = flat_keys(stored), flat_keys(given)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if ignored(key):
      continue
    if key not in b:
      diffs.append(f"{key} {json.dumps(a[key])} != (absent)")
    elif key not in a:
      diffs.append(f"{key} (absent) != {json.dumps(b[key])}")
    elif a[key] != b[key]:
      diffs.append(f"{key} {json.dumps(a[key])} != {json.dumps(b[key])}")
  return diffs


def read_fingerprint(workdir: pathlib.Path) -> dict[str, Any]:
  """The fingerprint stored in ``workdir/run.json``.

  Raises:
    reliability.CorruptCheckpointError: the file cannot be read or holds no fingerprint object.
  """
  run_file = workdir / RUN_FILE
  try:
    stored = json.loads(run_file.read_text(encoding="utf-8"))["fingerprint"]
    if not isinstance(stored, dict):
      raise TypeError("'fingerprint' is not a JSON object")
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise reliability.CorruptCheckpointError(
        f"{run_file} is unreadable ({type(e).__name__}: {jsonfiles.first_line(e, 80)}), so the "
        f"config of the run in {workdir} is unknown; restore the file, or use --overwrite to move "
        "the run aside (nothing is deleted), or another --workdir", file=RUN_FILE) from None
  return stored


def holds_checkpoints(workdir: pathlib.Path) -> bool:
  """Whether ``workdir/checkpoints`` holds a committed step directory."""
  ckpt_dir = workdir / CHECKPOINT_DIR
  return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def is_finished(workdir: pathlib.Path) -> bool:
  """Whether the run's ``results.json`` exists."""
  return (workdir / RESULTS_FILE).exists()


def holds_saved_state(workdir: pathlib.Path) -> bool:
  """Whether the workdir holds a committed or set-aside checkpoint (or a finished run)."""
  if holds_checkpoints(workdir):
    return True
  corrupt_dir = workdir / CORRUPT_DIR
  if corrupt_dir.is_dir() and any(corrupt_dir.iterdir()):
    return True
  return is_finished(workdir)


def move_aside(workdir: pathlib.Path) -> pathlib.Path | None:
  """Moves every entry of the workdir except earlier ``previous-*`` folders into a new one."""
  entries = [p for p in workdir.iterdir()
             if not p.name.startswith(PREVIOUS_PREFIX) and p.name != reliability.LOCK_FILE]
  return reliability.move_into_fresh(entries, workdir, PREVIOUS_PREFIX)


def _more(diffs: list[str]) -> str:
  return f" (and {len(diffs) - MAX_LISTED} more)" if len(diffs) > MAX_LISTED else ""


def refuse_finished(workdir: pathlib.Path, fingerprint: abc.Mapping[str, Any],
                    ignore_keys: abc.Iterable[str]) -> None:
  """Raises :class:`RunFinishedError` naming the differing fingerprint keys, if any."""
  differs = ""
  if (workdir / RUN_FILE).exists():
    diffs = fingerprint_diff(read_fingerprint(workdir), fingerprint, ignore_keys)
    if diffs:
      differs = (f" by a different config: {'; '.join(diffs[:MAX_LISTED])}{_more(diffs)} "
                 "(stored != now)")
  raise RunFinishedError(
      f"run in {workdir} already finished{differs}; results in {workdir / RESULTS_FILE}; "
      "pass --overwrite (moves it aside, nothing is deleted) or use another --workdir")


def open_run(workdir: pathlib.Path, fingerprint: abc.Mapping[str, Any],
             ignore_keys: abc.Iterable[str], overwrite: bool) -> tuple[pathlib.Path | None, bool]:
  """Checks that this run may use ``workdir`` (moving an old run aside if ``overwrite``).

  Returns:
    ``(previous_dir, bound)``: where the old run was moved (None if not moved), and whether
    ``run.json`` already holds this fingerprint.

  Raises:
    RunFinishedError: the workdir holds a finished run and ``overwrite`` is False.
    ValueError: the workdir holds checkpoints of a different fingerprint (naming the keys), or
      checkpoints without a ``run.json``.
    reliability.CorruptCheckpointError: ``run.json`` cannot be read.
  """
  run_file = workdir / RUN_FILE
  if overwrite:
    previous_dir = move_aside(workdir)
  else:
    previous_dir = None
    if is_finished(workdir):
      refuse_finished(workdir, fingerprint, ignore_keys)
  if run_file.exists() and holds_saved_state(workdir):
    diffs = fingerprint_diff(read_fingerprint(workdir), fingerprint, ignore_keys)
    if diffs:
      raise ValueError(
          f"checkpoint in {workdir} was written by a different config: "
          f"{'; '.join(diffs[:MAX_LISTED])}{_more(diffs)} (stored != now); use another "
          "--workdir, or --overwrite to move the old run aside, or rerun with the stored values "
          "to resume it")
    return previous_dir, True
  if not run_file.exists() and holds_checkpoints(workdir):
    raise ValueError(f"{workdir / CHECKPOINT_DIR} holds checkpoints but {run_file} is missing, so "
                     "their config is unknown; use another --workdir, or --overwrite to move them "
                     "aside")
  # A run.json without any checkpoint (an attempt that failed before saving anything) binds
  # nothing; it is replaced at the first save.
  return previous_dir, False


def bind(workdir: pathlib.Path, fingerprint: abc.Mapping[str, Any]) -> None:
  """Writes ``workdir/run.json`` with ``fingerprint`` and the time (atomically)."""
  created = datetime.datetime.now().isoformat(timespec="seconds")
  jsonfiles.write_json_atomic(workdir / RUN_FILE, {"fingerprint": fingerprint, "created": created})
