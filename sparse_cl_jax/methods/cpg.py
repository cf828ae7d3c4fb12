"""CPG — Compacting, Picking and Growing (Hung et al., NeurIPS 2019) — and PAE.

Registry names ``'cpg'`` and ``'pae'`` both build from this module (``config.method`` decides);
both read their settings from ``config.cpg`` (:func:`default_config`).

Per task t (owner ``t + 1``, task-IL, one head and one BatchNorm row per task), Algorithm 1 of the
paper, one function per step, called in order by :func:`run_task`:

1. **Accuracy goal** (:func:`accuracy_goal`, ``cpg.goal``), always on *validation* data; met when
   ``val >= goal - cpg.goal_tolerance`` (:func:`meets_goal`).
2. **Picking + training** (:func:`pick`): a binarised real-valued mask over the (frozen) weights
   of earlier tasks, trained with the free weights, the task's head and norm row. PAE: no mask.
3. **Growing** (:func:`grow`, looped by :func:`pick_and_grow`): while the goal is missed and a
   level is left, the task restarts from its starting point with one more growth level allocated.
4. **Compacting** (:func:`compact`): gradual magnitude pruning of the task's weights in stages
   (:func:`prune_stage`), keeping the largest sparsity that still meets the goal.
5. **Retraining** (:func:`retrain`): the kept weights and a fresh picking mask, if it helps.
6. :func:`finish_task`: the kept weights become owned by the task and frozen; pruned ones are zero
   and free for later tasks; the task's binary picks are stored bit-packed.

The steps are Python orchestration of the trainer's recorded operations; what they do to the
state are jitted functions of the state (:func:`start_task`, :func:`allocate_level`,
:func:`prune_to`, ...), compiled once per run for its :class:`Layout`.

Growth without reshaping or recompiling: the model is built once at the *maximum* width
(``config.width_multiplier``; ``configs/cpg.py`` sets ``sqrt(1.5)``, ``pae`` ``sqrt(2)``);
:func:`allocation_levels` gives every parameter position the smallest growth level whose network
contains it (``alloc``, int8, data in the method state) and ``level[T]`` the level each task was
trained at. Every view masks positions above the viewing task's level to zero, so growing only
enlarges the allocated region: no new arrays, no retrace. Reported expansion, redundancy and
stored bytes count the allocated region only.

Zero forgetting: the view of a finished task j uses weights owned by tasks 1..j+1 (old ones times
task j's stored picks), its own head and norm row, at its own level; none of these change later
(freezing is ``transforms.freeze`` with the frozen mask as data), so its outputs are
bit-identical after any later picking, growth or compaction (BWT exactly 0). Control flow (retry
after growth, keep the best stage) branches on evaluated accuracies and keeps snapshots in
Python, so ``resumable_within_task=False``: an interrupted task is replayed from its start.

Example::

  python experiments/main.py --config=configs/cpg.py:fashion_mnist --workdir=/tmp/cpg
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import fields
from sparse_cl_jax import masks
from sparse_cl_jax import metrics
from sparse_cl_jax import runtime
from sparse_cl_jax import schedules
from sparse_cl_jax import topk
from sparse_cl_jax import transforms
from sparse_cl_jax import types
from sparse_cl_jax.methods import base
from sparse_cl_jax.methods import piggyback

DEFAULT_NORM = "task_batch"
FORGETS_NOTHING = True
GOALS = ("individual", "fine_avg", "fine_max", "current_finetune", "fixed")
STATS = ("goal", "val_trained", "sparsity", "val_compacted", "val_final", "attempts", "retrained")


def default_config(method: str = "cpg") -> ml_collections.ConfigDict:
  """``config.cpg`` with the as-coded CIFAR-100 settings (epochs come from the config); the
  as-coded options that default to off are on in ``configs/cpg.py:cifar100``. Each field is
  declared with its rule (:mod:`sparse_cl_jax.fields`)."""
  f = fields.field
  Number, Int, Flag = fields.Number, fields.Int, fields.Flag  # pylint: disable=invalid-name
  lr = Number(0, lo_open=True)
  c = fields.Group()
  c.picking = f(method == "cpg", Flag())
  # Growth: parameter multipliers of the allocated network, from the one a task starts at (channels
  # grow by the square root when growth_counts == 'params', as coded).
  c.levels = f((1.0, 1.5) if method == "cpg" else (1.0, 1.5, 2.0),
               fields.Seq(Number(0, lo_open=True), min_len=1, increasing=True, first=1.0))
  c.growth_counts = f("params", fields.Choice(("params", "channels")))
  c.mask_init = f(1e-2, Number())  # picking: a Piggyback mask over old weights
  c.mask_threshold = f(5e-3, Number())
  c.mask_lr = f(5e-4, lr)
  # (fraction of epochs, factor), cumulative
  c.mask_lr_schedule = f(((0.5, 0.2), (0.7, 0.0)),
                         fields.Seq(fields.Seq(items=(Number(0, 1), Number(0)))))
  # Accuracy goal (always on validation data).
  c.goal = f("individual", fields.Choice(GOALS, hint=(
      "'finetune' was renamed: 'current_finetune' is one fine-tune of the current network; the "
      "paper's goals are 'fine_avg' and 'fine_max'")))
  # for 'fixed': one value for all tasks or one per task
  c.goal_values = f((), fields.Seq(Number(0), lengths=(0, 1, fields.Ref("num_tasks", top=True))),
                    fields.Seq(min_len=1, when=fields.when("goal", "fixed"),
                               hint="give the accuracy goal of every task, or one for all"))
  c.goal_epochs = f(0, Int(0))  # reference training epochs; 0 = config.epochs
  # 'fine_avg' / 'fine_max': independent fine-tuning sequences (paper: 5)
  c.goal_repeats = f(5, Int(1))
  c.goal_finetune_lr = f(0.0, Number(0))  # their lr after the first task; 0 = learning_rate
  c.goal_tolerance = f(0.0, Number(0, 1))  # as coded allow_acc_loss
  c.min_train_acc = f(0.0, Number(0, 1))  # as coded 0.95 (a stage / a width counts only above it)
  # Weight decay of the current task's maskable (conv / FC) weights only, as coded 4e-5 (the
  # authors' do_weight_decay_and_make_grads_zero: added to the gradient before the optimiser);
  # config.weight_decay would also decay heads, norm rows and biases.
  c.weight_decay = f(0.0, Number(0))
  c.per_task_biases = f(False, Flag())  # as coded True: every task has its own layer biases
  # As coded True: a task's BN row (affine and running statistics) starts from the previous
  # task's, as the authors' scripts load the previous task's checkpoint.
  c.norm_from_previous = f(False, Flag())
  # Compaction: sparsities of the stages, each above the last.
  c.stages = f((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
               fields.Seq(Number(0, 1, lo_open=True, hi_open=True), increasing=True))
  c.stage_epochs = f(20, Int(1))
  c.ramp_epochs = f(4.0, Number(0))
  c.prune_every = f(10, Int(1))  # batches between mask updates
  c.prune_lr = f(1e-3, lr)
  c.stop_at_first_miss = f(True, Flag())  # paper; False = as coded (every stage, keep the best)
  c.reserve_for_remaining = f(True, Flag())  # as coded: prune even if the max width misses
  # Retraining after compaction (tasks after the first, as coded).
  c.retrain_epochs = f(30, Int(0))
  c.retrain_lr = f(1e-3, lr)
  c.retrain_mask_lr = f(1e-4, lr)
  c.retrain_patience = f(5, Int(0))  # 0 = no early stop
  c.retrain_reinit_mask = f(True, Flag())
  c.retrain_first_task = f(False, Flag())
  return c


def channel_multipliers(levels, counts: str = "params") -> list[float]:
  """Channel-width multipliers of the growth levels (``sqrt`` of parameter multipliers)."""
  levels = [float(x) for x in levels]
  if not levels or any(x <= 0 for x in levels) or sorted(set(levels)) != levels:
    raise ValueError(f"config.cpg.levels={tuple(levels)} must be positive and increasing")
  if counts not in ("params", "channels"):
    raise ValueError(f"config.cpg.growth_counts={counts!r}: choose 'params' or 'channels'")
  return [math.sqrt(x) if counts == "params" else x for x in levels]


def allocation_levels(model, variables: dict, input_shape, multipliers,
                      rows: types.LeafSpec) -> types.Params:
  """For every param position, the first growth level whose network contains it (int8 tree).

  ``model`` is the maximum-width network and ``variables`` its initial variables (running
  statistics as initialised: mean 0, variance 1); level ``l`` is the same network with
  ``width_multiplier = multipliers[l]``. A position belongs to level ``l`` when it connects live
  units of the narrower network: the units beyond the narrower network's widths (the last axis of
  every kernel / bias / norm leaf, a prefix) are zeroed in a positive probe of the wide network,
  and the positions with a nonzero gradient of the summed logits are the live ones (inputs of a
  flattened conv feature map are found the same way). Rows of per-task leaves share row 0's
  pattern. Positions alive at no level get ``len(multipliers)``.

  Raises:
    ValueError: if the levels are not nested (a narrower network not contained in a wider one).
  """
  x = jnp.ones((1,) + tuple(input_shape), jnp.float32)
  key = jax.random.key(0)
  params = variables["params"]
  extra = {c: v for c, v in variables.items() if c not in ("params", "intermediates")}
  n_levels = len(multipliers)

  def fan(p, r):
    shape = tuple(p.shape[1:]) if r else tuple(p.shape)
    return float(np.prod(shape[:-1])) if len(shape) >= 2 else 1.0

  @jax.jit
  def probe_grads(probe):
    # Liveness is read off exact zeros of this gradient: take it through the stock lax/Flax ops,
    # whose max-pool gives a tied window's gradient to one element (the fast CPU ops of
    # runtime.py split it, and their zero pattern can depend on XLA's optimisation level).
    with runtime.use_fast_ops(False):
      return jax.grad(lambda q: jnp.sum(model.apply({"params": q, **extra}, x, task=0,
                                                    train=False)))(probe)

  level = jax.tree.map(lambda p: np.full(np.shape(p), n_levels, np.int8), params)
  for lv in reversed(range(n_levels)):
    narrow = model.clone(width_multiplier=float(multipliers[lv]))
    shapes = jax.eval_shape(lambda k, n=narrow: n.init(k, x, task=0, train=False), key)["params"]
    if jax.tree.structure(shapes) != jax.tree.structure(params):
      raise ValueError("the narrow network's params do not mirror the wide one's")

    def alive_last(p, s, lv=lv):
      shape = np.shape(p)
      if not shape:
        return np.ones((), bool)
      if len(s.shape) != len(shape) or s.shape[-1] > shape[-1]:
        raise ValueError(f"growth level {lv} is wider than the model ({s.shape} vs {shape}); "
                         "config.width_multiplier must be the maximum width")
      return np.broadcast_to(np.arange(shape[-1]) < s.shape[-1], shape)

    alive = jax.tree.map(alive_last, params, shapes)
    probe = jax.tree.map(
        lambda p, a, r: jnp.where(jnp.asarray(a), 1.0 / fan(p, r), 0.0).astype(p.dtype),
        params, alive, rows)
    grads = jax.device_get(probe_grads(probe))

    def decide(g, a, r):
      nz = np.asarray(g) != 0
      if r and nz.ndim:
        nz = np.broadcast_to(nz[:1], nz.shape)
      return nz & a

    allocated = jax.tree.map(decide, grads, alive, rows)
    for al, old in zip(jax.tree.leaves(allocated), jax.tree.leaves(level)):
      if lv + 1 < n_levels and np.any(al & (old > lv + 1)):
        raise ValueError("growth levels are not nested")
    level = jax.tree.map(lambda old, al, lv=lv: np.where(al, lv, old).astype(np.int8), level,
                         allocated)
  return level


def view(params: types.Params, pick, m, task, current, *, spec: types.LeafSpec,
         rows: types.LeafSpec, picking: bool, threshold: float,
         bias_leaves: types.LeafSpec | None = None) -> types.Params:
  """The params task ``task`` computes with after ``current`` was trained (traced ints).

  ``m`` holds ``own`` (ownership), ``alloc`` (:func:`allocation_levels`), ``level`` ([T]) and,
  with picking, ``bits`` (stored picks). With ``k = task + 1`` and the task's level ``lv``:

  * positions above ``lv`` (not allocated for the task) are 0, on every leaf;
  * weights owned by earlier tasks (``1 <= own < k``) enter as ``w * pick``: the live
    straight-through mask for the task being trained, the stored bits for finished tasks, 1 for
    tasks not trained yet and without picking (PAE);
  * the task's own weights (``own == k``) enter as they are, and so do free allocated weights
    while the task is the one being trained (released ones hold exact zeros);
  * everything else (free weights of a finished task, later tasks' weights) is 0.
  Per-task leaves (heads, norm rows) are only masked by the allocation, and so are the leaves of
  ``bias_leaves`` (per-task biases, as coded): a finished task reads its own copy from
  ``m['bias_bank']`` (``[T, ...]`` per such leaf), the others the live values.
  """
  task = jnp.asarray(task, jnp.int32)
  current = jnp.asarray(current, jnp.int32)
  k = task + 1
  cur = task == current
  future = task > current
  lv = m["level"][jnp.minimum(task, current)].astype(jnp.int8)
  stored = piggyback.get_bits(m["bits"], task, spec) if picking else None

  def one(p, o, a, s, r, bl, bank, *extra):
    allocated = a <= lv
    zero = jnp.zeros_like(p)
    if r:
      return jnp.where(allocated, p, zero)
    if bl:
      finished = task < current
      return jnp.where(allocated, jnp.where(finished, bank[jnp.minimum(task, T - 1)], p), zero)
    older = (o >= 1) & (o < k)
    usable = (o == k) | (cur & (o == 0) & allocated)
    old_val = p
    if picking and s:
      live_mask, bits = extra
      live = transforms.binarize_ste(live_mask, threshold).astype(p.dtype)
      mk = jnp.where(future, jnp.ones_like(p), jnp.where(cur, live, bits.astype(p.dtype)))
      old_val = p * mk
    return jnp.where(older, old_val, jnp.where(usable, p, zero))

  T = m["level"].shape[0]
  if bias_leaves is None:
    bias_leaves = jax.tree.map(lambda _: False, spec)
  bank = m.get("bias_bank")
  if bank is None:
    bank = jax.tree.map(lambda _: jnp.zeros((1,), jnp.float32), spec)
  trees = [params, m["own"], m["alloc"], spec, rows, bias_leaves, bank]
  if picking:
    trees += [pick, stored]
  return jax.tree.map(one, *trees)


@jax.jit
def _copy(tree):
  """A copy in fresh buffers (one compiled call), safe to keep while the original is donated."""
  return jax.tree.map(jnp.copy, tree)


def _stats_allocation(batch_stats, alloc, params):
  """The allocation level of every running statistic: that of its norm layer's ``scale``.

  ``mean`` / ``var`` of a norm module get the ``alloc`` of the module's ``scale`` (same shape:
  ``[T, C]`` for per-task BatchNorm); statistics without such a sibling get level 0.
  """
  scale_alloc = {path.rsplit("/", 1)[0]: a
                 for path, a in zip(masks.paths(params), jax.tree.leaves(alloc))
                 if path.endswith("/scale")}

  def one(path, leaf):
    a = scale_alloc.get(path.rsplit("/", 1)[0])
    if a is not None and np.shape(a) == np.shape(leaf):
      return np.asarray(a, np.int8)
    return np.zeros(np.shape(leaf), np.int8)

  return masks.map_with_path(one, batch_stats)


def _per_task_goal(values, t: int) -> float:
  values = tuple(float(v) for v in values)
  if not values:
    raise ValueError("config.cpg.goal='fixed' needs config.cpg.goal_values (one or one per task)")
  return values[t] if len(values) > 1 else values[0]


# --------------------------------------------------------------------------------------------------
# The method's state and the functions over it (pure, jitted once per run for its Layout).


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """What the jitted state functions are compiled for (Python values and bool trees)."""
  spec: types.LeafSpec  # maskable leaves
  rows: types.LeafSpec  # per-task leaves (heads, norm rows)
  bias_leaves: types.LeafSpec  # shared biases kept per task (all False without per_task_biases)
  norm_rows: types.LeafSpec  # per-task norm affine leaves
  num_tasks: int
  picking: bool
  threshold: float
  mask_init: float
  per_task_biases: bool
  norm_from_previous: bool
  per_task_stats: bool  # per-task BatchNorm running statistics
  goal_repeats: int
  fine_goal: bool


def make_layout(ctx: base.Context, cc, *, picking: bool, goal_repeats: int) -> Layout:
  """The :class:`Layout` of a run from its context and ``config.cpg``."""
  spec, rows = ctx.spec, ctx.task_rows
  per_task_biases = bool(cc.get("per_task_biases", False))
  # Shared leaves that are neither maskable nor per-task rows and end in "bias": kept per task.
  treedef = jax.tree.structure(ctx.params)
  leaf_info = list(zip(masks.paths(ctx.params), jax.tree.leaves(spec), jax.tree.leaves(rows)))
  bias_leaves = jax.tree.unflatten(treedef, [
      per_task_biases and not sp and not rw and path.endswith("bias")
      for path, sp, rw in leaf_info])
  norm_re = re.compile(base.TASK_ROW_PATTERNS[1])
  norm_rows = jax.tree.unflatten(treedef, [bool(rw) and norm_re.search(path) is not None
                                           for path, _, rw in leaf_info])
  return Layout(
      spec=spec, rows=rows, bias_leaves=bias_leaves, norm_rows=norm_rows,
      num_tasks=ctx.num_tasks, picking=picking, threshold=float(cc.mask_threshold),
      mask_init=float(cc.mask_init), per_task_biases=per_task_biases,
      norm_from_previous=bool(cc.get("norm_from_previous", False)),
      per_task_stats=("batch_stats" in ctx.variables
                      and getattr(ctx.model, "norm", "none") == "task_batch"),
      goal_repeats=goal_repeats, fine_goal=cc.goal in ("fine_avg", "fine_max"))


@functools.partial(jax.jit, static_argnames="lay")
def new_state(params, alloc, stats_alloc, *, lay: Layout) -> dict:
  """The method state before task 1: nothing owned, every task at level 0."""
  T = lay.num_tasks
  m = {"own": masks.new_ownership(params),
       "alloc": alloc,
       "stats_alloc": stats_alloc,
       "trainable": masks.zeros(params),
       "level": jnp.zeros((T,), jnp.int32),
       "goals": jnp.zeros((T,), jnp.float32),
       "stats": {k: jnp.zeros((T,), jnp.float32) for k in STATS}}
  if lay.fine_goal:
    m["goal_runs"] = jnp.zeros((lay.goal_repeats, T), jnp.float32)
  if lay.picking:
    m["bits"] = piggyback.new_bits(params, lay.spec, T)
  if lay.per_task_biases:
    m["bias_bank"] = jax.tree.map(
        lambda p, bl: jnp.zeros((T,) + p.shape, p.dtype) if bl else jnp.zeros((1,), p.dtype),
        params, lay.bias_leaves)
  return m


def fresh_pick(params, *, lay: Layout) -> dict:
  """The picking mask at its initial value (``cpg.mask_init``) on every maskable leaf."""
  return {"pick": piggyback.init_real_mask(params, lay.spec, lay.mask_init)}


def trainable_of(params, m, t, *, lay: Layout) -> types.Masks:
  """What task ``t`` trains at its level: free allocated weights, its rows, its biases."""
  lv = m["level"][t].astype(jnp.int8)
  row_t = base.task_slice(params, lay.rows, t)

  def one(o, a, rt, r, bl):
    if r:
      return rt & (a <= lv)
    if bl:  # a per-task bias: the task trains its own copy at every allocated position
      return a <= lv
    return (o == 0) & (a <= lv)

  return jax.tree.map(one, m["own"], m["alloc"], row_t, lay.rows, lay.bias_leaves)


def _from_row(tree, flags, src, dst):
  """Row ``dst`` of the flagged leaves set to their row ``src``."""
  return jax.tree.map(lambda x, f: x.at[dst].set(x[src]) if f else x, tree, flags)


def _fresh_stats_rows(bs, t, where):
  """Running statistics with row ``t`` reset (mean 0, var 1) where ``where`` (a tree) holds."""
  leaves = []
  for path, x, w in zip(masks.paths(bs), jax.tree.leaves(bs), jax.tree.leaves(where)):
    init = jnp.ones_like(x) if path.endswith("var") else jnp.zeros_like(x)
    row = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) == t
    leaves.append(jnp.where(row & w, init, x))
  return jax.tree.unflatten(jax.tree.structure(bs), leaves)


@functools.partial(jax.jit, static_argnames="lay")
def start_task(state, t, *, lay: Layout):
  """Task ``t`` starts at the previous task's level with a fresh picking mask."""
  m = dict(state.method)
  prev_t = jnp.maximum(t - 1, 0)
  m["level"] = m["level"].at[t].set(jnp.where(t > 0, m["level"][prev_t], 0))
  params, bs = state.params, state.batch_stats
  if lay.norm_from_previous:  # as coded: the new task's BN row starts from the previous task's
    src = jnp.where(t > 0, prev_t, t)
    params = _from_row(params, lay.norm_rows, src, t)
    if lay.per_task_stats:
      bs = _from_row(bs, jax.tree.map(lambda _: True, bs), src, t)
  m["trainable"] = trainable_of(params, m, t, lay=lay)
  aux = fresh_pick(params, lay=lay) if lay.picking else state.aux
  return state._replace(params=params, batch_stats=bs, method=m, aux=aux)


@functools.partial(jax.jit, static_argnames="lay")
def allocate_level(state, t, fresh, *, lay: Layout):
  """Allocates the next level; its weights get the never-used values of ``fresh``."""
  m = dict(state.method)
  new = m["level"][t] + 1
  m["level"] = m["level"].at[t].set(new)
  row_t = base.task_slice(state.params, lay.rows, t)
  region = jax.tree.map(lambda a, rt: (a == new.astype(jnp.int8)) & rt, m["alloc"], row_t)
  params = jax.tree.map(lambda p, f, g: jnp.where(g, f, p), state.params, fresh, region)
  bs = state.batch_stats
  if lay.per_task_stats:  # new channels' running statistics of the task's row start afresh
    bs = _fresh_stats_rows(bs, t, jax.tree.map(lambda a: a == new.astype(jnp.int8),
                                               m["stats_alloc"]))
  m["trainable"] = trainable_of(params, m, t, lay=lay)
  return state._replace(params=params, batch_stats=bs, method=m)


@functools.partial(jax.jit, static_argnames="lay")
def reference_start(state, t, finetune, fresh, *, lay: Layout):
  """A throw-away state for the goal's reference model: everything free, base width."""
  m = dict(state.method)
  m["own"] = jax.tree.map(jnp.zeros_like, m["own"])
  m["level"] = m["level"].at[t].set(0)
  row_t = base.task_slice(state.params, lay.rows, t)
  params = jax.tree.map(lambda p, f, rt: jnp.where(rt & ~finetune, f, p), state.params, fresh,
                        row_t)
  # 'individual': every shared weight and the task's rows restart from the network's initial
  # values (as coded, every baseline model is trained from the same seed), and so do the task's
  # running statistics; 'current_finetune' keeps the current weights (released ones are zero)
  # and the task's rows as ``start_task`` left them.
  bs = state.batch_stats
  if lay.per_task_stats:
    bs = _fresh_stats_rows(bs, t, jax.tree.map(lambda _: ~finetune, bs))
  m["trainable"] = trainable_of(params, m, t, lay=lay)
  return state._replace(params=params, batch_stats=bs, method=m)


@functools.partial(jax.jit, static_argnames="lay")
def chain_start(state, bank_params, bank_stats, j, k, *, lay: Layout):
  """Fine-tuning reference for task ``k`` from task ``j``'s model of a sequence (paper, Sec. 4.1
  and Table 2; as coded the whole network is copied, head and BatchNorm included): every
  weight free and trainable at the base width, task ``k``'s rows set to the model's row ``j``."""
  m = dict(state.method)
  m["own"] = jax.tree.map(jnp.zeros_like, m["own"])
  m["level"] = m["level"].at[k].set(0)
  params = _from_row(bank_params, lay.rows, j, k)
  bs = _from_row(bank_stats, jax.tree.map(lambda _: lay.per_task_stats, bank_stats), j, k)
  m["trainable"] = trainable_of(params, m, k, lay=lay)
  return state._replace(params=params, batch_stats=bs, method=m)


@functools.partial(jax.jit, static_argnames="lay")
def set_goals(state, goals, runs, *, lay: Layout):
  """Stores every task's goal (and, for fine goals, the sequences' accuracies)."""
  m = dict(state.method)
  m["goals"] = goals
  if lay.fine_goal:
    m["goal_runs"] = runs
  return state._replace(method=m)


@functools.partial(jax.jit, static_argnames="lay")
def prune_to(state, t, sparsity, *, lay: Layout):
  """Keeps ``n0 - round(s * n0)`` of the task's candidate weights per layer (by magnitude)."""
  spec = lay.spec
  m = dict(state.method)
  lv = m["level"][t].astype(jnp.int8)
  cur = jax.tree.map(lambda tr, s: tr & s, m["trainable"], spec)
  n0 = jax.tree.map(
      lambda o, a, s: jnp.sum((o == 0) & (a <= lv), dtype=jnp.int32) if s else jnp.int32(0),
      m["own"], m["alloc"], spec)
  keep_n = jax.tree.map(
      lambda n: n - jnp.round(sparsity * n.astype(jnp.float32)).astype(jnp.int32), n0)
  keep = topk.topk_mask(jax.tree.map(jnp.abs, state.params), keep_n, candidates=cur, spec=spec)
  keep = jax.tree.map(jnp.logical_and, keep, cur)
  released = jax.tree.map(lambda c, kp: c & ~kp, cur, keep)
  params = jax.tree.map(lambda p, r: jnp.where(r, jnp.zeros_like(p), p), state.params, released)
  m["trainable"] = jax.tree.map(lambda s, kp, tr: kp if s else tr, spec, keep, m["trainable"])
  return state._replace(params=params, method=m)


@functools.partial(jax.jit, static_argnames="lay")
def reset_pick(state, *, lay: Layout):
  """The picking mask back to its initial value (retraining, as coded)."""
  return state._replace(aux=fresh_pick(state.params, lay=lay)) if lay.picking else state


@functools.partial(jax.jit, static_argnames="lay")
def finish_task(state, t, stats, *, lay: Layout):
  """Task ``t`` owns (freezes) what it kept; its picks are stored as bits; its stats recorded."""
  m = dict(state.method)
  kept = jax.tree.map(lambda tr, r, bl: tr & (not r) & (not bl), m["trainable"], lay.rows,
                      lay.bias_leaves)
  m["own"] = masks.assign(m["own"], kept, t + 1)
  if lay.per_task_biases:
    m["bias_bank"] = jax.tree.map(lambda b, p, bl: b.at[t].set(p) if bl else b,
                                  m["bias_bank"], state.params, lay.bias_leaves)
  if lay.picking:
    live = jax.tree.map(lambda a, s: (a > lay.threshold) if s else jnp.zeros((), jnp.bool_),
                        state.aux["pick"], lay.spec)
    m["bits"] = piggyback.set_bits(m["bits"], live, t, lay.spec)
  m["trainable"] = masks.zeros(m["trainable"])
  m["stats"] = {k: v.at[t].set(stats[k]) for k, v in m["stats"].items()}
  return state._replace(method=m)


# --------------------------------------------------------------------------------------------------
# Algorithm 1, phase by phase (Python orchestration of the trainer's recorded operations).


def run_task(trainer, state, t, *, config, lay: Layout, alloc):
  """Task ``t``: accuracy goal, picking (growing while the goal is missed), compacting,
  retraining; then the kept weights become the task's (``alloc``: the allocation levels)."""
  tt = jnp.int32(t)
  state = trainer.apply(state, lambda s: start_task(s, tt, lay=lay))
  goal, state = accuracy_goal(trainer, state, t, config=config, lay=lay)
  state, acc, met, level, attempts = pick_and_grow(trainer, state, t, goal, config=config,
                                                   lay=lay, alloc=alloc)
  state, chosen, acc_c = compact(trainer, state, t, goal, met, acc, level, config=config, lay=lay)
  state, acc_f, retrained = retrain(trainer, state, t, acc_c, config=config, lay=lay)
  logging.info("task %d: goal %.4f, trained %.4f (%d attempt(s), %gx), sparsity %.2f -> %.4f, "
               "final %.4f", t + 1, goal, acc, attempts, float(config.cpg.levels[level]), chosen,
               acc_c, acc_f)
  stats = {"goal": goal, "val_trained": acc, "sparsity": chosen, "val_compacted": acc_c,
           "val_final": acc_f, "attempts": attempts, "retrained": retrained}
  stats = {k: jnp.float32(v) for k, v in stats.items()}
  return trainer.apply(state, lambda s: finish_task(s, tt, stats, lay=lay))


def meets_goal(acc: float, goal: float, tolerance: float) -> bool:
  """The acceptance rule of a width and of a compaction stage: ``acc >= goal - tolerance``."""
  return acc >= goal - tolerance


def train_ok(trainer, t: int, min_train_acc: float) -> bool:
  """As coded, a width or a compaction stage counts only if its training accuracy exceeds
  ``cpg.min_train_acc`` (0.95): the running mean over the last epoch of the training operation
  just run (``trainer.last_train_stats``; training mode, augmented batches, as coded)."""
  if min_train_acc <= 0.0:
    return True
  stats = trainer.last_train_stats
  if stats is None:
    raise ValueError("config.cpg.min_train_acc needs the training accuracy of the last "
                     "epoch, but the training operation before it ran no epoch; set "
                     "config.epochs / cpg.stage_epochs >= 1 or cpg.min_train_acc=0")
  logging.info("task %d: training accuracy %.4f over the last epoch (needs > %g)", t + 1,
               stats.accuracy, min_train_acc)
  return stats.accuracy > min_train_acc


def accuracy_goal(trainer, state, t, *, config, lay: Layout):
  """``(goal of task t, state)``: step 1, on validation data.

  ``'individual'`` trains a base-width model on the task alone from the network's initial values
  (the as-coded "baseline" accuracy of an individual model; every baseline starts from the same
  seed); ``'fine_avg'`` / ``'fine_max'`` are the paper's goals (Sec. 4.1, Table 2) of
  :func:`finetune_goals`, all set at task 0; ``'current_finetune'`` fine-tunes the current
  base-width network (released weights zero) once, a cheap proxy that is none of the paper's
  goals. The reference trainings run on throw-away copies of the state with the same compiled
  step. ``'fixed'`` takes ``cpg.goal_values`` (one number, or one per task: e.g. the validation
  accuracies of a ``configs/individual.py`` run, as ``benchmarks/cpg_results.py`` does).
  """
  cc = config.cpg
  if cc.goal == "fixed":
    return _per_task_goal(cc.goal_values, t), state
  if lay.fine_goal:
    if t == 0:
      avg, best, runs = finetune_goals(trainer, state, config=config, lay=lay)
      goals = avg if cc.goal == "fine_avg" else best
      state = trainer.apply(state, lambda s: set_goals(
          s, jnp.asarray(goals, jnp.float32), jnp.asarray(runs, jnp.float32), lay=lay))
    return float(jax.device_get(state.method["goals"][t])), state
  temp = reference_start(_copy(state), jnp.int32(t), jnp.asarray(cc.goal == "current_finetune"),
                         trainer.initial_params(), lay=lay)
  temp = trainer.train(temp, t, epochs=int(cc.goal_epochs) or int(config.epochs),
                       phase=f"{cc.goal} reference", aux_lr=0.0)
  acc = trainer.evaluate(temp, t, split="val")
  del temp
  return acc, state


def finetune_goals(trainer, state, *, config, lay: Layout):
  """The paper's fine-Avg / fine-Max goals of every task (Sec. 4.1, Table 2), on validation.

  ``goal_repeats`` independent sequences; in each, task 1 is trained from scratch (the
  network's initial values) and task k > 1 by fine-tuning the sequence's model of a task drawn
  uniformly from 1..k-1 (as coded: ``tools/random_generate_task_id.py``), the whole network
  with that model's head and BatchNorm row, at ``goal_finetune_lr`` (as coded 5e-3). Returns
  ``(mean over sequences, max over sequences)`` per task and the ``[R, T]`` accuracies. The
  sequences' models are kept on the host while a sequence runs (T full networks).
  """
  cc = config.cpg
  repeats, T = lay.goal_repeats, lay.num_tasks
  rng = np.random.default_rng((int(config.seed), 0xC96))
  runs = np.zeros((repeats, T))
  n_epochs = int(cc.goal_epochs) or int(config.epochs)
  for r in range(repeats):
    bank = []
    for k in range(T):
      if k == 0:
        start = reference_start(_copy(state), jnp.int32(0), jnp.asarray(False),
                                trainer.initial_params(), lay=lay)
        lr = float(config.learning_rate)
      else:
        j = int(rng.integers(0, k))
        start = chain_start(_copy(state), *bank[j], jnp.int32(j), jnp.int32(k), lay=lay)
        lr = float(cc.get("goal_finetune_lr", 0.0)) or float(config.learning_rate)
      model_k = trainer.train(start, k, epochs=n_epochs, lr=lr, aux_lr=0.0,
                              phase=f"fine-tune sequence {r + 1}/{repeats}")
      runs[r, k] = trainer.evaluate(model_k, k, split="val")
      bank.append(jax.device_get((model_k.params, model_k.batch_stats)))
      del model_k
    logging.info("CPG fine-tuning sequence %d/%d: validation accuracies %s", r + 1, repeats,
                 np.round(runs[r], 4).tolist())
  return runs.mean(axis=0), runs.max(axis=0), runs


def mask_lr_fn(lr: float, n_epochs: int, schedule, picking: bool):
  """Per-epoch learning rate of the picking mask: ``lr`` times every factor of ``schedule``
  (``(fraction of epochs, factor)`` pairs) whose epoch ``round(fraction * n_epochs)`` has come;
  0 without picking."""
  def fn(epoch):
    factor = 1.0
    for frac, f in schedule:
      if epoch >= round(float(frac) * n_epochs):
        factor *= float(f)
    return float(lr * factor) if picking else 0.0
  return fn


def pick(trainer, state, t, level: int, *, config, picking: bool):
  """Step 2 at growth level ``level``; returns ``(state, validation accuracy)``.

  The weights owned by tasks < t+1 are frozen; a real-valued mask over them (``state.aux['pick']``,
  initialised to 0.01) is binarised with ``> 5e-3`` in the forward pass with a straight-through
  gradient (:func:`sparse_cl_jax.transforms.binarize_ste`): the effective old weight is
  ``binary(m) * w_old``. The mask is trained by Adam (``Method.aux_tx``, lr 5e-4, x0.2 at 50% and
  x0 at 70% of the epochs as coded, :func:`mask_lr_fn`) with the free (released) weights, the
  task's head and norm row (base optimiser, ``config.epochs``). PAE: every old weight is used.
  """
  cc, epochs = config.cpg, int(config.epochs)
  state = trainer.train(state, t, epochs=epochs, phase=f"train x{float(cc.levels[level]):g}",
                        aux_lr_fn=mask_lr_fn(float(cc.mask_lr), epochs, cc.mask_lr_schedule,
                                             picking))
  return state, trainer.evaluate(state, t, split="val")


def grow(trainer, state, start, t, *, lay: Layout):
  """Step 3: restarts task ``t`` from ``start``, its starting point (as coded: the previous task's
  checkpoint, released weights zero), with the *allocated* region one level larger (as coded
  +0.5x of the parameter count: ``cpg.levels = (1.0, 1.5)``, PAE ``(1.0, 1.5, 2.0)``; channels
  grow by the square root). The newly allocated weights take their initial values, which no view
  has ever used (a deliberate, logged initialisation). ``state`` (the trained one) is dropped."""
  tt = jnp.int32(t)
  start = _copy(start)
  init = trainer.initial_params()
  return trainer.apply(state, lambda s: allocate_level(start, tt, init, lay=lay))


def pick_and_grow(trainer, state, t, goal: float, *, config, lay: Layout, alloc):
  """Steps 2 and 3: picking at the task's level, then one level wider after each miss (or, as
  coded, a training accuracy not above ``cpg.min_train_acc``, :func:`train_ok`) while a level is
  left. Returns ``(state, validation accuracy, goal met, level, attempts)``."""
  cc = config.cpg
  levels = [float(x) for x in cc.levels]
  level = int(jax.device_get(state.method["level"][t]))
  snap = _copy(state)
  attempts = 0
  while True:
    attempts += 1
    state, acc = pick(trainer, state, t, level, config=config, picking=lay.picking)
    met = (meets_goal(acc, goal, float(cc.goal_tolerance))
           and train_ok(trainer, t, float(cc.min_train_acc)))
    if met or level >= len(levels) - 1:
      break
    level += 1
    logging.info("task %d: val %.4f misses the goal %.4f; restarting the task at %gx "
                 "parameters: %d newly allocated weights (re-)initialised to their never-used "
                 "initial values", t + 1, acc, goal, levels[level],
                 int(sum(np.sum(a[t] == level) if r else np.sum(a == level)
                         for a, r in zip(jax.tree.leaves(alloc), jax.tree.leaves(lay.rows)))))
    state = grow(trainer, state, snap, t, lay=lay)
    snap = _copy(state)
  del snap
  return state, acc, met, level, attempts


def n_candidates(state, t: int, spec: types.LeafSpec) -> int:
  """Task ``t``'s pruning candidates: free maskable weights allocated at its level."""
  m = jax.device_get(state.method)
  lv = int(m["level"][t])
  return sum(int(np.sum((o == 0) & (a <= lv)))
             for o, a, s in zip(jax.tree.leaves(m["own"]), jax.tree.leaves(m["alloc"]),
                                jax.tree.leaves(spec)) if s)


def reserve_sparsity(t: int, num_tasks: int) -> float:
  """As coded, the sparsity a task that missed its goal at the maximum width is pruned to: it
  leaves ``round(1 / (remaining + 1), 1)`` of its weights for each remaining task."""
  remaining = num_tasks - t - 1
  return 1.0 - round(1.0 / (remaining + 1), 1)


def stage_points(sparsity: float, previous: float, ramp: int, every: int) -> np.ndarray:
  """The cubic ramp (Zhu & Gupta 2017) from ``previous`` to ``sparsity`` over ``ramp`` steps at
  every mask update (steps ``0, every, 2 every, ...`` past the ramp), as host float32 values."""
  sched = schedules.cubic(sparsity, begin_step=0, end_step=ramp, initial_sparsity=previous,
                          frequency=every)
  return np.asarray(sched(np.arange(0, ramp + every + 1, every, dtype=np.int32)))


def prune_stage(trainer, state, t, sparsity: float, previous: float, steps_per_epoch: int, *,
                config, lay: Layout):
  """One compaction stage: ``cpg.stage_epochs`` at ``cpg.prune_lr`` while the mask follows the
  cubic ramp (Zhu & Gupta 2017, :func:`stage_points`) from ``previous`` to ``sparsity`` over
  ``cpg.ramp_epochs``, updated every ``cpg.prune_every`` batches (a trainer hook), then the
  stage's exact sparsity (:func:`prune_to`)."""
  cc = config.cpg
  tt = jnp.int32(t)
  freq = max(1, int(cc.prune_every))
  ramp = max(1, round(float(cc.ramp_epochs) * steps_per_epoch))
  points = stage_points(sparsity, previous, ramp, freq)

  def hook(st, steps_done):
    i = steps_done // freq
    if i >= len(points):
      return st
    return prune_to(st, tt, jnp.float32(points[i]), lay=lay)

  state = trainer.train(state, t, epochs=int(cc.stage_epochs), phase=f"compact {sparsity:.2f}",
                        lr=float(cc.prune_lr), lr_milestones=(), aux_lr=0.0, hook=hook,
                        hook_every=freq)
  return trainer.apply(state, lambda st: prune_to(st, tt, jnp.float32(sparsity), lay=lay))


def compact(trainer, state, t, goal: float, met: bool, acc0: float, level: int, *,
            config, lay: Layout):
  """Step 4: gradual magnitude pruning, per layer, of the task's candidate weights (the free
  weights it started from, as coded) in stages ``cpg.stages`` (0.1 .. 0.9, 0.95).

  Returns (state, chosen sparsity, its validation accuracy): the largest sparsity that still
  meets the goal (:func:`meets_goal`). By default (the paper's Algorithm 1) pruning stops at the
  first stage that misses it; ``cpg.stop_at_first_miss=False`` runs every stage (as coded).
  ``cpg.min_train_acc`` (as coded 0.95; default 0 = off) also requires a stage's training
  accuracy to exceed it (:func:`train_ok`). A task that missed its goal even at the maximum
  width is still pruned, as coded, to :func:`reserve_sparsity` (``cpg.reserve_for_remaining``).
  """
  cc = config.cpg
  tol = float(cc.goal_tolerance)
  if n_candidates(state, t, lay.spec) == 0:
    return state, 0.0, acc0
  at_max_unmet = (not met) and level >= len(cc.levels) - 1
  must = 1.0
  if at_max_unmet:
    if not cc.reserve_for_remaining:
      return state, 0.0, acc0
    must = reserve_sparsity(t, lay.num_tasks)
    if must <= 0.0:
      return state, 0.0, acc0
    logging.info("task %d: goal %.4f missed at the maximum width; pruning to about %.2f to "
                 "leave room for %d more tasks (as coded)", t + 1, goal, must,
                 lay.num_tasks - t - 1)
  best = (_copy(state), 0.0, acc0)
  nb = max(1, -(-int(trainer.task_data(t).n) // int(config.batch_size)))
  s_prev = 0.0
  for s in (float(x) for x in cc.stages):
    if s <= s_prev:
      continue
    if at_max_unmet and s_prev >= must:
      break
    state = prune_stage(trainer, state, t, s, s_prev, nb, config=config, lay=lay)
    acc = trainer.evaluate(state, t, split="val")
    logging.info("task %d: sparsity %.2f -> val %.4f (goal %.4f)", t + 1, s, acc, goal)
    if not train_ok(trainer, t, float(cc.min_train_acc)):
      break
    s_prev = s
    if at_max_unmet or meets_goal(acc, goal, tol):
      best = (_copy(state), s, acc)
    elif cc.stop_at_first_miss:
      break
  return best


def retrain(trainer, state, t, acc_chosen: float, *, config, lay: Layout):
  """Step 5 (tasks after the first, as coded): the picking mask is re-initialised and trained
  again with the kept weights for up to ``cpg.retrain_epochs`` epochs, keeping the best epoch on
  validation (patience ``cpg.retrain_patience``) if it beats ``acc_chosen`` (the compacted
  model's); returns (state, accuracy, 1 if retrained else 0)."""
  cc = config.cpg
  if int(cc.retrain_epochs) <= 0 or (t == 0 and not cc.retrain_first_task):
    return state, acc_chosen, 0
  pre = _copy(state)
  if lay.picking and cc.retrain_reinit_mask:
    state = trainer.apply(state, functools.partial(reset_pick, lay=lay))
  best, best_acc, bad = None, acc_chosen, 0
  for e in range(int(cc.retrain_epochs)):
    state = trainer.train(state, t, epochs=1, phase="retrain", lr=float(cc.retrain_lr),
                          lr_milestones=(),
                          aux_lr=float(cc.retrain_mask_lr) if lay.picking else 0.0,
                          reset_optimizer=e == 0)
    acc = trainer.evaluate(state, t, split="val")
    if acc > best_acc:
      best, best_acc, bad = _copy(state), acc, 0
    else:
      bad += 1
      if int(cc.retrain_patience) and bad >= int(cc.retrain_patience):
        break
  if best is None:
    return pre, acc_chosen, 0
  return best, best_acc, 1


# --------------------------------------------------------------------------------------------------
# The method's functions for the trainer, and reporting.


def forward_params(params, aux, m, task, current, *, lay: Layout):
  """``Method.forward_params``: :func:`view` with the live picking mask."""
  return view(params, aux.get("pick"), m, task, current, spec=lay.spec, rows=lay.rows,
              picking=lay.picking, threshold=lay.threshold,
              bias_leaves=lay.bias_leaves if lay.per_task_biases else None)


def wrap_tx(tx, *, weight_decay: float, spec: types.LeafSpec):
  """The base optimiser after CPG's own weight decay (maskable leaves; frozen ones dropped by
  the freeze transform, last), so only the current task's conv / FC weights decay."""
  if weight_decay > 0:
    tx = optax.chain(optax.masked(optax.add_decayed_weights(weight_decay), spec), tx)
  return base.freezing_tx(tx)


def _stored_bytes(state, *, lay: Layout, alloc_l, lv_task, bits_per: int) -> dict:
  """Bytes stored: allocated shared weights, per-task rows at each task's level, masks over the
  allocated maskable weights, per-task running statistics at each task's level."""
  T = lay.num_tasks
  final = int(lv_task.max())
  spec_l = [bool(s) for s in jax.tree.leaves(lay.spec)]
  rows_l = [bool(r) for r in jax.tree.leaves(lay.rows)]
  bias_l = [bool(b) for b in jax.tree.leaves(lay.bias_leaves)]
  params = jax.device_get(state.params)
  weights = 0
  for i, a in enumerate(alloc_l):
    if rows_l[i]:
      weights += sum(int(np.sum(a[j] <= lv_task[j])) for j in range(T))
    elif bias_l[i]:  # one copy per task, at the task's level
      weights += sum(int(np.sum(a <= lv_task[j])) for j in range(T))
    else:
      weights += int(np.sum(a <= final))
  mask_bytes = sum((int(np.sum(alloc_l[i] <= final)) * bits_per + 7) // 8
                   for i in range(len(spec_l)) if spec_l[i])
  scale_alloc = {p.rsplit("/", 1)[0]: alloc_l[i] for i, p in enumerate(masks.paths(params))
                 if rows_l[i] and p.endswith("/scale")}
  stats_n = 0
  for path, leaf in masks.leaves_with_paths(jax.device_get(state.batch_stats)):
    a = scale_alloc.get(path.rsplit("/", 1)[0])
    if a is not None and a.shape == np.shape(leaf):
      stats_n += sum(int(np.sum(a[j] <= lv_task[j])) for j in range(T))
    else:
      stats_n += int(np.size(leaf))
  stored = {"weights": 4 * weights, "masks": mask_bytes, "per_task": 4 * stats_n}
  stored["total"] = sum(stored.values())
  return stored


def report(ctx, state, *, lay: Layout, levels) -> dict:
  """``Method.report``: capacity (base, allocated, redundant), weights each task uses and owns,
  picked fractions, stored bytes and the per-task statistics of :data:`STATS`."""
  del ctx
  T = lay.num_tasks
  m = jax.device_get(state.method)
  own_l = jax.tree.leaves(m["own"])
  alloc_l = jax.tree.leaves(m["alloc"])
  spec_l = [bool(s) for s in jax.tree.leaves(lay.spec)]
  lv_task = np.asarray(m["level"]).astype(int)
  final = int(lv_task.max())
  bits_l = jax.tree.leaves(m["bits"]) if lay.picking else None

  def spec_sum(fn):
    return int(sum(np.sum(fn(i)) for i in range(len(spec_l)) if spec_l[i]))

  total = sum(int(np.size(alloc_l[i])) for i in range(len(spec_l)) if spec_l[i])
  base_n = spec_sum(lambda i: alloc_l[i] <= 0)
  alloc_n = spec_sum(lambda i: alloc_l[i] <= final)
  free_n = spec_sum(lambda i: (own_l[i] == 0) & (alloc_l[i] <= final))
  used, own_n, picked_frac = [], [], []
  for j in range(T):
    k = j + 1
    older_n = spec_sum(lambda i, k=k: (own_l[i] >= 1) & (own_l[i] < k))
    if lay.picking:
      w, sh = j // 32, np.uint32(j % 32)
      picked = spec_sum(lambda i, k=k, w=w, sh=sh:
                        (own_l[i] >= 1) & (own_l[i] < k) & (((bits_l[i][w] >> sh) & 1) == 1))
    else:
      picked = older_n
    mine = spec_sum(lambda i, k=k: own_l[i] == k)
    used.append(picked + mine)
    own_n.append(mine)
    picked_frac.append(picked / older_n if older_n else float("nan"))

  bits_per = masks.ownership_bits(T) + (T if lay.picking else 0)
  stored = _stored_bytes(state, lay=lay, alloc_l=alloc_l, lv_task=lv_task, bits_per=bits_per)
  full = metrics.model_bytes(jax.device_get(state.params), mask_bits=bits_per, maskable=lay.spec,
                             per_task_trees=[jax.device_get(state.batch_stats)])
  stats = {k: np.asarray(v).tolist() for k, v in m["stats"].items()}
  return {
      "density_per_task": [u / max(total, 1) for u in used],
      "mask_bits": bits_per,
      "ownership": m["own"],
      "model_bytes": stored,
      "model_bytes_full_width": full,
      "base_maskable_weights": base_n,
      "allocated_maskable_weights": alloc_n,
      "expansion": alloc_n / max(base_n, 1),
      "redundant": free_n / max(base_n, 1),
      "weights_used_per_task": used,
      "own_weights_per_task": own_n,
      "own_fraction_of_base_per_task": [n / max(base_n, 1) for n in own_n],
      "picked_fraction_per_task": picked_frac,
      "level_per_task": lv_task.tolist(),
      "param_multiplier_per_task": [levels[v] for v in lv_task.tolist()],
      "goal_per_task": stats["goal"],
      "val_trained_per_task": stats["val_trained"],
      "chosen_sparsity_per_task": stats["sparsity"],
      "val_compacted_per_task": stats["val_compacted"],
      "val_final_per_task": stats["val_final"],
      "attempts_per_task": [int(a) for a in stats["attempts"]],
      "retrained_per_task": [int(r) for r in stats["retrained"]],
      **({"goal_sequences_val": np.asarray(m["goal_runs"]).tolist()} if lay.fine_goal else {}),
  }


def check_config(config, model) -> None:
  """Raises ValueError for a config CPG / PAE cannot run with its model (logs a warning for a
  doubtful one), after ``config.validate`` (the rules of :func:`default_config`'s fields)."""
  config_lib.validate(config)
  if config.method not in ("cpg", "pae"):
    raise ValueError(f"cpg.make builds 'cpg' or 'pae', not {config.method!r}")
  if getattr(model, "norm", "none") == "batch":
    raise ValueError("CPG/PAE: norm='batch' shares BatchNorm running statistics across "
                     "tasks, so earlier tasks would silently forget; use norm='task_batch' (the "
                     "default) or 'batch_stats_only'")
  if float(config.weight_decay) > 0:
    logging.warning("CPG: config.weight_decay=%g also decays heads, BatchNorm rows and biases; the "
                    "authors decay only the current task's conv/FC weights "
                    "(config.cpg.weight_decay)", float(config.weight_decay))


def make(config, ctx: base.Context) -> base.Method:
  """CPG (``config.method='cpg'``) or PAE (``'pae'``: no picking) with ``config.cpg``."""
  check_config(config, ctx.model)
  cc = config.cpg
  picking = config.method == "cpg" and bool(cc.picking)
  levels = [float(x) for x in cc.levels]
  cmult = channel_multipliers(levels, cc.growth_counts)
  base_width = float(ctx.model.width_multiplier) / cmult[-1]
  alloc = allocation_levels(ctx.model, ctx.variables, ctx.stream.input_shape,
                            [base_width * c for c in cmult], ctx.task_rows)
  stats_alloc = _stats_allocation(ctx.variables.get("batch_stats", {}), alloc, ctx.params)
  lay = make_layout(ctx, cc, picking=picking, goal_repeats=int(cc.get("goal_repeats", 5)))
  return base.Method(
      name=config.method,
      run_task=functools.partial(run_task, config=config, lay=lay, alloc=alloc),
      init_state=lambda ctx: new_state(ctx.params, alloc, stats_alloc, lay=lay),
      init_aux=lambda ctx: fresh_pick(ctx.params, lay=lay) if picking else {},
      forward_params=functools.partial(forward_params, lay=lay),
      wrap_tx=functools.partial(wrap_tx, weight_decay=float(cc.get("weight_decay", 0.0)),
                                spec=lay.spec),
      tx_args=base.stored_trainable_args,
      aux_tx=(optax.inject_hyperparams(optax.adam)(learning_rate=float(cc.mask_lr)) if picking
              else None),
      report=functools.partial(report, lay=lay, levels=levels),
      resumable_within_task=False)
