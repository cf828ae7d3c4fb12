"""The method protocol: what a continual-learning method is, for the harness that runs it.

A method is a small set of pure functions over a state pytree.

Harness layer of the design: below the methods, which build :class:`Method` values, and below
the trainer, which calls them. A method does not subclass anything; it is a :class:`Method`
value whose fields are functions. The harness (:mod:`sparse_cl_jax.train`) calls them:

* ``init_state(ctx) -> mstate``: the method's non-trainable state for the whole stream (masks,
  ownership, statistics). Shapes never change between tasks.
* ``init_aux(ctx) -> aux``: trainable method variables other than the params (e.g. Piggyback's
  real-valued masks); ``{}`` when there are none. They are trained by ``aux_tx``.
* ``forward_params(params, aux, mstate, task, current) -> params``: the params the network
  computes with for ``task`` (traced) after training ``current`` (traced); used by training
  (``task == current``) and evaluation. Must be differentiable in ``params`` and ``aux``.
* ``wrap_tx(base_tx) -> tx``: puts the method's optax transforms around the base optimiser
  (freezing, sparsity). ``tx_args(mstate, task) -> dict`` gives the keyword extra arguments
  (element-wise masks as data) for ``tx.update``; likewise ``aux_tx_args``.
* ``penalty(params, aux, mstate, task) -> scalar``: an extra loss term (L1 for CLNP...), or None.
* ``run_task(trainer, state, t) -> state``: Python orchestration of task ``t``'s phases through
  the trainer's recorded operations (``trainer.train``, ``trainer.apply``, ``trainer.evaluate``),
  which makes a run resumable inside a task.
* ``report(ctx, state) -> dict``: per-run figures (``density_per_task``, ``model_bytes``,
  capacity) for ``results.json``.

Optional, for methods whose step is more than one cross-entropy over one batch:

* ``step_loss(fwd, params, aux, mstate, batch_stats, batches, task) -> (loss, (new_batch_stats,
  stats, outputs))``: the loss of the multi-source step that ``trainer.train(..., sources=...)``
  runs (:class:`sparse_cl_jax.train.Source`). ``batches`` maps each source's name to its gathered
  rows (the source's data keys, ``'x'`` augmented, plus ``'valid'`` bool ``[B]``); ``fwd`` is the
  trainer's model application (:class:`sparse_cl_jax.train.Forward`: ``fwd(fp, batch_stats, x,
  valid, task)`` and ``fwd.features(...)``); ``stats`` is ``f32[3]`` = (loss * count, correct,
  count) for the progress bar and the epoch's running means; ``outputs`` any per-example pytree
  for ``after_step``. Differentiable in ``params`` and ``aux``.
* ``after_step(mstate, outputs, task) -> mstate``: runs inside the jitted step after the update,
  for per-example statistics kept in the method's state (checkpointed, replayed exactly). The
  classic step passes ``{"ids", "correct", "valid", "y"}`` (each ``[B]``; ``correct`` is the
  training-mode prediction on the augmented minibatch).
* ``eval_logits(logits) -> logits``: the logits a prediction reads, applied to the model's raw
  output before class-IL masking (evaluation and the classic step); e.g. LLT's main head.

A module constant ``OUTPUT_COPIES = k`` makes the harness build the head with ``k`` times the
stream's outputs (LLT's main and auxiliary heads side by side on the same features).

A method module also sets ``DEFAULT_NORM``: the normalisation it wants for models that have one
when the config says ``norm="auto"`` (parameter isolation needs per-task BatchNorm to forget
nothing).

Ownership convention shared by the parameter-isolation methods (PackNet, CPG, DST, CLNP): the
loop's task index ``t`` (0-based) owns weights as owner ``t + 1``; 0 means free.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import optax

from sparse_cl_jax import types


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method may know about the run when it builds its state (all static)."""
  config: ml_collections.ConfigDict
  model: nn.Module
  stream: Any  # data.TaskStream
  variables: dict  # the initial {'params': ..., 'batch_stats': ...}
  spec: types.LeafSpec  # maskable leaves
  task_rows: types.LeafSpec  # leaves with one row per task on axis 0 (heads, per-task BN)
  num_tasks: int
  key: jax.Array  # raw uint32 key data for the method's own randomness

  @property
  def params(self) -> types.Params:
    return self.variables["params"]


def _no_args(mstate, task):
  del mstate, task
  return {}


def _identity_tx(tx):
  return tx


def _empty(ctx):
  del ctx
  return {}


def _plain_forward(params, aux, mstate, task, current):
  del aux, mstate, task, current
  return params


def _no_report(ctx, state):
  del ctx, state
  return {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A continual-learning method as plain functions (see the module docstring)."""
  name: str
  run_task: Callable[..., Any]
  init_state: Callable[[Context], Any] = _empty
  init_aux: Callable[[Context], Any] = _empty
  forward_params: Callable[..., types.Params] = _plain_forward
  wrap_tx: Callable[[optax.GradientTransformation], optax.GradientTransformation] = _identity_tx
  tx_args: Callable[[Any, Any], dict] = _no_args
  aux_tx: optax.GradientTransformation | None = None
  aux_tx_args: Callable[[Any, Any], dict] = _no_args
  penalty: Callable[..., jax.Array] | None = None
  report: Callable[[Context, Any], dict] = _no_report
  # False for methods whose task logic branches on snapshots: then only task boundaries are
  # checkpointed (resume restarts the interrupted task).
  resumable_within_task: bool = True
  step_loss: Callable[..., Any] | None = None
  after_step: Callable[[Any, Any, Any], Any] | None = None
  eval_logits: Callable[[jax.Array], jax.Array] | None = None
