"""Checkpoints of a whole continual-learning run: state pytree, stream position, final results.

Layer 5 of the design (harness), and the only module of the package that imports orbax (in
``checkpointer.py``; the other modules of this package are pure file-system and pytree code). One
run lives in one ``workdir``::

  workdir/
    run.json              {"fingerprint": {...}, "created": "..."}   written atomically with the
                          first checkpoint (or results.json): an attempt that saved nothing
                          binds the workdir to nothing
    run.lock              held (flock) by the process that has the run open; see reliability.py
    checkpoints/<step>/   orbax step directories: "state" (the arrays), "meta" (JSON) and
                          "checksums.json" (SHA-256 of every file of "state" and "meta")
    corrupt-checkpoints/  steps that failed to restore, moved here as they were (never deleted):
                          step-<step>-<time>, or incomplete-step-<step>-<time> (no checksums)
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
one-line warning and falls back to the newest valid one; an unreadable ``checksums.json`` is
such a failure. A step committed by orbax whose ``checksums.json`` is missing (the process was
killed in between) never finished its save: it is never restored unverified but raises
:class:`IncompleteCheckpointError` (a ``CorruptCheckpointError``) and is set aside the same way, as
``corrupt-checkpoints/incomplete-step-<step>-<timestamp>``; when nothing but incomplete steps were
set aside the run starts afresh, as after a kill inside orbax's own write.

A save that fails (orbax, TensorStore or the checksums) removes its temporary directory at once and
sets aside a step it renamed into place without checksums, so no later restore can take it for a
checkpoint; a storage fault (full disk, quota, read-only file system, I/O error) is raised as
:class:`reliability.StorageError`, one line naming the step, the folder, the cause and the previous
step. The temporary directories a killed save left are removed when the workdir is next opened,
synchronously and under its lock (not in orbax's background thread, which nothing waited for).
Opening a workdir that cannot be written (read-only, full) raises ``StorageError`` naming the file.

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

Modules (each one concern; ``checkpoint.NAME`` re-exports the public names):

* ``checkpointer``: the orbax side and :class:`Checkpointer`, which wires the others together.
* ``checksums``: write, read and verify a step's ``checksums.json`` (SHA-256 of its files).
* ``quarantine``: move steps that cannot be restored into ``corrupt-checkpoints/``.
* ``workdir``: the workdir's layout, ``run.json`` and its fingerprint, finished and previous runs.
* ``trees``: a state pytree <-> orbax's nested dict, the abstract ``like`` tree, tree mismatches.
* ``jsonfiles``: JSON-able conversion and atomic JSON writes.
"""

from sparse_cl_jax import reliability
from sparse_cl_jax.checkpoint import checkpointer
from sparse_cl_jax.checkpoint import checksums
from sparse_cl_jax.checkpoint import jsonfiles
from sparse_cl_jax.checkpoint import quarantine
from sparse_cl_jax.checkpoint import trees
from sparse_cl_jax.checkpoint import workdir
from sparse_cl_jax.checkpoint.checkpointer import Checkpointer
from sparse_cl_jax.checkpoint.checkpointer import IncompleteCheckpointError
from sparse_cl_jax.checkpoint.checkpointer import PyTree
from sparse_cl_jax.checkpoint.checksums import FILE as CHECKSUM_FILE
from sparse_cl_jax.checkpoint.workdir import CHECKPOINT_DIR
from sparse_cl_jax.checkpoint.workdir import CORRUPT_DIR
from sparse_cl_jax.checkpoint.workdir import PREVIOUS_PREFIX
from sparse_cl_jax.checkpoint.workdir import RESULTS_FILE
from sparse_cl_jax.checkpoint.workdir import RUN_FILE
from sparse_cl_jax.checkpoint.workdir import RunFinishedError

__all__ = [
    "CHECKPOINT_DIR", "CHECKSUM_FILE", "CORRUPT_DIR", "Checkpointer", "IncompleteCheckpointError",
    "PREVIOUS_PREFIX", "PyTree", "RESULTS_FILE", "RUN_FILE", "RunFinishedError", "checkpointer",
    "checksums", "jsonfiles", "quarantine", "reliability", "trees", "workdir",
]
