"""Seeded, stratified index splits (host side, deterministic), and the seed salts of the package.

Every random choice of the data package draws from its own stream,
``numpy.random.default_rng((seed, SALT, ...))``; the salts live here, in one table, so that no
two choices share a stream.
"""

from __future__ import annotations

import numpy as np

# Independent random streams derived from one seed: np.random.default_rng((seed, salt, ...)).
SALT_SOURCE_SPLIT = 1  # The test split of sources that ship none (digits, miniImageNet pickles).
SALT_CLASS_ORDER = 2  # A stream's random class order.
SALT_VAL_SPLIT = 3  # The validation rows held out of the training split.
SALT_PERMUTATION = 4  # The pixel permutations of a permuted stream.
SALT_SUBSAMPLE = 5  # The per-task, per-split caps (max_train_per_task, max_eval_per_task).


def stratified_split(labels: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices per class: ``round(fraction * n_c)`` held out, at least 1 and at most n_c - 1.

  Args:
    labels: int [N].
    fraction: fraction held out per class; 0 holds out nothing.
    rng: numpy generator (classes are processed in increasing label order).

  Returns:
    (kept, held_out) sorted index arrays, a partition of ``range(N)``.
  """
  held = []
  if fraction > 0:
    for c in np.unique(labels):
      idx = np.flatnonzero(labels == c)
      n_held = int(np.clip(round(fraction * idx.size), 1, max(idx.size - 1, 0)))
      held.append(rng.permutation(idx)[:n_held])
  held = np.sort(np.concatenate(held)) if held else np.zeros((0,), np.int64)
  kept = np.setdiff1d(np.arange(labels.shape[0]), held, assume_unique=True)
  return kept, held


def stratified_subsample(indices: np.ndarray, labels: np.ndarray, max_count: int | None,
                         rng: np.random.Generator) -> np.ndarray:
  """At most ``max_count`` of ``indices``, class proportions kept (sorted result)."""
  if max_count is None or indices.size <= max_count:
    return indices
  # Rank each example within its class at random, then take the lowest relative ranks.
  key = np.empty(indices.size, np.float64)
  sub_labels = labels[indices]
  for c in np.unique(sub_labels):
    pos = np.flatnonzero(sub_labels == c)
    key[pos] = (rng.permutation(pos.size) + rng.random(pos.size)) / pos.size
  return np.sort(indices[np.argsort(key, kind='stable')[:max_count]])
