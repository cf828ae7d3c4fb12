"""Drop-and-grow topology updates for dynamic sparse training (SET, RigL, SNFS, DST for CL).

Layer 3 of the design, pure and jit-compatible (the drop fraction may be traced):

1. :func:`drop_and_grow` drops, per leaf, ``n = floor(fraction * active)`` active positions with
   the lowest drop scores and grows the same ``n`` among inactive positions with the highest grow
   scores, so every leaf keeps exactly its count. Growth never picks a position that was active
   before the update (a dropped weight is not regrown in the same update), and can be restricted
   further, e.g. to never-used positions ("unfired" growth). If a leaf has fewer growth candidates
   than ``n``, ``n`` shrinks to that number, keeping the count exact.
2. :func:`regrow` sets the values of grown positions: zero (RigL; DST-for-CL as coded) or fresh
   initial values; :func:`apply_topology` also zeroes the dropped ones.
3. :func:`reset_moments` zeroes the optimiser moments of changed positions in any optax state via
   ``optax.tree_utils.tree_map_params`` (no isinstance switch over optimiser states).

Example::

  from sparse_cl_jax import criteria, growth
  res = growth.drop_and_grow(mask, criteria.magnitude(params), criteria.gradient(params, grads=g),
                             fraction=0.3, spec=spec)
  params = growth.regrow(params, res.grown, mode="zero")
  opt_state = growth.reset_moments(tx, opt_state, res.changed)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax import topk
from sparse_cl_jax import types


class DropGrowResult(NamedTuple):
  """Outcome of one topology update (all bool trees with the params' structure)."""
  masks: types.Masks  # the new mask
  dropped: types.Masks  # positions switched off
  grown: types.Masks  # positions switched on

  @property
  def changed(self) -> types.Masks:
    return masks_lib.logical_or(self.dropped, self.grown)


def drop_and_grow(masks: types.Masks, drop_scores: types.Scores, grow_scores: types.Scores,
                  fraction, *, spec: types.LeafSpec | None = None,
                  drop_candidates: types.Masks | None = None,
                  grow_candidates: types.Masks | None = None) -> DropGrowResult:
  """Drops the weakest ``fraction`` of each leaf's active weights and grows as many elsewhere.

  Args:
    masks: current bool mask tree.
    drop_scores: higher = more important; the lowest active ones are dropped (e.g. magnitude).
    grow_scores: higher = grow first (e.g. |gradient|, |momentum|, random).
    fraction: fraction of each leaf's droppable active weights to drop (traced OK), in [0, 1].
    spec: leaves that take part (default all); others are returned unchanged.
    drop_candidates: positions that may be dropped (default: all active positions), e.g. only the
      current task's weights, not frozen ones of earlier tasks.
    grow_candidates: positions that may be grown (always intersected with the inactive ones), e.g.
      never-used positions for "unfired" growth, or positions not owned by earlier tasks.

  Returns:
    A :class:`DropGrowResult`.
  """
  masks_lib.check_like(masks, drop_scores, what="drop_scores")
  masks_lib.check_like(masks, grow_scores, what="grow_scores")
  if drop_candidates is not None:
    masks_lib.check_like(masks, drop_candidates, what="drop_candidates")
  if grow_candidates is not None:
    masks_lib.check_like(masks, grow_candidates, what="grow_candidates")
  leaves, treedef = jax.tree.flatten(masks)
  flags = [True] * len(leaves) if spec is None else [bool(s) for s in jax.tree.leaves(spec)]
  dc = jax.tree.leaves(drop_candidates) if drop_candidates is not None else [None] * len(leaves)
  gc = jax.tree.leaves(grow_candidates) if grow_candidates is not None else [None] * len(leaves)
  ds, gs = jax.tree.leaves(drop_scores), jax.tree.leaves(grow_scores)
  frac = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)

  new, dropped, grown = [], [], []
  for i, m in enumerate(leaves):
    m = jnp.asarray(m, jnp.bool_)
    if not flags[i]:
      new.append(m)
      dropped.append(jnp.zeros_like(m))
      grown.append(jnp.zeros_like(m))
      continue
    droppable = m if dc[i] is None else m & dc[i]
    growable = ~m if gc[i] is None else (~m) & gc[i]
    n_drop_able = jnp.sum(droppable, dtype=jnp.int32)
    n = jnp.floor(frac * n_drop_able.astype(jnp.float32)).astype(jnp.int32)
    n = jnp.minimum(n, jnp.sum(growable, dtype=jnp.int32))
    keep = topk.topk_mask(ds[i], n_drop_able - n, candidates=droppable)
    drop = droppable & ~keep
    grow = topk.topk_mask(gs[i], n, candidates=growable)
    new.append((m & ~drop) | grow)
    dropped.append(drop)
    grown.append(grow)
  unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
  return DropGrowResult(unflat(new), unflat(dropped), unflat(grown))


def regrow(params: types.Params, grown: types.Masks, *, mode: str = "zero",
           init_params: types.Params | None = None) -> types.Params:
  """Sets grown positions to zero (``mode='zero'``) or to ``init_params`` (``mode='init'``)."""
  masks_lib.check_like(params, grown, what="grown")
  if mode == "zero":
    return jax.tree.map(lambda p, g: jnp.where(g, jnp.zeros_like(p), p), params, grown)
  if mode == "init":
    if init_params is None:
      raise ValueError("regrow(mode='init') needs init_params (e.g. a fresh model.init)")
    masks_lib.check_like(params, init_params, what="init_params")
    return jax.tree.map(lambda p, g, q: jnp.where(g, q.astype(p.dtype), p),
                        params, grown, init_params)
  raise ValueError(f"regrow mode must be 'zero' or 'init', got {mode!r}")


def apply_topology(params: types.Params, result: DropGrowResult, *, mode: str = "zero",
                   init_params: types.Params | None = None) -> types.Params:
  """Writes a topology update into the params: dropped weights become +0.0, grown ones are set
  by :func:`regrow` (zero or ``init_params``). Afterwards the params are exactly zero outside
  ``result.masks`` wherever they were before, so a method whose training view is its sparse mask
  need not re-apply the mask in the forward pass.
  """
  params = jax.tree.map(lambda p, d: jnp.where(d, jnp.zeros_like(p), p), params, result.dropped)
  return regrow(params, result.grown, mode=mode, init_params=init_params)


def reset_moments(tx: optax.GradientTransformation, opt_state, changed: types.Masks):
  """Zeroes every params-shaped tree of ``opt_state`` (Adam mu/nu, momentum traces...) at ``changed``.

  ``tx`` is the transformation that produced ``opt_state``; it is used only to locate the
  params-shaped parts of the state (``optax.tree_utils.tree_map_params``). Scalars such as Adam's
  step count are left alone.
  """
  return optax.tree_utils.tree_map_params(
      tx, lambda s, c: jnp.where(c, jnp.zeros_like(s), s), opt_state, changed)


def mark_used(used: types.Masks, masks: types.Masks) -> types.Masks:
  """Accumulates which positions were ever active (for "unfired" growth)."""
  return masks_lib.logical_or(used, masks)
