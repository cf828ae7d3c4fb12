"""Per-leaf sparsity distributions: uniform, Erdos-Renyi (ER) and Erdos-Renyi-Kernel (ERK).

Layer 1 of the design. The distributions decide how many weights each maskable leaf keeps for a
given overall sparsity. Densities are computed on the host from static shapes (NumPy). Counts
(:func:`target_counts`) follow one integer rule whether the sparsity is a Python number (Python ints
out, usable as static configuration) or a traced value inside a jitted step (int32 scalars out, e.g.
a gradual schedule): the same float32 sparsity gives the same counts on both paths.

The overall count is exact: over the maskable leaves, ``sum(counts) == kept_total(s, N)``, i.e.
``rint((1 - s) * N)`` with ``s`` read as float32.

ER / ERK follow Mocanu et al. (2018) and Evci et al. (RigL, 2020): the density of leaf l is
proportional to ``(n_in + n_out) / (n_in * n_out)`` (ER) or to ``sum(shape) / prod(shape)`` (ERK,
which also counts the kernel's spatial size), scaled to hit the overall density; a leaf whose
density would exceed 1 is made dense and the others are rescaled (repeated until none exceeds 1).

Example::

  from sparse_cl_jax import sparsity
  counts = sparsity.target_counts(params, 0.9, distribution="erk")   # {'conv_0': {'kernel': 97, ...
  counts = jax.jit(lambda s: sparsity.target_counts(params, s, distribution="erk"))(0.9)  # same
  dens = sparsity.densities(params, 0.9, distribution="erk")
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax import types

DISTRIBUTIONS = ("uniform", "er", "erk")


def check_sparsity(value, name: str = "sparsity") -> float:
  """Validates a sparsity level: must be a number in [0, 1)."""
  if is_traced(value):
    raise ValueError(f"{name} must be a number in [0, 1) here, got a traced value (inside jit); "
                     "target_counts and uniform_counts accept traced sparsities")
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
  if not 0.0 <= v < 1.0 or np.isnan(v):
    raise ValueError(f"{name} must be in [0, 1), got {value!r}")
  return v


def _raw_score(shape: tuple[int, ...], distribution: str) -> float:
  if distribution == "uniform":
    return 1.0
  if len(shape) < 2:
    # A vector leaf (only maskable if asked): treat it like a dense layer with n_out = size.
    shape = (1,) + tuple(shape)
  if distribution == "erk":
    return float(np.sum(shape)) / float(np.prod(shape))
  n_in, n_out = shape[-2], shape[-1]
  # ER ignores the kernel's spatial size in the numerator but not in the leaf size.
  return float(n_in + n_out) / float(np.prod(shape))


def densities(params: types.Params, sparsity: float, *, distribution: str = "uniform",
              spec: types.LeafSpec | None = None,
              overrides: Mapping[str, float] | None = None) -> types.LeafSpec:
  """Per-leaf target density (Python floats) for an overall ``sparsity`` over maskable leaves.

  Args:
    params: the params pytree (only shapes are read).
    sparsity: overall fraction of maskable weights to remove, in [0, 1).
    distribution: ``'uniform'``, ``'er'`` or ``'erk'``.
    spec: which leaves are maskable (default :func:`masks.maskable`). Others get density 1.
    overrides: ``{path_regex: sparsity}``; a maskable leaf whose path matches gets that fixed
      sparsity and the remaining budget is spread over the other maskable leaves so that the
      overall sparsity is still ``sparsity``.

  Returns:
    A tree of Python floats with the params' structure.

  Raises:
    ValueError: for a sparsity outside [0, 1), an unknown distribution, or overrides that make the
      overall target unreachable.
  """
  sparsity = check_sparsity(sparsity)
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"unknown sparsity distribution {distribution!r}; choose from {DISTRIBUTIONS}")
  if spec is None:
    spec = masks_lib.maskable(params)
  masks_lib.check_like(params, spec, what="maskable spec", check_shapes=False)
  overrides = dict(overrides or {})
  for k, v in overrides.items():
    check_sparsity(v, f"override sparsity for {k!r}")
  compiled = [(re.compile(k), v) for k, v in overrides.items()]

  names = masks_lib.paths(params)
  shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(params)]
  flags = jax.tree.leaves(spec)
  sizes = {n: int(np.prod(s, dtype=np.int64)) for n, s in zip(names, shapes)}
  dens: dict[str, float] = {n: 1.0 for n in names}

  free_names = []
  fixed_kept = 0.0
  total = 0
  for n, s, f in zip(names, shapes, flags):
    if not f:
      continue
    total += sizes[n]
    hit = [v for r, v in compiled if r.search(n)]
    if hit:
      dens[n] = 1.0 - hit[0]
      fixed_kept += dens[n] * sizes[n]
    else:
      free_names.append(n)
  budget = (1.0 - sparsity) * total - fixed_kept
  free_total = sum(sizes[n] for n in free_names)
  if free_names:
    if budget < -1e-9 or budget > free_total + 1e-9:
      raise ValueError(
          f"overrides {overrides} leave {budget:.0f} weights for {free_total} others: the overall "
          f"sparsity {sparsity} cannot be reached")
    raw = {n: _raw_score(shapes[names.index(n)], distribution) for n in free_names}
    dense: set[str] = set()
    while True:
      rest = [n for n in free_names if n not in dense]
      rest_budget = budget - sum(sizes[n] for n in dense)
      denom = sum(raw[n] * sizes[n] for n in rest)
      eps = rest_budget / denom if denom > 0 else 0.0
      newly = [n for n in rest if eps * raw[n] > 1.0]
      if not newly:
        break
      dense.update(newly)
    for n in free_names:
      dens[n] = 1.0 if n in dense else float(eps * raw[n])
  leaves = [dens[n] for n in names]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


# --------------------------------------------------------------------------------------------------
# Exact counts: one integer rule for concrete (host) and traced (jitted) sparsity.

# A traced sparsity is exact for fewer maskable weights than this (see `_floor_div`).
MAX_TRACED_WEIGHTS = 2 ** 26


def is_traced(value) -> bool:
  """Whether ``value`` is a JAX tracer (a value inside ``jit``/``vmap``/``grad``), not a number."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(value))


def kept_total(sparsity, n: int):
  """How many of ``n`` weights a ``sparsity`` keeps: ``rint(f32(1 - s) * n)``, the one float step.

  The sparsity is read as a float32 number (the dtype a traced value has) and the product is
  rounded half to even, on the host (NumPy float32) and in a jitted step (XLA float32) alike, so
  both give the same integer. A traced value is clipped to [0, 1] first (NaN counts as 0).
  """
  if is_traced(sparsity):
    s = jnp.asarray(sparsity, jnp.float32)
    s = jnp.where(jnp.isnan(s), jnp.float32(0.0), jnp.clip(s, 0.0, 1.0))
    return jnp.rint((jnp.float32(1.0) - s) * jnp.float32(n)).astype(jnp.int32)
  s = np.float32(check_sparsity(sparsity))
  return int(np.rint((np.float32(1.0) - s) * np.float32(n)))


def _floor_div(xp, b, w, big_w):
  """``(b * w) // W`` and ``(b * w) % W`` exactly, for integer vectors ``w`` and scalars b, W.

  NumPy: int64, exact. JAX (x64 off): the quotient is estimated in float32 (relative error below
  3e-7), the remainder ``b * w - q0 * W`` is computed in wrapping int32, which is exact while its
  true value lies in (-2^31, 2^31), i.e. for fewer than :data:`MAX_TRACED_WEIGHTS` weights; one
  floor division then corrects the estimate.
  """
  ftype = np.float64 if xp is np else jnp.float32
  q0 = xp.floor(b.astype(ftype) * w.astype(ftype) / big_w.astype(ftype)).astype(w.dtype)
  r0 = b * w - q0 * big_w
  return q0 + r0 // big_w, r0 % big_w


def _distribute(xp, budget, sizes: list[int], weights: list[int]):
  """Splits an integer ``budget`` over leaves in proportion to integer ``weights``, capped at sizes.

  The rule (exact rational arithmetic, in integers): a leaf whose share ``B * w_l / W`` exceeds its
  size keeps everything and the rest is re-split over the others (repeated until none exceeds);
  the others get ``floor(B * w_l / W)`` and the ``B - sum(floors)`` leftover weights go one each to
  the largest remainders, ties to the earlier leaf. Works with ``xp=np`` (host, Python ints out)
  and ``xp=jnp`` (traced budget).
  """
  itype = np.int64 if xp is np else jnp.int32
  n = xp.asarray(sizes, itype)
  w = xp.asarray(weights, itype)
  budget = xp.asarray(budget, itype)
  num = len(sizes)

  def split(dense):
    b = budget - xp.sum(xp.where(dense, n, 0))
    big_w = xp.maximum(xp.sum(xp.where(dense, 0, w)), 1)
    q, r = _floor_div(xp, b, w, big_w)
    return b, q, r

  def cap(dense):
    _, q, r = split(dense)
    return dense | (q > n) | ((q == n) & (r > 0))

  dense = xp.zeros(num, bool)
  if xp is np:
    while True:
      new = cap(dense)
      if (new == dense).all():
        break
      dense = new
  else:
    # Each pass makes at least one more leaf dense or changes nothing: num passes suffice.
    dense = jax.lax.fori_loop(0, num, lambda i, d: cap(d), dense)
  b, q, r = split(dense)
  counts = xp.where(dense, n, q)
  short = b - xp.sum(xp.where(dense, 0, q))
  key = xp.where(dense, -1, r)
  idx = xp.arange(num)
  beats = (key[:, None] > key[None, :]) | ((key[:, None] == key[None, :])
                                           & (idx[:, None] < idx[None, :]))
  rank = xp.sum(beats, axis=0)
  return counts + (~dense & (rank < short)).astype(itype)


def _weight(shape: tuple[int, ...], distribution: str) -> int:
  """Integer proportionality weight ``raw_density * size`` of a leaf (see :func:`_raw_score`)."""
  size = int(np.prod(shape, dtype=np.int64))
  if distribution == "uniform":
    return size
  if len(shape) < 2:
    shape = (1,) + tuple(shape)
  if distribution == "erk":
    return int(np.sum(shape))
  return int(shape[-2] + shape[-1])


def target_counts(params: types.Params, sparsity, *, distribution: str = "uniform",
                  spec: types.LeafSpec | None = None,
                  overrides: Mapping[str, float] | None = None) -> types.LeafSpec:
  """Number of weights each leaf keeps; non-maskable leaves keep all. ``sparsity`` may be traced.

  One integer rule, whether ``sparsity`` is a number or a traced value inside ``jit``:

  1. The maskable leaves keep ``K = kept_total(sparsity, N)`` weights in all (:func:`kept_total`:
     ``rint(f32(1 - s) * N)``). A leaf matching ``overrides`` keeps
     ``kept_total(its sparsity, its size)``; the remaining budget goes to the other leaves.
  2. The budget is split over the leaves in proportion to integer weights ``density * size`` of the
     distribution (uniform: the size; ER: ``n_in + n_out``; ERK: ``sum(shape)``), capping leaves
     that would exceed their size (ERK's dense small layers), floors plus largest remainders,
     ties to the earlier leaf. So the counts are the rounding of :func:`densities` that sums to
     exactly ``K``.

  Args:
    params: the params pytree (only shapes are read; ``jax.ShapeDtypeStruct`` leaves work).
    sparsity: overall fraction of maskable weights to remove. A number must lie in [0, 1)
      (``ValueError`` otherwise); a traced value cannot be checked and is clipped to [0, 1]
      (1 keeps nothing; NaN counts as 0, nothing removed).
    distribution: ``'uniform'``, ``'er'`` or ``'erk'``.
    spec: which leaves are maskable (default :func:`masks.maskable`).
    overrides: ``{path_regex: sparsity}`` fixed per-leaf sparsities (static numbers).

  Returns:
    A tree with the params' structure: Python ints for a number ``sparsity``; int32 scalars for a
    traced one (equal to the ints the same float32 value gives on the host).

  Raises:
    ValueError: a sparsity or override outside [0, 1), an unknown distribution, overrides that
      make the overall target unreachable, or (traced only) more than
      :data:`MAX_TRACED_WEIGHTS` maskable weights.

  Example::

    sparsity.target_counts(params, 0.9, distribution="erk")             # Python ints
    jax.jit(lambda s: sparsity.target_counts(params, s, distribution="erk"))(0.9)  # same, int32
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"unknown sparsity distribution {distribution!r}; choose from {DISTRIBUTIONS}")
  traced = is_traced(sparsity)
  if not traced:
    check_sparsity(sparsity)
  if spec is None:
    spec = masks_lib.maskable(params)
  masks_lib.check_like(params, spec, what="maskable spec", check_shapes=False)
  compiled = []
  for k, v in dict(overrides or {}).items():
    compiled.append((re.compile(k), check_sparsity(v, f"override sparsity for {k!r}")))

  names = masks_lib.paths(params)
  shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(params)]
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  flags = [bool(f) for f in jax.tree.leaves(spec)]
  counts: list = list(sizes)
  free, fixed_kept, total = [], 0, 0
  for i, (name, f) in enumerate(zip(names, flags)):
    if not f:
      continue
    total += sizes[i]
    hit = [v for r, v in compiled if r.search(name)]
    if hit:
      counts[i] = kept_total(hit[0], sizes[i])
      fixed_kept += counts[i]
    else:
      free.append(i)
  treedef = jax.tree.structure(params)
  if traced and total >= MAX_TRACED_WEIGHTS:
    raise ValueError(f"a traced sparsity supports fewer than {MAX_TRACED_WEIGHTS} maskable "
                     f"weights, got {total}: pass the sparsity as a Python number")
  if not free:
    return jax.tree.unflatten(treedef, [jnp.int32(c) for c in counts] if traced else counts)
  free_sizes = [sizes[i] for i in free]
  weights = [_weight(shapes[i], distribution) for i in free]
  budget = kept_total(sparsity, total) - fixed_kept
  if traced:
    budget = jnp.clip(budget, 0, sum(free_sizes))
    free_counts = _distribute(jnp, budget, free_sizes, weights)
    counts = [jnp.int32(c) for c in counts]
    for j, i in enumerate(free):
      counts[i] = free_counts[j]
  else:
    if not 0 <= budget <= sum(free_sizes):
      raise ValueError(
          f"overrides {dict(overrides or {})} leave {budget} weights for {sum(free_sizes)} others: "
          f"the overall sparsity {sparsity} cannot be reached")
    free_counts = _distribute(np, budget, free_sizes, weights)
    for j, i in enumerate(free):
      counts[i] = int(free_counts[j])
  return jax.tree.unflatten(treedef, counts)


def uniform_counts(params: types.Params, sparsity, spec: types.LeafSpec | None = None):
  """``target_counts(params, sparsity, distribution='uniform')`` as int32 scalars (jit-friendly).

  The same rule as :func:`target_counts` (exact overall count, largest remainders), so a traced
  and a number ``sparsity`` agree. A number must lie in [0, 1) (``ValueError`` otherwise); a traced
  value is clipped to [0, 1], NaN counts as 0.
  """
  counts = target_counts(params, sparsity, distribution="uniform", spec=spec)
  return jax.tree.map(lambda c: jnp.asarray(c, jnp.int32), counts)
