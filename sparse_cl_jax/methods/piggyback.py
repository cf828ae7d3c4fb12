"""Piggyback (Mallya, Davis & Lazebnik, ECCV 2018): per-task binary masks over a frozen backbone.

Per task t:

* task 1 (``t == 0``) trains the backbone (every weight, its head and per-task norm row) for
  ``config.epochs``; the backbone is then frozen for good. The paper starts from an ImageNet
  backbone; here the backbone is trained on the first task of the stream (as the CPG authors'
  Piggyback baseline is driven), so task 1 uses the whole backbone with no mask.
* every later task learns a real-valued mask ``m`` over the backbone's maskable weights (conv and
  dense kernels), initialised to ``piggyback.mask_init`` (0.01) and binarised in the forward pass
  as ``m > piggyback.threshold`` (5e-3) with a straight-through gradient
  (:func:`sparse_cl_jax.transforms.binarize_ste`): the effective weight is
  ``binary(m) * w_frozen`` and ``d loss / d m = d loss / d binary(m)`` (Sec. 3 of the paper). The
  mask is trained with Adam at ``piggyback.mask_lr`` (1e-4 as coded); the task's head and norm row
  with the base optimiser at ``piggyback.lr``.
* at the end of the task its binary mask is stored, bit-packed (bit ``t`` of a uint32 word per
  weight, :func:`set_bits`), and the real-valued mask is reset for the next task.

Evaluation of task j uses the frozen backbone, task j's stored bits, its head and its norm row, so
its outputs are bit-identical after later tasks (BWT exactly 0). Stored size: the backbone plus one
bit per maskable weight per task.

The bit helpers (:func:`new_bits`, :func:`get_bits`, :func:`set_bits`) and :func:`masked_params`
are shared with CPG's picking (:mod:`sparse_cl_jax.methods.cpg`).

Example::

  python experiments/main.py --config=configs/piggyback.py --workdir=/tmp/piggyback
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from sparse_cl_jax import masks
from sparse_cl_jax import transforms
from sparse_cl_jax import types
from sparse_cl_jax.methods import base

DEFAULT_NORM = "task_batch"
FORGETS_NOTHING = True


# --------------------------------------------------------------------------------------------------
# Bit-packed per-task binary masks (one uint32 word holds 32 tasks' bits for one weight).


def num_words(num_tasks: int) -> int:
  """uint32 words needed per weight to hold one bit per task."""
  return max(1, -(-int(num_tasks) // 32))


def new_bits(params: types.Params, spec: types.LeafSpec, num_tasks: int):
  """All-zero bit store: ``uint32 [W, *shape]`` on maskable leaves, ``uint32 [W]`` elsewhere."""
  w = num_words(num_tasks)
  return jax.tree.map(
      lambda p, s: jnp.zeros((w,) + tuple(jnp.shape(p)) if s else (w,), jnp.uint32), params, spec)


def _word_and_shift(task):
  task = jnp.asarray(task, jnp.int32)
  return task // 32, (task % 32).astype(jnp.uint32)


def get_bits(bits, task, spec: types.LeafSpec) -> types.Masks:
  """Task ``task``'s stored bool mask (traced task OK); scalar False on non-maskable leaves."""
  w, sh = _word_and_shift(task)

  def one(b, s):
    if not s:
      return jnp.zeros((), jnp.bool_)
    return ((b[w] >> sh) & jnp.uint32(1)) == jnp.uint32(1)

  return jax.tree.map(one, bits, spec)


def set_bits(bits, mask: types.Masks, task, spec: types.LeafSpec):
  """Stores bool ``mask`` (params-shaped on maskable leaves) as task ``task``'s bits."""
  w, sh = _word_and_shift(task)
  bit = jnp.left_shift(jnp.uint32(1), sh)

  def one(b, m, s):
    if not s:
      return b
    word = b[w]
    new = jnp.where(m, word | bit, word & ~bit)
    return b.at[w].set(new)

  return jax.tree.map(one, bits, mask, spec)


def init_real_mask(params: types.Params, spec: types.LeafSpec, value: float):
  """Real-valued mask tree: ``value`` on maskable leaves, a float32 scalar 0 elsewhere."""
  return jax.tree.map(
      lambda p, s: jnp.full(jnp.shape(p), value, jnp.float32) if s else jnp.zeros((), jnp.float32),
      params, spec)


def masked_params(params: types.Params, real_mask, bits, task, current, *,
                  spec: types.LeafSpec, threshold: float) -> types.Params:
  """Piggyback's view of the backbone for ``task`` after training ``current`` (traced ints).

  Maskable leaves become ``w * b`` with ``b``: 1 for task 0 (the backbone's own task) and for
  tasks not trained yet (``task > current``); ``binarize_ste(real_mask, threshold)`` for the task
  being trained (straight-through gradient to ``real_mask``); the stored bits otherwise. Other
  leaves pass through.

  Example (hand-checkable gradient)::

    w = {'k': jnp.array([[1., -2.], [3., 4.]])}
    m = {'k': jnp.array([[0.01, 0.004], [0.01, 0.01]])}
    f = lambda m: jnp.sum(jnp.array([[1., 2.]]) @ masked_params(w, m, bits, 1, 1, ...)['k'])
    jax.grad(f)(m)['k'] == [[1., -2.], [6., 8.]]   # x_i * w_ij, also where the bit is 0
  """
  task = jnp.asarray(task, jnp.int32)
  current = jnp.asarray(current, jnp.int32)
  use_one = (task == 0) | (task > current)
  cur = task == current
  stored = get_bits(bits, task, spec)

  def one(p, m, b, s):
    if not s:
      return p
    live = transforms.binarize_ste(m, threshold).astype(p.dtype)
    mk = jnp.where(use_one, jnp.ones_like(p), jnp.where(cur, live, b.astype(p.dtype)))
    return p * mk

  return jax.tree.map(one, params, real_mask, stored, spec)


def mask_lr_fn(lr: float, milestones, decay: float, epochs: int):
  """Per-epoch mask learning rate: ``lr`` times ``decay`` per passed milestone (fractions)."""

  def fn(epoch):
    passed = sum(1 for f in milestones if epoch >= round(f * epochs))
    return float(lr * decay ** passed)

  return fn


def init_state(ctx: base.Context) -> dict:
  """No stored bits, nothing trainable."""
  return {"bits": new_bits(ctx.params, ctx.spec, ctx.num_tasks),
          "trainable": masks.zeros(ctx.params)}


def start_task(state, t, *, rows, spec, mask_init: float):
  """Task 1 trains the whole backbone; later tasks only their head and norm rows, and a fresh
  real-valued mask (``mask_init`` on every maskable weight)."""
  m = dict(state.method)
  row_t = base.task_slice(state.params, rows, t)
  first = t == 0
  shared = jax.tree.map(lambda r: not r, rows)
  m["trainable"] = jax.tree.map(lambda r, sh: r & (first | ~sh), row_t,
                                masks.from_spec(state.params, shared))
  aux = {"mask": init_real_mask(state.params, spec, mask_init)}
  return state._replace(method=m, aux=aux)


def finish_task(state, t, *, spec, threshold: float):
  """Stores task ``t``'s binary mask (``mask > threshold``; all ones for task 1) as its bits."""
  m = dict(state.method)
  live = jax.tree.map(lambda a, s: (a > threshold) if s else jnp.zeros((), jnp.bool_),
                      state.aux["mask"], spec)
  live = jax.tree.map(lambda x, s: x | (t == 0) if s else x, live, spec)
  m["bits"] = set_bits(m["bits"], live, t, spec)
  m["trainable"] = masks.zeros(m["trainable"])
  return state._replace(method=m)


def run_task(trainer, state, t, *, config, start, finish):
  """Task 1: the backbone; later tasks: a mask over it (``start`` / ``finish``: the jitted
  :func:`start_task` and :func:`finish_task`)."""
  pc = config.piggyback
  tt = jnp.int32(t)
  state = trainer.apply(state, lambda s: start(s, tt))
  if t == 0:
    state = trainer.train(state, t, epochs=config.epochs, phase="backbone")
  else:
    epochs = int(pc.epochs) or int(config.epochs)
    state = trainer.train(
        state, t, epochs=epochs, phase="mask", lr=float(pc.lr) or None,
        aux_lr_fn=mask_lr_fn(float(pc.mask_lr), tuple(pc.mask_lr_milestones),
                             float(pc.mask_lr_decay), epochs))
  return trainer.apply(state, lambda s: finish(s, tt))


def report(ctx, state) -> dict:
  """Density (= picked fraction) per task and one stored bit per task and maskable weight."""
  spec, T = ctx.spec, ctx.num_tasks
  bits = jax.device_get(state.method["bits"])
  spec_leaves = jax.tree.leaves(spec)
  total = sum(int(jnp.size(p)) for p, s in zip(jax.tree.leaves(ctx.params), spec_leaves) if s)
  dens = []
  for j in range(T):
    got = get_bits(bits, j, spec)
    used = sum(int(jnp.sum(g)) for g, s in zip(jax.tree.leaves(got), spec_leaves) if s)
    dens.append(1.0 if j == 0 else used / max(total, 1))
  # One stored bit per task and maskable weight (task 1's all-ones mask included, as
  # metrics.model_bytes documents for Piggyback).
  return {"density_per_task": dens, "mask_bits": T, "picked_fraction_per_task": dens}


def make(config, ctx: base.Context) -> base.Method:
  """Piggyback with ``config.piggyback.{mask_init, threshold, mask_lr, epochs, lr, ...}``."""
  pc = config.piggyback
  if getattr(ctx.model, "norm", "none") == "batch":
    raise ValueError("Piggyback: norm='batch' shares BatchNorm running statistics across "
                     "tasks, so earlier tasks would silently forget; use norm='task_batch' (the "
                     "default) or 'batch_stats_only'")
  spec, thr, init_value = ctx.spec, float(pc.threshold), float(pc.mask_init)
  return base.Method(
      name="piggyback",
      run_task=functools.partial(
          run_task, config=config,
          start=jax.jit(functools.partial(start_task, rows=ctx.task_rows, spec=spec,
                                          mask_init=init_value)),
          finish=jax.jit(functools.partial(finish_task, spec=spec, threshold=thr))),
      init_state=init_state,
      init_aux=lambda ctx: {"mask": init_real_mask(ctx.params, spec, init_value)},
      forward_params=lambda params, aux, m, task, current: masked_params(
          params, aux["mask"], m["bits"], task, current, spec=spec, threshold=thr),
      wrap_tx=base.freezing_tx, tx_args=base.stored_trainable_args,
      aux_tx=optax.inject_hyperparams(optax.adam)(learning_rate=float(pc.mask_lr)),
      report=report)
