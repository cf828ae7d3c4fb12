"""Evaluation bodies: accuracy counts and raw outputs in eval mode, in eval batches on the device.

Pure functions of the trainer's :class:`~sparse_cl_jax.train.steps.StepEnv` and constants ``c``
(jitted once by the trainer). Evaluation never augments, runs the model with ``train=False`` and
leaves the padding rows of a split out of every count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_cl_jax.train import state as state_lib
from sparse_cl_jax.train import steps

TrainState = state_lib.TrainState
TaskData = state_lib.TaskData


def eval_counts(env: steps.StepEnv, c, state: TrainState, data: TaskData, view_task, current,
                head_task):
  """(correct, total) over the valid rows of ``data`` with the method's view of ``view_task``."""
  env.trace_counts["eval"] += 1
  eb = env.eval_batch_size
  n_max = data.x.shape[0]
  nb = -(-n_max // eb)
  # The method's view is computed once, outside the batch loop.
  fp = env.method.forward_params(state.params, state.aux, state.method, view_task, current)

  def body(i, acc):
    pos = i * eb + jnp.arange(eb, dtype=jnp.int32)
    idx = steps.shard_batch(env, jnp.minimum(pos, n_max - 1))
    valid = (pos < data.n).astype(jnp.float32)
    x = jnp.take(data.x, idx, axis=0)
    y = jnp.take(data.y, idx, axis=0)
    logits, _ = steps.apply_model(env, c, fp, state.batch_stats, x, view_task, train=False,
                                  valid=steps.shard_batch(env, pos < data.n))
    logits = steps.mask_logits(env, c, logits, head_task)
    hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return acc + jnp.stack([jnp.sum(hit * valid), jnp.sum(valid)])

  return jax.lax.fori_loop(0, nb, body, jnp.zeros(2, jnp.float32))


def outputs(env: steps.StepEnv, c, state: TrainState, x, n, view_task, current, *,
            features: bool):
  """Eval-mode logits (and penultimate features) of every row of ``x``, in eval batches."""
  env.trace_counts["outputs"] += 1
  eb = env.eval_batch_size
  n_max = x.shape[0]
  nb = -(-n_max // eb)
  fp = env.method.forward_params(state.params, state.aux, state.method, view_task, current)
  fwd = steps.Forward(env, c, None)

  def one(i):
    pos = i * eb + jnp.arange(eb, dtype=jnp.int32)
    idx = steps.shard_batch(env, jnp.minimum(pos, n_max - 1))
    valid = steps.shard_batch(env, pos < n)
    xb = jnp.take(x, idx, axis=0)
    if features:
      f, logits, _ = fwd.features(fp, state.batch_stats, xb, valid, view_task, train=False)
      return {"logits": logits, "features": f}
    logits, _ = fwd(fp, state.batch_stats, xb, valid, view_task, train=False)
    return {"logits": logits}

  out = jax.lax.map(one, jnp.arange(nb, dtype=jnp.int32))
  return jax.tree.map(lambda a: a.reshape((nb * eb,) + a.shape[2:])[:n_max], out)


def accuracy_view(class_il: bool, t: int, current: int) -> int:
  """The task whose view and head task ``t``'s accuracy after training ``current`` reads.

  Task-IL reads task ``t``'s own view and head; class-IL the view of ``current`` and the logits
  of every class seen up to it.
  """
  return current if class_il else t


def outputs_of(compiled, put, state: TrainState, data, *, view_task: int,
               current: int | None = None, features: bool = False) -> dict:
  """Evaluation-mode outputs over every row of ``data``, on the device, in eval batches.

  Args:
    compiled: the trainer's jitted :func:`outputs`.
    put: the trainer's placement of a host array.
    state: the train state (read, not donated).
    data: anything with ``x`` (``uint8`` [N, ...]) and ``n`` as attributes or dict keys
      (``TaskData``, an ``ExemplarMemory``, a source's data dict).
    view_task / current: passed to ``method.forward_params`` (``current`` defaults to
      ``view_task``) and ``view_task`` to the model (head and per-task norm).
    features: also return the penultimate features (the input of the model's ``head``).

  Returns:
    ``{"logits": f32 [N, K_out]}`` (the raw outputs: no ``eval_logits``, no class masking) and,
    with ``features``, ``"features": f32 [N, D]``. Rows ``>= n`` hold outputs of repeated rows:
    ignore them.
  """
  get = (lambda k: data[k]) if isinstance(data, dict) else (lambda k: getattr(data, k))
  current = view_task if current is None else current
  return compiled(state, put(jnp.asarray(get("x"))), jnp.asarray(get("n"), jnp.int32),
                  jnp.int32(view_task), jnp.int32(current), features=bool(features))
