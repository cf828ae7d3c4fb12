"""Checkpoints of a whole continual-learning run: state pytree, stream position, final results.

Layer 5 of the design (harness), and the only module of the package that imports orbax. One run
lives in one ``workdir``::

  workdir/
    run.json              {"fingerprint": {...}, "created": "..."}   written atomically with the
                          first checkpoint (or results.json): an attempt that saved nothing
                          binds the workdir to nothing
    run.lock              held (flock) by the process that has the run open; see reliability.py
    checkpoints/<step>/   orbax step directories: "state" (the arrays), "meta" (JSON) and
                          "checksums.json" (SHA-256 of every file of "state" and "meta")
    corrupt-checkpoints/  steps that failed to restore, moved here as they were (never deleted)
    results.json          written by Checkpointer.finish(); its presence means "finished"
    previous-<timestamp>/ an older run moved aside by overwrite=True (never deleted)

Conventions:

* ``fingerprint``: a JSON-able dict that identifies the run, normally the config as a dict plus the
  method name (``{**config.to_dict(), 'method': 'packnet'}``). A workdir that holds a checkpoint
  refuses a different fingerprint, naming the differing keys, so a resumed run never mixes
  configs; flags that do not change results (progress bars, logging) go into ``ignore_keys``.
  Nested dicts are compared key by key (``model.width``). The fingerprint binds with the first
  :meth:`Checkpointer.save` (or :meth:`Checkpointer.finish`): a run that failed before it saved
  anything never blocks a rerun with another config, and a ``run.json`` left without any
  checkpoint is replaced.
* ``step``: any strictly increasing integer chosen by the caller, e.g. a global phase or epoch
  counter. Only the last ``max_to_keep`` steps are kept.
* ``state``: any pytree of arrays (params, optimiser state, masks, ownership, method state, RNG
  keys as raw ``uint32`` key data, i.e. ``jax.random.key_data(key)``). Empty nodes (``None``,
  ``optax.EmptyState()``) are allowed; they come back from ``like``. NumPy leaves are stored with
  JAX's canonical dtype (as ``jnp.asarray`` would convert them: float64 -> float32 unless x64 is
  on); restored leaves are always ``jax.Array``.
* ``meta``: small JSON describing where in the stream the checkpoint was taken, e.g.
  ``{'task': 3, 'phase': 'prune', 'epoch': 7, 'R': [[...]]}``. Python ``json`` rules apply: tuples
  come back as lists, NaN survives.

Saving is synchronous and atomic: orbax writes ``checkpoints/<step>.orbax-checkpoint-tmp`` and
renames it when complete, so a crash or an error mid-save leaves the previous checkpoint intact (and
older steps are only pruned after the new one is committed). Right after the commit the SHA-256 of
every file of the step goes into ``checksums.json`` (atomically): TensorStore checks the integrity
of its index but not of compressed array data, so a flipped byte there would otherwise restore
silently as different numbers. Restoring verifies the checksums, then validates the stored tree
against ``like`` and names every mismatching path. A step that cannot be read back as it was
written raises :class:`reliability.CorruptCheckpointError` naming the step and the file;
:meth:`Checkpointer.restore_newest_valid` moves such steps to ``corrupt-checkpoints/`` with a
one-line warning and falls back to the newest valid one. A step committed by orbax whose
``checksums.json`` is missing (the process was killed in between) is restored unverified.

One process at a time: the constructor takes ``run.lock`` (:class:`reliability.WorkdirLock`)
before touching anything, and :meth:`Checkpointer.close` releases it; a second process opening the
same workdir gets :class:`reliability.WorkdirInUseError` naming the holder.

Example::

  from sparse_cl_jax import checkpoint
  ckpt = checkpoint.Checkpointer(workdir, fingerprint={**config.to_dict(), 'method': 'packnet'},
                                 ignore_keys=('progress_bar',))
  start = 0
  found = ckpt.restore_newest_valid(like=jax.eval_shape(init_state, key))
  if found is not None:
    step, state, meta = found
    start = meta['task'] + 1
  for task in range(start, num_tasks):
    state = train_task(state, task)
    ckpt.save(task, state, {'task': task, 'R': R.tolist()})
  ckpt.finish({'acc': metrics.acc(R), 'R': R.tolist()})
  ckpt.close()
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import pathlib
import re
from collections import abc
from typing import Any

from absl import logging as absl_logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from sparse_cl_jax import reliability

PyTree = Any

RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
PREVIOUS_PREFIX = "previous-"
CORRUPT_DIR = "corrupt-checkpoints"
CHECKSUM_FILE = "checksums.json"
_ITEMS = ("state", "meta")  # The orbax items of a step; their files are checksummed.

_MAX_LISTED = 10  # How many differing keys / paths an error message lists.


class _QuietOrbax:
  """Drops orbax's INFO/DEBUG records (several per save) from the absl logger; keeps warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in record.pathname


_QUIET = _QuietOrbax()
absl_logging.get_absl_logger().addFilter(_QUIET)


class RunFinishedError(RuntimeError):
  """The workdir holds a finished run and ``overwrite`` was not requested."""


# --------------------------------------------------------------------------------------------------
# JSON helpers.


def _jsonable(obj: Any, *, what: str, strict: bool = False) -> Any:
  """Plain JSON types from ``obj`` (NumPy scalars and small arrays converted).

  Args:
    obj: nested dicts / lists / tuples / scalars / NumPy or JAX arrays.
    what: how to call ``obj`` in error messages.
    strict: replace NaN and infinities by ``None`` (strict JSON).

  Raises:
    TypeError: naming the offending entry when something cannot be written as JSON.
  """

  def convert(x, where):
    if isinstance(x, abc.Mapping):
      out = {}
      for k, v in x.items():
        if not isinstance(k, (str, int, float, bool)) and k is not None:
          raise TypeError(f"{what}: key {k!r} at {where or '<root>'} is not a JSON key")
        out[str(k)] = convert(v, f"{where}.{k}" if where else str(k))
      return out
    if isinstance(x, (list, tuple)):
      return [convert(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
      x = np.asarray(x)
      if x.dtype.kind not in "biuf":
        raise TypeError(f"{what}: {where or '<root>'} has dtype {x.dtype}, not JSON-able")
      return convert(x.tolist(), where)
    if isinstance(x, float) and strict and not math.isfinite(x):
      return None
    if x is None or isinstance(x, (str, int, float, bool)):
      return x
    raise TypeError(f"{what}: {where or '<root>'} is a {type(x).__name__}, not JSON-able "
                    "(pass plain dicts, e.g. config.to_dict())")

  return convert(obj, "")


def _fsync_dir(path: pathlib.Path) -> None:
  """Makes a rename inside ``path`` durable (best effort: not every file system allows it)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _write_json_atomic(path: pathlib.Path, obj: Any, *, strict: bool = False) -> None:
  """Writes ``obj`` to ``path`` atomically: a temporary file, fsync, ``os.replace``, fsync the dir.

  Readers see the old file or the new one, never a partial one, even if the process is killed.
  """
  text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=not strict) + "\n"
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)  # Our own partial temporary file, never a saved one.
    raise
  _fsync_dir(path.parent)


def _file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _step_files(step_dir: pathlib.Path) -> list[str]:
  """The files of a step's items, relative to ``step_dir``, sorted."""
  out = []
  for item in _ITEMS:
    root = step_dir / item
    if root.is_dir():
      out.extend(p.relative_to(step_dir).as_posix() for p in root.rglob("*") if p.is_file())
  return sorted(out)


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


# TensorStore errors name the file or the OCDBT key they failed on.
_FILE_IN_ERROR = re.compile(r'(?:local file|Error reading) "([^"]+)"')


def _file_in_error(e: BaseException, step_dir: pathlib.Path, default: str) -> str:
  names = _FILE_IN_ERROR.findall(str(e))
  for name in reversed(names):  # The innermost (last) name is the most specific.
    prefix = str(step_dir) + os.sep
    if name.startswith(prefix):
      return name[len(prefix):]
  return f"{default} ({names[-1]})" if names else default


def _flat_keys(d: abc.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{'a.b': v}`` for nested dicts (non-dict values are leaves)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, abc.Mapping) and v:
      out.update(_flat_keys(v, key))
    else:
      out[key] = v
  return out


def _fingerprint_diff(stored: abc.Mapping[str, Any], given: abc.Mapping[str, Any],
                      ignore_keys: abc.Iterable[str]) -> list[str]:
  """Differences as ``'key stored != given'``; ignored keys (and their subkeys) are skipped."""
  ignore = tuple(ignore_keys)

  def ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignore)

  a, b = _flat_keys(stored), _flat_keys(given)
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


# --------------------------------------------------------------------------------------------------
# Pytree <-> orbax nested dict.


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _escape(name: str) -> str:
  # Orbax joins nested keys with '.', so a '.' inside a key would alias another leaf.
  return name.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def _leaves(tree: PyTree) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
  """``([(path components, leaf)], treedef)``; raises on two leaves with the same stored name."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = [(tuple(_key_name(k) for k in path), leaf) for path, leaf in with_path]
  seen = {}
  for parts, _ in out:
    stored = tuple(_escape(p) for p in parts)
    if stored in seen:
      raise ValueError(f"leaves {'/'.join(seen[stored])!r} and {'/'.join(parts)!r} map to the same "
                       "checkpoint name")
    seen[stored] = parts
  return out, treedef


def _nest(leaves: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  """Nested dict keyed by the escaped path components (orbax's native layout)."""
  root: dict[str, Any] = {}
  for parts, leaf in leaves:
    if not parts:
      raise ValueError("state must be a container of arrays, not a single array")
    node = root
    for p in parts[:-1]:
      node = node.setdefault(_escape(p), {})
    node[_escape(parts[-1])] = leaf
  return root


def _lookup(nested: abc.Mapping[str, Any], parts: tuple[str, ...]) -> Any:
  node = nested
  for p in parts:
    node = node[_escape(p)]
  return node


def _is_key_dtype(dtype) -> bool:
  return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _host_leaf(path: str, x: Any) -> Any:
  """A leaf orbax can write: jax arrays as they are, others as canonical-dtype NumPy arrays."""
  if isinstance(x, jax.Array):
    if _is_key_dtype(x.dtype):
      raise TypeError(f"state leaf {path!r} is a typed PRNG key; save jax.random.key_data(key) "
                      "(uint32) and rebuild it with jax.random.wrap_key_data after restore")
    return x
  x = np.asarray(x)
  if x.dtype.kind in "OUSMm" or x.dtype.fields is not None:
    raise TypeError(f"state leaf {path!r} has dtype {x.dtype}; only numeric and bool arrays can be "
                    "checkpointed (put strings and small Python values into meta)")
  return x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)


def _default_sharding() -> jax.sharding.Sharding:
  device = jax.config.jax_default_device
  if device is None:
    device = jax.local_devices()[0]
  elif isinstance(device, str):
    device = jax.local_devices(backend=device)[0]
  return jax.sharding.SingleDeviceSharding(device)


def _abstract_leaf(x: Any, default: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
  """``ShapeDtypeStruct`` of a ``like`` leaf, with its sharding or the default device's."""
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    shape, dtype, sharding = tuple(x.shape), x.dtype, getattr(x, "sharding", None)
  else:
    x = np.asarray(x)
    shape, dtype, sharding = x.shape, jax.dtypes.canonicalize_dtype(x.dtype), None
  if _is_key_dtype(dtype):
    raise TypeError("`like` holds a typed PRNG key; checkpoints store raw uint32 key data")
  sharding = default if sharding is None else sharding
  return jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)


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
    self.fingerprint = _jsonable(dict(fingerprint), what="fingerprint")
    self.max_to_keep = max_to_keep
    self.ignore_keys = tuple(ignore_keys)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._manager = None
    # First of all: nothing in the workdir is touched (not even orbax's cleanup of temporary
    # directories, which could be another process's save in progress) without the lock.
    self._lock = reliability.WorkdirLock(self.workdir)
    self._lock.acquire()
    try:
      self._open(overwrite)
    except BaseException:
      self._lock.release()
      raise

  def _open(self, overwrite: bool) -> None:
    run_file = self.workdir / RUN_FILE
    if overwrite:
      self.previous_dir = self._move_aside()
    else:
      self.previous_dir = None
      if self.is_finished():
        differs = ""
        if run_file.exists():
          diffs = _fingerprint_diff(self._read_fingerprint(run_file), self.fingerprint,
                                    self.ignore_keys)
          if diffs:
            more = f" (and {len(diffs) - _MAX_LISTED} more)" if len(diffs) > _MAX_LISTED else ""
            differs = (f" by a different config: {'; '.join(diffs[:_MAX_LISTED])}{more} "
                       "(stored != now)")
        raise RunFinishedError(
            f"run in {self.workdir} already finished{differs}; results in {self.results_path}; "
            "pass --overwrite (moves it aside, nothing is deleted) or use another --workdir")
    self._bound = False  # whether run.json holds this fingerprint
    if run_file.exists() and self._holds_saved_state():
      stored = self._read_fingerprint(run_file)
      diffs = _fingerprint_diff(stored, self.fingerprint, self.ignore_keys)
      if diffs:
        listed = "; ".join(diffs[:_MAX_LISTED])
        more = f" (and {len(diffs) - _MAX_LISTED} more)" if len(diffs) > _MAX_LISTED else ""
        raise ValueError(
            f"checkpoint in {self.workdir} was written by a different config: {listed}{more} "
            "(stored != now); use another --workdir, or --overwrite to move the old run aside, "
            "or rerun with the stored values to resume it")
      self._bound = True
    elif not run_file.exists():
      ckpt_dir = self.workdir / CHECKPOINT_DIR
      if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise ValueError(f"{ckpt_dir} holds checkpoints but {run_file} is missing, so their config "
                         "is unknown; use another --workdir, or --overwrite to move them aside")
    # else: a run.json without any checkpoint (an attempt that failed before saving anything)
    # binds nothing; it is replaced at the first save.
    self._manager = self._new_manager()

  def _holds_saved_state(self) -> bool:
    """Whether the workdir holds a committed or set-aside checkpoint (or a finished run)."""
    ckpt_dir = self.workdir / CHECKPOINT_DIR
    if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
      return True
    if self.corrupt_dir.is_dir() and any(self.corrupt_dir.iterdir()):
      return True
    return self.is_finished()

  def _bind(self) -> None:
    """Writes ``run.json`` with this fingerprint (before the first checkpoint is written)."""
    if self._bound:
      return
    created = datetime.datetime.now().isoformat(timespec="seconds")
    _write_json_atomic(self.workdir / RUN_FILE,
                       {"fingerprint": self.fingerprint, "created": created})
    self._bound = True

  def _read_fingerprint(self, run_file: pathlib.Path) -> dict[str, Any]:
    try:
      stored = json.loads(run_file.read_text(encoding="utf-8"))["fingerprint"]
      if not isinstance(stored, dict):
        raise TypeError("'fingerprint' is not a JSON object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
      raise reliability.CorruptCheckpointError(
          f"{run_file} is unreadable ({type(e).__name__}: {_first_line(e, 80)}), so the config of "
          f"the run in {self.workdir} is unknown; restore the file, or use --overwrite to move the "
          "run aside (nothing is deleted), or another --workdir", file=RUN_FILE) from None
    return stored

  # ----------------------------------------------------------------------------------------------
  # Paths and state of the run.

  @property
  def checkpoint_dir(self) -> pathlib.Path:
    """``workdir/checkpoints``: orbax's step directories."""
    return self.workdir / CHECKPOINT_DIR

  @property
  def results_path(self) -> pathlib.Path:
    """``workdir/results.json``."""
    return self.workdir / RESULTS_FILE

  def is_finished(self) -> bool:
    """Whether :meth:`finish` has written ``results.json``."""
    return self.results_path.exists()

  @property
  def corrupt_dir(self) -> pathlib.Path:
    """``workdir/corrupt-checkpoints``: steps that failed to restore, set aside."""
    return self.workdir / CORRUPT_DIR

  def latest_step(self) -> int | None:
    """The most recent committed step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All committed steps still kept, ascending."""
    return sorted(self._manager.all_steps())

  # ----------------------------------------------------------------------------------------------
  # Save / restore.

  def save(self, step: int, state: PyTree, meta: abc.Mapping[str, Any]) -> None:
    """Saves ``state`` and ``meta`` as checkpoint ``step``; returns once it is committed.

    Args:
      step: an int greater than :meth:`latest_step`.
      state: pytree of arrays (see the module docstring).
      meta: small JSON-able dict (stream position, metrics so far).

    Raises:
      ValueError: ``step`` is not after the latest step, or the state has no array leaves.
      TypeError: a leaf cannot be checkpointed (strings, objects, typed PRNG keys) or ``meta``
        is not JSON-able.
      Exception: whatever orbax raised while writing; the previous checkpoints are left intact and
        this object stays usable.
    """
    step = int(step)
    latest = self.latest_step()
    if step < 0 or (latest is not None and step <= latest):
      raise ValueError(f"checkpoint step {step} must be > the latest step {latest} in "
                       f"{self.checkpoint_dir}")
    meta = _jsonable(dict(meta), what="meta")
    leaves, _ = _leaves(state)
    if not leaves:
      raise ValueError("state has no array leaves to checkpoint")
    leaves = [(parts, _host_leaf("/".join(parts), x)) for parts, x in leaves]
    self._bind()
    args = ocp.args.Composite(state=ocp.args.StandardSave(_nest(leaves)),
                              meta=ocp.args.JsonSave(meta))
    try:
      self._manager.save(step, args=args, force=True)
      self._manager.wait_until_finished()
    except BaseException:
      # The step directory was never renamed into place; re-read the committed steps from disk so
      # that the manager's cached step list cannot claim the failed step.
      self._manager.reload()
      raise
    self._write_checksums(step)

  def _step_dir(self, step: int) -> pathlib.Path:
    return self.checkpoint_dir / str(step)

  def _write_checksums(self, step: int) -> None:
    """Records the SHA-256 of every file of committed ``step`` in its ``checksums.json``."""
    step_dir = self._step_dir(step)
    files = {name: _file_sha256(step_dir / name) for name in _step_files(step_dir)}
    _write_json_atomic(step_dir / CHECKSUM_FILE, {"algorithm": "sha256", "files": files})

  def _verify_checksums(self, step: int) -> None:
    """Raises CorruptCheckpointError naming the first file that differs from what was written."""
    step_dir = self._step_dir(step)
    path = step_dir / CHECKSUM_FILE
    if not path.exists():
      return  # Killed between orbax's commit and the checksums: restored unverified.
    try:
      files = json.loads(path.read_text(encoding="utf-8"))["files"]
      files = {str(k): str(v) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
      raise self._corrupt(step, CHECKSUM_FILE, f"unreadable ({type(e).__name__})") from None
    for name, digest in sorted(files.items()):
      if not (step_dir / name).is_file():
        raise self._corrupt(step, name, "missing")
      if _file_sha256(step_dir / name) != digest:
        raise self._corrupt(step, name, "checksum mismatch (changed after it was written)")

  def _corrupt(self, step: int, file: str, reason: str) -> reliability.CorruptCheckpointError:
    return reliability.CorruptCheckpointError(
        f"checkpoint step {step} in {self.checkpoint_dir} is corrupt: {file}: {reason}",
        step=step, file=file)

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
      reliability.CorruptCheckpointError: the step cannot be read back as it was written (a file
        fails its checksum, or orbax / TensorStore fails to read it); names the step and the file.
      ValueError: the stored tree does not match ``like``; the message names the paths (missing,
        unexpected, shape or dtype differences).
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.checkpoint_dir}")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.checkpoint_dir}; "
                              f"available: {steps}")
    leaves, treedef = _leaves(like)
    default = _default_sharding()
    abstract = [(parts, _abstract_leaf(x, default)) for parts, x in leaves]
    self._verify_checksums(step)
    step_dir = self._step_dir(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, _file_in_error(e, step_dir, "meta/metadata"),
                          _first_line(e)) from e
    if not isinstance(meta, dict):
      raise self._corrupt(step, "meta/metadata", f"holds a {type(meta).__name__}, not a dict")
    try:
      stored = self._manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, _file_in_error(e, step_dir, "state/_METADATA"),
                          _first_line(e)) from e
    stored = getattr(stored, "tree", stored)
    self._check_matches(step, stored, abstract)  # A different structure is not corruption.
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_nest(abstract))))
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, _file_in_error(e, step_dir, "state"), _first_line(e)) from e
    state = jax.tree_util.tree_unflatten(
        treedef, [_lookup(restored["state"], parts) for parts, _ in abstract])
    return state, dict(meta)

  def restore_newest_valid(self, *, like: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
    """Restores the newest checkpoint that reads back intact; sets corrupt ones aside.

    Every step that raises :class:`reliability.CorruptCheckpointError` is moved, as it is, to
    ``workdir/corrupt-checkpoints/step-<step>-<timestamp>`` with a one-line warning that names
    the step and the file, and the next older step is tried.

    Args:
      like: as in :meth:`restore`.

    Returns:
      ``(step, state, meta)``, or None when the run has no checkpoint yet (a fresh start).

    Raises:
      reliability.NoValidCheckpointError: the run had checkpoints but none restores (they are all
        in ``corrupt-checkpoints/`` now, or were set aside by an earlier attempt).
      ValueError: a step does not match ``like`` (not corruption: nothing is moved).
    """
    while True:
      steps = self.all_steps()
      if not steps:
        break
      step = steps[-1]
      try:
        state, meta = self.restore(step, like=like)
      except reliability.CorruptCheckpointError as e:
        dest = self.set_aside(step)
        older = f"trying step {steps[-2]}" if len(steps) > 1 else "no older checkpoint"
        absl_logging.warning("%s; moved it to %s; %s", e, dest, older)
        continue
      return step, state, meta
    if self.corrupt_dir.is_dir() and any(self.corrupt_dir.iterdir()):
      raise reliability.NoValidCheckpointError(
          f"no valid checkpoint to resume the run in {self.workdir}: the corrupt ones are in "
          f"{self.corrupt_dir}; use --overwrite to move the run aside and start again (nothing "
          "is deleted), or another --workdir")
    return None

  def set_aside(self, step: int) -> pathlib.Path:
    """Moves step ``step`` to ``corrupt-checkpoints/step-<step>-<timestamp>`` (never deletes)."""
    self.corrupt_dir.mkdir(exist_ok=True)
    dest = reliability.fresh_path(self.corrupt_dir, f"step-{step}-")
    os.replace(self._step_dir(step), dest)
    _fsync_dir(self.checkpoint_dir)
    self._manager.reload()
    return dest

  def _check_matches(self, step: int, stored: Any, abstract) -> None:
    """Raises ValueError listing every path where the stored tree and ``like`` differ."""
    stored_leaves = {}
    for path, meta in jax.tree_util.tree_flatten_with_path(stored)[0]:
      stored_leaves["/".join(_key_name(k) for k in path)] = meta
    wanted = {"/".join(_escape(p) for p in parts): ("/".join(parts), x) for parts, x in abstract}
    problems = []
    for name in sorted(set(wanted) - set(stored_leaves)):
      problems.append(f"{wanted[name][0]}: in `like` but not in the checkpoint")
    for name in sorted(set(stored_leaves) - set(wanted)):
      problems.append(f"{name}: in the checkpoint but not in `like`")
    for name in sorted(set(wanted) & set(stored_leaves)):
      path, x = wanted[name]
      meta = stored_leaves[name]
      shape, dtype = tuple(getattr(meta, "shape", ())), getattr(meta, "dtype", None)
      if shape != tuple(x.shape):
        problems.append(f"{path}: shape {shape} in the checkpoint, {tuple(x.shape)} in `like`")
      elif dtype is not None and np.dtype(dtype) != np.dtype(x.dtype):
        problems.append(f"{path}: dtype {np.dtype(dtype)} in the checkpoint, "
                        f"{np.dtype(x.dtype)} in `like`")
    if problems:
      more = (f"\n  ... and {len(problems) - _MAX_LISTED} more"
              if len(problems) > _MAX_LISTED else "")
      raise ValueError(f"checkpoint step {step} in {self.checkpoint_dir} does not match `like`:\n  "
                       + "\n  ".join(problems[:_MAX_LISTED]) + more)

  # ----------------------------------------------------------------------------------------------
  # End of run.

  def finish(self, results: abc.Mapping[str, Any]) -> pathlib.Path:
    """Writes ``results.json`` atomically, which marks the run finished.

    NaN and infinities become ``null`` (strict JSON); ``np.asarray(R, float)`` turns them back into
    NaN. Checkpoints are kept.

    Args:
      results: JSON-able dict (NumPy arrays and scalars are converted).

    Returns:
      The path of ``results.json``.
    """
    results = _jsonable(dict(results), what="results", strict=True)
    self._bind()
    _write_json_atomic(self.results_path, results, strict=True)
    return self.results_path

  def wait(self) -> None:
    """Blocks until pending checkpoint operations are done (saves are already synchronous)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending operations, releases orbax's resources and the workdir's lock."""
    try:
      if self._manager is not None:
        self._manager.close()
    finally:
      self._lock.release()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # ----------------------------------------------------------------------------------------------
  # Internals.

  def _new_manager(self) -> ocp.CheckpointManager:
    registry = ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(self.max_to_keep),
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,  # Leftovers of interrupted saves, never committed steps.
        create=True,
    )
    return ocp.CheckpointManager(self.checkpoint_dir, options=options, handler_registry=registry)

  def _move_aside(self) -> pathlib.Path | None:
    """Moves every entry of the workdir except earlier ``previous-*`` folders into a new one."""
    entries = [p for p in self.workdir.iterdir()
               if not p.name.startswith(PREVIOUS_PREFIX) and p.name != reliability.LOCK_FILE]
    return reliability.move_into_fresh(entries, self.workdir, PREVIOUS_PREFIX)
