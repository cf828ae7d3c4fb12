"""Faults a run detects and reports in one line: divergence, a workdir in use, corrupt checkpoints.

Layer 5 of the design (harness), with no JAX or orbax in it: the trainer calls
:func:`check_loss` on every epoch's loss, :mod:`sparse_cl_jax.checkpoint` holds a
:class:`WorkdirLock` for as long as a run has its workdir open, and the launchers turn every
:class:`FaultError` into one line on stderr and a non-zero exit status.

* Divergence: an epoch whose mean training loss is not finite, or above
  ``config.divergence_threshold`` (default :data:`DEFAULT_DIVERGENCE_THRESHOLD`; 0 = only
  non-finite losses), stops the run with :class:`DivergenceError` before that epoch is
  checkpointed. The check reads the epoch totals the training loop already brought to the host,
  so it adds no device synchronisation. :func:`first_nonfinite` guards the checkpoint itself: a
  state with NaN or infinite floats is never saved.
* One run per workdir: :class:`WorkdirLock` is an advisory ``flock`` on ``workdir/run.lock``,
  which records the holder (pid, host, start time, command). The kernel drops the lock when its
  process ends in any way (SIGKILL included), so a lock left by a killed run never blocks a resume;
  the lock file itself stays (it is tiny, and deleting it would race with a new holder).

Example::

  from sparse_cl_jax import reliability
  lock = reliability.WorkdirLock("/tmp/run")
  lock.acquire()  # WorkdirInUseError naming the other process if it is held
  try:
    ...
  finally:
    lock.release()
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import math
import os
import pathlib
import socket
import sys
import time
from typing import Any

from absl import logging
import numpy as np

LOCK_FILE = "run.lock"
DEFAULT_DIVERGENCE_THRESHOLD = 1e4
_ADVICE = ("lower --config.learning_rate (with a new --workdir), or raise "
           "--config.divergence_threshold (0 checks only for NaN/inf)")
NONFINITE_ADVICE = "lower --config.learning_rate (with a new --workdir)"


class FaultError(RuntimeError):
  """A fault the harness detected; ``str(error)`` is one line naming it and what to do."""


class DivergenceError(FaultError):
  """The training loss is not finite or above ``config.divergence_threshold``.

  Attributes:
    what: what diverged and where (task, phase, epoch, loss).
    advice: what to do.
    context: what the caller knows about the checkpoints (added by ``experiment.run``).
  """

  def __init__(self, what: str, advice: str = _ADVICE, context: str = ""):
    self.what, self.advice, self.context = what, advice, context
    super().__init__("; ".join(p for p in (what, context, advice) if p))

  def with_context(self, context: str) -> DivergenceError:
    """The same error with ``context`` (e.g. which checkpoint is intact) in its message."""
    return DivergenceError(self.what, self.advice, context)


class WorkdirInUseError(FaultError):
  """Another process holds the workdir's lock."""


class CorruptCheckpointError(FaultError):
  """A checkpoint (or the workdir's ``run.json``) cannot be read back as it was written.

  Attributes:
    step: the checkpoint step (None for files outside a step).
    file: the file that failed, relative to the step directory when known.
  """

  def __init__(self, message: str, *, step: int | None = None, file: str | None = None):
    super().__init__(message)
    self.step, self.file = step, file


class NoValidCheckpointError(FaultError):
  """A run has checkpoints but none of them can be restored."""


# --------------------------------------------------------------------------------------------------
# Divergence.


def divergence_threshold(config) -> float:
  """``config.divergence_threshold``, or the default for configs built without the field."""
  value = getattr(config, "divergence_threshold", DEFAULT_DIVERGENCE_THRESHOLD)
  return float(DEFAULT_DIVERGENCE_THRESHOLD if value is None else value)


def check_loss(loss: float, config, *, task: int, phase: str, epoch: int, epochs: int) -> None:
  """Raises :class:`DivergenceError` if an epoch's mean training loss is not finite or too large.

  Args:
    loss: the epoch's mean training loss (a host float: no device synchronisation here).
    config: the run's config; ``config.divergence_threshold`` > 0 is the largest accepted loss,
      0 accepts any finite loss.
    task: the task index (0-based; reported 1-based).
    phase: the phase label of the training operation (``'train'``, ``'retrain'``, ...).
    epoch: the epoch index (0-based; reported 1-based).
    epochs: the operation's number of epochs.
  """
  loss = float(loss)
  threshold = divergence_threshold(config)
  if math.isfinite(loss) and (threshold <= 0 or loss <= threshold):
    return
  finite = math.isfinite(loss)
  why = f"> config.divergence_threshold={threshold:g}" if finite else "is not finite"
  raise DivergenceError(f"training diverged at task {task + 1} {phase} epoch {epoch + 1}/{epochs}: "
                        f"mean loss {loss:.4g} {why}; stopped before checkpointing this epoch",
                        _ADVICE if finite else NONFINITE_ADVICE)


def first_nonfinite(leaves_with_paths) -> str | None:
  """The path of the first floating-point leaf holding NaN or inf, or None.

  Args:
    leaves_with_paths: ``[(path, host array)]`` (e.g. from ``masks.leaves_with_paths``).
  """
  for path, x in leaves_with_paths:
    x = np.asarray(x)
    if x.dtype.kind in "fc" and x.size and not np.isfinite(x).all():
      return str(path)
  return None


# --------------------------------------------------------------------------------------------------
# One run per workdir.


def _holder_info() -> dict[str, Any]:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)[:300]}


def _describe(info: dict[str, Any] | None) -> str:
  if not info:
    return "another process (it has not written its details yet)"
  command = " ".join(str(info.get("command", "")).split())
  if len(command) > 120:
    command = command[:117] + "..."
  return (f"process {info.get('pid')} on {info.get('host')} (started {info.get('started')}"
          + (f", command: {command}" if command else "") + ")")


class WorkdirLock:
  """An exclusive advisory lock on ``workdir/run.lock`` for one open run.

  Args:
    workdir: the run's directory (must exist).
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self._fd: int | None = None
    self.previous: dict[str, Any] | None = None  # a holder that ended without releasing

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _read(self, fd: int) -> dict[str, Any] | None:
    data = os.pread(fd, 4096, 0)
    if not data.strip():
      return None
    try:
      info = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
      return None
    return info if isinstance(info, dict) else None

  def acquire(self) -> None:
    """Takes the lock at once, or raises :class:`WorkdirInUseError` naming its holder."""
    if self._fd is not None:
      return
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        os.close(fd)
        logging.warning("cannot lock %s (%s): this file system does not support flock, so a "
                        "second run on this workdir would not be refused", self.path, e)
        return
      info = None
      for _ in range(20):  # The holder writes its details right after locking.
        info = self._read(fd)
        if info:
          break
        time.sleep(0.05)
      os.close(fd)
      raise WorkdirInUseError(
          f"workdir {self.workdir} is in use by {_describe(info)}; wait for it to end or stop "
          "it, or use another --workdir") from None
    self.previous = self._read(fd)  # Non-empty only if its holder ended without release().
    if self.previous:
      logging.info("workdir %s: its last run (%s) ended without releasing %s (killed?); taking "
                   "it over", self.workdir, _describe(self.previous), LOCK_FILE)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_holder_info()) + "\n").encode("utf-8"), 0)
    self._fd = fd

  def __del__(self):  # A holder dropped without release() (e.g. an unclosed Checkpointer).
    try:
      self.release()
    except Exception:  # pylint: disable=broad-except  # interpreter shutdown
      pass

  def release(self) -> None:
    """Releases the lock (empties the file first: an empty file means a clean end)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)
    finally:
      os.close(fd)  # Closing the descriptor drops the flock.


def fresh_path(parent: pathlib.Path, prefix: str) -> pathlib.Path:
  """``parent/<prefix><YYYYmmdd-HHMMSS>`` (``-1``, ``-2`` ... appended if taken): a new path."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  dest = parent / f"{prefix}{stamp}"
  suffix = 1
  while dest.exists():
    dest = parent / f"{prefix}{stamp}-{suffix}"
    suffix += 1
  return dest


def move_into_fresh(entries, parent: pathlib.Path, prefix: str) -> pathlib.Path | None:
  """Moves ``entries`` (paths) into a new :func:`fresh_path` folder; ``None`` if there are none."""
  entries = list(entries)
  if not entries:
    return None
  dest = fresh_path(parent, prefix)
  dest.mkdir()
  for entry in entries:
    os.replace(entry, dest / entry.name)
  return dest
