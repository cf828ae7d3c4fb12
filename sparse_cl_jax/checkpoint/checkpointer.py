"""The orbax side of the checkpoint package: one run's steps saved, verified, restored, set aside.

The only module of the package (and of ``sparse_cl_jax``) that imports orbax. The top-level
functions are the phases of a save (:func:`save_args`, :func:`commit`, then the checksums) and of a
restore (:func:`verify_step`, then :func:`restore_step`); :class:`Checkpointer` holds the workdir's
lock and orbax's manager and wires them together (see the package docstring for the conventions).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import sys
from collections import abc
from typing import Any, Callable

from absl import logging as absl_logging
import jax
import orbax.checkpoint as ocp

from sparse_cl_jax import distributed
from sparse_cl_jax import reliability
from sparse_cl_jax.checkpoint import checksums as checksums_lib
from sparse_cl_jax.checkpoint import jsonfiles
from sparse_cl_jax.checkpoint import quarantine
from sparse_cl_jax.checkpoint import trees
from sparse_cl_jax.checkpoint import workdir as workdir_lib

PyTree = Any
ITEMS = ("state", "meta")  # The orbax items of a step; their files are checksummed.


class _QuietOrbax:
  """Drops orbax's INFO/DEBUG records (several per save) from the absl logger; keeps warnings.

  Also drops the tracebacks orbax's background threads log for a storage fault (a full disk, a
  read-only file system): the same error reaches :meth:`Checkpointer.save`, which reports it in
  one line.
  """

  def filter(self, record) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno < 30:
      return False
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or reliability.storage_fault(exc) is None


_QUIET = _QuietOrbax()
absl_logging.get_absl_logger().addFilter(_QUIET)


def _unraisable_hook(unraisable) -> None:
  """Drops TensorStore's callbacks into the event loop of a save that already failed.

  When one write of a save fails (e.g. a full disk), orbax closes the save's asyncio loop while
  TensorStore still completes the other writes; each completion then calls
  ``loop.call_soon_threadsafe`` on the closed loop and Python prints "Event loop is closed" as an
  unraisable exception, tens of tracebacks burying the one-line error. Everything else goes to
  the previous hook.
  """
  value = unraisable.exc_value
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return
  _PREVIOUS_UNRAISABLE_HOOK(unraisable)


_PREVIOUS_UNRAISABLE_HOOK = sys.unraisablehook
sys.unraisablehook = _unraisable_hook


class IncompleteCheckpointError(reliability.CorruptCheckpointError):
  """A step orbax committed whose ``checksums.json`` was never written: its save did not finish."""


# --------------------------------------------------------------------------------------------------
# Save.


# Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when complete.
TMP_MARK = ".orbax-checkpoint-tmp"


def temporary_dirs(checkpoint_dir: pathlib.Path, step: int | None = None) -> list[pathlib.Path]:
  """Orbax's temporary directories in ``checkpoint_dir`` (of ``step`` only, if given)."""
  if not checkpoint_dir.is_dir():
    return []
  prefix = "" if step is None else f"{int(step)}{TMP_MARK}"
  return sorted(p for p in checkpoint_dir.iterdir()
                if TMP_MARK in p.name and p.name.startswith(prefix))


def remove_temporary_dirs(checkpoint_dir: pathlib.Path, step: int | None = None) -> None:
  """Removes the leftovers of interrupted or failed saves (never committed: never a checkpoint).

  Best effort: what cannot be removed now (a read-only file system) is removed by the next
  :class:`Checkpointer` that opens the workdir. Orbax can do this itself
  (``cleanup_tmp_directories``), but in a background thread that nothing waits for: a run that
  stops right after opening its workdir then prints that thread's traceback at exit.
  """
  for path in temporary_dirs(checkpoint_dir, step):
    shutil.rmtree(path, ignore_errors=True)


def new_manager(checkpoint_dir: pathlib.Path, max_to_keep: int | None, *,
                processes: int = 1, barrier_prefix: str | None = None) -> ocp.CheckpointManager:
  """Orbax's synchronous manager of ``checkpoint_dir``, keeping the ``max_to_keep`` latest steps.

  The temporary directories of interrupted saves are removed first, synchronously. With several
  ``processes`` (every one calls this, process 0 having created ``checkpoint_dir``), orbax runs
  its multi-process protocol: every process takes part in each save and restore, process 0
  finalizes; its barriers are the coordination service's, named with ``barrier_prefix`` (one per
  workdir), so the checkpointers of a sweep's cells, in threads, never wait on each other.
  """
  multi = {}
  if processes > 1:
    multi["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
        primary_host=0, active_processes=set(range(processes)),
        barrier_sync_key_prefix=barrier_prefix)
  else:
    remove_temporary_dirs(checkpoint_dir)
  registry = ocp.handlers.create_default_handler_registry(
      state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
      enable_async_checkpointing=False,
      cleanup_tmp_directories=False,  # done above, not in a thread that nothing waits for
      create=processes <= 1,  # orbax refuses to create it with active_processes set
      **multi,
  )
  return ocp.CheckpointManager(checkpoint_dir, options=options, handler_registry=registry)


def check_new_step(step: int, latest: int | None, checkpoint_dir: pathlib.Path) -> int:
  """``int(step)``, refused (ValueError) unless it is >= 0 and after the ``latest`` step."""
  step = int(step)
  if step < 0 or (latest is not None and step <= latest):
    raise ValueError(f"checkpoint step {step} must be > the latest step {latest} in "
                     f"{checkpoint_dir}")
  return step


def save_args(state: PyTree, meta: abc.Mapping[str, Any]) -> ocp.args.Composite:
  """What orbax writes for one step: ``state`` as arrays, ``meta`` as JSON; validates both.

  Raises:
    ValueError: the state has no array leaves, is a single array, or two leaves share a name.
    TypeError: a leaf cannot be checkpointed or ``meta`` is not JSON-able.
  """
  meta = jsonfiles.jsonable(dict(meta), what="meta")
  pairs, _ = trees.leaves(state)
  if not pairs:
    raise ValueError("state has no array leaves to checkpoint")
  pairs = [(parts, trees.host_leaf("/".join(parts), x)) for parts, x in pairs]
  return ocp.args.Composite(state=ocp.args.StandardSave(trees.nest(pairs)),
                            meta=ocp.args.JsonSave(meta))


def commit(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> None:
  """Saves ``args`` as ``step`` and waits until orbax has renamed it into place."""
  try:
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()
  except BaseException:
    # The step directory was never renamed into place; re-read the committed steps from disk so
    # that the manager's cached step list cannot claim the failed step.
    manager.reload()
    raise


# --------------------------------------------------------------------------------------------------
# Restore.

def step_to_restore(steps: list[int], step: int | None, checkpoint_dir: pathlib.Path) -> int:
  """``step``, or the latest of ``steps`` when None; FileNotFoundError if it is not in ``steps``."""
  if step is None:
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir}; "
                            f"available: {steps}")
  return step


# TensorStore errors name the file or the OCDBT key they failed on.
_FILE_IN_ERROR = re.compile(r'(?:local file|Error reading) "([^"]+)"')


def file_in_error(e: BaseException, step_dir: pathlib.Path, default: str) -> str:
  """The step file an orbax / TensorStore error names (relative to ``step_dir``), or ``default``."""
  names = _FILE_IN_ERROR.findall(str(e))
  for name in reversed(names):  # The innermost (last) name is the most specific.
    prefix = str(step_dir) + os.sep
    if name.startswith(prefix):
      return name[len(prefix):]
  return f"{default} ({names[-1]})" if names else default


def corrupt_error(checkpoint_dir: pathlib.Path, step: int, file: str,
                  reason: str) -> reliability.CorruptCheckpointError:
  """The one-line error for a step that cannot be read back as written, naming step and file."""
  return reliability.CorruptCheckpointError(
      f"checkpoint step {step} in {checkpoint_dir} is corrupt: {file}: {reason}",
      step=step, file=file)


def verify_step(checkpoint_dir: pathlib.Path, step: int) -> None:
  """Verifies the step's files against its ``checksums.json``.

  Raises:
    IncompleteCheckpointError: the step has no ``checksums.json`` (its save did not finish).
    reliability.CorruptCheckpointError: ``checksums.json`` is unreadable, or a file is missing,
      unlisted or changed; names the step and the file.
  """
  try:
    checksums_lib.verify(checkpoint_dir / str(step), ITEMS)
  except checksums_lib.MissingChecksumsError as e:
    raise IncompleteCheckpointError(
        f"checkpoint step {step} in {checkpoint_dir} is incomplete: {e.file}: {e.reason}",
        step=step, file=e.file) from None
  except checksums_lib.ChecksumError as e:
    raise corrupt_error(checkpoint_dir, step, e.file, e.reason) from None


def check_matches(checkpoint_dir: pathlib.Path, step: int, stored: Any,
                  abstract: trees.Leaves) -> None:
  """Raises ValueError listing every path where the stored tree and ``like`` differ."""
  problems = trees.mismatches(stored, abstract)
  if problems:
    limit = workdir_lib.MAX_LISTED
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    raise ValueError(f"checkpoint step {step} in {checkpoint_dir} does not match `like`:\n  "
                     + "\n  ".join(problems[:limit]) + more)


def restore_step(manager: ocp.CheckpointManager, checkpoint_dir: pathlib.Path, step: int,
                 abstract: trees.Leaves, treedef: Any) -> tuple[PyTree, dict[str, Any]]:
  """Reads step ``step``'s meta, checks its tree against ``abstract``, then reads its arrays.

  Raises:
    reliability.CorruptCheckpointError: orbax / TensorStore fails to read a file (named).
    ValueError: the stored tree does not match ``abstract`` (see :func:`check_matches`).
  """
  step_dir = checkpoint_dir / str(step)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # pylint: disable=broad-except
    raise corrupt_error(checkpoint_dir, step, file_in_error(e, step_dir, "meta/metadata"),
                        jsonfiles.first_line(e)) from e
  if not isinstance(meta, dict):
    raise corrupt_error(checkpoint_dir, step, "meta/metadata",
                        f"holds a {type(meta).__name__}, not a dict")
  try:
    stored = manager.item_metadata(step)["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise corrupt_error(checkpoint_dir, step, file_in_error(e, step_dir, "state/_METADATA"),
                        jsonfiles.first_line(e)) from e
  stored = getattr(stored, "tree", stored)
  check_matches(checkpoint_dir, step, stored, abstract)  # A different structure is not corruption.
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trees.nest(abstract))))
  except Exception as e:  # pylint: disable=broad-except
    raise corrupt_error(checkpoint_dir, step, file_in_error(e, step_dir, "state"),
                        jsonfiles.first_line(e)) from e
  state = jax.tree_util.tree_unflatten(
      treedef, [trees.lookup(restored["state"], parts) for parts, _ in abstract])
  return state, dict(meta)


def restore_together(ckpt: "Checkpointer", like: PyTree):
  """:meth:`Checkpointer.restore_newest_valid` with several processes: process 0 verifies the
  checksums, sets aside what fails and tells the others which step; then every process restores
  it (``ckpt``'s private fields: this is the checkpointer's own code, outside the class).
  """
  name = f"{ckpt._key}/restore"
  if ckpt._primary:
    try:
      step = newest_verified(ckpt)
    except BaseException as e:
      distributed.publish(name, "error " + reliability.one_line(e))
      raise
    distributed.publish(name, "none" if step is None else str(step))
  else:
    said = distributed.fetch(name)
    if said.startswith("error "):
      raise reliability.NoValidCheckpointError(f"process 0 could not restore the run in "
                                               f"{ckpt.workdir}: {said[len('error '):]}")
    step = None if said == "none" else int(said)
    ckpt._manager.reload()
  if step is None:
    return None
  abstract, treedef = trees.abstract_like(like)
  try:
    state, meta = restore_step(ckpt._manager, ckpt.checkpoint_dir, step, abstract, treedef)
  except reliability.CorruptCheckpointError as e:
    if ckpt._primary:
      dest = ckpt.set_aside(step)
      raise reliability.CorruptCheckpointError(
          f"{e}; moved it to {dest}; rerun the same command on every process to resume from "
          "the next older step", step=step, file=e.file) from None
    raise
  return step, state, meta


def newest_verified(ckpt: "Checkpointer") -> int | None:
  """The newest step whose checksums verify (the corrupt ones set aside), None if none."""
  found = newest_valid(ckpt, lambda step: verify_step(ckpt.checkpoint_dir, step))
  return None if found is None else found[0]


def newest_valid(ckpt: "Checkpointer", attempt: Callable[[int], Any]) -> tuple[int, Any] | None:
  """``(step, attempt(step))`` for the newest step whose ``attempt`` raises no
  :class:`reliability.CorruptCheckpointError`; every newer step is set aside with a one-line
  warning. None when the run has no checkpoint; :class:`reliability.NoValidCheckpointError` when
  it had some but none is valid."""
  while steps := ckpt.all_steps():
    step = steps[-1]
    try:
      return step, attempt(step)
    except reliability.CorruptCheckpointError as e:
      dest = ckpt.set_aside(step, incomplete=isinstance(e, IncompleteCheckpointError))
      older = f"trying step {steps[-2]}" if len(steps) > 1 else "no older checkpoint"
      absl_logging.warning("%s; moved it to %s; %s", e, dest, older)
  if quarantine.holds_corrupt(ckpt.corrupt_dir):
    raise reliability.NoValidCheckpointError(
        f"no valid checkpoint to resume the run in {ckpt.workdir}: the corrupt ones are in "
        f"{ckpt.corrupt_dir}; use --overwrite to move the run aside and start again (nothing "
        "is deleted), or another --workdir")
  return None


def discard_unfinished(ckpt: "Checkpointer", step: int) -> None:
  """After a failed save: its temporary directory removed, a step without checksums set aside.

  Best effort (a read-only file system refuses both; the next open and the next restore do it).
  """
  remove_temporary_dirs(ckpt.checkpoint_dir, step)
  step_dir = ckpt.checkpoint_dir / str(step)
  try:
    if step_dir.exists() and not (step_dir / checksums_lib.FILE).exists():
      ckpt.set_aside(step, incomplete=True)
  except OSError:
    pass
  try:
    ckpt._manager.reload()
  except Exception:  # pylint: disable=broad-except  # the step list is re-read on next use
    pass


# --------------------------------------------------------------------------------------------------
# The checkpointer.


class Checkpointer:
  """Saves and restores one run's state, stream position and final results in ``workdir``.

  Args:
    workdir: the run's directory (created if missing).
    fingerprint: JSON-able dict identifying the run (config plus method name). Stored in
      ``workdir/run.json`` with the first checkpoint and compared on every later open while the
      workdir holds a checkpoint.
    max_to_keep: how many most recent checkpoints to keep (``None``: all).
    ignore_keys: fingerprint keys (dotted for nested dicts) that are not compared, e.g. flags that
      do not change results.
    overwrite: if the workdir already holds a run (finished or not), move all of it into
      ``workdir/previous-<timestamp>/`` and start afresh. Nothing is ever deleted.

  Raises:
    reliability.WorkdirInUseError: another process has the workdir open (names it).
    RunFinishedError: the workdir holds a finished run and ``overwrite`` is False.
    ValueError: the workdir holds checkpoints of a different fingerprint (the message names the
      keys), or checkpoints without a ``run.json``.
    reliability.CorruptCheckpointError: ``run.json`` cannot be read.
    TypeError: the fingerprint is not JSON-able.
  """

  def __init__(self, workdir: str | os.PathLike, *, fingerprint: abc.Mapping[str, Any],
               max_to_keep: int | None = 3, ignore_keys: abc.Iterable[str] = (),
               overwrite: bool = False):
    self.workdir = pathlib.Path(workdir).absolute()
    self.fingerprint = jsonfiles.jsonable(dict(fingerprint), what="fingerprint")
    self.max_to_keep = max_to_keep
    self.ignore_keys = tuple(ignore_keys)
    with reliability.writing(self.workdir):
      self.workdir.mkdir(parents=True, exist_ok=True)
    self.checkpoint_dir = self.workdir / workdir_lib.CHECKPOINT_DIR  # orbax's step directories
    self.corrupt_dir = self.workdir / workdir_lib.CORRUPT_DIR  # steps set aside, never deleted
    self.results_path = self.workdir / workdir_lib.RESULTS_FILE  # written by finish()
    self._manager = None
    # Several processes (sparse_cl_jax.distributed): process 0 holds the lock and writes run.json,
    # the checksums and the results; every process takes part in orbax's saves and restores.
    self._processes = distributed.process_count()
    self._primary = distributed.is_primary()
    self._key = "ckpt-" + hashlib.sha1(str(self.workdir).encode()).hexdigest()[:16]
    self.previous_dir, self._bound = None, True
    self._lock = None
    if self._primary:
      self._open_primary(overwrite)
    if self._processes > 1:  # the others open the workdir once process 0 has prepared it
      distributed.barrier(f"{self._key}/open")
      try:
        self._manager = new_manager(self.checkpoint_dir, max_to_keep,
                                    processes=self._processes, barrier_prefix=self._key)
      except BaseException:
        self._release()
        raise

  def _open_primary(self, overwrite: bool) -> None:
    # First of all: nothing in the workdir is touched (not even the cleanup of temporary
    # directories, which could be another process's save in progress) without the lock.
    self._lock = reliability.WorkdirLock(self.workdir)
    with reliability.writing(self.workdir):  # a read-only or full workdir: one line, naming it
      self._lock.acquire()
    try:
      with reliability.writing(self.workdir):
        # _bound: whether run.json holds this fingerprint.
        self.previous_dir, self._bound = workdir_lib.open_run(
            self.workdir, self.fingerprint, self.ignore_keys, overwrite)
        if self._processes > 1:
          remove_temporary_dirs(self.checkpoint_dir)
          self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        else:
          self._manager = new_manager(self.checkpoint_dir, self.max_to_keep)
    except BaseException:
      self._release()
      raise

  def _release(self) -> None:
    if self._lock is not None:
      self._lock.release()

  def is_finished(self) -> bool:
    """Whether :meth:`finish` has written ``results.json``."""
    return workdir_lib.is_finished(self.workdir)

  def latest_step(self) -> int | None:
    """The most recent committed step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All committed steps still kept, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree, meta: abc.Mapping[str, Any]) -> None:
    """Saves ``state`` and ``meta`` as checkpoint ``step``, then its checksums.

    When a save fails, the previous checkpoints are left intact, what the failed save wrote is
    removed (orbax's temporary directory) or set aside as incomplete (a step renamed into place
    before its checksums were written), and this object stays usable.

    Args:
      step: an int greater than :meth:`latest_step`.
      state: pytree of arrays (see the package docstring).
      meta: small JSON-able dict (stream position, metrics so far).

    Raises:
      ValueError, TypeError: ``step`` is not after the latest step, or see :func:`save_args`.
      reliability.StorageError: a storage fault (full disk, quota, read-only file system, I/O
        error) stopped the write; one line naming the step, the folder and the cause.
      Exception: whatever else orbax raised while writing.
    """
    previous = self.latest_step()
    step = check_new_step(step, previous, self.checkpoint_dir)
    args = save_args(state, meta)
    try:
      self._bind()
      commit(self._manager, step, args)
      if self._primary:
        self._write_checksums(step)
    except Exception as e:  # pylint: disable=broad-except  # re-raised, in one line if storage
      if self._primary:
        discard_unfinished(self, step)
      intact = (f"the previous checkpoint, step {previous}, is intact" if previous is not None
                else "no earlier checkpoint")
      fault = reliability.storage_error(
          e, self.checkpoint_dir, f"cannot write checkpoint step {step} to {self.checkpoint_dir}",
          context=intact)
      if fault is None:
        raise
      raise fault from e

  def _write_checksums(self, step: int) -> None:
    """Records the SHA-256 of every file of committed ``step`` in its ``checksums.json``."""
    checksums_lib.write(self.checkpoint_dir / str(step), ITEMS)

  def restore(self, step: int | None = None, *, like: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores checkpoint ``step`` (default: the latest) into the structure of ``like``.

    Args:
      step: the step to restore; None for :meth:`latest_step`.
      like: a pytree with the state's structure, shapes and dtypes: concrete arrays or
        ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``). Leaves carrying a sharding are
        restored with it; others go to the default device.

    Returns:
      ``(state, meta)``: ``state`` has ``like``'s tree structure with ``jax.Array`` leaves, ``meta``
      is the dict passed to :meth:`save`.

    Raises:
      FileNotFoundError: no such checkpoint.
      reliability.CorruptCheckpointError: the step cannot be read back as it was written, or
        (:class:`IncompleteCheckpointError`) has no checksums; names the step and the file.
      ValueError: the stored tree does not match ``like``; the message names the paths.
    """
    step = step_to_restore(self.all_steps(), step, self.checkpoint_dir)
    abstract, treedef = trees.abstract_like(like)
    verify_step(self.checkpoint_dir, step)
    return restore_step(self._manager, self.checkpoint_dir, step, abstract, treedef)

  def restore_newest_valid(self, *, like: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
    """Restores the newest checkpoint that reads back intact; sets the others aside.

    Every newer step that raises :class:`reliability.CorruptCheckpointError` is moved, as it is,
    to ``workdir/corrupt-checkpoints/`` (:meth:`set_aside`) with a one-line warning that names the
    step and the file, and the next older step is tried.

    Returns:
      ``(step, state, meta)``, or None when the run has no checkpoint (a fresh start; also when
      only incomplete steps were set aside).

    Raises:
      reliability.NoValidCheckpointError: the run had checkpoints but none restores (the corrupt
        ones are in ``corrupt-checkpoints/`` now, or were set aside by an earlier attempt).
      ValueError: a step does not match ``like`` (not corruption: nothing is moved).
    """
    if self._processes > 1:
      return restore_together(self, like)
    found = newest_valid(self, lambda step: self.restore(step, like=like))
    return None if found is None else (found[0], *found[1])

  def set_aside(self, step: int, *, incomplete: bool = False) -> pathlib.Path:
    """Moves step ``step`` to ``corrupt-checkpoints/[incomplete-]step-<step>-<timestamp>``."""
    dest = quarantine.set_aside(self.checkpoint_dir / str(step), self.corrupt_dir, step,
                                incomplete=incomplete)
    self._manager.reload()
    return dest

  def finish(self, results: abc.Mapping[str, Any]) -> pathlib.Path:
    """Writes ``results.json`` atomically, which marks the run finished; returns its path.

    NaN and infinities become ``null`` (strict JSON); ``np.asarray(R, float)`` turns them back into
    NaN. Checkpoints are kept. ``results``: JSON-able dict (NumPy arrays and scalars converted).
    """
    results = jsonfiles.jsonable(dict(results), what="results", strict=True)
    if not self._primary:  # process 0 writes the results of a multi-process run
      return self.results_path
    with reliability.writing(self.results_path):
      self._bind()
      jsonfiles.write_json_atomic(self.results_path, results, strict=True)
    return self.results_path

  def _bind(self) -> None:
    """Writes ``run.json`` with this fingerprint (before the first checkpoint is written)."""
    if not self._bound:
      workdir_lib.bind(self.workdir, self.fingerprint)
      self._bound = True

  def wait(self) -> None:
    """Blocks until pending checkpoint operations are done (saves are already synchronous)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending operations, releases orbax's resources and the workdir's lock.

    Every background thread of orbax has ended when it returns, so nothing of it prints at the
    interpreter's exit. Idempotent.
    """
    manager, self._manager = self._manager, None
    try:
      if manager is not None:
        manager.close()
    finally:
      self._release()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
