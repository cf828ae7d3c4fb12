"""CLNP: Continual Learning via Neural Pruning (Golkar, Kagan & Cho 2019), with graceful forgetting.

Neuron (filter) level parameter isolation for ReLU chain networks. The method state holds, per
hidden layer, one integer per unit: ``owner[u] = 0`` (free, inactive) or ``k`` (activated by task
``k``, i.e. the loop's task ``k - 1``; the ownership convention of :mod:`.base`). Weight-level masks
are expanded from these vectors inside the jitted steps (Sec. 2.1, Fig. 1 of the paper):

* active weights ``W(N_act -> N_act)``: a weight from unit ``i`` (layer l) to unit ``o`` (layer
  l+1) with ``1 <= owner[i] <= owner[o]`` belongs to task ``owner[o]``; frozen for good;
* interference weights ``W(N_inact -> N_act)``: into an owned unit from a unit that was inactive
  when it was activated (``owner[i] == 0`` or ``owner[i] > owner[o]``); set to exactly 0.0 when
  a task is pruned and frozen at 0.0 ever after;
* free weights ``W(N -> N_inact)``: into a free unit from any unit; trainable by the next task and
  re-initialised (fresh draw of the model's initialisers) at the start of every task.

Per task ``t`` (Alg. 1 with graceful forgetting, Sec. 2.2; :func:`run_task`):

1. ``begin`` (:func:`begin_task`): re-initialise the free weights, zero the interference weights
   into owned hidden units (the new task's head row keeps its initial values: it is cut from
   inactive final units only at step 5).
2. For every grid point (:func:`train_candidates`; L1 scale x learning rate,
   ``clnp.grid_l1_scale`` x ``clnp.grid_lr``) train a candidate from the same start with a
   per-layer L1 penalty on the trainable weights (:func:`l1_penalty`; ``clnp.l1``: one coefficient
   per weight layer, the hidden layers then the output layer).
3. Per candidate: the mean post-ReLU activation of every unit / channel over the task's training
   data (``E_S(N_l)``, :func:`make_unit_means`), then for every threshold ``theta`` of
   ``clnp.theta_grid`` (per-layer thresholds ``theta * clnp.theta_scale[l]``) the validation
   accuracy of the network pruned at ``theta``: free units with mean activation ``> theta`` become
   task ``t``'s units, the others stay free and their outgoing weights into active units are cut.
4. Graceful forgetting (:func:`graceful_forgetting`: :func:`search_thresholds`, :func:`select`):
   among candidates whose unpruned validation accuracy lies within ``clnp.margin`` of the best
   candidate's, raise the threshold as far as the pruned accuracy stays within the margin (one
   shared value, or layer by layer with ``clnp.theta_search='per_layer'``); keep the sparsest
   (fewest active units).
5. Commit the choice (:func:`commit`: owners assigned, interference weights set to 0.0) and
   optionally fine-tune the task's weights (:func:`finetune`; ``clnp.finetune_epochs`` at
   ``clnp.finetune_lr`` with ``clnp.finetune_l1``: the paper's "CLNP m = 4% + FT" uses 20 epochs,
   1e-4, 5e-5).
6. Diagnostics (Fig. 3, 4b, 5b; :func:`record_reuse`, :func:`report`): per layer, units used
   after the task, units newly activated by it and earlier units it reuses (those active on its
   data and in its view, i.e. mean activation above the layer's threshold; a layer without free
   units keeps its previous threshold).

Output structures (Sec. 2.1, Fig. 2): multi-head (one pre-allocated head row per task; a head row
sees the final hidden units active at its task) or single-head (``config.multi_head=False``: one
output layer; task ``t`` sees only the final hidden units it activated itself, the others are
masked out, and the output bias is trained by the first task only). Both promise exactly zero
forgetting: earlier tasks' outputs are bit-identical after later tasks.

Normalisation: per-task BatchNorm (``norm='task_batch'``, the default here) or none; a shared
BatchNorm would update the running statistics of earlier tasks' channels and is refused.

Statistics that selection uses come from the training data (mean activation) and the validation
split (accuracies); the test split is never used. All thresholds, L1 coefficients, the task index
and the phase are traced values, so the grid search adds no compilation. Because the grid branches
on state snapshots only task boundaries are checkpointed (``resumable_within_task=False``).

Example::

  python experiments/main.py --config=configs/clnp.py:permuted_fashion_mnist --workdir=/tmp/clnp
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sparse_cl_jax import masks
from sparse_cl_jax import models
from sparse_cl_jax.methods import base

DEFAULT_NORM = "task_batch"
FORGETS_NOTHING = True
# Chain networks: every hidden layer feeds only the next one (no residual additions).
CHAIN_MODELS = ("mlp", "small_convnet", "clnp_convnet", "clnp_wide_fcn", "vgg16_bn")

TRAIN, PRUNED = 0, 1  # values of mstate["phase"]


# --------------------------------------------------------------------------------------------------
# Layout: which parameter leaf connects which units.


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a chain network's parameters map onto its hidden units.

  Attributes:
    names: hidden layers (sown activations), forward order, e.g. ``('dense_0', 'dense_1')``.
    units: units (channels) per hidden layer.
    positions: spatial positions per example of each layer's activation (1 for dense layers).
    roles: ``{leaf path: role}``; roles are ``('kernel', l)``, ``('bias', l)``,
      ``('head_kernel',)``, ``('head_bias',)`` and ``('row',)`` (per-task rows on axis 0, e.g.
      per-task BatchNorm).
    multi_head: one head row per task (else a single shared output layer).
  """
  names: tuple[str, ...]
  units: tuple[int, ...]
  positions: tuple[int, ...]
  roles: dict
  multi_head: bool


def make_layout(model, params, input_shape: Sequence[int], task_rows) -> Layout:
  """Builds the :class:`Layout` of ``model`` (abstractly, no compute).

  Args:
    model: a Flax model of :mod:`sparse_cl_jax.models` (a chain network).
    params: its params (arrays or ShapeDtypeStructs).
    input_shape: one input, with batch axis, e.g. ``(1, 28, 28, 1)``.
    task_rows: the leaves holding one row per task (``base.task_rows``).

  Raises:
    ValueError: a parameter leaf that fits none of the roles, or shapes that do not chain.
  """
  names = models.hidden_layer_names(model, input_shape)
  if not names:
    raise ValueError("CLNP needs a model with hidden ReLU layers that sow their activations")

  def acts(key):
    _, st = model.init_with_output(key, jnp.zeros(tuple(input_shape), jnp.float32), task=0,
                                   train=False, mutable=True)
    return models.hidden_activations(st)

  shapes = jax.eval_shape(acts, jax.random.key(0))
  units = tuple(int(shapes[n].shape[-1]) for n in names)
  positions = tuple(int(math.prod(shapes[n].shape[1:-1])) for n in names)
  index = {n: i for i, n in enumerate(names)}
  rows = dict(zip(masks.paths(task_rows), jax.tree.leaves(task_rows)))
  multi = False
  roles = {}
  for path, leaf in zip(masks.paths(params), jax.tree.leaves(params)):
    shape = tuple(np.shape(leaf))
    module, _, name = path.rpartition("/")
    if module in index and name in ("kernel", "bias"):
      k = index[module]
      if shape[-1] != units[k]:
        raise ValueError(f"{path}: last axis {shape[-1]} != {units[k]} units of {module}")
      if name == "kernel":
        if len(shape) not in (2, 4):
          raise ValueError(f"{path}: kernel of rank {len(shape)} is not a dense or 2-D conv kernel")
        if k > 0 and shape[-2] % units[k - 1]:
          raise ValueError(f"{path}: input size {shape[-2]} is not a multiple of the "
                           f"{units[k - 1]} units of {names[k - 1]}")
        if k > 0 and len(shape) == 4 and shape[-2] != units[k - 1]:
          raise ValueError(f"{path}: conv input channels {shape[-2]} != {units[k - 1]}")
      roles[path] = (name, k)
    elif path == "head/kernel":
      if len(shape) != 3 or shape[1] % units[-1]:
        raise ValueError(f"{path}: expected [heads, D, classes] with D a multiple of "
                         f"{units[-1]}, got {shape}")
      multi = shape[0] > 1
      roles[path] = ("head_kernel",)
    elif path == "head/bias":
      roles[path] = ("head_bias",)
    elif rows.get(path, False):
      roles[path] = ("row",)
    else:
      raise ValueError(
          f"CLNP cannot place parameter {path!r}: it is neither a hidden layer's kernel/bias, the "
          "head, nor a per-task row. Shared normalisation would change earlier tasks' outputs: "
          "use norm='task_batch' (or 'none').")
  return Layout(names=names, units=units, positions=positions, roles=roles, multi_head=multi)


def _shape_vec(v, ndim: int, axis: int):
  """Reshapes a vector to rank ``ndim`` with its entries on ``axis`` (explicit broadcasting)."""
  shape = [1] * ndim
  shape[axis] = v.shape[0]
  return v.reshape(shape)


def _in_vec(owner, layout: Layout, k: int, shape):
  """Owners of the units feeding the kernel of layer ``k`` (or the head, ``k = L``), along the
  kernel's input axis (``-2``; dense inputs flattened from NHWC repeat the channels)."""
  v = owner[layout.names[k - 1]]
  din = shape[-2]
  if din != v.shape[0]:
    v = jnp.tile(v, din // v.shape[0])
  return _shape_vec(v, len(shape), len(shape) - 2)


def _kernel_owner(owner, layout: Layout, k: int, shape):
  """Weight-level owner of hidden kernel ``k``: ``owner[out]`` for active weights, else 0."""
  out = _shape_vec(owner[layout.names[k]], len(shape), len(shape) - 1)
  if k == 0:  # inputs are always active
    return jnp.broadcast_to(out, shape), jnp.broadcast_to(out, shape)
  inn = _in_vec(owner, layout, k, shape)
  w = jnp.where((inn >= 1) & (inn <= out), out, jnp.zeros_like(out))
  return jnp.broadcast_to(w, shape), jnp.broadcast_to(out, shape)


def _row(shape, task):
  """True on row ``task`` of axis 0 (``task`` may be traced)."""
  return jax.lax.broadcasted_iota(jnp.int32, shape, 0) == jnp.asarray(task, jnp.int32)


def _map(layout: Layout, params, fn):
  return masks.map_with_path(lambda path, p: fn(layout.roles[path], p), params)


def weight_owner(layout: Layout, owner, params):
  """Integer tree with the params' structure: which task each weight belongs to (0 = free).

  Hidden kernels: active weights belong to their output unit's task, interference and free
  weights are 0. Biases: their unit's owner. Multi-head heads: row r belongs to task r + 1 where
  its input unit is active at r; single head: the input unit's owner. Per-task rows: r + 1.
  """

  def fn(role, p):
    shape = jnp.shape(p)
    if role[0] == "kernel":
      return _kernel_owner(owner, layout, role[1], shape)[0]
    if role[0] == "bias":
      return owner[layout.names[role[1]]]
    if role[0] == "head_kernel":
      inn = _in_vec(owner, layout, len(layout.names), shape)
      if not layout.multi_head:
        return jnp.broadcast_to(inn, shape)
      r1 = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + 1
      return jnp.where((inn >= 1) & (inn <= r1), r1, 0)
    if role[0] in ("head_bias", "row"):
      return jax.lax.broadcasted_iota(jnp.int32, shape, 0) + 1
    return jnp.zeros(shape, jnp.int32)

  return _map(layout, params, fn)


def view_masks(layout: Layout, owner, params, task, training):
  """What task ``task`` computes with (bool tree).

  ``training`` (traced bool): the current task before pruning also sees the free units (and,
  in a single head, the output rows of free final units). Otherwise: the weights and biases of
  tasks ``1 .. task + 1`` (units of other tasks compute 0 and feed nothing); a single head sees
  only the final units of task ``task + 1``.
  """
  j1 = jnp.asarray(task, jnp.int32) + 1

  def fn(role, p):
    shape = jnp.shape(p)
    if role[0] == "kernel":
      w, out = _kernel_owner(owner, layout, role[1], shape)
      return ((w >= 1) & (w <= j1)) | (training & (out == 0))
    if role[0] == "bias":
      o = owner[layout.names[role[1]]]
      return ((o >= 1) & (o <= j1)) | (training & (o == 0))
    if role[0] == "head_kernel":
      inn = _in_vec(owner, layout, len(layout.names), shape)
      if layout.multi_head:
        m = ((inn >= 1) & (inn <= j1)) | training
      else:
        m = (inn == j1) | (training & (inn == 0))
      return jnp.broadcast_to(m, shape)
    return jnp.ones(shape, jnp.bool_)

  return _map(layout, params, fn)


def trainable_masks(layout: Layout, owner, params, task, phase):
  """What task ``task`` may change (bool tree): free positions before pruning, its own after."""
  t1 = jnp.asarray(task, jnp.int32) + 1
  before = jnp.asarray(phase, jnp.int32) == TRAIN

  def fn(role, p):
    shape = jnp.shape(p)
    if role[0] == "kernel":
      w, out = _kernel_owner(owner, layout, role[1], shape)
      return jnp.where(before, out == 0, w == t1)
    if role[0] == "bias":
      o = owner[layout.names[role[1]]]
      return jnp.where(before, o == 0, o == t1)
    if role[0] == "head_kernel":
      inn = jnp.broadcast_to(_in_vec(owner, layout, len(layout.names), shape), shape)
      if layout.multi_head:
        return _row(shape, task) & (before | ((inn >= 1) & (inn <= t1)))
      return jnp.where(before, inn == 0, inn == t1)
    if role[0] == "head_bias":
      if layout.multi_head:
        return _row(shape, task)
      return jnp.broadcast_to(t1 == 1, shape)  # a shared output bias: first task only
    if role[0] == "row":
      return _row(shape, task)
    return jnp.zeros(shape, jnp.bool_)

  return _map(layout, params, fn)


def interference_masks(layout: Layout, owner, params, task, *, head: bool = True):
  """Weights that must be exactly 0.0 once ``task`` is pruned (bool tree).

  Into an owned unit from a unit that is not active at its task; in a multi-head net also (with
  ``head``) head row ``task`` from the final units inactive at ``task``. Before a task trains,
  ``head=False``: its head row is trained from every final unit, free ones included, and starts
  from its initial values (cut only when the task is pruned).
  """
  t1 = jnp.asarray(task, jnp.int32) + 1

  def fn(role, p):
    shape = jnp.shape(p)
    if role[0] == "kernel":
      w, out = _kernel_owner(owner, layout, role[1], shape)
      return (out >= 1) & (w == 0)
    if role[0] == "head_kernel" and layout.multi_head and head:
      inn = _in_vec(owner, layout, len(layout.names), shape)
      return _row(shape, task) & ~((inn >= 1) & (inn <= t1))
    return jnp.zeros(shape, jnp.bool_)

  return _map(layout, params, fn)


def free_masks(layout: Layout, owner, params):
  """Free weights, re-initialised before every task: into free units (and a single head's rows
  of free final units)."""

  def fn(role, p):
    shape = jnp.shape(p)
    if role[0] == "kernel":
      return _kernel_owner(owner, layout, role[1], shape)[1] == 0
    if role[0] == "bias":
      return owner[layout.names[role[1]]] == 0
    if role[0] == "head_kernel" and not layout.multi_head:
      inn = _in_vec(owner, layout, len(layout.names), shape)
      return jnp.broadcast_to(inn == 0, shape)
    return jnp.zeros(shape, jnp.bool_)

  return _map(layout, params, fn)


def begin_params(layout: Layout, owner, params, fresh, task):
  """The params task ``task`` starts from (Sec. 2.1): free weights re-initialised from ``fresh``,
  interference weights into owned hidden units set to 0.0, everything else kept.

  The new task's head row (multi-head) keeps its initial values from every final unit, free ones
  included: it is trained from all of them and cut from the units left inactive only when the
  task is pruned (``interference_masks`` in ``commit``), never zeroed up front.
  """
  free = free_masks(layout, owner, params)
  zero = interference_masks(layout, owner, params, task, head=False)
  return jax.tree.map(lambda p, f, fr, z: jnp.where(z, jnp.zeros_like(p), jnp.where(fr, f, p)),
                      params, fresh, free, zero)


def activate(owner: dict, means: dict, thetas, task) -> dict:
  """Free units whose mean activation exceeds their layer's threshold become task ``task``'s.

  Args:
    owner: ``{layer: int32 [units]}``.
    means: ``{layer: float32 [units]}`` mean activation on the task's data.
    thetas: ``{layer: float32 scalar}`` per-layer thresholds (traced OK).
    task: the loop's task index (owner ``task + 1``).
  """
  t1 = jnp.asarray(task, jnp.int32) + 1
  return {n: jnp.where((o == 0) & (means[n] > thetas[n]), t1, o) for n, o in owner.items()}


# --------------------------------------------------------------------------------------------------
# Graceful forgetting.


def search_thresholds(evaluate, grid, scale, floor: float, mode: str = "shared",
                      movable=None):
  """Raises the pruning threshold as far as the validation accuracy stays at or above ``floor``.

  Args:
    evaluate: ``evaluate(theta_vec) -> (accuracy, active_units)`` of the candidate pruned at the
      per-layer thresholds ``theta_vec`` (float32 ``[L]``).
    grid: ascending threshold values ``[K]``.
    scale: per-layer multipliers ``[L]`` (``theta_vec = value * scale``).
    floor: the lowest accepted accuracy (``best - m``).
    mode: ``'shared'``: one value for all layers, the largest grid value whose accuracy is
      ``>= floor``. ``'per_layer'``: greedy, from the last hidden layer to the first, the largest
      value for that layer with the others held (the final hidden layer first: in a single head
      it is the capacity that runs out).
    movable: ``[L]`` bool, per-layer mode only: layers whose threshold may rise (default all);
      a layer without free units is left at the smallest value, where raising it changes nothing.

  Returns:
    ``(theta_vec, accuracy, units, within)``; with ``within=False`` not even the smallest grid
    value keeps the accuracy within the margin, and ``theta_vec`` is that smallest value.
  """
  grid = np.asarray(grid, np.float32)
  scale = np.asarray(scale, np.float32)
  theta = grid[0] * scale
  acc0, units0 = evaluate(theta)
  best = (theta, acc0, units0)
  if acc0 < floor:
    return theta, acc0, units0, False
  if mode == "shared":
    for value in grid[1:]:
      acc, units = evaluate(value * scale)
      if acc >= floor:
        best = (value * scale, acc, units)
    return (*best, True)
  if mode != "per_layer":
    raise ValueError(f"config.clnp.theta_search={mode!r}: use 'shared' or 'per_layer'")
  movable = np.ones(scale.shape, bool) if movable is None else np.asarray(movable, bool)
  for layer in reversed(range(scale.size)):
    if not movable[layer]:
      continue
    for value in grid[1:]:
      trial = best[0].copy()
      trial[layer] = value * scale[layer]
      acc, units = evaluate(trial)
      if acc >= floor:
        best = (trial, acc, units)
  return (*best, True)


def select(unpruned, pruned, units, eligible) -> int:
  """Graceful forgetting (Sec. 2.2): the sparsest candidate within the margin.

  Args:
    unpruned: ``[G]`` validation accuracy of each trained candidate before pruning.
    pruned: ``[G]`` its accuracy after pruning at its own threshold (:func:`search_thresholds`).
    units: ``[G]`` active units after pruning (lower = sparser).
    eligible: ``[G]`` bool: unpruned and pruned accuracy within the margin of the best unpruned.

  Returns:
    The index with the fewest units among the eligible ones (ties: higher pruned accuracy, then
    the earlier grid point); if none is eligible, the best unpruned candidate.
  """
  eligible = np.asarray(eligible, bool)
  if not eligible.any():
    return int(np.argmax(np.asarray(unpruned)))
  keys = [(int(units[g]), -float(pruned[g]), g) for g in np.flatnonzero(eligible)]
  return int(min(keys)[2])


# --------------------------------------------------------------------------------------------------
# Activation statistics.


def make_unit_means(model, normalize, layout: Layout, forward, *, batch_size: int,
                    has_batch_stats: bool):
  """A jitted ``f(params, batch_stats, mstate, data, task) -> {layer: float32 [units]}``.

  The mean post-ReLU activation of every unit (channel: also averaged over spatial positions)
  over the valid rows of ``data`` (a ``train.TaskData``), computed in evaluation mode with
  ``forward(params, None, mstate, task, task)`` (the method's view of ``task``): ``E_S(N_l)``.
  """

  @jax.jit
  def unit_means(params, batch_stats, mstate, data, task):
    fp = forward(params, None, mstate, task, task)
    variables = {"params": fp}
    if has_batch_stats:
      variables["batch_stats"] = batch_stats
    n_max = data.x.shape[0]
    nb = -(-n_max // batch_size)

    def body(i, sums):
      pos = i * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
      idx = jnp.minimum(pos, n_max - 1)
      valid = (pos < data.n).astype(jnp.float32)
      x = normalize(jnp.take(data.x, idx, axis=0))
      # valid: padding rows stay out of batch statistics (norm='batch_stats_only').
      _, st = model.apply(variables, x, task=task, train=False, mutable=["intermediates"],
                          valid=pos < data.n)
      acts = models.hidden_activations(st)
      out = {}
      for n in layout.names:
        a = acts[n].astype(jnp.float32)
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        out[n] = sums[n] + jnp.einsum("b,bpu->u", valid, a)
      return out

    init = {n: jnp.zeros((u,), jnp.float32) for n, u in zip(layout.names, layout.units)}
    sums = jax.lax.fori_loop(0, nb, body, init)
    count = jnp.maximum(data.n, 1).astype(jnp.float32)
    return {n: sums[n] / (count * p) for n, p in zip(layout.names, layout.positions)}

  return unit_means


# --------------------------------------------------------------------------------------------------
# Configuration.


def _per_layer(value, n: int, what: str) -> np.ndarray:
  """A float per layer from a number, a 1-sequence (broadcast) or a sequence of length ``n``."""
  if isinstance(value, (int, float)):
    value = (value,)
  v = np.asarray(tuple(value), np.float32)
  if v.shape == (1,):
    v = np.full((n,), v[0], np.float32)
  if v.shape != (n,):
    raise ValueError(f"config.clnp.{what}={tuple(value)} needs {n} entries (or one)")
  return v


def grid_points(config) -> list[tuple[float, float]]:
  """The (L1 scale, learning rate) grid of graceful forgetting, in config order."""
  cc = config.clnp
  scales = tuple(cc.grid_l1_scale) or (1.0,)
  lrs = tuple(cc.grid_lr) or (float(config.learning_rate),)
  return [(float(s), float(lr)) for s, lr in itertools.product(scales, lrs)]


def check_setting(config, ctx: base.Context) -> None:
  """Refuses a model, stream or normalisation with which CLNP could not forget nothing."""
  if config.model not in CHAIN_MODELS:
    raise ValueError(f"CLNP needs a chain network (one of {CHAIN_MODELS}); config.model="
                     f"{config.model!r} has residual connections or is unknown")
  if ctx.stream.incremental != "task":
    raise ValueError("CLNP needs the task id at test time (config.incremental='task'); use "
                     "config.multi_head=False for the paper's single-head setting")
  norm = getattr(ctx.model, "norm", "none")
  if norm not in ("none", "task_batch", "batch_stats_only"):
    raise ValueError(f"CLNP with norm={norm!r} would change earlier tasks' outputs (shared "
                     "running statistics); use norm='task_batch' or 'none'")


@dataclasses.dataclass(frozen=True)
class Settings:
  """``config.clnp`` read for a network of ``L`` hidden layers (see ``configs/clnp.py``).

  Attributes:
    l1: ``[L + 1]`` L1 coefficients of the training phase (hidden layers, then the output layer).
    finetune_l1: ``[L + 1]`` the same for fine-tuning.
    theta_scale: ``[L]`` per-layer multipliers of the thresholds.
    theta_grid: ``[K]`` ascending threshold values.
    margin: accepted loss of validation accuracy (graceful forgetting's ``m``).
    theta_search: ``'shared'`` or ``'per_layer'`` (:func:`search_thresholds`).
    grid: ``(L1 scale, learning rate)`` candidates (:func:`grid_points`).
    epochs: training epochs of every candidate.
    finetune_epochs: fine-tuning epochs after pruning (0: none).
    finetune_lr: fine-tuning learning rate.
  """
  l1: np.ndarray
  finetune_l1: np.ndarray
  theta_scale: np.ndarray
  theta_grid: np.ndarray
  margin: float
  theta_search: str
  grid: list
  epochs: int
  finetune_epochs: int
  finetune_lr: float


def read_settings(config, num_layers: int) -> Settings:
  """Checks and reads ``config.clnp`` for ``num_layers`` hidden layers."""
  cc = config.clnp
  L = num_layers
  l1 = _per_layer(cc.l1, L + 1, "l1")
  ft_l1 = _per_layer(cc.finetune_l1, L + 1, "finetune_l1")
  theta_scale = _per_layer(cc.theta_scale, L, "theta_scale")
  theta_grid = np.asarray(tuple(cc.theta_grid), np.float32)  # ascending: configs/clnp.py
  margin = float(cc.margin)
  return Settings(l1=l1, finetune_l1=ft_l1, theta_scale=theta_scale, theta_grid=theta_grid,
                  margin=margin, theta_search=str(cc.theta_search), grid=grid_points(config),
                  epochs=int(config.epochs), finetune_epochs=int(cc.finetune_epochs),
                  finetune_lr=float(cc.finetune_lr))


# --------------------------------------------------------------------------------------------------
# The method's state and its view of the network.


def init_state(layout: Layout, l1: np.ndarray, num_tasks: int, num_grid: int) -> dict:
  """Every unit free, phase TRAIN, and the per-task records of the selection (all empty)."""
  L, T, G = len(layout.names), num_tasks, num_grid
  return {
      "owner": {n: jnp.zeros((u,), jnp.int32) for n, u in zip(layout.names, layout.units)},
      "phase": jnp.asarray(TRAIN, jnp.int32),
      "l1": jnp.asarray(l1),
      "theta": jnp.zeros((T, L), jnp.float32),  # chosen per-layer thresholds
      "reused": jnp.zeros((T, L), jnp.int32),  # earlier units each task uses
      # Per task and grid point: validation accuracy unpruned and pruned (-1: not searched),
      # active units after pruning (-1: not searched), its thresholds.
      "grid_val": jnp.zeros((T, G, 2), jnp.float32),
      "grid_units": jnp.zeros((T, G), jnp.int32),
      "grid_theta": jnp.zeros((T, G, L), jnp.float32),
      "choice": jnp.full((T, 2), -1, jnp.int32),  # (grid point, 1 if within the margin)
  }


def view_params(layout: Layout, params, mstate, task, current):
  """``forward_params``: the params masked to what task ``task`` computes with (:func:`view_masks`);
  the current task before pruning also sees the free units."""
  training = (jnp.asarray(task, jnp.int32) == jnp.asarray(current, jnp.int32)) & (
      mstate["phase"] == TRAIN)
  return masks.apply(params, view_masks(layout, mstate["owner"], params, task, training))


def frozen_tx_args(layout: Layout, params_like, mstate, task) -> dict:
  """``tx_args``: everything but :func:`trainable_masks` is frozen."""
  return base.frozen_args(trainable_masks(layout, mstate["owner"], params_like, task,
                                          mstate["phase"]))


def l1_layers(layout: Layout) -> dict:
  """``{kernel path: index into the per-layer L1 coefficients}`` (hidden kernels, then the head)."""
  L = len(layout.names)
  return {p: (r[1] if r[0] == "kernel" else L) for p, r in layout.roles.items()
          if r[0] in ("kernel", "head_kernel")}


def l1_penalty(layout: Layout, l1_index: dict, params, mstate, task):
  """``penalty``: per-layer L1 on the weights the task trains (Sec. 2.2), coefficients
  ``mstate['l1']``."""
  tr = trainable_masks(layout, mstate["owner"], params, task, mstate["phase"])
  total = jnp.zeros((), jnp.float32)
  for path, p, t in zip(masks.paths(params), jax.tree.leaves(params), jax.tree.leaves(tr)):
    if path in l1_index:
      total = total + mstate["l1"][l1_index[path]] * jnp.sum(jnp.where(t, jnp.abs(p), 0.0))
  return total


# --------------------------------------------------------------------------------------------------
# The phases of a task (each jitted one maps a train state to a train state).


def begin_task(state, t, *, model, key, input_shape, layout: Layout):
  """Step 1: free weights re-drawn (key folded with ``t``), interference zeroed, phase TRAIN."""
  m = dict(state.method)
  fresh = model.init(jax.random.fold_in(key, t), jnp.zeros(input_shape, jnp.float32), task=0,
                     train=False)["params"]
  params = begin_params(layout, m["owner"], state.params, fresh, t)
  m["phase"] = jnp.asarray(TRAIN, jnp.int32)
  return state._replace(params=params, method=m)


def set_l1(state, coeffs):
  """The per-layer L1 coefficients the penalty uses from now on."""
  m = dict(state.method)
  m["l1"] = coeffs
  return state._replace(method=m)


def pruned_view(names: Sequence[str], state, means, theta_vec, t):
  """A candidate pruned at ``theta_vec`` (owners assigned, phase PRUNED; params untouched)."""
  m = dict(state.method)
  m["owner"] = activate(m["owner"], means, {n: theta_vec[i] for i, n in enumerate(names)}, t)
  m["phase"] = jnp.asarray(PRUNED, jnp.int32)
  return state._replace(method=m)


def commit(layout: Layout, state, means, theta_vec, t, records):
  """Step 5: prunes at ``theta_vec``: free units with mean activation above their layer's
  threshold become task ``t``'s (frozen from now on), interference weights are set to exactly 0.0,
  and the thresholds and ``records`` (``{method state field: row t}``) are stored."""
  state = pruned_view(layout.names, state, means, theta_vec, t)
  m = dict(state.method)
  zero = interference_masks(layout, m["owner"], state.params, t)
  params = jax.tree.map(lambda p, z: jnp.where(z, jnp.zeros_like(p), p), state.params, zero)
  m["theta"] = m["theta"].at[t].set(theta_vec)
  for name, value in records.items():
    m[name] = m[name].at[t].set(value)
  return state._replace(params=params, method=m)


def record_reuse(layout: Layout, state, means, t):
  """Step 6: how many earlier units task ``t`` reuses (active on its data, in its view)."""
  m = dict(state.method)
  theta = m["theta"][t]
  counts = []
  for i, n in enumerate(layout.names):
    o = m["owner"][n]
    used = (o >= 1) & (o <= t) & (means[n] > theta[i])
    if i == len(layout.names) - 1 and not layout.multi_head:
      used = jnp.zeros_like(used)  # a single head masks other tasks' final units
    counts.append(jnp.sum(used, dtype=jnp.int32))
  m["reused"] = m["reused"].at[t].set(jnp.stack(counts))
  return state._replace(method=m)


class Steps(NamedTuple):
  """The jitted state maps of a task (see :func:`jit_steps`)."""
  begin: Callable  # (state, t) -> state
  set_l1: Callable  # (state, coeffs) -> state
  pruned_view: Callable  # (state, means, theta_vec, t) -> state
  commit: Callable  # (state, means, theta_vec, t, records) -> state
  record_reuse: Callable  # (state, means, t) -> state
  unit_means: Callable  # (params, batch_stats, mstate, data, task) -> {layer: [units]}


def jit_steps(layout: Layout, model, key, input_shape, unit_means) -> Steps:
  """Jits the phases above for one network (their static arguments bound)."""
  return Steps(
      begin=jax.jit(functools.partial(begin_task, model=model, key=key, input_shape=input_shape,
                                      layout=layout)),
      set_l1=jax.jit(set_l1),
      pruned_view=jax.jit(functools.partial(pruned_view, layout.names)),
      commit=jax.jit(functools.partial(commit, layout)),
      record_reuse=jax.jit(functools.partial(record_reuse, layout)),
      unit_means=unit_means)


def task_unit_means(steps: Steps, trainer, state, t):
  """``E_S(N_l)``: every unit's mean activation over task ``t``'s training data, in its view."""
  return steps.unit_means(state.params, state.batch_stats, state.method,
                          trainer.task_data(t, "train"), jnp.int32(t))


def train_candidates(trainer, state, t: int, *, steps: Steps, settings: Settings):
  """Step 2 (and 3's statistics): one candidate per grid point, all from the same start.

  Returns:
    ``(candidates, unpruned)``: ``[(state, unit means)]`` per grid point and ``[G]`` their
    validation accuracies before pruning. ``state`` itself becomes the last candidate.
  """
  grid = settings.grid
  G = len(grid)
  cands = []
  unpruned = np.zeros((G,))
  for g, (scale, lr) in enumerate(grid):
    s = state if g == G - 1 else jax.tree.map(jnp.copy, state)
    coeffs = jnp.asarray(settings.l1 * np.float32(scale))
    s = trainer.apply(s, lambda s, c=coeffs: steps.set_l1(s, c))
    s = trainer.train(s, t, epochs=settings.epochs, lr=lr, phase=f"train {g + 1}/{G}")
    unpruned[g] = trainer.evaluate(s, t, split="val")
    cands.append((s, task_unit_means(steps, trainer, s, t)))
  return cands, unpruned


def count_units(owner: dict, means: dict, theta_vec, names: Sequence[str]) -> int:
  """Active units after pruning at ``theta_vec``: the owned ones plus the free ones whose mean
  activation exceeds their layer's threshold (NumPy)."""
  old = sum(int(np.sum(v > 0)) for v in owner.values())
  return old + sum(int(np.sum((owner[n] == 0) & (means[n] > theta_vec[i])))
                   for i, n in enumerate(names))


class Choice(NamedTuple):
  """Graceful forgetting's outcome for one task (``G`` grid points, ``L`` hidden layers)."""
  index: int  # the chosen grid point
  thetas: np.ndarray  # [G, L] float32 thresholds of every candidate (the chosen one's adjusted)
  unpruned: np.ndarray  # [G] validation accuracy before pruning
  pruned: np.ndarray  # [G] after pruning at its thresholds (-1: not searched)
  units: np.ndarray  # [G] active units after pruning (-1: not searched)
  eligible: np.ndarray  # [G] bool: pruned accuracy within the margin of the best unpruned one


def graceful_forgetting(accuracy, unpruned, means, owner: dict, *, names: Sequence[str],
                        settings: Settings, prev_theta, task: int) -> Choice:
  """Steps 3-4: per candidate the highest thresholds within the margin, then the sparsest.

  Args:
    accuracy: ``accuracy(g, theta_vec) -> float``, validation accuracy of candidate ``g`` pruned
      at the per-layer thresholds ``theta_vec``.
    unpruned: ``[G]`` validation accuracy of every candidate before pruning.
    means: per candidate ``{layer: [units]}`` mean activations on the task's training data.
    owner: ``{layer: int [units]}`` owners before the task (0 = free).
    names: the hidden layers, forward order.
    settings: thresholds (``theta_grid * theta_scale``), ``margin`` and ``theta_search``.
    prev_theta: ``[L]`` the previous task's thresholds (kept by layers without free units).
    task: the loop's task index (for the reuse diagnostic and the log).

  Returns:
    A :class:`Choice`. Candidates below ``best unpruned - margin`` are not searched. A layer
    without free units keeps ``prev_theta`` (tasks after the first); if no candidate stays within
    the margin, the best unpruned one is kept at the lowest thresholds.
  """
  G, L = len(unpruned), len(names)
  unpruned = np.asarray(unpruned)
  owner = {n: np.asarray(v) for n, v in owner.items()}
  movable = np.asarray([bool(np.any(owner[n] == 0)) for n in names])
  floor = float(unpruned.max()) - settings.margin - 1e-9
  pruned = np.full((G,), -1.0)
  units = np.full((G,), -1, np.int64)
  thetas = np.zeros((G, L), np.float32)
  eligible = np.zeros((G,), bool)
  for g in range(G):
    if unpruned[g] < floor:
      continue
    means_np = {n: np.asarray(v) for n, v in means[g].items()}

    def evaluate(theta_vec, g=g, means_np=means_np):
      return accuracy(g, theta_vec), count_units(owner, means_np, theta_vec, names)

    thetas[g], pruned[g], units[g], eligible[g] = search_thresholds(
        evaluate, settings.theta_grid, settings.theta_scale, floor, mode=settings.theta_search,
        movable=movable)
  g = select(unpruned, pruned, units, eligible)
  if task > 0:  # a layer without free units keeps its last threshold (for the reuse diagnostic)
    thetas[g] = np.where(movable, thetas[g], prev_theta)
  if not eligible[g]:
    logging.warning("CLNP task %d: no candidate stays within margin %g of the best validation "
                    "accuracy %.4f after pruning; keeping the best one at the lowest thresholds",
                    task + 1, settings.margin, unpruned.max())
    thetas[g] = np.where(movable, settings.theta_grid[0] * settings.theta_scale, thetas[g])
  return Choice(index=g, thetas=thetas, unpruned=unpruned, pruned=pruned, units=units,
                eligible=eligible)


def choice_records(choice: Choice) -> dict:
  """The method state's per-task rows that record ``choice`` (written by :func:`commit`)."""
  g = choice.index
  return {"grid_val": jnp.asarray(np.stack([choice.unpruned, choice.pruned], 1), jnp.float32),
          "grid_units": jnp.asarray(choice.units, jnp.int32),
          "grid_theta": jnp.asarray(choice.thetas),
          "choice": jnp.asarray([g, int(choice.eligible[g])], jnp.int32)}


def finetune(trainer, state, t: int, *, steps: Steps, settings: Settings):
  """Step 5's optional fine-tuning of the task's own weights (with the fine-tuning L1)."""
  if not settings.finetune_epochs:
    return state
  state = trainer.apply(state, lambda s: steps.set_l1(s, jnp.asarray(settings.finetune_l1)))
  return trainer.train(state, t, epochs=settings.finetune_epochs, lr=settings.finetune_lr,
                       phase="finetune")


def run_task(trainer, state, t: int, *, layout: Layout, steps: Steps, settings: Settings):
  """One task of Alg. 1 with graceful forgetting (steps 1-6 of the module docstring)."""
  tt = jnp.int32(t)
  state = trainer.apply(state, lambda s: steps.begin(s, tt))
  owner = {n: np.asarray(v) for n, v in state.method["owner"].items()}
  prev_theta = np.asarray(state.method["theta"])[max(t - 1, 0)]
  cands, unpruned = train_candidates(trainer, state, t, steps=steps, settings=settings)
  del state

  def accuracy(g, theta_vec):
    s, means = cands[g]
    return trainer.evaluate(steps.pruned_view(s, means, jnp.asarray(theta_vec), tt), t,
                            split="val")

  choice = graceful_forgetting(accuracy, unpruned, [means for _, means in cands], owner,
                               names=layout.names, settings=settings, prev_theta=prev_theta,
                               task=t)
  g = choice.index
  logging.info("CLNP task %d: grid point %s (l1 scale, lr), thresholds %s: val %.4f -> %.4f, "
               "%d active units", t + 1, settings.grid[g], choice.thetas[g], unpruned[g],
               choice.pruned[g], choice.units[g])
  records = choice_records(choice)
  chosen, means = cands[g]
  cands.clear()  # the other candidates' states are no longer needed
  state = trainer.apply(chosen, lambda s: steps.commit(s, means, jnp.asarray(choice.thetas[g]),
                                                       tt, records))
  del chosen
  state = finetune(trainer, state, t, steps=steps, settings=settings)
  final_means = task_unit_means(steps, trainer, state, t)
  return trainer.apply(state, lambda s: steps.record_reuse(s, final_means, tt))


# --------------------------------------------------------------------------------------------------
# Report.


def report(ctx, state, *, num_tasks: int, layout: Layout, settings: Settings) -> dict:
  """Ownership fields, per-layer neuron usage (Fig. 3, 4b, 5b) and every task's selection."""
  names, T, grid = layout.names, num_tasks, settings.grid
  m = jax.device_get(state.method)
  params = jax.device_get(state.params)
  own = jax.device_get(weight_owner(layout, state.method["owner"], params))
  out = base.ownership_report(ctx, own)
  neurons = {}
  for i, n in enumerate(names):
    o = np.asarray(m["owner"][n])
    u = int(o.size)
    new = [int(np.sum(o == j + 1)) for j in range(T)]
    used = [int(np.sum((o >= 1) & (o <= j + 1))) for j in range(T)]
    reused = [int(x) for x in np.asarray(m["reused"])[:, i]]
    neurons[n] = {
        "units": u,
        "used_fraction_after_task": [x / u for x in used],
        "new_per_task": new,
        "reused_per_task": reused,
        "task_fraction": [(new[j] + reused[j]) / u for j in range(T)],
        "free_after_last_task": (u - used[-1]) / u,
    }
  selection = []
  for j in range(T):
    g, within = (int(x) for x in np.asarray(m["choice"][j]))
    if g < 0:
      selection.append(None)
      continue
    gv = np.asarray(m["grid_val"][j])
    selection.append({
        "grid_point": g, "l1_scale": grid[g][0], "learning_rate": grid[g][1],
        "theta_per_layer": [float(x) for x in np.asarray(m["theta"][j])],
        "val_unpruned": float(gv[g, 0]), "val_pruned": float(gv[g, 1]),
        "best_val_unpruned": float(gv[:, 0].max()), "within_margin": bool(within),
        "active_units": int(np.asarray(m["grid_units"][j])[g]),
    })
  out["neurons_per_layer"] = neurons
  out["clnp"] = {
      "layers": list(names), "multi_head": layout.multi_head, "margin": settings.margin,
      "grid": [list(p) for p in grid], "theta_grid": [float(x) for x in settings.theta_grid],
      "theta_search": settings.theta_search, "selection": selection,
      "grid_val": np.asarray(m["grid_val"]).tolist(),
      "grid_units": np.asarray(m["grid_units"]).tolist(),
      "grid_theta": np.asarray(m["grid_theta"]).tolist(),
  }
  return out


# --------------------------------------------------------------------------------------------------
# The method.


def make(config, ctx: base.Context) -> base.Method:
  """CLNP with the ``config.clnp`` fields described in ``configs/clnp.py``."""
  check_setting(config, ctx)
  input_shape = (1,) + tuple(ctx.stream.input_shape)
  layout = make_layout(ctx.model, ctx.params, input_shape, ctx.task_rows)
  settings = read_settings(config, len(layout.names))
  l1_index = l1_layers(layout)
  params_like, num_tasks = ctx.params, ctx.num_tasks

  def forward_params(params, aux, m, task, current):
    del aux
    return view_params(layout, params, m, task, current)

  unit_means = make_unit_means(ctx.model, ctx.stream.normalize, layout, forward_params,
                               batch_size=int(config.eval_batch_size),
                               has_batch_stats="batch_stats" in ctx.variables)
  steps = jit_steps(layout, ctx.model, jax.random.wrap_key_data(ctx.key), input_shape,
                    unit_means)
  return base.Method(
      name="clnp",
      run_task=functools.partial(run_task, layout=layout, steps=steps, settings=settings),
      init_state=lambda _: init_state(layout, settings.l1, num_tasks, len(settings.grid)),
      forward_params=forward_params,
      wrap_tx=base.freezing_tx,
      tx_args=lambda m, task: frozen_tx_args(layout, params_like, m, task),
      penalty=lambda params, aux, m, task: l1_penalty(layout, l1_index, params, m, task),
      report=functools.partial(report, num_tasks=num_tasks, layout=layout, settings=settings),
      resumable_within_task=False)


def layout_of(ctx: base.Context) -> Layout:
  """The :class:`Layout` of a context's model (for tests and diagnostics)."""
  return make_layout(ctx.model, ctx.params, (1,) + tuple(ctx.stream.input_shape), ctx.task_rows)
