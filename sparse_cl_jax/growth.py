"""Drop-and-grow topology updates for dynamic sparse training (SET, RigL, SNFS, DST for CL).

Layer 3 of the design, pure and jit-compatible (the drop fraction may be traced):

1. :func:`drop_and_grow` drops, per leaf, ``n = floor(fraction * active)`` active positions with
   the lowest drop scores and grows the same ``n`` among inactive positions with the highest grow
   scores, so every leaf keeps exactly its count. Growth never picks a position that was active
   before the update (a dropped weight is not regrown in the same update), and can be restricted
   further, e.g. to never-used positions ("unfired" growth). If a leaf has fewer growth candidates
   than ``n``, ``n`` shrinks to that number, keeping the count exact. When every growth candidate
   of a leaf has the same score, the pick is the tie rule's (the first inactive positions), not
   the criterion's: it warns (:class:`TiedGrowthWarning`), see ``on_tied_growth``.
2. :func:`regrow` sets the values of grown positions: zero (RigL; DST-for-CL as coded) or fresh
   initial values; :func:`apply_topology` also zeroes the dropped ones.
3. :func:`reset_moments` zeroes the optimiser moments of changed positions in any optax state,
   ``optax.masked`` / ``optax.multi_transform`` included, via ``optax.tree.map_params`` (no
   isinstance switch over optimiser states); also the state an ``nnx.Optimizer`` keeps.

Gradient growth (RigL) needs the *dense* gradient, ``dL/dw_eff`` at every position of the masked
network. A gradient taken through :func:`sparse_cl_jax.masks.apply` is zero at the inactive
positions (the growth candidates), so it cannot rank them; let the criterion take the loss and
differentiate at the masked weights itself. Example::

  from sparse_cl_jax import criteria, growth
  grow = criteria.gradient(params, masks=mask, loss_fn=loss)   # dense |dL/dw| at masks.apply(params)
  res = growth.drop_and_grow(mask, criteria.magnitude(params), grow, fraction=0.3, spec=spec)
  params = growth.apply_topology(params, res)                  # dropped -> 0, grown -> 0
  opt_state = growth.reset_moments(tx, opt_state, res.changed)
  mask = res.masks
"""

from __future__ import annotations

from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax import sparsity as sparsity_lib
from sparse_cl_jax import topk
from sparse_cl_jax import types


ON_TIED_GROWTH = ("warn", "raise", "ignore")


class TiedGrowthWarning(UserWarning):
  """Growth in some leaf was decided by the tie rule: all its candidates had the same score."""


class DropGrowResult(NamedTuple):
  """Outcome of one topology update (bool trees with the params' structure)."""
  masks: types.Masks  # the new mask
  dropped: types.Masks  # positions switched off
  grown: types.Masks  # positions switched on
  # Per leaf, a bool scalar: positions were grown while every candidate had the same grow score
  # (so the tie rule, not the criterion, chose them).
  tied_growth: types.LeafSpec = None

  @property
  def changed(self) -> types.Masks:
    return masks_lib.logical_or(self.dropped, self.grown)


def check_fraction(fraction, name: str = "fraction"):
  """A drop fraction in [0, 1]: a number is checked, a traced value is clipped (NaN counts as 0).

  Raises:
    ValueError: for a number outside [0, 1] or not a number.
  """
  if sparsity_lib.is_traced(fraction):
    f = jnp.asarray(fraction, jnp.float32)
    return jnp.where(jnp.isnan(f), jnp.float32(0.0), jnp.clip(f, 0.0, 1.0))
  try:
    v = float(fraction)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in [0, 1], got {fraction!r}") from None
  if not 0.0 <= v <= 1.0:  # also refuses NaN
    raise ValueError(f"{name} must be in [0, 1], got {fraction!r}")
  return jnp.float32(v)


def _tie_message(names: list[str]) -> str:
  return (f"drop_and_grow: every growth candidate of {', '.join(repr(n) for n in names)} has the "
          "same grow score, so the grown positions are the first inactive ones (the tie rule), not "
          "the criterion's choice. A gradient taken through masks.apply is zero at inactive "
          "positions: use criteria.gradient(params, masks=mask, loss_fn=loss) for the dense "
          "gradient, or pass on_tied_growth='ignore' if ties are expected")


def report_ties(flags, names: list[str], mode: str) -> None:
  """Warns (``mode='warn'``) or raises (``'raise'``) naming the leaves whose growth was tied.

  ``flags``: :attr:`DropGrowResult.tied_growth` as a ``[..., len(names)]`` bool array (any
  leading axes: vmapped or stacked updates, a leaf is named if any of them tied).
  """
  flags = np.asarray(flags, bool).reshape(-1, len(names)).any(axis=0)  # any leading vmap axes
  if not flags.any():
    return
  message = _tie_message([n for n, f in zip(names, flags) if f])
  if mode == "raise":
    raise ValueError(message)
  warnings.warn(message, TiedGrowthWarning, stacklevel=3)


@jax.jit
def _update_leaf(m, droppable, growable, drop_score, grow_score, frac):
  """One leaf of :func:`drop_and_grow`: (new mask, dropped, grown, tied-growth flag).

  Jitted so that an eager call (a user's script) runs compiled instead of op by op.
  """
  n_drop_able = jnp.sum(droppable, dtype=jnp.int32)
  n_cand = jnp.sum(growable, dtype=jnp.int32)
  n = jnp.floor(frac * n_drop_able.astype(jnp.float32)).astype(jnp.int32)
  n = jnp.minimum(n, n_cand)
  keep = topk.topk_mask(drop_score, n_drop_able - n, candidates=droppable)
  drop = droppable & ~keep
  grow = topk.topk_mask(grow_score, n, candidates=growable)
  score = jnp.asarray(grow_score, jnp.float32)
  score = jnp.where(jnp.isnan(score), -jnp.inf, score)  # NaN ranks as -inf, as in topk
  hi = jnp.max(jnp.where(growable, score, -jnp.inf))
  lo = jnp.min(jnp.where(growable, score, jnp.inf))
  return (m & ~drop) | grow, drop, grow, (n > 0) & (n < n_cand) & (hi == lo)


def drop_and_grow(masks: types.Masks, drop_scores: types.Scores, grow_scores: types.Scores,
                  fraction, *, spec: types.LeafSpec | None = None,
                  drop_candidates: types.Masks | None = None,
                  grow_candidates: types.Masks | None = None,
                  on_tied_growth: str = "warn") -> DropGrowResult:
  """Drops the weakest ``fraction`` of each leaf's active weights and grows as many elsewhere.

  Args:
    masks: current bool mask tree.
    drop_scores: higher = more important; the lowest active ones are dropped (e.g. magnitude).
    grow_scores: higher = grow first (e.g. |gradient|, |momentum|, random). For gradient growth
      pass the dense gradient, e.g. ``criteria.gradient(params, masks=masks, loss_fn=loss)``; a
      gradient taken through ``masks.apply`` is 0 at every candidate (see ``on_tied_growth``).
    fraction: fraction of each leaf's droppable active weights to drop, in [0, 1]. A number
      outside [0, 1] is refused (``ValueError``); a traced value cannot be checked and is clipped
      to [0, 1] (NaN counts as 0: nothing changes).
    spec: leaves that take part (default all); others are returned unchanged.
    drop_candidates: positions that may be dropped (default: all active positions), e.g. only the
      current task's weights, not frozen ones of earlier tasks.
    grow_candidates: positions that may be grown (always intersected with the inactive ones), e.g.
      never-used positions for "unfired" growth, or positions not owned by earlier tasks.
    on_tied_growth: what to do when a leaf grows ``n`` of more than ``n`` candidates that all have
      the same grow score (the pick is then the tie rule's: the first inactive positions):
      ``'warn'`` (default, a :class:`TiedGrowthWarning`), ``'raise'`` (``ValueError``; inside
      ``jit`` it surfaces as a ``JaxRuntimeError`` ending in that message when the step runs) or
      ``'ignore'``. Inside ``jit`` the check runs as a ``jax.debug.callback``.
      ``result.tied_growth`` carries the per-leaf flags either way.

  Returns:
    A :class:`DropGrowResult`.

  Raises:
    ValueError: trees that do not match, a ``fraction`` outside [0, 1], an unknown
      ``on_tied_growth``, or tied growth under ``on_tied_growth='raise'``.
  """
  if on_tied_growth not in ON_TIED_GROWTH:
    raise ValueError(f"on_tied_growth must be one of {ON_TIED_GROWTH}, got {on_tied_growth!r}")
  frac = check_fraction(fraction)
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

  new, dropped, grown, tied = [], [], [], []
  for i, m in enumerate(leaves):
    m = jnp.asarray(m, jnp.bool_)
    if not flags[i]:
      new.append(m)
      dropped.append(jnp.zeros_like(m))
      grown.append(jnp.zeros_like(m))
      tied.append(jnp.bool_(False))
      continue
    droppable = m if dc[i] is None else m & dc[i]
    growable = ~m if gc[i] is None else (~m) & gc[i]
    out = _update_leaf(m, droppable, growable, ds[i], gs[i], frac)
    for acc, x in zip((new, dropped, grown, tied), out):
      acc.append(x)
  unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
  if on_tied_growth != "ignore":
    names = masks_lib.paths(masks)
    if sparsity_lib.is_traced(tied):
      jax.debug.callback(lambda f: report_ties(f, names, on_tied_growth), jnp.stack(tied))
    else:
      report_ties(np.asarray(jnp.stack(tied)), names, on_tied_growth)
  return DropGrowResult(unflat(new), unflat(dropped), unflat(grown), unflat(tied))


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


def _is_masked_node(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _zero_changed(s, c):
  if _is_masked_node(s):  # a position optax.masked / multi_transform keeps no state for
    return s
  return jnp.where(c, jnp.zeros_like(s), s)


def _zero_at(node, changed):
  """A params-shaped subtree of an optimiser state with its leaves zeroed where ``changed`` is True.

  The leaves are matched structurally, or else by path (:func:`masks.align`): the state's copy of
  the params may wrap its arrays differently from ``changed`` (``nnx.Optimizer`` keeps
  ``OptVariable`` wrappers where a mask built from ``nnx.state(model, nnx.Param)`` has ``Param``
  ones). ``MaskedNode`` positions are kept as they are.
  """
  leaves, node_def = jax.tree.flatten(node, is_leaf=_is_masked_node)
  parts = masks_lib.align(node, changed, is_leaf=_is_masked_node, what="changed")
  return node_def.unflatten(
      [s if c is None else _zero_changed(s, c) for s, c in zip(leaves, parts)])


def _mirrors(node, changed) -> bool:
  """Whether a state subtree is a float copy of the params tree (``MaskedNode`` standing in for
  any left-out leaf or subtree), leaf shapes equal to ``changed``'s, matched as by :func:`_zero_at`."""
  try:
    parts = masks_lib.align(node, changed, is_leaf=_is_masked_node)
  except ValueError:
    return False
  found = False
  for x, c in zip(jax.tree.leaves(node, is_leaf=_is_masked_node), parts):
    if c is None:
      continue
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(c, "shape")
            and jnp.issubdtype(x.dtype, jnp.inexact) and tuple(x.shape) == tuple(c.shape)):
      return False
    found = True
  return found


def reset_moments(tx: optax.GradientTransformation, opt_state, changed: types.Masks):
  """Zeroes every params-shaped tree of ``opt_state`` (Adam mu/nu, momentum traces...) at ``changed``.

  Works on any optax state, including those of ``optax.masked`` and ``optax.multi_transform``
  (whose params-shaped trees hold ``optax.MaskedNode`` at the positions they leave out),
  ``optax.inject_hyperparams``, ``optax.MultiSteps`` (the accumulated gradient is reset too) and
  chains of them. Scalars such as Adam's step count are left alone.

  Flax NNX: pass ``optimizer.tx`` and ``optimizer.opt_state`` of an ``nnx.Optimizer`` (the optax
  state with its arrays in ``OptVariable`` / ``OptArray`` wrappers) and a ``changed`` tree built
  from ``nnx.state(model, nnx.Param)``; the result keeps the wrappers, so it can be assigned back
  (``optimizer.opt_state = growth.reset_moments(...)``, also inside ``nnx.jit``).

  ``tx`` is the transformation that produced ``opt_state``; it locates the params-shaped parts of
  the state (``optax.tree.map_params``, which initialises ``tx`` on a placeholder). Where ``tx``
  cannot be initialised on that placeholder (e.g. ``multi_transform`` with a label *function*
  that walks the params), the params-shaped parts are found by structure instead: every float
  subtree of the state that mirrors ``changed`` (``MaskedNode`` standing in for left-out leaves).
  Either way the leaves of a params-shaped part are matched to ``changed`` by structure, or by
  path where only the containers or ``nnx.Variable`` wrappers differ (:func:`masks.align`).

  Args:
    tx: the optax transformation of ``opt_state``.
    opt_state: its state.
    changed: bool tree with the params' structure; True = zero the moments there.

  Returns:
    The state with the moments of changed positions set to zero.

  Example::

    opt_state = growth.reset_moments(tx, opt_state, result.changed)
  """
  try:
    # Locating with tx needs tx.init to accept optax's params placeholder.
    optax.tree.map_params(tx, lambda x: x, opt_state, is_leaf=_is_masked_node)
  except (AssertionError, AttributeError, IndexError, KeyError, TypeError, ValueError):
    located = False  # e.g. a label function that walks the params as a dict
  else:
    located = True
  if located:
    # `is_leaf` true at the root: map_params hands over each params-shaped part whole.
    return optax.tree.map_params(tx, lambda node: _zero_at(node, changed), opt_state,
                                 is_leaf=lambda _: True)

  def reset(node):
    if not _mirrors(node, changed):
      return node
    return _zero_at(node, changed)

  return jax.tree.map(reset, opt_state, is_leaf=lambda node: _mirrors(node, changed))


def mark_used(used: types.Masks, masks: types.Masks) -> types.Masks:
  """Accumulates which positions were ever active (for "unfired" growth)."""
  return masks_lib.logical_or(used, masks)
