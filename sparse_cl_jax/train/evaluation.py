"""Evaluation bodies: accuracy counts and raw outputs in eval mode, in eval batches on the device.

Pure functions of the trainer's :class:`~sparse_cl_jax.train.steps.StepEnv` and constants ``c``
(jitted once by the trainer). Evaluation never augments, runs the model with ``train=False`` and
leaves the padding rows of a split out of every count.

Two accuracy views come out of one evaluation program (:func:`eval_counts`): the run's own
(task-aware for task-IL, task-agnostic for class-IL, exactly as before) and the other one:

* class-IL, task-aware: the same logits, the argmax restricted to the classes of the example's
  own task (no second forward pass).
* task-IL, task-agnostic: the network as it is after the last task trained (``current``): the
  method's view of ``current`` (``forward_params(..., current, current)``; for PackNet, CPG, DST
  and CLNP the latest task's mask, which holds every earlier task's weights) and ``current``'s
  per-task rows (BatchNorm), the argmax over the concatenated classes of every head ``0 ..
  current``; right when it falls on the example's own head and label. A task-agnostic test
  cannot use the example's task id, and the latest view is the one network that holds all the
  tasks trained. On the diagonal (``t == current``) this is the same forward pass as the
  task-aware view; below it, the views differ for methods with per-task masks and a second pass
  runs (inside the same program, under ``lax.cond``); above it the example's head is not seen
  yet, so the count is 0 without a pass. A single-head task-IL model has one head: the
  task-agnostic view is its argmax under the latest view (the domain-incremental reading).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_cl_jax import models
from sparse_cl_jax.train import state as state_lib
from sparse_cl_jax.train import steps

TrainState = state_lib.TrainState
TaskData = state_lib.TaskData


def _num_heads(env: steps.StepEnv) -> int:
  """Heads the task-agnostic view reads: the model's (task-IL), 1 for a shared head."""
  return 1 if env.class_il else int(getattr(env.model, "num_heads", 1))


def _with_heads(env: steps.StepEnv, fn):
  """``(fn(), heads)``: ``heads`` f32 [H, B, K] are every head's outputs on the features ``fn``'s
  forward pass gives its top-level :class:`~sparse_cl_jax.models.MultiHead` (``None`` with one
  head, or when the model has no such module)."""
  num_heads = _num_heads(env)
  heads, done = [], []

  def grab(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if (num_heads > 1 and not done and context.method_name == "__call__"
        and isinstance(module, models.MultiHead)):
      done.append(True)  # the calls below pass through this interceptor untouched
      # The same module, unbound, applied to its own variables once per head.
      alone, variables = module.clone(parent=None), {"params": module.variables["params"]}
      heads.extend(alone.apply(variables, args[0], jnp.int32(s)).astype(jnp.float32)
                   for s in range(num_heads))
    return out

  with nn.intercept_methods(grab):
    out = fn()
  return out, (jnp.stack(heads) if heads else None)


def _agnostic_hit(env: steps.StepEnv, c, logits, heads, current, data_task, y):
  """Task-IL, task-agnostic: the argmax over the classes of heads ``0 .. current`` lands on the
  example's own head ``data_task`` and label ``y`` (one head: the argmax of ``logits``)."""
  if heads is None:
    if env.method.eval_logits is not None:
      logits = env.method.eval_logits(logits)
    return jnp.argmax(logits, -1) == y
  if env.method.eval_logits is not None:
    heads = jax.vmap(env.method.eval_logits)(heads)
  num_heads, _, k = heads.shape
  rows = jnp.minimum(jnp.arange(num_heads), c["head_mask"].shape[0] - 1)
  usable = c["head_mask"][rows][:, :k] & (jnp.arange(num_heads) <= current)[:, None]  # [H, K]
  flat = jnp.where(usable[:, None, :], heads, jnp.finfo(heads.dtype).min)
  flat = jnp.transpose(flat, (1, 0, 2)).reshape(flat.shape[1], num_heads * k)
  return jnp.argmax(flat, -1) == data_task * k + y


def _aware_hit(env: steps.StepEnv, c, logits, data_task, y):
  """Class-IL, task-aware: the argmax over the classes of the example's task ``data_task``."""
  if env.method.eval_logits is not None:
    logits = env.method.eval_logits(logits)
  seen = c["head_mask"]  # class-IL: row t holds the classes of tasks 0 .. t
  own = seen[data_task] & ~jnp.where(data_task > 0, seen[jnp.maximum(data_task - 1, 0)], False)
  logits = jnp.where(own[None, :], logits, jnp.finfo(logits.dtype).min)
  return jnp.argmax(logits, -1) == y


def eval_batches(env: steps.StepEnv, n_max: int) -> tuple[int, int]:
  """``(batches, rows per batch)`` for a split of ``n_max`` rows: the fewest batches of at most
  ``eval_batch_size`` rows, all of one size (a multiple of the mesh's ``'data'`` devices), so
  that the padding is at most one row per batch and device. 1,200 rows with ``eval_batch_size``
  500 are 3 batches of 400, not 3 of 500 of which 300 rows are padding: the accuracy is the
  same, the forward passes over padding are not paid (issue 27)."""
  eb = env.eval_batch_size
  nb = max(1, -(-n_max // eb))
  n_dev = int(env.mesh.shape.get("data", 1)) if env.mesh is not None else 1
  per = -(-n_max // nb)
  return nb, min(eb, -(-per // n_dev) * n_dev)


def eval_counts(env: steps.StepEnv, c, state: TrainState, data: TaskData, view_task, current,
                head_task, data_task, views):
  """Counts over the valid rows of ``data`` (task ``data_task``) with the method's view.

  Returns f32 ``[correct, total, other]``: ``correct`` with the view of ``view_task`` and the
  classes of ``head_task`` (the run's own accuracy view); ``other`` the correct predictions of the
  other view (module docstring): class-IL task-aware, task-IL task-agnostic. A task-IL second
  pass runs only when ``views`` (traced bool) is set.
  """
  env.trace_counts["eval"] += 1
  n_max = data.x.shape[0]
  nb, eb = eval_batches(env, n_max)
  # The method's view is computed once, outside the batch loop.
  fp = env.method.forward_params(state.params, state.aux, state.method, view_task, current)

  def batch(i):
    pos = i * eb + jnp.arange(eb, dtype=jnp.int32)
    idx = steps.shard_batch(env, jnp.minimum(pos, n_max - 1))
    valid = (pos < data.n).astype(jnp.float32)
    return pos, valid, jnp.take(data.x, idx, axis=0), jnp.take(data.y, idx, axis=0)

  def body(i, acc):
    pos, valid, x, y = batch(i)
    (raw, _), heads = _with_heads(env, lambda: steps.apply_model(
        env, c, fp, state.batch_stats, x, view_task, train=False,
        valid=steps.shard_batch(env, pos < data.n)))
    logits = steps.mask_logits(env, c, raw, head_task)
    hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    if env.class_il:
      other = _aware_hit(env, c, raw, data_task, y)
    else:
      other = _agnostic_hit(env, c, raw, heads, current, data_task, y)
    return acc + jnp.stack([jnp.sum(hit * valid), jnp.sum(valid),
                            jnp.sum(other.astype(jnp.float32) * valid)])

  # Only the batches that hold valid rows run: a split padded to a longer one's size (the
  # validation split beside the test split) pays for its own rows only.
  nb_valid = jnp.clip((jnp.asarray(data.n, jnp.int32) + eb - 1) // eb, 1, nb)
  counts = jax.lax.fori_loop(0, nb_valid, body, jnp.zeros(3, jnp.float32))
  if env.class_il:
    return counts

  def latest_view():
    """Task-IL, task-agnostic below the diagonal: the network of ``current`` on this data."""
    fp_now = env.method.forward_params(state.params, state.aux, state.method, current, current)

    def body_now(i, hits):
      pos, valid, x, y = batch(i)
      (raw, _), heads = _with_heads(env, lambda: steps.apply_model(
          env, c, fp_now, state.batch_stats, x, current, train=False,
          valid=steps.shard_batch(env, pos < data.n)))
      hit = _agnostic_hit(env, c, raw, heads, current, data_task, y)
      return hits + jnp.sum(hit.astype(jnp.float32) * valid)

    return jax.lax.fori_loop(0, nb_valid, body_now, jnp.zeros((), jnp.float32))

  seen = (view_task < current) | (_num_heads(env) == 1)  # above it: the head is not seen yet
  same = view_task == current
  other = jax.lax.cond(jnp.asarray(views) & ~same & seen, latest_view,
                       lambda: jnp.where(same, counts[2], 0.0))
  return counts.at[2].set(other)


def outputs(env: steps.StepEnv, c, state: TrainState, x, n, view_task, current, *,
            features: bool):
  """Eval-mode logits (and penultimate features) of every row of ``x``, in eval batches."""
  env.trace_counts["outputs"] += 1
  n_max = x.shape[0]
  nb, eb = eval_batches(env, n_max)
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


def task_accuracy(eval_counts, class_il: bool, state, data, t: int, current: int,
                  views: bool = False):
  """Accuracy on task ``t`` after training ``current`` from the evaluation program
  ``eval_counts`` (:func:`eval_counts`); with ``views``, both views (:func:`both_views`)."""
  view = accuracy_view(class_il, t, current)
  correct, total, other = eval_counts(state, data, jnp.int32(view), jnp.int32(current),
                                      jnp.int32(view), jnp.int32(t), jnp.bool_(views))
  total = float(total)
  own = float(correct) / total if total else float("nan")
  if not views:
    return own
  other = float(other) / total if total else float("nan")
  return both_views(class_il, own, other)


def both_views(class_il: bool, own: float, other: float) -> dict[str, float]:
  """``{"task_aware", "task_agnostic"}`` from the run's own view and the other one."""
  aware, agnostic = (other, own) if class_il else (own, other)
  return {"task_aware": aware, "task_agnostic": agnostic}


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
