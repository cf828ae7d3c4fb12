"""Optax gradient transformations that keep masks sparse and frozen weights frozen.

Layer 3 of the design. Each factory returns an ``optax.GradientTransformationExtraArgs`` that chains
with any optax optimiser. Element-wise masks are *data*: they are passed to ``update`` as keyword
extra arguments (``tx.update(grads, state, params, sparse_mask=m, frozen=f)``), never captured as
Python constants, so changing a mask between tasks or after a drop-and-grow step does not recompile
a jitted step. ``optax.chain`` forwards extra arguments to every transform that accepts them.

Where to put them in a chain::

  tx = optax.chain(
      transforms.mask_updates(mask_arg="trainable"),  # optional: keep moments clean
      optax.adamw(1e-3, weight_decay=1e-4),
      transforms.keep_sparse(mask_arg="sparse_mask"),   # masked weights become / stay exactly 0
      transforms.freeze(mask_arg="frozen"),             # LAST: frozen weights bit-identical,
  )                                                     # whatever momentum or weight decay say

``freeze`` placed last outputs an exact 0.0 update on frozen positions, so ``optax.apply_updates``
leaves them bit-identical under Adam/AdamW/SGD with momentum or Nesterov and weight decay.
``keep_sparse`` outputs ``-w`` on masked positions, so after ``apply_updates`` they are exactly +0.0
even if they were not zero before (e.g. right after a mask change). For static, leaf-level choices
(never touch BN scales) use ``optax.masked`` with :func:`sparse_cl_jax.masks.maskable`.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import optax

from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax import types


def _mask_from(extra_args: dict, mask_arg: str, who: str, updates) -> types.Masks:
  if mask_arg not in extra_args:
    raise ValueError(
        f"{who} expects its mask as a keyword argument: tx.update(grads, state, params, "
        f"{mask_arg}=mask_tree); got keyword arguments {sorted(extra_args)}")
  mask = extra_args[mask_arg]
  masks_lib.check_like(updates, mask, what=f"{who} mask {mask_arg!r}")
  return mask


def keep_sparse(*, mask_arg: str = "sparse_mask") -> optax.GradientTransformationExtraArgs:
  """Holds weights outside a mask at exactly zero (also under weight decay and momentum).

  The update on a masked-out position is ``-w``, so after ``optax.apply_updates`` it is +0.0;
  elsewhere updates pass through. Place it after the optimiser (and after ``optax.add_decayed_weights``).

  Args:
    mask_arg: name of the keyword argument carrying the bool mask tree (True = active weight).

  Example::

    tx = optax.chain(optax.adamw(1e-3, weight_decay=1e-2), transforms.keep_sparse())
    updates, state = tx.update(grads, state, params, sparse_mask=mask)
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    mask = _mask_from(extra_args, mask_arg, "keep_sparse", updates)
    if params is None:
      raise ValueError("keep_sparse needs params: call tx.update(grads, state, params, ...)")
    new = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p.astype(u.dtype)), updates, params, mask)
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def freeze(*, mask_arg: str = "frozen") -> optax.GradientTransformationExtraArgs:
  """Zeroes the updates of frozen positions (True = frozen). Put it LAST in the chain.

  Frozen weights then stay bit-identical whatever the optimiser's momentum or weight decay would
  have done. Their moments keep accumulating in the optimiser state, which is harmless because the
  update is discarded; use :func:`sparse_cl_jax.growth.reset_moments` before a position becomes
  trainable again.

  Example::

    tx = optax.chain(optax.sgd(0.1, momentum=0.9, nesterov=True), transforms.freeze())
    updates, state = tx.update(grads, state, params, frozen=owned_by_earlier_tasks)
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params
    mask = _mask_from(extra_args, mask_arg, "freeze", updates)
    new = jax.tree.map(lambda u, m: jnp.where(m, jnp.zeros_like(u), u), updates, mask)
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mask_updates(*, mask_arg: str = "trainable") -> optax.GradientTransformationExtraArgs:
  """Zeroes updates (or gradients, when first in a chain) outside a mask (True = pass).

  First in a chain it keeps the optimiser's moments of masked positions untouched (useful before
  weights are released for reuse); last in a chain it is the positive-mask twin of :func:`freeze`.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params
    mask = _mask_from(extra_args, mask_arg, "mask_updates", updates)
    new = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask)
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_mask(*, mask_arg: str = "decay_mask") -> optax.GradientTransformationExtraArgs:
  """Multiplies updates element-wise by a float/bool mask tree (e.g. per-task weight decay)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params
    mask = _mask_from(extra_args, mask_arg, "scale_by_mask", updates)
    new = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask)
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def add_masked_decayed_weights(weight_decay: float, *,
                               mask_arg: str = "decay_mask") -> optax.GradientTransformationExtraArgs:
  """Adds ``weight_decay * w`` only where an element-wise mask is True.

  CPG applies weight decay to the current task's weights only (as coded); with an element-wise
  mask passed as data this does not recompile when the task changes.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("add_masked_decayed_weights needs params")
    mask = _mask_from(extra_args, mask_arg, "add_masked_decayed_weights", updates)
    new = jax.tree.map(
        lambda u, p, m: jnp.where(m, u + weight_decay * p.astype(u.dtype), u),
        updates, params, mask)
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# Straight-through binarisation (Piggyback, Mallya et al. 2018; CPG picking).


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def binarize_ste(real_mask: jax.Array, threshold: float) -> jax.Array:
  """``(real_mask > threshold)`` as floats, with a straight-through (identity) gradient.

  Piggyback (Mallya et al. 2018, Sec. 3): the forward pass uses the binary mask, the backward pass
  copies the gradient w.r.t. the binary mask onto the real-valued mask unchanged.

  Example::

    w_eff = w_frozen * transforms.binarize_ste(m_real, 5e-3)
    # d loss / d m_real == d loss / d mask_binary == (d loss / d w_eff) * w_frozen
  """
  return (real_mask > threshold).astype(real_mask.dtype)


def _binarize_fwd(real_mask, threshold):
  return binarize_ste(real_mask, threshold), None


def _binarize_bwd(threshold, residual, g):
  del threshold, residual
  return (g,)


binarize_ste.defvjp(_binarize_fwd, _binarize_bwd)
