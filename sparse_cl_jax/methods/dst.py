"""Dynamic sparse training for continual learning (Yildirim et al., CPAL 2024).

"Continual Learning with Dynamic Sparse Training: Exploring Algorithms for Effective Model
Updates", Sec. 3. Task-incremental; every task ``t`` (owner ``t + 1``) gets its own subnetwork at
a fixed per-task sparsity ``s`` (:func:`run_task`):

1. ``begin`` (:func:`begin_task`): draw the task's mask, per layer exactly ``k_l`` positions
   (:func:`sparsity.target_counts`, ``init='uniform'`` or ``'erk'``), at random over *all*
   positions (as coded: the mask may include frozen weights of earlier tasks, which the task then
   computes with but never changes). Free positions in the mask are the task's trainable weights;
   they start at zero for tasks after the first (as coded; ``new_weights='init'``: fresh initial
   values). Task 0 starts from the model's initialisation.
2. Train with the config's optimiser; every ``update_every`` steps the trainer's hook
   (:func:`topology_hook`) runs :func:`topology_step`, i.e. :func:`topology_update` (jitted,
   separate from the train step, so the step never retraces) at :func:`drop_schedule`'s fraction:
   drop by smallest magnitude ``floor(f * n)`` of the ``n`` trainable active weights of each layer,
   ``f`` cosine-annealed from ``drop_fraction`` (0.5) to ``drop_fraction_final`` (0.005) over the
   first ``t_end`` of the task's steps (the paper's ``f_decay(t, alpha, T_end)``), stepped per
   batch; no update after ``T_end = t_end * steps`` (as coded there is no stop: ``t_end=1.0``,
   and an update at the task's last step would freeze never-trained zero weights into it); grow
   as many per layer among positions that are neither active nor owned by earlier tasks, by
   ``random`` (SET), ``unfired`` (random among positions never active during this task; when a
   layer has fewer of them than it drops, all of them plus the shortfall drawn at random among
   the other growable positions, as coded), ``gradient`` (largest ``|dL/dw|`` on a fresh batch
   at the masked weights, RigL) or ``momentum`` (largest ``|m|`` of the optimiser's first moment,
   SNFS). Grown weights start at zero (as coded; ``regrow='init'``: fresh values). The per-layer
   count is exact after every update.
3. ``finish`` (:func:`finish_task`): the task's trainable active weights become owned by the
   task (frozen for good); its mask is stored as bit ``t`` of a per-weight ``uint32`` word
   (``bits``), the fixed-shape equivalent of a ``[T, ...]`` stack of bool masks at 1/8 of the
   memory.

Evaluation of task ``j`` uses exactly ``mask_j`` (own + reused frozen weights), task ``j``'s head
and per-task BN row, so with per-task BN (``norm='task_batch'``, the default) its outputs are
bit-identical after later tasks: BWT is exactly 0. Shared non-maskable leaves (biases of layers
without a norm) are trained by the first task only, then frozen (as in PackNet).

Forward transfer as in the paper (eq. 4): ``R[i, j]`` for ``j > i`` is task ``i``'s subnetwork,
head and BN (affine and running statistics) applied to task ``j``'s data, its labels read as
positions within task ``i``'s head (as coded). So the upper triangle is not GEM's
(:data:`UPPER_TRIANGLE`): ``results.json`` reports ``fwt.subnetwork`` (eq. 4) and
``fwt.previous_subnetwork_minus_init`` instead of a ``fwt.gem``. ``forward_params`` places row
``i`` of every per-task leaf at row ``j`` for that view; ``finish`` copies task ``i``'s running
statistics into the not-yet-trained rows, and ``begin`` resets the new task's row to the initial
statistics, so this bookkeeping never affects training.

The train step uses a masking op with a dense (straight-through) gradient: the optimiser sees
``dL/dw`` at every position, as PyTorch does for the as-coded weights that are physically zero
outside the mask; the ``freeze`` transform (last in the chain, mask passed as data) zeroes every
update outside the task's trainable active weights, so the optimiser's first moment is dense (what
momentum growth reads) while nothing outside the mask changes.

Differences from the authors' code (muratonuryildirim/CL-with-DST), all documented defaults:

* Exact per-layer counts (top-k of random scores) instead of Bernoulli draws; drop count
  ``floor(f * n_trainable)`` instead of ``ceil(f * n_mask)``; a dropped position is not regrown in
  the same update.
* Growth never picks a position owned by an earlier task. As coded, random/unfired growth can pick
  one, but the weight is then held at zero during training and restored to the old value at test
  time (a train/test mismatch); gradient and momentum growth effectively never pick one (their
  gradient is zeroed there).
* Drop only among the task's own trainable weights (``drop_frozen=True``: also among the reused
  frozen ones, as coded).
* Momentum growth scores ``|mu|`` of Adam (as coded: ``|mu / (sqrt(nu) + 1e-8)|``).
* Per-task heads (task-IL, dense, not masked) instead of one masked 100-way head with argmax over
  all logits; per-task BN by default (``norm='batch_stats_only'``: no affine, batch statistics at
  test time, as coded); no test-time augmentation; no checkpoint selection on train accuracy.

Example::

  python experiments/main.py --config=configs/dst_cl.py:fashion_mnist --workdir=/tmp/dst \
      --config.dst.init=erk --config.dst.growth=gradient --config.dst.sparsity=0.9
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import criteria
from sparse_cl_jax import growth as growth_lib
from sparse_cl_jax import masks
from sparse_cl_jax import schedules
from sparse_cl_jax import sparsity as sparsity_lib
from sparse_cl_jax import topk
from sparse_cl_jax.data import normalization
from sparse_cl_jax.methods import base

DEFAULT_NORM = "task_batch"
FORGETS_NOTHING = True
# What R[i, j] (j > i) holds: task i's subnetwork and head on task j (metrics.forward_transfer).
UPPER_TRIANGLE = "subnetwork"

INITS = ("uniform", "erk")
GROWTH_MODES = ("random", "unfired", "gradient", "momentum")
WEIGHT_INITS = ("zero", "init")
_WORD = 32  # tasks per uint32 word of ``bits``
_HOOK_SALT = 0xD57  # folded into the train operation's key for the topology updates

# Traces of this module's jitted functions (``begin``, ``finish``, ``update_<growth>``), for tests.
TRACE_COUNTS: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------------------------------
# Per-task masks as bits of uint32 words: bits[w] holds tasks 32 w .. 32 w + 31.


def num_words(num_tasks: int) -> int:
  """uint32 words per weight needed for ``num_tasks`` per-task mask bits."""
  return max(1, -(-int(num_tasks) // _WORD))


def new_bits(params, num_tasks: int):
  """All-zero per-task mask bits: a uint32 tree with leaves ``[num_words(T), *shape]``."""
  w = num_words(num_tasks)
  return jax.tree.map(lambda p: jnp.zeros((w,) + tuple(jnp.shape(p)), jnp.uint32), params)


def get_task_mask(bits, task) -> Any:
  """Task ``task``'s bool mask from the bits (``task`` may be traced)."""
  task = jnp.asarray(task, jnp.int32)
  shift = (task % _WORD).astype(jnp.uint32)

  def one(b):
    word = b[task // _WORD]
    return (jnp.right_shift(word, shift) & jnp.uint32(1)) == jnp.uint32(1)

  return jax.tree.map(one, bits)


def set_task_mask(bits, task_masks, task) -> Any:
  """Sets bit ``task`` to ``task_masks`` (other tasks' bits untouched)."""
  task = jnp.asarray(task, jnp.int32)
  shift = (task % _WORD).astype(jnp.uint32)

  def one(b, m):
    w = task // _WORD
    keep = b[w] & ~jnp.left_shift(jnp.uint32(1), shift)
    return b.at[w].set(keep | jnp.left_shift(m.astype(jnp.uint32), shift))

  return jax.tree.map(one, bits, task_masks)


# --------------------------------------------------------------------------------------------------
# Masking with a dense gradient.


@jax.custom_vjp
def mask_dense_grad(w: jax.Array, m: jax.Array) -> jax.Array:
  """``where(m, w, 0)`` whose gradient w.r.t. ``w`` is the gradient w.r.t. the masked weight.

  The optimiser then sees ``dL/dw_eff`` at inactive positions too, like PyTorch code whose
  inactive weights are physically zero (RigL/SNFS growth signals). Updates outside the trainable
  mask must be discarded by the optimiser chain (``transforms.freeze``).
  """
  return jnp.where(m, w, jnp.zeros_like(w))


def _mask_fwd(w, m):
  return mask_dense_grad(w, m), None


def _mask_bwd(residual, g):
  del residual
  return g, None


mask_dense_grad.defvjp(_mask_fwd, _mask_bwd)


# --------------------------------------------------------------------------------------------------
# Pure pieces (testable on hand-made trees).


def growth_schedule(growth: str, growth_per_task, num_tasks: int) -> list[str]:
  """The growth mode of every task: ``growth_per_task`` (list or comma string) overrides ``growth``.

  Adaptive growth (Sec. 5.3 of the paper): e.g. ``('random',) * 5 + ('gradient',) * 5``.
  """
  if isinstance(growth_per_task, str):
    growth_per_task = [g.strip() for g in growth_per_task.split(",") if g.strip()]
  modes = list(growth_per_task or ()) or [growth] * num_tasks
  if len(modes) != num_tasks:
    raise ValueError(f"config.dst.growth_per_task has {len(modes)} entries for {num_tasks} tasks: "
                     f"{modes}")
  for g in modes:
    if g not in GROWTH_MODES:
      raise ValueError(f"unknown DST growth mode {g!r}; choose from {GROWTH_MODES}")
  return modes


def trainable(mstate, spec, rows, task) -> Any:
  """What task ``task`` may change: its free active weights, its rows, shared leaves (task 0)."""
  task = jnp.asarray(task, jnp.int32)
  rows_mask = base.task_slice(mstate["mask"], rows, task)

  def one(m, o, r, s, is_row):
    if s:
      return m & (o == 0) & r
    if is_row:
      return r
    return jnp.full(jnp.shape(m), task == 0)

  return jax.tree.map(one, mstate["mask"], mstate["own"], rows_mask, spec, rows)


def topology_update(mstate, params, *, fraction, growth: str, spec, key=None, grads=None,
                    opt_state=None, drop_frozen: bool = False, on_tied_growth: str = "warn"):
  """One drop-and-grow step of the current task's mask (pure; jit-compatible).

  Args:
    mstate: the method state (``mask``, ``own``, ``used`` are read).
    params: current params (drop by smallest ``|w|``).
    fraction: drop fraction of each layer's droppable active weights (traced OK).
    growth: ``'random'``, ``'unfired'``, ``'gradient'`` or ``'momentum'`` (static).
    spec: maskable leaves.
    key: randomness for random / unfired growth.
    grads: dense gradient tree (``'gradient'``).
    opt_state: optax state holding a first moment (``'momentum'``).
    drop_frozen: also drop reused weights of earlier tasks (as coded); default only the task's own.
    on_tied_growth: :func:`growth.drop_and_grow`'s (``'ignore'``: the caller reads
      ``tied_growth`` of the result).

  Returns:
    ``(new_mstate, growth.DropGrowResult)``: ``mask`` updated, ``used`` accumulated. Per layer the
    number of active positions is unchanged; growth never picks an owned position or an active
    one. ``'unfired'`` picks positions never active earlier in this task first (at random); only
    when a layer has fewer of them than it drops is the shortfall drawn at random among the other
    free inactive positions (as coded: ``random_unfired_growth`` of CL-with-DST's ``core.py``).
  """
  mask, own, used = mstate["mask"], mstate["own"], mstate["used"]
  free = masks.free(own)
  drop_cand = mask if drop_frozen else masks.logical_and(mask, free)
  grow_cand = free
  if growth == "random":
    scores = criteria.random(params, key=key)
  elif growth == "unfired":
    # Random scores in [0, 1), lifted by 1 where never used: exact top-k takes every unfired
    # position before any fired one, each group in random order.
    scores = jax.tree.map(lambda r, u: r + jnp.where(u, 0.0, 1.0).astype(r.dtype),
                          criteria.random(params, key=key), used)
  elif growth == "gradient":
    scores = criteria.gradient(params, grads=grads)
  elif growth == "momentum":
    scores = criteria.momentum(params, opt_state=opt_state)
  else:
    raise ValueError(f"unknown DST growth mode {growth!r}; choose from {GROWTH_MODES}")
  res = growth_lib.drop_and_grow(mask, criteria.magnitude(params), scores, fraction, spec=spec,
                                 drop_candidates=drop_cand, grow_candidates=grow_cand,
                                 on_tied_growth=on_tied_growth)
  new = dict(mstate)
  new["mask"] = res.masks
  new["used"] = growth_lib.mark_used(used, res.masks)
  return new, res


def update_end(total_steps: int, t_end: float) -> int:
  """``T_end``: the last step (of ``total_steps``) after which a topology update may run.

  ``floor(t_end * total_steps)``; with ``t_end < 1`` at least one training step follows the last
  update, so grown weights (zero as coded) are trained before the task's mask is frozen.
  """
  end = math.floor(float(t_end) * int(total_steps) + 1e-9)
  if t_end < 1.0:
    end = min(end, int(total_steps) - 1)
  return max(end, 0)


def view_masks(mstate, task, current) -> Any:
  """The mask task ``task`` computes with after ``current`` was trained.

  ``task >= current``: the current (latest) task's mask, i.e. task ``current``'s subnetwork (the
  forward-transfer view for later tasks); ``task < current``: the stored mask of ``task``.
  """
  later = jnp.asarray(task, jnp.int32) >= jnp.asarray(current, jnp.int32)
  stored = get_task_mask(mstate["bits"], task)
  return jax.tree.map(lambda m, b: jnp.where(later, m, b), mstate["mask"], stored)


# --------------------------------------------------------------------------------------------------
# Configuration.


def _check_setting(config, ctx: base.Context, modes: list[str]) -> None:
  """Refuses momentum growth without a first moment; warns about settings that forget."""
  if "momentum" in modes and config.optimizer == "sgd" and not config.momentum:
    raise ValueError("DST momentum growth needs a first moment: use Adam or SGD with momentum")
  if ctx.stream.incremental != "task":
    logging.warning("DST for CL is a task-incremental method; running it class-incremental")
  if getattr(ctx.model, "norm", "none") == "batch":
    logging.warning("DST with shared BatchNorm running statistics forgets: use norm='task_batch' "
                    "(default) or 'batch_stats_only' (as coded)")


class Budget(NamedTuple):
  """Every task's mask size: ``counts`` per maskable leaf (a tree of ints), ``total`` maskable
  weights, ``kept`` = the sum of the counts."""
  counts: Any
  total: int
  kept: int


def mask_budget(params, spec, sparsity: float, init: str) -> Budget:
  """Per-layer counts of one task's mask at ``sparsity`` (``init``: 'uniform' or 'erk')."""
  counts = sparsity_lib.target_counts(params, sparsity, distribution=init, spec=spec)
  sizes = [int(np.size(p)) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(spec)) if f]
  kept = sum(c for c, f in zip(jax.tree.leaves(counts), jax.tree.leaves(spec)) if f)
  return Budget(counts=counts, total=max(sum(sizes), 1), kept=kept)


# --------------------------------------------------------------------------------------------------
# The method's state and its view of the network.


def init_state(params, num_tasks: int) -> dict:
  """Nothing owned, no stored masks; the mask is dense until the first task draws its own (the
  random-init baseline sees the full model)."""
  return {
      "own": masks.new_ownership(params),
      "mask": masks.ones(params),
      "used": masks.zeros(params),
      "bits": new_bits(params, num_tasks),
      "num_updates": jnp.zeros((num_tasks,), jnp.int32),
      "num_regrown": jnp.zeros((num_tasks,), jnp.int32),
  }


def view_params(params, mstate, task, current, *, spec, rows):
  """``forward_params``: the weights masked by :func:`view_masks` (dense gradient); for a later
  task ``task > current`` task ``current``'s head / BN row placed at row ``task``."""
  sel = view_masks(mstate, task, current)
  later = jnp.asarray(task, jnp.int32) > jnp.asarray(current, jnp.int32)
  t = jnp.asarray(task, jnp.int32)
  c = jnp.asarray(current, jnp.int32)

  def one(p, mk, f, is_row):
    if f:
      p = mask_dense_grad(p, mk)
    if is_row:  # task i's head / BN row at row j for the forward-transfer view (j > i)
      p = jnp.where(later, p.at[t].set(p[c]), p)
    return p

  return jax.tree.map(one, params, sel, spec, rows)


def frozen_tx_args(mstate, task, *, spec, rows) -> dict:
  """``tx_args``: everything but :func:`trainable` is frozen."""
  return base.frozen_args(trainable(mstate, spec, rows, task))


def fresh_params(key, *, model, input_shape):
  """A fresh draw of the model's initial params (``new_weights`` / ``regrow='init'``)."""
  return model.init(key, jnp.zeros(input_shape, jnp.float32), task=0, train=False)["params"]


# --------------------------------------------------------------------------------------------------
# The phases of a task (each jitted one maps a train state to a train state).


def _set_rows(tree, task, values):
  """Row ``task`` of every leaf of ``tree`` set to row ``task`` of ``values``."""
  return jax.tree.map(lambda a, v: a.at[task].set(v[task]), tree, values)


def begin_task(state, t, key, *, counts, spec, overlap: bool, new_weights: str, fresh,
               per_task_stats: bool, init_stats):
  """Step 1: task ``t``'s sparse mask, exactly ``counts`` positions per layer at random.

  Candidates are all positions (``overlap``, as coded) or the free ones. For tasks after the
  first its free positions start at zero (``new_weights='zero'``) or a fresh draw ``fresh(key)``
  (``'init'``). With per-task statistics the task's BN row is reset to ``init_stats``.
  """
  TRACE_COUNTS["begin"] += 1
  m = dict(state.method)
  own = m["own"]
  cand = jax.tree.map(lambda o: jnp.ones(o.shape, jnp.bool_) if overlap else o == 0, own)
  scores = criteria.random(state.params, key=jax.random.fold_in(key, 0))
  mask = topk.topk_mask(scores, counts, candidates=cand, spec=spec)
  fill = (fresh(jax.random.fold_in(key, 1)) if new_weights == "init"
          else jax.tree.map(jnp.zeros_like, state.params))
  later_task = t > 0

  def start(p, mk, o, q, f):
    if not f:
      return p
    return jnp.where(later_task & mk & (o == 0), q.astype(p.dtype), p)

  params = jax.tree.map(start, state.params, mask, own, fill, spec)
  m["mask"] = mask
  m["used"] = mask
  bs = state.batch_stats
  if per_task_stats:
    bs = _set_rows(bs, t, init_stats)
  return state._replace(params=params, batch_stats=bs, method=m)


def drop_schedule(total_steps: int, *, drop_fraction: float, drop_fraction_final: float,
                  t_end: float):
  """Step 2's schedule: ``(T_end, f)`` with ``f(step)`` the cosine-annealed drop fraction.

  ``f`` goes from ``drop_fraction`` to ``drop_fraction_final`` over the first
  ``T_end = update_end(total_steps, t_end)`` steps (the paper's ``f_decay(t, alpha, T_end)``).
  """
  end = update_end(total_steps, t_end)
  sched = schedules.cosine_drop_fraction(drop_fraction, total_steps=max(1, end),
                                         final=drop_fraction_final)
  return end, sched


def dense_grads(state, data, t, key, run, *, model, spec, rows, batch_size: int, has_stats: bool,
                class_il: bool):
  """``dL/dw_eff`` at the task's masked weights on a random batch of its training data.

  ``run``: the run's data-valued constants, ``{"mean", "std", "head_mask"}`` (the stream's
  normalisation and class layout), arguments rather than constants of the compiled update.
  """
  idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(data.n, 1))
  x = normalization.normalize(jnp.take(data.x, idx, axis=0), run["mean"], run["std"])
  y = jnp.take(data.y, idx, axis=0)
  eff = view_params(state.params, state.method, t, t, spec=spec, rows=rows)

  def loss(e):
    variables = {"params": e}
    if has_stats:
      variables["batch_stats"] = state.batch_stats
      logits, _ = model.apply(variables, x, task=t, train=True, mutable=["batch_stats"])
    else:
      logits = model.apply(variables, x, task=t, train=True)
    if class_il:
      logits = jnp.where(run["head_mask"][t][None, :], logits, jnp.finfo(logits.dtype).min)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  return jax.grad(loss)(eff)


def topology_step(state, data, t, fraction, key, run, *, mode: str, tx, spec, drop_frozen: bool,
                  regrow: str, reset_moments: bool, fresh, grads_of):
  """Step 2's update: :func:`topology_update` at drop ``fraction``, then the grown weights set
  (zero, or ``fresh`` with ``regrow='init'``), optionally their optimiser moments reset, and the
  task's update and regrowth counts raised. ``grads_of(state, data, t, key, run)``: the gradient
  that ``'gradient'`` growth scores (:func:`dense_grads`; ``run``: its data-valued constants).

  Returns ``(state, tied)``: ``tied`` holds the per-leaf tied-growth flags
  (:class:`growth.TiedGrowthWarning`), read on the host after the task's training
  (:func:`run_task`): a host callback inside the compiled update would keep it out of the
  persistent compilation cache.
  """
  TRACE_COUNTS[f"update_{mode}"] += 1
  grads = (grads_of(state, data, t, jax.random.fold_in(key, 2), run) if mode == "gradient"
           else None)
  m, res = topology_update(state.method, state.params, fraction=fraction, growth=mode,
                           spec=spec, key=jax.random.fold_in(key, 0), grads=grads,
                           opt_state=state.opt_state, drop_frozen=drop_frozen,
                           on_tied_growth="ignore")
  if regrow == "init":
    params = growth_lib.regrow(state.params, res.grown, mode="init",
                               init_params=fresh(jax.random.fold_in(key, 1)))
  else:
    params = growth_lib.regrow(state.params, res.grown, mode="zero")
  opt_state = state.opt_state
  if reset_moments:
    opt_state = growth_lib.reset_moments(tx, opt_state, res.changed)
  m["num_updates"] = m["num_updates"].at[t].add(1)
  m["num_regrown"] = m["num_regrown"].at[t].add(masks.count(res.grown, spec))
  tied = jnp.stack([jnp.asarray(f, jnp.bool_) for f in jax.tree.leaves(res.tied_growth)])
  return state._replace(params=params, opt_state=opt_state, method=m), tied


def topology_hook(update, data, task, *, schedule, end: int, key, run, tied: list):
  """The trainer's hook: ``update`` at ``schedule(steps_done)`` until ``T_end``, then nothing.

  Each update's tied-growth flags are appended to ``tied`` (device arrays: no synchronisation).
  """

  def hook(st, steps_done):
    if steps_done > end:  # T_end: the topology is fixed for the rest of the task
      return st
    st, flags = update(st, data, task, schedule(steps_done), jax.random.fold_in(key, steps_done),
                       run)
    tied.append(flags)
    return st

  return hook


def finish_task(state, t, *, spec, per_task_stats: bool):
  """Step 3: the task's trainable active weights become its own (frozen for good), its mask is
  stored as bit ``t``; its running statistics are copied into the untrained rows."""
  TRACE_COUNTS["finish"] += 1
  m = dict(state.method)
  mine = masks.where_spec(spec, m["mask"], fill=False)
  m["own"] = masks.assign(m["own"], mine, t + 1)
  m["bits"] = set_task_mask(m["bits"], mine, t)
  bs = state.batch_stats
  if per_task_stats:  # untrained rows get task t's statistics (forward-transfer view only)
    def copy_down(a):
      later = jax.lax.broadcasted_iota(jnp.int32, a.shape, 0) > t
      return jnp.where(later, a[t][None], a)
    bs = jax.tree.map(copy_down, bs)
  return state._replace(batch_stats=bs, method=m)


def run_task(trainer, state, t: int, *, begin, finish, update_for, modes: list[str], dc, epochs,
             batch_size: int, run, names: list[str]):
  """One task: its mask drawn (``begin``), sparse training with a drop-and-grow update every
  ``dc.update_every`` steps until ``T_end`` (``update_for(mode, tx)``: the jitted
  :func:`topology_step` of growth ``mode``; ``run``: the run's data-valued constants), then its
  weights frozen (``finish``). Tied growth in any update of the task warns once afterwards
  (``names``: the leaves' paths)."""
  tt = jnp.int32(t)
  key = trainer.op_key(0)
  state = trainer.apply(state, lambda st: begin(st, tt, key))
  data = trainer.task_data(t)
  nb = max(1, math.ceil(int(data.n) / batch_size))
  every = int(dc.update_every)
  hook, tied = None, []
  if every > 0:
    end, sched = drop_schedule(nb * int(epochs), drop_fraction=float(dc.drop_fraction),
                               drop_fraction_final=float(dc.drop_fraction_final),
                               t_end=float(dc.get("t_end", 1.0)))
    update = update_for(modes[t], trainer.tx)
    train_key = jax.random.fold_in(trainer.op_key(0), _HOOK_SALT)  # the train op's own key
    hook = topology_hook(update, data, tt, schedule=sched, end=end, key=train_key, run=run,
                         tied=tied)
  state = trainer.train(state, t, epochs=epochs, phase=f"dst-{modes[t]}", hook=hook,
                        hook_every=every)
  if tied:  # one transfer per task
    growth_lib.report_ties(np.asarray(jax.device_get(jnp.stack(tied))), names, "warn")
  return trainer.apply(state, lambda st: finish(st, tt))


# --------------------------------------------------------------------------------------------------
# Report.


def report(ctx, state, *, spec, num_tasks: int, budget: Budget, overlap: bool, dc,
           modes: list[str]) -> dict:
  """Density and reuse per task, the update and regrowth counts, and the ownership."""
  del ctx
  T, total = num_tasks, budget.total
  m = jax.device_get(state.method)
  flags = jax.tree.leaves(spec)
  own = [np.asarray(o) for o, f in zip(jax.tree.leaves(m["own"]), flags) if f]
  bits = [np.asarray(b) for b, f in zip(jax.tree.leaves(m["bits"]), flags) if f]
  dens, reused = [], []
  for j in range(T):
    word, sh = j // _WORD, np.uint32(j % _WORD)
    mj = [((b[word] >> sh) & np.uint32(1)).astype(bool) for b in bits]
    n = sum(int(x.sum()) for x in mj)
    old = sum(int((x & (o >= 1) & (o <= j)).sum()) for x, o in zip(mj, own))
    dens.append(float(n) / total)
    reused.append(float(old) / n if n else float("nan"))
  out = {"density_per_task": dens, "mask_bits": T, "ownership": m["own"]}
  if overlap:  # every task's mask holds exactly the target counts
    out["expected_density_per_task"] = [float(budget.kept) / total] * T
  out["dst"] = {
      "init": dc.init, "sparsity": float(dc.sparsity), "growth_per_task": modes,
      "update_every": int(dc.update_every),
      "updates_per_task": np.asarray(m["num_updates"]).tolist(),
      "regrown_per_task": np.asarray(m["num_regrown"]).tolist(),
      "reused_fraction_per_task": reused,
      "backbone_used": float(sum(int((o > 0).sum()) for o in own)) / total,
  }
  return out


# --------------------------------------------------------------------------------------------------
# Jitted phases shared by the runs of a process.

_SHARED: dict = {}
_SHARED_LOCK = threading.Lock()


def _static(tree) -> tuple:
  """A hashable stand-in for a tree of static leaves (bools, ints): its structure and leaves."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(leaves)


def shared_jit(key: tuple, make_fn):
  """``jax.jit(make_fn())``, one per ``key`` in the process (the static setup it closes over).

  Runs whose ``key`` is equal (the cells of a sweep that differ in seed, learning rate, ...)
  share one trace and one executable; per-run values must be arguments, not closure constants.
  A key that cannot be hashed (a model with unhashable fields) gets a function of its own. (Cells
  that call a new one at the same moment wait for one trace and one compilation: jax's own.)
  """
  try:
    hash(key)
  except TypeError:
    return jax.jit(make_fn())
  with _SHARED_LOCK:
    fn = _SHARED.get(key)
    if fn is None:
      fn = _SHARED[key] = jax.jit(make_fn())
  return fn


def clear_shared() -> None:
  """Forgets the shared jitted functions (tests that count traces start from none)."""
  with _SHARED_LOCK:
    _SHARED.clear()


# --------------------------------------------------------------------------------------------------
# The method.


def make(config, ctx: base.Context) -> base.Method:
  """DST for CL with ``config.dst.{init, growth, growth_per_task, sparsity, update_every, ...}``.

  Fields of ``config.dst`` (see ``configs/dst_cl.py``): ``init`` ('uniform' | 'erk'), ``growth``
  (one of :data:`GROWTH_MODES`, every task), ``growth_per_task`` (optional list overriding it),
  ``sparsity`` (per task), ``update_every`` (dT in steps; 0 = static sparse training),
  ``drop_fraction`` / ``drop_fraction_final`` (cosine schedule ends), ``t_end`` (fraction of the
  task's steps after which the topology is fixed; the cosine reaches its end there), ``new_weights``
  and ``regrow`` ('zero' as coded | 'init'), ``reset_moments`` (zero the optimiser moments of
  changed positions; as coded False), ``mask_overlap`` (a task's mask may include earlier tasks'
  frozen weights; as coded True), ``drop_frozen`` (as coded False here, see the module docstring).
  """
  config_lib.validate(config)  # the rules declared with each field (configs/dst_cl.py)
  dc = config.dst
  T = ctx.num_tasks
  spec, rows = ctx.spec, ctx.task_rows
  modes = growth_schedule(dc.growth, dc.growth_per_task, T)
  _check_setting(config, ctx, modes)
  budget = mask_budget(ctx.params, spec, float(dc.sparsity), dc.init)
  has_stats = "batch_stats" in ctx.variables
  per_task_stats = has_stats and getattr(ctx.model, "norm", "none") == "task_batch"
  input_shape = (1,) + tuple(ctx.stream.input_shape)
  fresh = functools.partial(fresh_params, model=ctx.model, input_shape=input_shape)
  # The jitted phases are shared by every run of the process with the same static setup (the
  # cells of a sweep trace and compile each once); what differs between runs is an argument.
  uses_fresh = dc.new_weights == "init" or dc.regrow == "init"
  setup = (_static(spec), _static(rows), per_task_stats,
           (ctx.model, input_shape) if uses_fresh else None)
  begin_jit = shared_jit(
      ("begin", setup, _static(budget.counts), bool(dc.mask_overlap), dc.new_weights),
      lambda: functools.partial(begin_task, counts=budget.counts, spec=spec,
                                overlap=bool(dc.mask_overlap), new_weights=dc.new_weights,
                                fresh=fresh, per_task_stats=per_task_stats))
  init_stats = ctx.variables.get("batch_stats", {})
  begin = lambda st, t, key: begin_jit(st, t, key, init_stats=init_stats)  # noqa: E731
  finish = shared_jit(("finish", setup),
                      lambda: functools.partial(finish_task, spec=spec,
                                                per_task_stats=per_task_stats))
  class_il = ctx.stream.incremental == "class"
  grads_of = functools.partial(dense_grads, model=ctx.model, spec=spec, rows=rows,
                               batch_size=int(config.batch_size), has_stats=has_stats,
                               class_il=class_il)
  run = {"mean": jnp.asarray(ctx.stream.mean, jnp.float32),
         "std": jnp.asarray(ctx.stream.std, jnp.float32),
         "head_mask": jnp.asarray(ctx.stream.head_mask)}

  def update_for(mode, tx):
    key = ("update", mode, setup, bool(dc.drop_frozen), dc.regrow, bool(dc.reset_moments),
           # tx only shapes the moments reset; the gradient's model and batch only its growth
           tx if dc.reset_moments else None,
           (ctx.model, int(config.batch_size), has_stats, class_il) if mode == "gradient"
           else None)
    return shared_jit(key, lambda: functools.partial(
        topology_step, mode=mode, tx=tx, spec=spec, drop_frozen=bool(dc.drop_frozen),
        regrow=dc.regrow, reset_moments=dc.reset_moments, fresh=fresh, grads_of=grads_of))

  def forward_params(params, aux, m, task, current):
    del aux
    return view_params(params, m, task, current, spec=spec, rows=rows)

  return base.Method(
      name="dst",
      run_task=functools.partial(run_task, begin=begin, finish=finish, update_for=update_for,
                                 modes=modes, dc=dc, epochs=config.epochs,
                                 batch_size=int(config.batch_size), run=run,
                                 names=masks.paths(ctx.params)),
      init_state=lambda ctx: init_state(ctx.params, T),
      forward_params=forward_params,
      wrap_tx=base.freezing_tx,
      tx_args=lambda m, task: frozen_tx_args(m, task, spec=spec, rows=rows),
      report=functools.partial(report, spec=spec, num_tasks=T, budget=budget,
                               overlap=bool(dc.mask_overlap), dc=dc, modes=modes))
