"""Continual-learning metrics over an accuracy matrix, capacity per layer, stored model size.

Layer 5 of the design (harness). Pure NumPy: nothing here needs JAX, so results can be recomputed
from a saved ``results.json`` anywhere.

The accuracy matrix ``R`` is a float array of shape ``[T, T]``: ``R[i, j]`` is the accuracy on task
``j`` after training task ``i`` (0-based). The upper triangle (``j > i``: tasks not trained yet) is
part of the matrix because forward transfer is computed from it. ``NaN`` marks an entry that was
not evaluated; every metric skips ``NaN`` terms (``nanmean`` semantics) and is ``NaN`` when no term
is left, e.g. BWT, forgetting and both FWTs for ``T == 1`` (they are undefined with one task, and a
``0`` would read as "no forgetting measured" in a table).

Metrics (``T`` tasks, all sums over 0-based indices):

* :func:`acc`: ``ACC = 1/T sum_j R[T-1, j]`` (Lopez-Paz & Ranzato 2017, GEM, eq. 2).
* :func:`bwt`: ``BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])`` (GEM, eq. 3).
* :func:`forgetting`: ``F = 1/(T-1) sum_{j<T-1} (max_{j<=l<T-1} R[l, j] - R[T-1, j])``
  (Chaudhry et al. 2018, RWalk, eq. 4-5; the max runs over the models that had already trained task
  ``j``, so the upper triangle is not used).
* :func:`fwt_gem`: ``FWT_GEM = 1/(T-1) sum_{j>0} (R[j-1, j] - b[j])`` with ``b[j]`` the accuracy of
  a randomly initialised model on task ``j`` (GEM, eq. 4).
* :func:`fwt_subnetwork`: ``FWT_sub = 1/(T-1) sum_{i<T-1} 1/(T-1-i) sum_{j>i} R[i, j]``: the
  accuracy of task ``i``'s subnetwork on the later tasks' data, averaged per row and then over
  rows (DST for CL, Yildirim et al. CPAL 2024, eq. 4, whose printed normaliser ``1/(T-i)`` is this
  per-row mean; their code averages the rows' means). ``pooled=True`` gives the plain mean over
  all pairs ``i < j`` instead.
* :func:`average_accuracy_curve`: ``a_i = 1/(i+1) sum_{j<=i} R[i, j]``, the mean accuracy over
  the tasks seen so far after each task.

What the upper triangle means depends on the method, and so does which FWT it supports
(:func:`forward_transfer`, ``results.json``'s ``fwt``): for most methods ``R[i, j]`` (``j > i``) is
the model after task ``i`` asked about task ``j`` through task ``j``'s own (untrained) head and
view, GEM's quantity (``upper_triangle='gem'``); DST for CL fills it with task ``i``'s subnetwork
*and head* applied to task ``j``'s data (``upper_triangle='subnetwork'``, the paper's eq. 4), so
``R[j-1, j] - b[j]`` is then not GEM's FWT and is reported under its own name.

Capacity and size:

* :func:`capacity_per_layer` / :func:`capacity_total`: fraction of each layer (and of the whole
  tree) that is free or owned by each task, from an integer ownership tree.
* :func:`model_bytes`: stored model size the way CPG (Hung et al. 2019, Table 1) reports it.

Trees here are plain nested containers (dicts, including Flax ``FrozenDict``, lists, tuples and
NamedTuples) of arrays; a leaf's path is its keys joined by ``/`` (dict keys in sorted order, as in
``jax.tree_util`` and :func:`sparse_cl_jax.masks.paths`).

Example::

  from sparse_cl_jax import metrics
  R = np.array([[0.9, 0.5], [0.8, 0.95]])
  metrics.acc(R), metrics.bwt(R)      # (0.875, -0.1)
  print(metrics.summary_table(R))
"""

from __future__ import annotations

import math
from collections import abc
from typing import Any

import numpy as np

Tree = Any  # A nested dict / list / tuple of arrays.


# --------------------------------------------------------------------------------------------------
# Helpers.


def _matrix(R) -> np.ndarray:
  R = np.asarray(R, dtype=np.float64)
  if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
    raise ValueError(f"accuracy matrix must be square [T, T] with T >= 1, got shape {R.shape}")
  return R


def _nanmean(values) -> float:
  """Mean of the non-NaN values; NaN (without a warning) when there are none."""
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else math.nan


def _nanmax(values) -> float:
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  values = values[~np.isnan(values)]
  return float(values.max()) if values.size else math.nan


def _flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
  """``{'a/b/c': leaf}`` for every leaf of a nested container (``None`` = empty subtree)."""
  out: dict[str, Any] = {}

  def join(key) -> str:
    return f"{prefix}/{key}" if prefix else str(key)

  if tree is None:
    return out
  if isinstance(tree, abc.Mapping):
    for key in sorted(tree):
      out.update(_flatten(tree[key], join(key)))
  elif isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple (e.g. optax states).
    for key in tree._fields:
      out.update(_flatten(getattr(tree, key), join(key)))
  elif isinstance(tree, (list, tuple)):
    for index, value in enumerate(tree):
      out.update(_flatten(value, join(index)))
  else:
    out[prefix] = tree
  return out


def _size(leaf) -> int:
  shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
  return int(np.prod(shape, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# Accuracy-matrix metrics.


def acc(R) -> float:
  """Average accuracy after the last task, ``1/T sum_j R[T-1, j]`` (GEM, eq. 2).

  Args:
    R: accuracy matrix ``[T, T]``.

  Returns:
    The mean of the last row (NaN entries skipped).
  """
  R = _matrix(R)
  return _nanmean(R[-1])


def bwt(R) -> float:
  """Backward transfer, ``1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])`` (GEM, eq. 3).

  Negative values mean forgetting. NaN for ``T == 1``.

  Args:
    R: accuracy matrix ``[T, T]``.
  """
  R = _matrix(R)
  T = R.shape[0]
  return _nanmean([R[T - 1, j] - R[j, j] for j in range(T - 1)])


def forgetting(R) -> float:
  """Average forgetting (Chaudhry et al. 2018, Riemannian Walk, eq. 4-5).

  ``F = 1/(T-1) sum_{j<T-1} (max_{j<=l<T-1} R[l, j] - R[T-1, j])``: for every task but the last, the
  drop from its best accuracy while it was learned (any model from task ``j`` up to task ``T-2``) to
  its final accuracy. Entries with ``l < j`` (before task ``j`` was trained) are not used. Positive
  values mean forgetting. NaN for ``T == 1``.

  Args:
    R: accuracy matrix ``[T, T]``.
  """
  R = _matrix(R)
  T = R.shape[0]
  return _nanmean([_nanmax(R[j:T - 1, j]) - R[T - 1, j] for j in range(T - 1)])


def fwt_gem(R, b) -> float:
  """Forward transfer as defined in GEM (Lopez-Paz & Ranzato 2017, eq. 4).

  ``FWT_GEM = 1/(T-1) sum_{j=1}^{T-1} (R[j-1, j] - b[j])``: accuracy on task ``j`` just before
  training it, minus the accuracy ``b[j]`` of a randomly initialised model. NaN for ``T == 1``.

  Args:
    R: accuracy matrix ``[T, T]``.
    b: ``[T]`` accuracies of the randomly initialised model on each task (``b[0]`` is unused).
  """
  R = _matrix(R)
  T = R.shape[0]
  b = np.asarray(b, dtype=np.float64)
  if b.shape != (T,):
    raise ValueError(f"b must have shape ({T},), got {b.shape}")
  return _nanmean([R[j - 1, j] - b[j] for j in range(1, T)])


def fwt_subnetwork(R, *, pooled: bool = False) -> float:
  """Forward transfer as defined in DST for CL (Yildirim et al., CPAL 2024, eq. 4).

  ``R[i, j]`` for ``j > i`` is the accuracy of the subnetwork learned up to task ``i`` on the data
  of the later task ``j``. The paper's definition, as its code computes it, averages each row's
  strict upper triangle and then the rows::

    FWT_sub = 1/(T-1) sum_{i=0}^{T-2} [ 1/(T-1-i) sum_{j=i+1}^{T-1} R[i, j] ]

  It is an absolute accuracy (no random-init baseline subtracted), so it is close to chance for
  unrelated tasks; compare it across methods, not with :func:`fwt_gem`. NaN for ``T == 1``.

  Args:
    R: accuracy matrix ``[T, T]``.
    pooled: if True, return the plain mean over all pairs ``i < j`` instead (weights early rows,
      which have more later tasks, more).
  """
  R = _matrix(R)
  T = R.shape[0]
  if pooled:
    return _nanmean(R[np.triu_indices(T, k=1)])
  return _nanmean([_nanmean(R[i, i + 1:]) for i in range(T - 1)])


UPPER_TRIANGLES = ("gem", "subnetwork")


def forward_transfer(R, b, *, upper_triangle: str = "gem") -> dict[str, float]:
  """The forward-transfer figures the accuracy matrix's upper triangle supports, by name.

  Args:
    R: accuracy matrix ``[T, T]``.
    b: ``[T]`` accuracies of the randomly initialised model on each task.
    upper_triangle: what ``R[i, j]`` (``j > i``) measures. ``'gem'``: the model after task ``i``
      with task ``j``'s own head and view (GEM's setting). ``'subnetwork'``: task ``i``'s
      subnetwork and head on task ``j``'s data (DST for CL, eq. 4).

  Returns:
    ``'gem'``: ``{'gem': fwt_gem, 'subnetwork': fwt_subnetwork}`` (the latter is the DST formula
    applied to this triangle). ``'subnetwork'``: ``{'subnetwork': fwt_subnetwork,
    'previous_subnetwork_minus_init': 1/(T-1) sum_{j>0} (R[j-1, j] - b[j])}``: task ``j-1``'s
    subnetwork and head on task ``j`` minus the random-init model on task ``j``, the arithmetic of
    GEM's eq. 4 on a different triangle, so it is not called ``gem``.

  Raises:
    ValueError: an unknown ``upper_triangle``.
  """
  if upper_triangle == "gem":
    return {"gem": fwt_gem(R, b), "subnetwork": fwt_subnetwork(R)}
  if upper_triangle == "subnetwork":
    return {"subnetwork": fwt_subnetwork(R), "previous_subnetwork_minus_init": fwt_gem(R, b)}
  raise ValueError(f"upper_triangle must be one of {UPPER_TRIANGLES}, got {upper_triangle!r}")


ACCURACY_VIEWS = ("task_aware", "task_agnostic")


def view_metrics(R) -> dict:
  """One accuracy view's entry of ``results.json``: its matrix, ACC, BWT and forgetting.

  The two views (:data:`ACCURACY_VIEWS`): *task-aware*, the prediction knows the example's task
  (its head, or the argmax over its own classes); *task-agnostic*, it does not (the argmax over
  every class seen so far). A run's ``accuracy_matrix`` is its scenario's view (task-IL:
  task-aware, class-IL: task-agnostic); docs/guide.md explains both.

  Args:
    R: accuracy matrix ``[T, T]`` of the view.

  Returns:
    ``{"accuracy_matrix": R as lists, "acc", "bwt", "forgetting"}``.
  """
  R = _matrix(R)
  return {"accuracy_matrix": R.tolist(), "acc": acc(R), "bwt": bwt(R),
          "forgetting": forgetting(R)}


def average_accuracy_curve(R) -> np.ndarray:
  """Mean accuracy over the tasks seen so far, after each task.

  ``a[i] = 1/(i+1) sum_{j<=i} R[i, j]``; ``a[T-1]`` equals :func:`acc`.

  Args:
    R: accuracy matrix ``[T, T]``.

  Returns:
    A float64 array of shape ``[T]``.
  """
  R = _matrix(R)
  return np.array([_nanmean(R[i, :i + 1]) for i in range(R.shape[0])])


# --------------------------------------------------------------------------------------------------
# Capacity.


def _owner_counts(owners, num_tasks: int, path: str) -> np.ndarray:
  owners = np.asarray(owners)
  if not (np.issubdtype(owners.dtype, np.integer) or owners.dtype == np.bool_):
    raise ValueError(f"ownership leaf {path!r} must be integer, got {owners.dtype}")
  owners = owners.reshape(-1).astype(np.int64)
  if owners.size and (owners.min() < 0 or owners.max() > num_tasks):
    raise ValueError(f"ownership leaf {path!r} has owners outside 0..{num_tasks}: "
                     f"min {owners.min()}, max {owners.max()}")
  return np.bincount(owners, minlength=num_tasks + 1)


def _fractions(counts: np.ndarray) -> dict[str, float]:
  total = int(counts.sum())
  fracs = counts / total if total else np.full(counts.shape, math.nan)
  out = {"free": float(fracs[0])}
  out.update({f"task_{k}": float(fracs[k]) for k in range(1, len(counts))})
  return out


def capacity_per_layer(ownership_tree: Tree, num_tasks: int) -> dict[str, dict[str, float]]:
  """Fraction of every leaf that is free or owned by each task.

  Args:
    ownership_tree: integer tree, 0 = free, ``k`` = owned by task ``k`` (tasks numbered from 1).
    num_tasks: number of tasks ``T``; every leaf gets the keys ``'free', 'task_1' .. 'task_T'``.

  Returns:
    ``{path: {'free': f0, 'task_1': f1, ..., 'task_T': fT}}`` with fractions summing to 1 per leaf
    (NaN for empty leaves), paths ``/``-joined.

  Raises:
    ValueError: if a leaf is not integer or holds an owner outside ``0..num_tasks``.

  Example::

    capacity_per_layer({'dense': {'kernel': np.array([0, 1, 1, 2])}}, 2)
    # {'dense/kernel': {'free': 0.25, 'task_1': 0.5, 'task_2': 0.25}}
  """
  return {path: _fractions(_owner_counts(leaf, num_tasks, path))
          for path, leaf in _flatten(ownership_tree).items()}


def capacity_total(ownership_tree: Tree, num_tasks: int) -> dict[str, float]:
  """Like :func:`capacity_per_layer`, over all leaves together (weighted by their sizes)."""
  counts = np.zeros(num_tasks + 1, dtype=np.int64)
  for path, leaf in _flatten(ownership_tree).items():
    counts += _owner_counts(leaf, num_tasks, path)
  return _fractions(counts)


# --------------------------------------------------------------------------------------------------
# Stored model size.


def model_bytes(params: Tree, *, mask_bits: int, maskable: Tree | None = None,
                per_task_trees: abc.Sequence[Tree] = (), dtype_bytes: int = 4,
                nonzero_only: bool = False) -> dict[str, int]:
  """Stored size of a multi-task sparse model, the way CPG reports model sizes.

  The stored model is (Hung et al. 2019, "CPG", Table 1 and Sec. 4):

  * ``'weights'``: the shared backbone, ``dtype_bytes`` per element of ``params`` (dense storage),
    or per *nonzero* element when ``nonzero_only=True`` (sparse storage: the masks below say where
    each stored value goes, so zeros need not be stored).
  * ``'masks'``: ``mask_bits`` bits per element of every maskable leaf, bit-packed, each leaf
    rounded up to whole bytes (as :func:`sparse_cl_jax.masks.packed_nbytes` packs them).
    ``mask_bits`` is everything stored per weight: ``1`` for one binary mask (a single pruned
    model, lottery tickets), ``T`` for one binary mask per task (Piggyback, DST for CL),
    ``ceil(log2(T+1))`` for an ownership tree (PackNet, PAE, CLNP;
    :func:`sparse_cl_jax.masks.ownership_bits`), ``ceil(log2(T+1)) + T`` for CPG's ownership plus
    per-task picking masks. Use ``mask_bits=0`` for a dense model.
  * ``'per_task'``: ``dtype_bytes`` per element of each tree in ``per_task_trees`` (per-task BN
    parameters and statistics, biases, heads), stored in full.
  * ``'total'``: the sum.

  Args:
    params: the shared weights (a params tree, concrete arrays; abstract ``ShapeDtypeStruct``
      leaves work unless ``nonzero_only``).
    mask_bits: bits stored per maskable element (see above); ``>= 0``.
    maskable: optional tree of bools with the params' paths (e.g.
      ``sparse_cl_jax.masks.maskable(params)``): which leaves carry masks. ``None``: all leaves.
    per_task_trees: trees stored once per task (pass one entry per task and kind).
    dtype_bytes: bytes per stored value (4 for float32).
    nonzero_only: count only the nonzero elements of ``params`` in ``'weights'``.

  Returns:
    ``{'weights': int, 'masks': int, 'per_task': int, 'total': int}`` in bytes.

  Example::

    params = {'dense': {'kernel': np.ones((4, 4)), 'bias': np.ones(4)}}
    model_bytes(params, mask_bits=2, maskable={'dense': {'kernel': True, 'bias': False}},
                per_task_trees=[{'head': np.ones(3)}] * 2)
    # {'weights': 80, 'masks': 4, 'per_task': 24, 'total': 108}
  """
  if mask_bits < 0:
    raise ValueError(f"mask_bits must be >= 0, got {mask_bits}")
  flat = _flatten(params)
  if nonzero_only:
    weights = dtype_bytes * sum(int(np.count_nonzero(np.asarray(x))) for x in flat.values())
  else:
    weights = dtype_bytes * sum(_size(x) for x in flat.values())
  if maskable is None:
    masked_paths = list(flat)
  else:
    spec = _flatten(maskable)
    if set(spec) != set(flat):
      diff = sorted(set(spec) ^ set(flat))
      raise ValueError(f"maskable does not mirror params; differing paths: {diff[:5]}")
    masked_paths = [p for p in flat if bool(spec[p])]
  masks = sum((_size(flat[p]) * mask_bits + 7) // 8 for p in masked_paths)
  per_task = dtype_bytes * sum(_size(x) for tree in per_task_trees
                               for x in _flatten(tree).values())
  return {"weights": weights, "masks": masks, "per_task": per_task,
          "total": weights + masks + per_task}


# --------------------------------------------------------------------------------------------------
# Printing.


def summary_table(R, *, names: abc.Sequence[str] | None = None, b=None, precision: int = 4,
                  upper_triangle: str = "gem") -> str:
  """A fixed-width text table of the accuracy matrix followed by the summary metrics.

  Rows are "after training task i", columns "evaluated on task j"; ``NaN`` prints as ``-``. Below
  the matrix: ACC, BWT, forgetting, FWT (subnetwork, DST-for-CL definition) and, when ``b`` is
  given, FWT (GEM definition), or with ``upper_triangle='subnetwork'`` the previous subnetwork's
  accuracy minus the random-init one (see :func:`forward_transfer`).

  Args:
    R: accuracy matrix ``[T, T]``.
    names: ``T`` task names (default ``task_1 .. task_T``).
    b: optional ``[T]`` random-init accuracies for :func:`fwt_gem`.
    precision: digits after the decimal point.
    upper_triangle: what the upper triangle measures (:data:`UPPER_TRIANGLES`).

  Returns:
    The table as one string (lines joined by newlines, no trailing newline).

  Example::

    print(summary_table(R, names=['0-1', '2-3', '4-5']))
  """
  R = _matrix(R)
  T = R.shape[0]
  names = [f"task_{k}" for k in range(1, T + 1)] if names is None else [str(n) for n in names]
  if len(names) != T:
    raise ValueError(f"need {T} names, got {len(names)}")

  def fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.{precision}f}"

  rows = [("after \\ on", names)]
  rows += [(names[i], [fmt(v) for v in R[i]]) for i in range(T)]
  rows.append(("", []))
  rows += [("ACC", [fmt(acc(R))]), ("BWT", [fmt(bwt(R))]), ("Forgetting", [fmt(forgetting(R))]),
           ("FWT (subnet)", [fmt(fwt_subnetwork(R))])]
  if b is not None:
    label = {"gem": "FWT (GEM)", "subnetwork": "FWT (prev. subnet - init)"}
    if upper_triangle not in label:
      raise ValueError(f"upper_triangle must be one of {UPPER_TRIANGLES}, got {upper_triangle!r}")
    rows.append((label[upper_triangle], [fmt(fwt_gem(R, b))]))
  label_width = max(len(label) for label, _ in rows)
  cell_width = max([len(c) for _, cells in rows for c in cells] + [1])
  lines = [" ".join([label.ljust(label_width)] + [c.rjust(cell_width) for c in cells]).rstrip()
           for label, cells in rows]
  return "\n".join(lines)
