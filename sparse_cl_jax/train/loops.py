"""The epoch loops: the epochs of one training operation, and the chunks of an epoch.

An epoch is ``nb`` batches in an order drawn from the operation's epoch key. Its batches run in
chunks (a whole epoch, or up to the next ``hook`` call) with the loop
:func:`sparse_cl_jax.runtime.epoch_loop` chose for the backend: ``'device'`` (one jitted
``lax.fori_loop`` per chunk) or ``'host'`` (one jitted call per batch, the statistics summed on the
device). After every epoch: the divergence check, the per-epoch log, the operation log, the
method's ``epoch_end``, a checkpoint every ``checkpoint_every_epochs``, and the stop check: once
SIGTERM or SIGINT asked the run to stop (:func:`sparse_cl_jax.reliability.stop_requested`), the
loop saves a checkpoint at the end of the epoch it is in and raises
:class:`~sparse_cl_jax.reliability.RunInterrupted` (a method that cannot resume inside a task saves
nothing; the harness names its newest checkpoint). An epoch is the unit a run resumes at, so the
wait is at most one epoch (one chunk of it and the step running when the signal came, and the
epoch's duties). A stop after an operation's last epoch (or an ``epoch_end`` that ended it early)
saves the position "operation done" (epoch = its number of epochs); the resumed run runs no epoch of
it and takes its last-epoch statistics from the operation log.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from sparse_cl_jax import reliability
from sparse_cl_jax.train import oplog as oplog_lib
from sparse_cl_jax.train import optim
from sparse_cl_jax.train import sources as sources_lib
from sparse_cl_jax.train import state as state_lib

# Salt folded into an epoch's key to derive the augmentation keys (the permutation uses the key).
AUGMENT_SALT = 0x617567
# Salt of the order of source number k (other than the 'epoch' source) of a multi-source step.
SOURCE_ORDER_SALT = 0x5eed


class Programs(NamedTuple):
  """The trainer's compiled step programs (each takes the run's constants first, bound)."""
  run_steps: Callable[..., Any]
  host_step: Callable[..., Any]
  run_multi: Callable[..., Any]
  host_multi: Callable[..., Any]
  permutation: Callable[..., Any]


def run_chunk(programs: Programs, loop: str, state, data, perm, first: int, count: int, task, lr,
              aux_lr, aug_key, spec=None):
  """Runs ``count`` batches from ``first`` with the ``'device'`` or ``'host'`` loop.

  With ``spec`` (multi-source), ``data`` and ``perm`` are dicts keyed by source name.
  """
  if spec is not None:
    if loop == "device":
      return programs.run_multi(state, data, perm, jnp.int32(first), jnp.int32(count), task, lr,
                                aux_lr, aug_key, spec=spec)
    totals = jnp.zeros(3, jnp.float32)
    for b in range(first, first + count):
      state, totals = programs.host_multi(state, totals, data, perm, jnp.int32(b), task, lr,
                                          aux_lr, aug_key, spec=spec)
    return state, totals
  if loop == "device":
    return programs.run_steps(state, data, perm, jnp.int32(first), jnp.int32(count), task, lr,
                              aux_lr, aug_key)
  totals = jnp.zeros(3, jnp.float32)
  for b in range(first, first + count):
    state, totals = programs.host_step(state, totals, data, perm, jnp.int32(b), task, lr, aux_lr,
                                       aug_key)
  return state, totals


@dataclasses.dataclass
class Operation:
  """One training operation as the epoch loop runs it (what ``Trainer.train`` resolved)."""
  op: int  # its number in the task's operation log
  task: int
  phase: str
  epochs: int
  start: int  # first epoch to run (> 0 when a resumed run continues inside it)
  data: Any  # TaskData, or a dict of source dicts with ``spec``
  spec: tuple | None  # the multi-source description (``sources.check_sources``), or None
  nb: int  # batches per epoch
  n_rows: Any  # rows of the data (int), or per source (dict) with ``spec``
  lr: float
  milestones: Any
  decay: float
  aux_lr: float
  aux_lr_fn: Callable[[int], float] | None
  hook: Callable[[Any, int], Any] | None
  hook_every: int
  epoch_end: Callable[[Any, int], tuple[Any, bool]] | None


def epoch_orders(programs: Programs, op: Operation, epoch_key):
  """The epoch's row order: of the data, or of every source (the 'epoch' source as data= is)."""
  if op.spec is None:
    return programs.permutation(epoch_key, op.data.n, op.n_rows)
  return {name: programs.permutation(
      epoch_key if order == "epoch" else jax.random.fold_in(epoch_key, SOURCE_ORDER_SALT + k),
      op.data[name]["n"], op.n_rows[name]) for k, (name, _, order, _) in enumerate(op.spec)}


def run_epoch(programs: Programs, loop: str, op: Operation, state, perm, task, lr, aux_lr,
              aug_key, steps_done: int):
  """One epoch in chunks; ``op.hook`` between chunks every ``op.hook_every`` steps.

  Returns the state, the epoch's summed ``(loss * n, correct, n)`` and the operation's steps.
  """
  b = 0
  totals = np.zeros(3)
  while b < op.nb:
    chunk = op.nb - b
    if op.hook is not None and op.hook_every > 0:
      chunk = min(chunk, op.hook_every - steps_done % op.hook_every)
    state, stats = run_chunk(programs, loop, state, op.data, perm, b, chunk, task, lr, aux_lr,
                             aug_key, op.spec)
    totals += np.asarray(stats)
    b += chunk
    steps_done += chunk
    if op.hook is not None and op.hook_every > 0 and steps_done % op.hook_every == 0:
      state = op.hook(state, steps_done)
  return state, totals, steps_done


def run_epochs(trainer, op: Operation, state):
  """Epochs ``op.start .. op.epochs - 1`` of a training operation, with the per-epoch duties.

  ``trainer`` supplies the compiled programs, the loop kind, the operation log, the per-epoch
  log (``on_epoch``), the checkpoint callback (``save_fn``) and the ``last_train_*`` results.
  """
  log = trainer.oplog
  if op.start >= op.epochs:  # a run stopped after this operation's last epoch, resumed
    (trainer.last_train_stats, trainer.last_train_epochs,
     trainer.last_train_steps) = log.replayed_train(op.op)
  bar = tqdm.tqdm(total=op.epochs, initial=op.start, disable=not trainer.config.progress,
                  leave=False, desc=f"task {op.task + 1}/{trainer.stream.num_tasks} {op.phase}",
                  unit="ep")
  try:  # closed however the loop ends: an error line never lands on the bar's line
    return _epochs(trainer, op, state, bar)
  finally:
    bar.close()


def _epochs(trainer, op: Operation, state, bar):
  """The epochs of :func:`run_epochs` with its progress bar ``bar``."""
  c = trainer.config
  log = trainer.oplog
  task = jnp.int32(op.task)
  steps_done = op.start * op.nb
  for epoch in range(op.start, op.epochs):
    epoch_key = trainer.op_key(epoch, op=op.op)
    perm = epoch_orders(trainer.programs, op, epoch_key)
    aug_key = jax.random.key_data(jax.random.fold_in(epoch_key, AUGMENT_SALT))
    lr_e = jnp.float32(optim.lr_for_epoch(op.lr, epoch, op.epochs, op.milestones, op.decay))
    aux_e = jnp.float32(op.aux_lr_fn(epoch) if op.aux_lr_fn is not None else op.aux_lr)
    state, totals, steps_done = run_epoch(trainer.programs, trainer.loop, op, state, perm, task,
                                          lr_e, aux_e, aug_key, steps_done)
    loss, acc = totals[0] / max(totals[2], 1), totals[1] / max(totals[2], 1)
    reliability.check_loss(loss, c, task=op.task, phase=op.phase, epoch=epoch, epochs=op.epochs)
    if trainer.on_epoch is not None:  # the harness's per-epoch log (experiment.EpochLogger)
      trainer.on_epoch(trainer, state, task=op.task, phase=op.phase, op=op.op, epoch=epoch,
                       epochs=op.epochs, loss=loss, accuracy=acc, learning_rate=lr_e, bar=bar)
    trainer.last_train_stats = state_lib.EpochStats(float(loss), float(acc))
    log.log[oplog_lib.train_key(op.op)] = [float(loss), float(acc)]
    stop = False
    if op.epoch_end is not None:
      state, stop = op.epoch_end(state, epoch)
      stop = bool(stop)
    trainer.last_train_epochs, trainer.last_train_steps = epoch + 1, (epoch + 1) * op.nb
    log.log[oplog_lib.steps_key(op.op)] = [trainer.last_train_epochs, trainer.last_train_steps]
    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
    bar.update(1)
    logging.log_every_n_seconds(logging.INFO, "task %d %s epoch %d/%d loss %.4f acc %.4f", 10,
                                op.task + 1, op.phase, epoch + 1, op.epochs, loss, acc)
    every = int(c.checkpoint_every_epochs)
    signum = reliability.stop_agreed(trainer.scope)
    if signum is not None:  # SIGTERM / SIGINT: save here (the operation done, if it is) and stop
      stop_here(trainer, state, op.op, op.epochs if stop else epoch + 1, signum)
    if stop:
      break
    if (trainer.save_fn is not None and trainer.method.resumable_within_task and every
        and (epoch + 1) % every == 0 and epoch + 1 < op.epochs):
      trainer.save_fn(state, log.position(op.op, epoch + 1))
  return state


def operation_data(trainer, t: int, data, sources):
  """``(spec, data, batches per epoch, rows)`` of a training operation on task ``t``: its own
  split, replacement ``data``, or the multi-source ``sources`` (placed on the device)."""
  if sources is not None:
    if data is not None:
      raise ValueError("train(): pass either data= or sources=, not both")
    return sources_lib.place(sources, trainer.put)
  data = trainer.task_data(t) if data is None else data
  nb = max(1, -(-int(data.n) // trainer.batch_size))
  return None, data, nb, int(data.x.shape[0])


def stop_here(trainer, state, op: int, epochs_done: int, signum: int):
  """Saves the position ``epochs_done`` of operation ``op`` and raises ``RunInterrupted``.

  A method that cannot resume inside a task (``resumable_within_task=False``), or a trainer
  without ``save_fn``, saves nothing; the harness names the newest checkpoint instead.
  """
  if trainer.save_fn is not None and trainer.method.resumable_within_task:
    trainer.save_fn(state, trainer.oplog.position(op, epochs_done))
    raise reliability.RunInterrupted(signum, saved=True)
  why = (f"{trainer.method.name} cannot save inside a task (a rerun repeats task "
         f"{trainer.oplog.task + 1} from its start)" if trainer.save_fn is not None else
         "this trainer has no checkpoint callback")
  raise reliability.RunInterrupted(signum, why, saved=False)
