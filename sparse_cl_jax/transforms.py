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

Flax NNX: the transforms work through ``nnx.Optimizer`` (masks go in as keyword arguments,
``optimizer.update(model, grads, sparse_mask=m, frozen=f)``, which it forwards to ``tx.update``).
A mask tree built from ``nnx.state(model, nnx.Param)`` (with its ``Param`` wrappers), from its
pure form or as a plain dict with the same keys is matched to the updates by path.

Inside optax wrappers: the transforms work in ``optax.chain``, ``optax.inject_hyperparams``,
``optax.MultiSteps`` and inside ``optax.masked`` / ``optax.multi_transform`` groups, with either
value of ``mask_compatible_extra_args`` (pass the full params-shaped mask; positions the wrapper
leaves out, ``optax.MaskedNode``, are passed through). Simplest with ``multi_transform``: keep the
per-group optimisers inside it and put ``keep_sparse`` / ``freeze`` after it, in an outer chain::

  tx = optax.chain(optax.multi_transform({"decay": optax.adamw(1e-3, weight_decay=1e-4),
                                          "plain": optax.adam(1e-3)}, labels),
                   transforms.keep_sparse(), transforms.freeze())
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import optax

from sparse_cl_jax import masks as masks_lib


def _is_masked_node(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _describe_mismatch(updates, mask) -> str:
  """Names the leaves of ``mask`` that are missing or unexpected against ``updates``."""
  u_names = masks_lib.paths(updates, is_leaf=_is_masked_node)
  u_flags = [_is_masked_node(x) for x in jax.tree.leaves(updates, is_leaf=_is_masked_node)]
  left_out = [q for q, f in zip(u_names, u_flags) if f]
  u_paths = set(u_names)
  m_paths = set(masks_lib.paths(mask, is_leaf=_is_masked_node))

  def under(q, roots):
    return any(q == r or q.startswith(r + "/") for r in roots)

  missing = sorted(q for q in u_paths - m_paths if not under(q, left_out)
                   and not any(m.startswith(q + "/") for m in m_paths))
  extra = sorted(q for q in m_paths - u_paths if not under(q, left_out))
  return masks_lib.describe_path_mismatch(missing, extra)


def _is_one_leaf(x) -> bool:
  treedef = jax.tree.structure(x)
  return treedef.num_leaves == 1 and treedef.num_nodes == 1


def _mask_from(extra_args: dict, mask_arg: str, who: str, updates) -> list:
  """The mask leaves aligned with the updates' leaves (``MaskedNode`` positions get ``None``).

  Inside ``optax.masked`` / ``optax.multi_transform`` the updates (and params) carry
  ``optax.MaskedNode`` at the positions the wrapper leaves out, while the mask arrives either as
  the full params-shaped tree (``mask_compatible_extra_args=False``, the default) or masked the
  same way (``True``); both are accepted.
  """
  if mask_arg not in extra_args:
    raise ValueError(
        f"{who} expects its mask as a keyword argument: tx.update(grads, state, params, "
        f"{mask_arg}=mask_tree); got keyword arguments {sorted(extra_args)}")
  mask = extra_args[mask_arg]
  u_leaves, u_def = jax.tree.flatten(updates, is_leaf=_is_masked_node)
  try:
    parts = u_def.flatten_up_to(mask)
  except (ValueError, TypeError):
    parts = None
  if parts is None or not all(_is_masked_node(u) or _is_one_leaf(m)
                              for u, m in zip(u_leaves, parts)):
    # Same paths, other containers: e.g. a mask keeping the nnx.Param wrappers of
    # nnx.state(model, nnx.Param), or a plain dict, for the pure nnx.State that
    # nnx.Optimizer.update hands to optax.
    try:
      parts = masks_lib.align(updates, mask, is_leaf=_is_masked_node)
    except ValueError:
      if parts is None:
        raise ValueError(f"{who} mask {mask_arg!r} does not match the params tree: "
                         f"{_describe_mismatch(updates, mask)}") from None
  names = masks_lib.paths(jax.tree.unflatten(u_def, [0] * len(u_leaves)))
  out, bad = [], []
  for name, u, m in zip(names, u_leaves, parts):
    if _is_masked_node(u):
      out.append(None)
      continue
    is_leaf = jax.tree_util.treedef_is_leaf(jax.tree.structure(m))
    if not is_leaf or tuple(jnp.shape(m)) != tuple(jnp.shape(u)):
      shape = tuple(jnp.shape(m)) if is_leaf else f"a {type(m).__name__} subtree"
      bad.append(f"{name}: {shape} vs params {tuple(jnp.shape(u))}")
    out.append(m)
  if bad:
    raise ValueError(f"{who} mask {mask_arg!r} does not match the params shapes: "
                     + "; ".join(bad[:5]))
  return out


def _map(fn, who: str, mask_arg: str, updates, params, extra_args, *, needs_params=False):
  """``fn(update, mask[, param])`` over the updates' leaves, passing ``MaskedNode`` through."""
  masks = _mask_from(extra_args, mask_arg, who, updates)
  u_leaves, u_def = jax.tree.flatten(updates, is_leaf=_is_masked_node)
  if needs_params:
    if params is None:
      raise ValueError(f"{who} needs params: call tx.update(grads, state, params, ...)")
    p_leaves = u_def.flatten_up_to(params)
  else:
    p_leaves = [None] * len(u_leaves)
  out = [u if m is None else (fn(u, m, p) if needs_params else fn(u, m))
         for u, m, p in zip(u_leaves, masks, p_leaves)]
  return jax.tree.unflatten(u_def, out)


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
    new = _map(lambda u, m, p: jnp.where(m, u, -p.astype(u.dtype)), "keep_sparse", mask_arg,
               updates, params, extra_args, needs_params=True)
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
    # -0.0, the additive identity of every float (+0.0 would turn a frozen -0.0 weight into +0.0).
    new = _map(lambda u, m: jnp.where(m, jnp.full_like(u, -0.0), u), "freeze", mask_arg, updates,
               params, extra_args)
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
    new = _map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), "mask_updates", mask_arg,
               updates, params, extra_args)
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_mask(*, mask_arg: str = "decay_mask") -> optax.GradientTransformationExtraArgs:
  """Multiplies updates element-wise by a float/bool mask tree (e.g. per-task weight decay)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    new = _map(lambda u, m: u * m.astype(u.dtype), "scale_by_mask", mask_arg, updates, params,
               extra_args)
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
    new = _map(lambda u, m, p: jnp.where(m, u + weight_decay * p.astype(u.dtype), u),
               "add_masked_decayed_weights", mask_arg, updates, params, extra_args,
               needs_params=True)
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
