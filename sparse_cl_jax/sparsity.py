"""Per-leaf sparsity distributions: uniform, Erdos-Renyi (ER) and Erdos-Renyi-Kernel (ERK).

Layer 1 of the design. The distributions decide how many weights each maskable leaf keeps for a
given overall sparsity. They are computed on the host from static shapes (NumPy), and return Python
numbers, so the result can be used as static configuration or fed to a jitted step as data.

The overall count is exact: over the maskable leaves, ``sum(counts) == round((1 - s) * N)``.

ER / ERK follow Mocanu et al. (2018) and Evci et al. (RigL, 2020): the density of leaf l is
proportional to ``(n_in + n_out) / (n_in * n_out)`` (ER) or to ``sum(shape) / prod(shape)`` (ERK,
which also counts the kernel's spatial size), scaled to hit the overall density; a leaf whose
density would exceed 1 is made dense and the others are rescaled (repeated until none exceeds 1).

Example::

  from sparse_cl_jax import sparsity
  counts = sparsity.target_counts(params, 0.9, distribution="erk")   # {'conv_0': {'kernel': 97, ...
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


def target_counts(params: types.Params, sparsity: float, *, distribution: str = "uniform",
                  spec: types.LeafSpec | None = None,
                  overrides: Mapping[str, float] | None = None) -> types.LeafSpec:
  """Number of weights each leaf keeps (Python ints); non-maskable leaves keep all.

  Rounds the densities of :func:`densities` with the largest-remainder method so that the total
  over maskable leaves is exactly ``round((1 - sparsity) * N)``. Ties in the remainders go to the
  earlier leaf (deterministic).
  """
  if spec is None:
    spec = masks_lib.maskable(params)
  dens = densities(params, sparsity, distribution=distribution, spec=spec, overrides=overrides)
  sizes = jax.tree.leaves(masks_lib.size_per_leaf(params))
  d = jax.tree.leaves(dens)
  flags = jax.tree.leaves(spec)
  counts = [int(s) for s in sizes]
  idx = [i for i, f in enumerate(flags) if f]
  if idx:
    total = sum(sizes[i] for i in idx)
    target = int(round((1.0 - check_sparsity(sparsity)) * total))
    exact = [d[i] * sizes[i] for i in idx]
    floors = [min(int(np.floor(e + 1e-9)), sizes[i]) for e, i in zip(exact, idx)]
    short = target - sum(floors)
    order = sorted(range(len(idx)), key=lambda j: (-(exact[j] - floors[j]), j))
    for j in order:
      if short <= 0:
        break
      if floors[j] < sizes[idx[j]]:
        floors[j] += 1
        short -= 1
    for j, i in enumerate(idx):
      counts[i] = floors[j]
  return jax.tree.unflatten(jax.tree.structure(params), counts)


def uniform_counts(params: types.Params, sparsity, spec: types.LeafSpec | None = None):
  """Per-leaf kept counts at a (possibly traced) uniform ``sparsity``; jit-compatible.

  Every maskable leaf keeps ``round((1 - sparsity) * size)``; others keep everything. Used by
  gradual schedules whose sparsity is a traced value.
  """
  if spec is None:
    spec = masks_lib.maskable(params)
  s = jnp.asarray(sparsity, jnp.float32)

  def one(p, f):
    n = int(np.size(p))
    if not f:
      return jnp.int32(n)
    return jnp.round((1.0 - s) * n).astype(jnp.int32)

  return jax.tree.map(one, params, spec)
