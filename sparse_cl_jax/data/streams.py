"""Continual-learning task streams: `make_stream` builds a padded, stacked `TaskStream`.

Split-X (disjoint class groups) or Permuted-X (all classes, one fixed pixel permutation per
task), task- or class-incremental labels, the rows chosen by `selection` (stratified validation
held out from train; the test split is never used for selection), every task padded to the same
shape and stacked so one jitted step compiles once for all tasks, and the per-channel statistics
of `normalization`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from sparse_cl_jax import types
from sparse_cl_jax.data import normalization
from sparse_cl_jax.data import selection
from sparse_cl_jax.data import source as source_lib
from sparse_cl_jax.data import splits

SCENARIOS = selection.SCENARIOS
INCREMENTAL = ('task', 'class')


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """Host-side numpy view of one task's valid rows (no padding). See `TaskStream.task`."""

  index: int
  classes: list[int]
  x_train: np.ndarray
  y_train: np.ndarray
  y_train_global: np.ndarray
  ids_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  y_val_global: np.ndarray
  ids_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  y_test_global: np.ndarray
  ids_test: np.ndarray
  permutation: np.ndarray | None

  def __repr__(self) -> str:
    return (f'Task({self.index}, classes={self.classes}, train={len(self.y_train)}, '
            f'val={len(self.y_val)}, test={len(self.y_test)})')


@dataclasses.dataclass(frozen=True, eq=False)
class TaskStream:
  """A sequence of tasks, padded and stacked so that a jitted loop compiles once.

  Every per-task array has a leading task axis T and a row axis padded to the largest task of that
  split (``N_max``). Padding rows hold zeros, label 0 and id -1; ``n_*[t]`` says how many leading
  rows of task t are valid, so padding is never counted.

  Labels: ``y_*`` is what the loss uses. Task-IL: the index of the class within its task's
  ``classes[t]`` (0..C_t-1; use a head with ``classes_per_task`` outputs per task). Class-IL: the
  global index in the stream's class order (task 0's classes are 0..C_0-1, task 1's
  C_0..C_0+C_1-1, ...; one head with ``num_classes_total`` outputs). In a permuted stream every
  task has all classes, so class-IL gives task t the indices t*C..(t+1)*C-1. ``y_*_global`` keeps
  the original dataset label.

  Ids: unique across the whole stream: train ids are ``0..sum(n_train)-1`` task after task (an
  array of per-example statistics of size ``num_train_ids`` can be indexed by them), then the
  validation ids, then the test ids.

  Attributes:
    name: source name.
    scenario: ``'split'`` or ``'permuted'``.
    incremental: ``'task'`` or ``'class'``.
    classes: original labels of each task (list of lists).
    num_tasks: T.
    classes_per_task: max over tasks of the number of classes.
    num_classes_total: sum over tasks of the number of classes (= number of class-IL labels).
    input_shape: (H, W, C).
    mean: float32 [C] per-channel mean of the valid training images, in [0, 1] units.
    std: float32 [C] per-channel std (at least 1e-6).
    x_train: uint8 [T, N_max, H, W, C]; likewise ``x_val``, ``x_test``.
    y_train: int32 [T, N_max] loss labels; likewise ``y_val``, ``y_test``.
    y_train_global: int32 [T, N_max] original labels; likewise for val and test.
    ids_train: int32 [T, N_max] stream-unique ids, -1 on padding; likewise for val and test.
    n_train: int32 [T] valid rows per task; likewise ``n_val``, ``n_test``.
    head_mask: bool [T, num_outputs]: the outputs usable at task t (class-IL: every class seen up
      to t, for masking logits; task-IL: the task's own C_t outputs).
    task_mask: bool [T, num_outputs]: the outputs of task t only (class-IL: its global indices,
      for task-aware evaluation of a class-IL model; task-IL: same as ``head_mask``).
    permutations: int32 [T, H*W] pixel permutation of each task (permuted scenario; identity
      rows where unpermuted), ``None`` for split streams. Pixel j of a permuted image is pixel
      ``permutations[t, j]`` of the original (channels move together).
    seed: the seed the stream was built from.
  """

  name: str
  scenario: str
  incremental: str
  classes: list[list[int]]
  num_tasks: int
  classes_per_task: int
  num_classes_total: int
  input_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray
  x_train: np.ndarray
  y_train: np.ndarray
  y_train_global: np.ndarray
  ids_train: np.ndarray
  n_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  y_val_global: np.ndarray
  ids_val: np.ndarray
  n_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  y_test_global: np.ndarray
  ids_test: np.ndarray
  n_test: np.ndarray
  head_mask: np.ndarray
  task_mask: np.ndarray
  permutations: np.ndarray | None
  seed: int

  def __repr__(self) -> str:
    return (f'TaskStream({self.name}, scenario={self.scenario!r}, '
            f'incremental={self.incremental!r}, num_tasks={self.num_tasks}, '
            f'classes={self.classes}, input_shape={self.input_shape}, '
            f'n_train={self.n_train.tolist()}, n_val={self.n_val.tolist()}, '
            f'n_test={self.n_test.tolist()})')

  @property
  def num_outputs(self) -> int:
    """Logits per head: ``classes_per_task`` (task-IL) or ``num_classes_total`` (class-IL)."""
    return self.classes_per_task if self.incremental == 'task' else self.num_classes_total

  @property
  def num_train_ids(self) -> int:
    """Number of training examples in the whole stream (train ids are ``0..num_train_ids-1``)."""
    return int(self.n_train.sum())

  @property
  def num_ids(self) -> int:
    """Number of ids over train, val and test (all ids are in ``0..num_ids-1``)."""
    return int(self.n_train.sum() + self.n_val.sum() + self.n_test.sum())

  def normalize(self, x: types.Array) -> jax.Array:
    """``(x / 255 - mean) / std`` per channel as float32; jit-compatible.

    Args:
      x: uint8 images [..., H, W, C] (any number of leading axes, at least one).

    Returns:
      float32 array of the same shape.
    """
    return normalization.normalize(x, self.mean, self.std)

  def task(self, t: int) -> Task:
    """Numpy views of task t's valid rows (no copies)."""
    t = int(t)
    if not 0 <= t < self.num_tasks:
      raise IndexError(f'task {t} out of range for {self.num_tasks} tasks.')
    fields = {}
    for split in ('train', 'val', 'test'):
      n = int(getattr(self, f'n_{split}')[t])
      for prefix in ('x', 'y', 'ids'):
        fields[f'{prefix}_{split}'] = getattr(self, f'{prefix}_{split}')[t, :n]
      fields[f'y_{split}_global'] = getattr(self, f'y_{split}_global')[t, :n]
    return Task(index=t, classes=list(self.classes[t]),
                permutation=None if self.permutations is None else self.permutations[t],
                **fields)

  def head_classes(self, t: int) -> np.ndarray:
    """int32 output indices usable at task t (class-IL: all seen so far; task-IL: 0..C_t-1)."""
    return np.flatnonzero(self.head_mask[int(t)]).astype(np.int32)


def make_stream(source: source_lib.Source, *, scenario: str = 'split', num_tasks: int,
                incremental: str = 'task', class_order: str | Sequence[int] | None = None,
                classes_per_task: Sequence[int] | None = None, val_fraction: float = 0.1,
                seed: int = 0, max_train_per_task: int | None = None,
                max_eval_per_task: int | None = None, permute_first: bool = False) -> TaskStream:
  """Builds a padded, stacked continual-learning task stream from a source.

  Validation: ``val_fraction`` of each class's *training* images is held out, stratified per class
  (``round(val_fraction * n_c)`` images, at least 1 and at most n_c - 1 per class, none when
  ``val_fraction == 0``), deterministically from ``seed``. The split depends only on the source
  and the seed (not on the class order), and the test split is never used for selection. In a
  permuted stream the same source images are held out in every task.

  Args:
    source: the `Source`.
    scenario: ``'split'``: the class order is cut into ``num_tasks`` consecutive groups (Split
      MNIST/CIFAR). ``'permuted'``: every task has all classes of the class order, with its own
      fixed pixel permutation (Permuted MNIST).
    num_tasks: number of tasks T.
    incremental: ``'task'`` (labels within the task, task id known) or ``'class'`` (global labels
      over all tasks seen); see `TaskStream`.
    class_order: ``None``: a random permutation of all classes drawn from ``seed`` (split;
      sorted for permuted streams, where the order would only rename the labels);
      ``'natural'``: sorted; ``'coarse'``: sorted by superclass then label (needs
      ``source.coarse_labels``; CIFAR-100 with ``num_tasks=20`` gives CPG's one superclass per
      task); or an explicit sequence of distinct labels (may be a subset of the classes).
    classes_per_task: split only: explicit number of classes of each task (length ``num_tasks``,
      summing to the number of classes in the order). Without it the order must divide evenly.
    val_fraction: fraction of each class's training images held out for validation, in [0, 1).
    seed: seeds the class order, validation split, permutations and subsampling.
    max_train_per_task: keep at most this many training images per task (stratified random
      subset; for quick runs).
    max_eval_per_task: keep at most this many validation and test images per task (stratified).
    permute_first: permuted only: permute task 0 too (default: task 0 is the original images).

  Returns:
    The `TaskStream`.

  Raises:
    ValueError: bad scenario/incremental/num_tasks/class order/classes_per_task/val_fraction, or a
      task without training images.
  """
  num_tasks = _check_stream_args(scenario, incremental, num_tasks, val_fraction,
                                 max_train_per_task, max_eval_per_task)
  if class_order is None and scenario == 'permuted':
    class_order = 'natural'  # Every task has every class: the order would only rename labels.
  order = selection.resolve_class_order(source, class_order, seed)
  if scenario == 'permuted' and classes_per_task is not None:
    raise ValueError('classes_per_task applies to the split scenario only.')
  task_classes = selection.task_classes(order, scenario, num_tasks, classes_per_task)
  offsets = np.cumsum([0] + [len(c) for c in task_classes])
  rows = selection.task_rows(source, task_classes, val_fraction=val_fraction, seed=seed,
                             max_train_per_task=max_train_per_task,
                             max_eval_per_task=max_eval_per_task)
  for t, classes in enumerate(task_classes):
    if rows['train'][t].size == 0:
      raise ValueError(f'task {t} (classes {classes}) has no training images.')
  height, width, channels = source.input_shape
  permutations = None
  if scenario == 'permuted':
    permutations = pixel_permutations(num_tasks, height * width, seed, permute_first)
  arrays = stack_splits(source, rows, task_classes, permutations,
                        offsets if incremental == 'class' else None)
  mean, std = normalization.channel_stats(source.x_train, rows['train'])
  head_mask, task_mask = output_masks(task_classes, incremental)
  return TaskStream(
      name=source.name, scenario=scenario, incremental=incremental,
      classes=[[int(c) for c in classes] for classes in task_classes], num_tasks=num_tasks,
      classes_per_task=max(len(c) for c in task_classes), num_classes_total=int(offsets[-1]),
      input_shape=(height, width, channels), mean=mean, std=std, head_mask=head_mask,
      task_mask=task_mask, permutations=permutations, seed=int(seed), **arrays)


def _check_stream_args(scenario: str, incremental: str, num_tasks: int, val_fraction: float,
                       max_train_per_task: int | None, max_eval_per_task: int | None) -> int:
  """Raises a ``ValueError`` for a bad argument of `make_stream`; returns ``int(num_tasks)``."""
  if scenario not in SCENARIOS:
    raise ValueError(f'scenario must be one of {SCENARIOS}, got {scenario!r}.')
  if incremental not in INCREMENTAL:
    raise ValueError(f'incremental must be one of {INCREMENTAL}, got {incremental!r}.')
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f'num_tasks must be a positive integer, got {num_tasks!r}.')
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction must lie in [0, 1), got {val_fraction}.')
  for arg_name, value in (('max_train_per_task', max_train_per_task),
                          ('max_eval_per_task', max_eval_per_task)):
    if value is not None and value < 1:
      raise ValueError(f'{arg_name} must be positive or None, got {value}.')
  return int(num_tasks)


def pixel_permutations(num_tasks: int, num_pixels: int, seed: int,
                       permute_first: bool) -> np.ndarray:
  """int32 [T, num_pixels]: a random permutation per task, drawn from ``seed`` in task order.

  Task 0 keeps the identity unless ``permute_first``.
  """
  rng = np.random.default_rng((seed, splits.SALT_PERMUTATION))
  permutations = np.tile(np.arange(num_pixels, dtype=np.int32), (num_tasks, 1))
  for t in range(0 if permute_first else 1, num_tasks):
    permutations[t] = rng.permutation(num_pixels).astype(np.int32)
  return permutations


def permute_pixels(x: np.ndarray, permutation: np.ndarray) -> np.ndarray:
  """Images [N, H, W, C] whose pixel j is pixel ``permutation[j]`` of ``x`` (channels together)."""
  n, height, width, channels = x.shape
  # Flat index of (pixel p, channel c).
  flat = (permutation[:, None] * channels + np.arange(channels)).ravel()
  return np.take(x.reshape(n, flat.size), flat, axis=1).reshape(n, height, width, channels)


def stack_splits(source: source_lib.Source, rows: dict[str, list[np.ndarray]],
                 task_classes: Sequence[Sequence[int]], permutations: np.ndarray | None,
                 offsets: np.ndarray | None) -> dict[str, np.ndarray]:
  """`stack_split` of train, val (from ``x_train``) and test, as `TaskStream` fields.

  Ids run on from one split to the next: train, then val, then test.
  """
  split_arrays = {'train': (source.x_train, source.y_train),
                  'val': (source.x_train, source.y_train),  # Held out of the training split.
                  'test': (source.x_test, source.y_test)}
  arrays = {}
  next_id = 0
  for split in selection.SPLITS:
    images, labels = split_arrays[split]
    stacked = stack_split(images, labels, rows[split], task_classes, permutations,
                          num_classes=source.num_classes, offsets=offsets, first_id=next_id)
    next_id += int(stacked['n'].sum())
    arrays.update({f'x_{split}': stacked['x'], f'y_{split}': stacked['y'],
                   f'y_{split}_global': stacked['y_global'], f'ids_{split}': stacked['ids'],
                   f'n_{split}': stacked['n']})
  return arrays


def stack_split(images: np.ndarray, labels: np.ndarray, rows: Sequence[np.ndarray],
                task_classes: Sequence[Sequence[int]], permutations: np.ndarray | None, *,
                num_classes: int, offsets: np.ndarray | None,
                first_id: int) -> dict[str, np.ndarray]:
  """One split of every task, padded to its largest task and stacked.

  Args:
    images: uint8 [N, H, W, C] source images of the split.
    labels: int32 [N] their source labels.
    rows: per task, the source rows (from `selection.task_rows`).
    task_classes: per task, its original labels.
    permutations: int32 [T, H*W] pixel permutations, or None.
    num_classes: number of classes of the source.
    offsets: class-IL: [T+1] first global label of each task; task-IL: None (labels within the
      task).
    first_id: the id of the split's first row (ids run on over the tasks).

  Returns:
    ``{'x', 'y', 'y_global', 'ids', 'n'}`` as `TaskStream` holds them for the split (padding:
    zeros, label 0, id -1).
  """
  num_tasks = len(rows)
  counts = np.asarray([r.size for r in rows], np.int32)
  n_max = int(counts.max(initial=0))
  x = np.zeros((num_tasks, n_max) + images.shape[1:], np.uint8)
  y = np.zeros((num_tasks, n_max), np.int32)
  y_global = np.zeros((num_tasks, n_max), np.int32)
  ids = np.full((num_tasks, n_max), -1, np.int32)
  next_id = first_id
  for t, (idx, classes) in enumerate(zip(rows, task_classes, strict=True)):
    n = idx.size
    task_x = images[idx]
    if permutations is not None and not np.array_equal(permutations[t],
                                                       np.arange(permutations.shape[1])):
      task_x = permute_pixels(task_x, permutations[t])
    x[t, :n] = task_x
    local = np.full((num_classes,), -1, np.int32)
    local[classes] = np.arange(len(classes), dtype=np.int32)
    y_global[t, :n] = labels[idx]
    y[t, :n] = local[labels[idx]] + (0 if offsets is None else offsets[t])
    ids[t, :n] = np.arange(next_id, next_id + n, dtype=np.int32)
    next_id += n
  return {'x': x, 'y': y, 'y_global': y_global, 'ids': ids, 'n': counts}


def output_masks(task_classes: Sequence[Sequence[int]],
                 incremental: str) -> tuple[np.ndarray, np.ndarray]:
  """(head_mask, task_mask), bool [T, num_outputs], as `TaskStream` documents them."""
  offsets = np.cumsum([0] + [len(c) for c in task_classes])
  num_tasks = len(task_classes)
  num_outputs = max(len(c) for c in task_classes) if incremental == 'task' else int(offsets[-1])
  head_mask = np.zeros((num_tasks, num_outputs), bool)
  task_mask = np.zeros((num_tasks, num_outputs), bool)
  for t, classes in enumerate(task_classes):
    if incremental == 'task':
      head_mask[t, :len(classes)] = True
      task_mask[t, :len(classes)] = True
    else:
      head_mask[t, :offsets[t + 1]] = True
      task_mask[t, offsets[t]:offsets[t + 1]] = True
  return head_mask, task_mask
