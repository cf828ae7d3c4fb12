"""Exemplar memory for class-incremental rehearsal: choosing exemplars and a fixed-shape buffer.

`select_exemplars` picks up to k per class, at random or by iCaRL herding (Rebuffi et al. 2017,
Alg. 4; used by Lifelong Lottery Tickets); `ExemplarMemory` stores them in a pytree whose shapes
never change, so a jitted step that reads it compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def select_exemplars(labels: Any, k: int, *, method: str = 'random', features: Any = None,
                     key_or_seed: Any = 0, classes: Sequence[int] | None = None) -> np.ndarray:
  """Chooses up to ``k`` exemplars per class (host side).

  ``'herding'`` is iCaRL's greedy mean matching (Rebuffi et al. 2017, Algorithm 4,
  "ConstructExemplarSet"): with phi the L2-normalised features of class c and mu their mean, the
  j-th exemplar is ``argmin_x || mu - (phi(x) + sum_{i<j} p_i) / j ||`` over the not yet chosen x
  (ties: lowest index). Its order matters: the first m exemplars are the best m (iCaRL's
  ReduceExemplarSet keeps a prefix). ``'random'`` draws k without replacement per class.

  Args:
    labels: int [N] labels of the candidates (valid rows only).
    k: exemplars per class (a class with fewer than k candidates gives all of them).
    method: ``'random'`` or ``'herding'``.
    features: float [N, D], required for herding.
    key_or_seed: an int seed or a JAX PRNG key (raw uint32 or typed); random only.
    classes: the classes to select for (default: every label present), in this order.

  Returns:
    int64 indices into ``labels``, grouped by class (in ``classes`` order), each group in
    selection order.

  Raises:
    ValueError: bad method, k or features.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D, got shape {labels.shape}.')
  if k < 0:
    raise ValueError(f'k must be non-negative, got {k}.')
  classes = np.unique(labels) if classes is None else np.asarray(classes)
  chosen = []
  if method == 'random':
    rng = np.random.default_rng(_numpy_seed(key_or_seed))
    for c in classes:
      idx = np.flatnonzero(labels == c)
      chosen.append(rng.permutation(idx)[:k])
  elif method == 'herding':
    if features is None:
      raise ValueError('herding needs features [N, D].')
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
      raise ValueError(f'features must be [N, D] with N={labels.shape[0]}, got '
                       f'{features.shape}.')
    for c in classes:
      idx = np.flatnonzero(labels == c)
      chosen.append(idx[_herding(features[idx], k)])
  else:
    raise ValueError(f'method must be "random" or "herding", got {method!r}.')
  return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros((0,), np.int64)


def _herding(features: np.ndarray, k: int) -> np.ndarray:
  """iCaRL herding order (positions into ``features``), at most ``k`` of them."""
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  phi = features / np.maximum(norms, 1e-12)
  mu = phi.mean(axis=0)
  available = np.ones(phi.shape[0], bool)
  running = np.zeros_like(mu)
  order = []
  for j in range(1, min(k, phi.shape[0]) + 1):
    distances = np.linalg.norm(mu[None, :] - (running[None, :] + phi) / j, axis=1)
    distances[~available] = np.inf
    best = int(np.argmin(distances))
    order.append(best)
    available[best] = False
    running += phi[best]
  return np.asarray(order, np.int64)


def _numpy_seed(key_or_seed: Any) -> Any:
  """An int seed, or the key data of a JAX PRNG key, as a numpy seed."""
  if isinstance(key_or_seed, (int, np.integer)):
    return int(key_or_seed)
  key = key_or_seed
  if hasattr(key, 'dtype') and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return [int(v) for v in np.asarray(key, np.uint32).ravel()]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExemplarMemory:
  """A fixed-capacity exemplar buffer whose shapes never change (a pytree: pass it to jit).

  Rows ``0..n-1`` are valid; the rest are padding (zeros, label 0, id -1).

  Attributes:
    x: uint8 [M, H, W, C] images.
    y: int32 [M] labels (whatever the loss uses, e.g. class-IL global labels).
    ids: int32 [M] stream ids of the stored examples, -1 on padding.
    n: int32 [] number of valid rows.
  """

  x: np.ndarray
  y: np.ndarray
  ids: np.ndarray
  n: np.ndarray

  @classmethod
  def empty(cls, capacity: int, input_shape: Sequence[int]) -> ExemplarMemory:
    """An empty memory of ``capacity`` rows of images shaped ``input_shape`` (H, W, C)."""
    return cls(x=np.zeros((capacity,) + tuple(input_shape), np.uint8),
               y=np.zeros((capacity,), np.int32), ids=np.full((capacity,), -1, np.int32),
               n=np.asarray(0, np.int32))

  @property
  def capacity(self) -> int:
    return int(self.x.shape[0])

  @property
  def valid(self) -> np.ndarray:
    """bool [M]: which rows hold exemplars."""
    return np.arange(self.capacity) < int(self.n)

  def add(self, x: Any, y: Any, ids: Any) -> ExemplarMemory:
    """Returns a new memory with the examples appended (host side; ``self`` is unchanged).

    Call as ``memory.add(x, y, ids)`` or ``ExemplarMemory.add(memory, x, y, ids)``.

    Args:
      x: uint8 [K, H, W, C] images.
      y: int [K] labels.
      ids: int [K] ids.

    Returns:
      The new memory, same shapes and dtypes.

    Raises:
      ValueError: more examples than free rows, or mismatched shapes.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    ids = np.asarray(ids)
    count, n = x.shape[0], int(self.n)
    if x.shape[1:] != self.x.shape[1:] or y.shape != (count,) or ids.shape != (count,):
      raise ValueError(f'cannot add images {x.shape}, labels {y.shape}, ids {ids.shape} to a '
                       f'memory of images {self.x.shape[1:]}.')
    if x.dtype != np.uint8:
      raise ValueError(f'exemplar images must be uint8, got {x.dtype}.')
    if n + count > self.capacity:
      raise ValueError(f'memory overflow: {n} + {count} > capacity {self.capacity}.')
    new_x, new_y, new_ids = np.array(self.x), np.array(self.y), np.array(self.ids)  # Copies.
    new_x[n:n + count] = x
    new_y[n:n + count] = y
    new_ids[n:n + count] = ids
    return ExemplarMemory(x=new_x, y=new_y, ids=new_ids, n=np.asarray(n + count, np.int32))
