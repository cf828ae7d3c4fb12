"""Which source rows each task of a stream holds: class orders, class groups, row selection.

`make_stream` (in `streams`) and `stream_source_rows` share these steps, so the rows a stream
uses can be recomputed without building it (`unused_train_rows`: the training images a capped
stream leaves over, an unlabeled pool for Lifelong Lottery Tickets).

Every step is host side and deterministic given ``seed`` (salts in `splits`): the class order,
the stratified validation hold-out (``val_fraction`` of each class's *training* images; it
depends only on the source and the seed, and the test split is never used for selection), and
the stratified per-task caps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparse_cl_jax.data import source as source_lib
from sparse_cl_jax.data import splits

SCENARIOS = ('split', 'permuted')
# The splits of a stream, in the order their rows are drawn (the index is a salt) and ids given.
SPLITS = ('train', 'val', 'test')


def resolve_class_order(source: source_lib.Source, class_order: str | Sequence[int] | None,
                        seed: int) -> list[int]:
  """The stream's class order: random from ``seed`` (None), ``'natural'``, ``'coarse'`` or given.

  Raises:
    ValueError: an unknown name, ``'coarse'`` without ``source.coarse_labels``, or a list that
      repeats a label or names one outside the source's classes.
  """
  num_classes = source.num_classes
  if class_order is None:
    rng = np.random.default_rng((seed, splits.SALT_CLASS_ORDER))
    return [int(c) for c in rng.permutation(num_classes)]
  if isinstance(class_order, str):
    if class_order == 'natural':
      return list(range(num_classes))
    if class_order == 'coarse':
      if source.coarse_labels is None:
        raise ValueError(f'class_order="coarse" needs a source with coarse_labels; '
                         f'{source.name} has none.')
      return [int(c) for c in np.lexsort((np.arange(num_classes), source.coarse_labels))]
    raise ValueError(f'class_order must be None, "natural", "coarse" or a list of labels, got '
                     f'{class_order!r}.')
  order = [int(c) for c in class_order]
  if not order or len(set(order)) != len(order) or min(order) < 0 or max(order) >= num_classes:
    raise ValueError(f'class_order must list distinct labels in [0, {num_classes}), got '
                     f'{list(class_order)}.')
  return order


def task_sizes(num_classes: int, num_tasks: int,
               classes_per_task: Sequence[int] | None) -> list[int]:
  """Classes of each task of a split stream: ``classes_per_task``, else an even division."""
  if classes_per_task is not None:
    sizes = [int(s) for s in classes_per_task]
    if len(sizes) != num_tasks or min(sizes) < 1 or sum(sizes) != num_classes:
      raise ValueError(f'classes_per_task {list(classes_per_task)} must have {num_tasks} '
                       f'positive entries summing to the {num_classes} classes of the order.')
    return sizes
  if num_classes % num_tasks:
    raise ValueError(f'num_tasks={num_tasks} does not divide the {num_classes} classes; pass '
                     'classes_per_task=[...] for uneven tasks or choose another num_tasks.')
  return [num_classes // num_tasks] * num_tasks


def task_classes(order: Sequence[int], scenario: str, num_tasks: int,
                 classes_per_task: Sequence[int] | None) -> list[list[int]]:
  """The original labels of each task.

  ``'split'``: ``order`` cut into ``num_tasks`` consecutive groups (sizes from `task_sizes`);
  ``'permuted'``: every task has all of ``order`` (``classes_per_task`` is ignored).

  Raises:
    ValueError: an unknown scenario or bad group sizes.
  """
  if scenario == 'split':
    sizes = task_sizes(len(order), num_tasks, classes_per_task)
    bounds = np.cumsum([0] + sizes)
    return [order[bounds[t]:bounds[t + 1]] for t in range(num_tasks)]
  if scenario == 'permuted':
    return [list(order) for _ in range(num_tasks)]
  raise ValueError(f'scenario must be one of {SCENARIOS}, got {scenario!r}.')


def task_rows(source: source_lib.Source, classes: Sequence[Sequence[int]], *,
              val_fraction: float, seed: int, max_train_per_task: int | None,
              max_eval_per_task: int | None) -> dict[str, list[np.ndarray]]:
  """The source rows of each task of each split (see `stream_source_rows` for the result).

  The validation rows are a stratified hold-out of ``val_fraction`` of each class's training
  images (`splits.stratified_split`, the same for every task); each task of each split then keeps
  the rows of its classes, capped stratified (`splits.stratified_subsample`) at
  ``max_train_per_task`` (train) or ``max_eval_per_task`` (val, test).
  """
  train_pool, val_pool = splits.stratified_split(
      source.y_train, val_fraction, np.random.default_rng((seed, splits.SALT_VAL_SPLIT)))
  test_pool = np.arange(source.y_test.shape[0])
  pools = {'train': (source.y_train, train_pool, max_train_per_task),
           'val': (source.y_train, val_pool, max_eval_per_task),
           'test': (source.y_test, test_pool, max_eval_per_task)}
  rows = {split: [] for split in SPLITS}
  for t, task in enumerate(classes):
    for salt, split in enumerate(SPLITS):
      labels, pool, cap = pools[split]
      idx = pool[np.isin(labels[pool], task)]
      rng = np.random.default_rng((seed, splits.SALT_SUBSAMPLE, t, salt))
      rows[split].append(splits.stratified_subsample(idx, labels, cap, rng))
  return rows


def stream_source_rows(source: source_lib.Source, *, scenario: str = 'split', num_tasks: int,
                       class_order: str | Sequence[int] | None = None,
                       classes_per_task: Sequence[int] | None = None, val_fraction: float = 0.1,
                       seed: int = 0, max_train_per_task: int | None = None,
                       max_eval_per_task: int | None = None) -> dict[str, list[np.ndarray]]:
  """The source rows `make_stream` puts in each task of each split (host side, no images copied).

  Takes the row-selecting arguments of `make_stream` and repeats its selection exactly (same
  random streams: class order, stratified validation hold-out, stratified per-task caps), so
  ``source.x_train[rows['train'][t]]`` are the (unpermuted) images of task t's training rows in
  stream order, ``rows['val'][t]`` likewise from ``x_train``, and ``rows['test'][t]`` index
  ``x_test``. Lifelong Lottery Tickets uses it to find the training images that a capped stream
  leaves unused (`unused_train_rows`), which then serve as an unlabeled pool.

  Returns:
    ``{'train': [...], 'val': [...], 'test': [...]}``: one sorted int64 index array per task.
  """
  if class_order is None and scenario == 'permuted':
    class_order = 'natural'
  order = resolve_class_order(source, class_order, seed)
  classes = task_classes(order, scenario, num_tasks, classes_per_task)
  return task_rows(source, classes, val_fraction=val_fraction, seed=seed,
                   max_train_per_task=max_train_per_task, max_eval_per_task=max_eval_per_task)


def unused_train_rows(source: source_lib.Source, **stream_kwargs: Any) -> np.ndarray:
  """Sorted indices of ``source.x_train`` rows that the stream uses neither for training nor
  for validation (arguments as in `stream_source_rows`): images a capped stream leaves over,
  usable as an unlabeled pool whose labels are discarded."""
  rows = stream_source_rows(source, **stream_kwargs)
  used = np.concatenate([np.zeros((0,), np.int64)] + rows['train'] + rows['val'])
  return np.setdiff1d(np.arange(source.x_train.shape[0]), used)
