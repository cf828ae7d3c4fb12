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
* Stop signals: :class:`StopSignals` (entered by ``experiment.run`` and ``sweep.run`` in the main
  thread) turns the first SIGTERM or SIGINT into a request (:func:`stop_requested`) that the epoch
  loop reads after every epoch: the run saves a checkpoint at the end of that epoch (a method that
  cannot save inside a task keeps its newest checkpoint) and raises :class:`RunInterrupted`, a
  ``SystemExit`` with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT). The handler
  only sets a flag, visible to every thread (the cells of a sweep). A second signal exits at once:
  SIGINT raises ``KeyboardInterrupt`` as Python does (with ``second='exit'``: exits like SIGTERM),
  SIGTERM writes one line and ends the process with ``os._exit(143)``.
* Storage faults: a write that fails because the disk is full, the quota is exceeded, the file
  system is read-only, or an I/O error (:data:`STORAGE_ERRNOS`; :func:`storage_fault` also reads
  them out of TensorStore's and orbax's errors) becomes a :class:`StorageError`: one line naming the
  path, the cause, the checkpoint that is intact, and what to do. :func:`writing` converts the
  faults raised inside its block; :func:`quiet_storage_faults_in_threads` keeps a background
  writer's fault (TensorBoard's, orbax's) from printing a traceback and records it instead.

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

import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import pathlib
import re
import signal
import socket
import sys
import threading
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


class StorageError(FaultError):
  """A write failed for a reason of the storage (full disk, quota, read-only, I/O error).

  ``str(error)`` is one line: what could not be written (naming the path), the cause, what is
  intact (``context``) and what to do (``advice``).

  Attributes:
    what: what could not be written, naming the path (``cannot write checkpoint step 3 to ...``).
    path: the path.
    cause: the operating system's words for it, and for a full disk which file system is full.
    errno: the error number (:data:`STORAGE_ERRNOS`).
    context: what the caller knows about the checkpoints (added by ``experiment.run``).
    advice: what to do.
  """

  def __init__(self, what: str, path: str | os.PathLike, cause: str, *, errno_: int,
               context: str = "", advice: str | None = None):
    self.what, self.path, self.cause, self.errno = what, str(path), cause, errno_
    self.context = context
    self.advice = storage_advice(errno_) if advice is None else advice
    tail = "; ".join(p for p in (context, self.advice) if p)
    super().__init__(f"{what}: {cause}" + (f" ({tail})" if tail else ""))

  def with_context(self, context: str) -> StorageError:
    """The same error with ``context`` (which checkpoint is intact) in its message."""
    return StorageError(self.what, self.path, self.cause, errno_=self.errno, context=context,
                        advice=self.advice)


class RunInterrupted(SystemExit):
  """A run (or sweep) stopped by SIGTERM or SIGINT after saving where it was.

  A ``SystemExit`` whose ``code`` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT):
  uncaught, it ends the program with that status and prints nothing (``experiment.run`` and
  ``sweep.run`` print :attr:`message` on stderr before raising it). Not an ``Exception``, so no
  ``except Exception`` on the way swallows it.

  Attributes:
    signum: the signal.
    message: one line: where the run was saved and that rerunning the same command resumes.
    step: the newest checkpoint step (None if there is none).
    saved: whether a checkpoint was saved on the way out (False: a method that cannot save inside
      a task, or a stop before anything was trained).
    where: the position of that checkpoint in words (``task 3, operation 0, after epoch 12``).
    checkpoint_dir: the run's checkpoint folder.
  """

  def __init__(self, signum: int, message: str = "", *, step: int | None = None,
               saved: bool = False, where: str = "", checkpoint_dir: str = ""):
    super().__init__(128 + int(signum))
    self.signum, self.message, self.step, self.saved = int(signum), message, step, saved
    self.where, self.checkpoint_dir = where, checkpoint_dir

  @property
  def signal_name(self) -> str:
    return signal_name(self.signum)

  def __str__(self) -> str:
    return self.message or f"stopped by {self.signal_name}"


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


# --------------------------------------------------------------------------------------------------
# Stop signals.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The first stop signal received, read by every thread. No lock: the handler runs in the main
# thread between two bytecodes, possibly while the main thread holds any lock; one list item's
# assignment is atomic.
_stop_signum: list[int | None] = [None]
_owner: list[StopSignals | None] = [None]  # the outermost StopSignals that installed handlers


def signal_name(signum: int) -> str:
  """``'SIGTERM'`` for 15, ...."""
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def stop_requested() -> int | None:
  """The signal that asked the runs of this process to stop, or None (any thread may ask)."""
  return _stop_signum[0]


# Set by sparse_cl_jax.distributed when the run spans several processes: (scope, local signal or
# None) -> the signal any process of the run received, or None; every process asks at the same
# points of the same scope.
_stop_agreement: list = [None]


def set_stop_agreement(agree) -> None:
  """Installs (or, with None, removes) the agreement :func:`stop_agreed` consults."""
  _stop_agreement[0] = agree


def stop_agreed(scope: str = "run") -> int | None:
  """:func:`stop_requested`, agreed by every process of the run (the same with one process).

  Called where a run may stop to save (an epoch end, a task end): a signal that reached only some
  processes stops all of them at the same point, so that their checkpoint is one.
  """
  local = stop_requested()
  agree = _stop_agreement[0]
  return local if agree is None else agree(scope, local)


def request_stop(signum: int = signal.SIGTERM) -> None:
  """Asks the runs of this process to stop at their next epoch end, as the first signal does."""
  if _stop_signum[0] is None:
    _stop_signum[0] = int(signum)


def clear_stop() -> None:
  """Forgets a stop request (done when the outermost :class:`StopSignals` is left)."""
  _stop_signum[0] = None


class StopSignals:
  """Context manager: SIGTERM and SIGINT ask the runs to stop (:func:`stop_requested`).

  Installed only in the main thread (where Python runs signal handlers) and only by the outermost
  user: nested or other-thread uses do nothing (:attr:`installed` is False). On exit the previous
  handlers come back and the request is cleared. The handler sets a flag and nothing else; a
  second signal ends the process at once: SIGINT raises ``KeyboardInterrupt`` (Python's own
  behaviour) unless ``second='exit'``, SIGTERM (and SIGINT with ``second='exit'``) writes one line
  on stderr and calls ``os._exit(128 + signum)``.

  Args:
    second: ``'raise'`` (a single run) or ``'exit'`` (a sweep, whose cell threads would otherwise
      keep the process alive after ``KeyboardInterrupt``).
  """

  def __init__(self, second: str = "raise"):
    if second not in ("raise", "exit"):
      raise ValueError(f"second={second!r}: use 'raise' or 'exit'")
    self.second = second
    self.installed = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread() or _owner[0] is not None:
      return self
    clear_stop()
    try:
      for s in STOP_SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    except (ValueError, OSError):  # e.g. an embedding interpreter without signals
      self._restore()
      return self
    _owner[0] = self
    self.installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if not self.installed:
      return
    self._restore()
    _owner[0] = None
    self.installed = False
    clear_stop()

  def _restore(self) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if stop_requested() is None:
      request_stop(signum)  # the epoch loop saves and stops; no I/O here
      return
    if signum == signal.SIGINT and self.second == "raise":
      raise KeyboardInterrupt
    name = signal_name(signum)
    bar = "\n" if _progress_bar_shown() else ""
    line = (f"{bar}stopped at once by a second {name} (nothing saved since the first); rerunning "
            "the same command resumes from the newest checkpoint\n")
    try:
      os.write(2, line.encode())
    finally:
      os._exit(128 + signum)  # pylint: disable=protected-access


def _progress_bar_shown() -> bool:
  tqdm_module = sys.modules.get("tqdm")
  instances = getattr(getattr(tqdm_module, "tqdm", None), "_instances", None)
  return bool(instances) and any(not getattr(b, "disable", True) for b in list(instances))


# --------------------------------------------------------------------------------------------------
# Storage faults.

STORAGE_ERRNOS = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EROFS: "Read-only file system",
    errno.EIO: "Input/output error",
}
# Faults that can only come from a write; converted wherever they are raised (EIO, EACCES and
# EPERM also come from reads: converted only where a write is known to fail, see writing()).
WRITE_ONLY_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_ERRNO_IN_TEXT = re.compile(r"os_error_code='(\d+)'|\[Errno (\d+)\]")


def storage_advice(code: int) -> str:
  """What to do about a storage fault with this errno."""
  if code == errno.ENOSPC:
    return "free space or move the workdir, then rerun the same command"
  if code == errno.EDQUOT:
    return "free space within your quota or move the workdir, then rerun the same command"
  if code == errno.EROFS:
    return "make the file system writable or move the workdir, then rerun the same command"
  if code in (errno.EACCES, errno.EPERM):
    return "make the workdir writable by this user or move it, then rerun the same command"
  return "check the disk or move the workdir, then rerun the same command"


def _chain(e: BaseException):
  """``e``, its causes and contexts, and the members of exception groups, each once."""
  seen, todo = set(), [e]
  while todo:
    x = todo.pop(0)
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    yield x
    todo.extend(getattr(x, "exceptions", ()) or ())
    todo.extend((x.__cause__, x.__context__))


def storage_fault(e: BaseException, codes=None) -> tuple[int, str] | None:
  """``(errno, strerror)`` of the storage fault behind ``e``, or None.

  Looks through ``e``'s causes and contexts for an ``OSError`` whose errno is in ``codes``
  (default :data:`STORAGE_ERRNOS`), and in the messages of TensorStore's errors
  (``[os_error_code='28']``) and of other wrappers (``[Errno 28]`` or the system's words).
  """
  codes = STORAGE_ERRNOS if codes is None else codes
  chain = list(_chain(e))
  for x in chain:
    if isinstance(x, StorageError) and x.errno in codes:
      return x.errno, os.strerror(x.errno)
    if isinstance(x, OSError) and x.errno in codes:
      return x.errno, x.strerror or os.strerror(x.errno)
  for x in chain:
    text = str(x)
    for m in _ERRNO_IN_TEXT.finditer(text):
      code = int(m.group(1) or m.group(2))
      if code in codes:
        return code, os.strerror(code)
    for code in codes:
      if os.strerror(code) in text:
        return code, os.strerror(code)
  return None


def _mount_point(path: pathlib.Path) -> pathlib.Path:
  path = path.absolute()
  while not path.exists() and path != path.parent:
    path = path.parent
  while not os.path.ismount(path) and path != path.parent:
    path = path.parent
  return path


def _size(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def describe_cause(code: int, strerror: str, path: str | os.PathLike) -> str:
  """The cause in words; for a full disk also which file system it is, its size and free space."""
  text = strerror or os.strerror(code)
  if code in (errno.ENOSPC, errno.EDQUOT):
    try:
      mount = _mount_point(pathlib.Path(path))
      st = os.statvfs(mount)
      text += (f" on {mount}, {_size(st.f_bavail * st.f_frsize)} free of "
               f"{_size(st.f_blocks * st.f_frsize)}")
    except OSError:
      pass
  return text


def storage_error(e: BaseException, path: str | os.PathLike, what: str | None = None, *,
                  codes=None, context: str = "") -> StorageError | None:
  """``e`` as a :class:`StorageError` if a storage fault is behind it (else None).

  Args:
    e: the exception a write raised.
    path: the path written (an ``OSError``'s own ``filename`` is preferred when ``what`` is None).
    what: what could not be written, naming the path (default ``cannot write PATH``).
    codes: the errnos that count (default :data:`STORAGE_ERRNOS`).
    context: what is intact.
  """
  if isinstance(e, StorageError):
    return e
  fault = storage_fault(e, codes)
  if fault is None:
    return None
  code, strerror = fault
  if what is None:
    named = next((x.filename for x in _chain(e) if isinstance(x, OSError) and x.filename), None)
    path = named if named is not None else path
    what = f"cannot write {path}"
  return StorageError(what, path, describe_cause(code, strerror, path), errno_=code,
                      context=context)


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str | None = None, *, codes=None):
  """Turns a storage fault raised inside the block into a :class:`StorageError` about ``path``.

  Every errno of :data:`STORAGE_ERRNOS` (and EACCES, EPERM) counts by default: the block is known
  to write.
  """
  codes = {**STORAGE_ERRNOS, errno.EACCES: "", errno.EPERM: ""} if codes is None else codes
  try:
    yield
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # re-raised unless a storage fault
    converted = storage_error(e, path, what, codes=codes)
    if converted is None:
      raise
    raise converted from e


_thread_faults: list[tuple[str, BaseException]] = []
_thread_hook_users = [0]
_thread_hook_lock = threading.Lock()
_previous_thread_hook: list[Any] = [None]


def _thread_hook(args) -> None:
  if args.exc_value is not None and storage_fault(args.exc_value) is not None:
    with _thread_hook_lock:
      _thread_faults.append((getattr(args.thread, "name", "?"), args.exc_value))
      del _thread_faults[:-100]  # the latest are enough
    return
  previous = _previous_thread_hook[0] or threading.__excepthook__
  previous(args)


@contextlib.contextmanager
def quiet_storage_faults_in_threads():
  """Inside the block, a thread that dies of a storage fault prints nothing; it is recorded.

  Background writers (TensorBoard's event thread, orbax's and TensorStore's workers) hit the same
  full disk as the run's own writes, which report it in one line; their tracebacks would only
  bury that line. :func:`thread_storage_faults` lists what was recorded. Nestable and
  thread-safe (the hook is process-wide while any block is open).
  """
  with _thread_hook_lock:
    if _thread_hook_users[0] == 0:
      _previous_thread_hook[0] = threading.excepthook
      threading.excepthook = _thread_hook
    _thread_hook_users[0] += 1
  try:
    yield
  finally:
    with _thread_hook_lock:
      _thread_hook_users[0] -= 1
      if _thread_hook_users[0] == 0:
        if threading.excepthook is _thread_hook:
          threading.excepthook = _previous_thread_hook[0] or threading.__excepthook__
        _previous_thread_hook[0] = None


def thread_storage_faults() -> list[tuple[str, BaseException]]:
  """``[(thread name, exception)]`` of the storage faults background threads died of."""
  with _thread_hook_lock:
    return list(_thread_faults)


def one_line(e: BaseException) -> str:
  """The message of ``e`` on one line (multi-line messages joined with '; ')."""
  parts = [p.strip() for p in str(e).splitlines() if p.strip()]
  return "; ".join(parts) or type(e).__name__
