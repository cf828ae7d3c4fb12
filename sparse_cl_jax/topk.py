"""Exact, deterministic top-k selection from score trees to bool masks (jit-compatible).

Layer 1 of the design. ``k`` may be a traced value (a sparsity schedule inside a jitted step), so
``jax.lax.top_k`` (static k) and a full sort (slow: O(n log n) and memory heavy) are both avoided.
Instead the k-th largest score is found by a 32-step bisection over the order-preserving integer
image of the float32 scores (each step one fused compare-and-count pass), then ties at the threshold
are broken by position: the earliest flat index (and, in global scope, the earliest leaf in
``jax.tree.leaves`` order) wins. The result has exactly ``min(k, #candidates)`` True entries.

Example::

  from sparse_cl_jax import topk
  keep = topk.topk_mask(scores, {'w': 3, 'b': 1})                     # layerwise
  keep = topk.topk_mask(scores, 4, scope="global")                    # one budget over leaves
  grow = topk.topk_mask(grads, counts, candidates=masks.logical_not(m))  # only inactive positions
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax import types

_SIGN = np.uint32(0x80000000)
_LOW = np.uint32(0x7FFFFFFF)


def ordered_key(scores) -> jax.Array:
  """Maps float scores to uint32 keys with the same order (NaN counts as -inf; 0 = never picked).

  Negative floats have their magnitude bits flipped so that larger floats map to larger keys; the
  sign bit is flipped so that the whole range is monotone as unsigned integers. Every real float
  (including -inf) maps above 0, so 0 is free to mark non-candidates.
  """
  x = jnp.asarray(scores).astype(jnp.float32)
  x = jnp.where(jnp.isnan(x), -jnp.inf, x)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  neg = (bits & _SIGN) != 0
  return jnp.where(neg, bits ^ jnp.uint32(0xFFFFFFFF), bits | _SIGN)


def _kth_largest(keys: list[jax.Array], k) -> jax.Array:
  """The largest T with #(keys >= T) >= k, by bisection over the 32 bits (k >= 1 assumed)."""

  def body(i, t):
    bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
    cand = t | bit
    n = sum(jnp.sum(key >= cand, dtype=jnp.int32) for key in keys)
    return jnp.where(n >= k, cand, t)

  return jax.lax.fori_loop(0, 32, body, jnp.uint32(0))


@jax.jit
def _select(keys: list[jax.Array], k) -> list[jax.Array]:
  """Exactly ``min(k, #nonzero keys)`` positions over ``keys`` (a list of flat uint32 arrays).

  Jitted (``k`` is an argument, so a new k never recompiles): called eagerly, e.g. from a user's
  script, it runs as one compiled computation instead of op-by-op dispatch of its loop and cond.
  """
  n_cand = sum(jnp.sum(key > 0, dtype=jnp.int32) for key in keys)
  k = jnp.minimum(jnp.asarray(k, jnp.int32), n_cand)
  t = _kth_largest(keys, jnp.maximum(k, 1))
  greater = [key > t for key in keys]
  n_greater = sum(jnp.sum(g, dtype=jnp.int32) for g in greater)
  remaining = k - n_greater
  ties = [(key == t) & (key > 0) for key in keys]
  n_ties = sum(jnp.sum(tie, dtype=jnp.int32) for tie in ties)

  def rank_ties(_):
    # Only when some tied positions must be left out: the earliest ones win (a cumsum per leaf,
    # the costliest part of the selection on CPU, hence skipped when every tie is taken).
    taken, offset = [], jnp.int32(0)
    for tie in ties:
      rank = jnp.cumsum(tie.astype(jnp.int32)) + offset
      taken.append(tie & (rank <= remaining))
      offset = offset + jnp.sum(tie, dtype=jnp.int32)
    return taken

  def take_all(_):
    return ties

  take = jax.lax.cond(n_ties > remaining, rank_ties, take_all, None)
  return [(g | tk) & (k > 0) for g, tk in zip(greater, take)]


def topk_mask(scores: types.Scores, k, *, candidates: types.Masks | None = None,
              scope: str = "layerwise", spec: types.LeafSpec | None = None) -> types.Masks:
  """Selects the ``k`` highest-scoring positions as a bool mask tree.

  Args:
    scores: float tree (higher = keep). NaN scores rank as -inf.
    k: ``scope='layerwise'``: a tree with one integer (Python or traced) per leaf, the number to
      select in that leaf. ``scope='global'``: one integer for all participating leaves together.
    candidates: optional bool tree; only True positions can be selected (e.g. free positions, the
      current task's positions). If a leaf has fewer candidates than its k, all of them are taken.
    scope: ``'layerwise'`` or ``'global'``.
    spec: optional tree of Python bools; leaves where it is False do not participate and are
      returned all-True (non-maskable leaves stay dense).

  Returns:
    A bool tree with the structure and shapes of ``scores``.

  Raises:
    ValueError: for an unknown scope or trees that do not match.
  """
  if scope not in ("layerwise", "global"):
    raise ValueError(f"scope must be 'layerwise' or 'global', got {scope!r}")
  leaves, treedef = jax.tree.flatten(scores)
  if candidates is not None:
    masks_lib.check_like(scores, candidates, what="candidates")
    cand = jax.tree.leaves(candidates)
  else:
    cand = [None] * len(leaves)
  flags = [True] * len(leaves) if spec is None else [bool(s) for s in jax.tree.leaves(spec)]
  if len(flags) != len(leaves):
    raise ValueError("spec does not match the scores tree")

  def keys_of(i):
    key = ordered_key(leaves[i]).reshape(-1)
    if cand[i] is not None:
      key = jnp.where(jnp.asarray(cand[i]).reshape(-1), key, jnp.uint32(0))
    return key

  out = [None] * len(leaves)
  active = [i for i in range(len(leaves)) if flags[i]]
  if scope == "layerwise":
    ks = jax.tree.leaves(k)
    if len(ks) != len(leaves):
      raise ValueError(
          f"layerwise k must be a tree with one count per leaf ({len(leaves)} leaves), got "
          f"{len(ks)} counts; pass scope='global' for a single budget")
    for i in active:
      out[i] = _select([keys_of(i)], ks[i])[0].reshape(jnp.shape(leaves[i]))
  else:
    if jax.tree.structure(k).num_leaves != 1:
      raise ValueError("global scope takes a single integer k")
    sel = _select([keys_of(i) for i in active], k)
    for i, m in zip(active, sel):
      out[i] = m.reshape(jnp.shape(leaves[i]))
  for i in range(len(leaves)):
    if out[i] is None:
      out[i] = jnp.ones(jnp.shape(leaves[i]), jnp.bool_)
  return jax.tree.unflatten(treedef, out)


def bottomk_mask(scores: types.Scores, k, **kwargs) -> types.Masks:
  """Selects the ``k`` lowest-scoring positions (same options and tie rule as :func:`topk_mask`)."""
  return topk_mask(jax.tree.map(lambda s: -jnp.asarray(s, jnp.float32), scores), k, **kwargs)
