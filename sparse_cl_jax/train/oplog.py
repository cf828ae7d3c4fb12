"""The operation log: numbering a task's recorded operations, and replaying them on resume.

A method drives its phases through recorded operations (``Trainer.train``, ``apply``, ``record``,
``evaluate``). Each gets a sequence number within the task; checkpoints store the state with the
(operation, epoch) reached and the log of results so far. On resume the method's ``run_task`` is
replayed: operations before the interrupted one are skipped (their results come from the log),
the interrupted training operation continues at its epoch. Keys derive from (seed, task,
operation, epoch), so a replayed run draws the same randomness.
"""

from __future__ import annotations

import dataclasses

import jax

from sparse_cl_jax.train import state as state_lib


@dataclasses.dataclass
class Resume:
  """Where an interrupted run stopped: task, operation number, epochs done, recorded results."""
  task: int
  op: int
  epoch: int
  op_log: dict


def train_key(op: int) -> str:
  """The log entry of training operation ``op``: its last epoch's ``[loss, accuracy]``."""
  return f"train:{op}"


def steps_key(op: int) -> str:
  """The log entry of training operation ``op``: ``[epochs run, optimiser steps run]``."""
  return f"steps:{op}"


def value_key(op: int) -> str:
  """The log entry of a recorded host value (``Trainer.record``)."""
  return f"value:{op}"


def eval_key(op: int) -> str:
  """The log entry of a recorded evaluation (``Trainer.evaluate``)."""
  return str(op)


class OpLog:
  """The current task's operation counter and log, and the position a resumed run restarts at."""

  def __init__(self):
    self.resume: Resume | None = None
    self.task = -1
    self.op = 0
    self.log: dict = {}

  def begin_task(self, t: int) -> None:
    """Starts the operation counter of task ``t``; a resumed task starts from its saved log."""
    self.task = t
    self.op = 0
    if self.resume is not None and self.resume.task == t:
      self.log = dict(self.resume.op_log)
    else:
      self.log = {}
      self.resume = None

  def next_op(self) -> tuple[int, bool, int]:
    """(operation number, skip it?, epoch to start from)."""
    i = self.op
    self.op += 1
    r = self.resume
    if r is None or r.task != self.task:
      return i, False, 0
    if i < r.op:
      return i, True, 0
    start = r.epoch if i == r.op else 0
    if i >= r.op:
      self.resume = None
    return i, False, start

  def key(self, seed_key, epoch: int = 0, *, op: int | None = None) -> jax.Array:
    """A key derived from (seed, task, operation, epoch); ``op`` defaults to the next one."""
    k = jax.random.wrap_key_data(seed_key)
    op = self.op if op is None else op
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(k, self.task), op), epoch)

  def replayed_train(self, op: int) -> tuple:
    """What a skipped training operation left: (last epoch's ``EpochStats`` or None, epochs,
    steps)."""
    recorded = self.log.get(train_key(op))
    stats = None if recorded is None else state_lib.EpochStats(*map(float, recorded))
    epochs, steps = map(int, self.log.get(steps_key(op), (0, 0)))
    return stats, epochs, steps

  def position(self, op: int, epoch: int) -> dict:
    """What a checkpoint inside operation ``op`` stores to resume at ``epoch``."""
    return {"task": self.task, "op": op, "epoch": epoch, "op_log": dict(self.log)}
