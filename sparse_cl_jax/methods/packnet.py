"""PackNet (Mallya & Lazebnik, CVPR 2018): iterative pruning packs tasks into one network.

Per task t (owner ``t + 1``):

1. train the free weights (and the task's own head / per-task norm row; shared biases and norms
   only in the first task, then frozen, as PackNet does) for ``config.epochs``;
2. one-shot, per layer, prune ``packnet.prune_fraction`` of the weights the task trained, by
   magnitude (Sec. 3 of the paper); pruned weights are set to zero and released (free);
3. retrain the kept weights for ``packnet.retrain_epochs`` at ``packnet.retrain_lr``;
4. the kept weights become owned by the task and are frozen for good.

Evaluation of task j uses only weights owned by tasks 1..j+1 (and its own head and norm row), so
its outputs are bit-identical after later tasks: BWT is exactly 0. Freezing is the
``transforms.freeze`` optax transform with the frozen mask passed as data, so all tasks share one
compiled step.

Example::

  python experiments/main.py --config=configs/packnet.py --workdir=/tmp/packnet \
      --config.packnet.prune_fraction=0.75
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_cl_jax import masks
from sparse_cl_jax import topk
from sparse_cl_jax.methods import base

DEFAULT_NORM = "task_batch"
FORGETS_NOTHING = True


def view(own, task, current):
  """Weights task ``task`` computes with after ``current`` was trained (bool tree)."""
  owner = jnp.asarray(task, jnp.int32) + 1
  same = jnp.asarray(task, jnp.int32) == jnp.asarray(current, jnp.int32)
  return jax.tree.map(lambda o: jnp.where(same, o <= owner, (o >= 1) & (o <= owner)), own)


def make(config, ctx: base.Context) -> base.Method:
  """PackNet with ``config.packnet.{prune_fraction, retrain_epochs, retrain_lr}``."""
  pc = config.packnet
  if getattr(ctx.model, "norm", "none") == "batch":
    raise ValueError("PackNet: norm='batch' shares BatchNorm running statistics across "
                     "tasks, so earlier tasks would silently forget; use norm='task_batch' (the "
                     "default) or 'batch_stats_only'")
  frac = float(pc.prune_fraction)
  if not 0.0 <= frac < 1.0:
    raise ValueError(f"config.packnet.prune_fraction={frac} must be in [0, 1)")
  spec, rows = ctx.spec, ctx.task_rows

  def init_state(ctx):
    return {"own": masks.new_ownership(ctx.params), "trainable": masks.zeros(ctx.params)}

  def forward_params(params, aux, m, task, current):
    del aux
    return masks.apply(params, view(m["own"], task, current))

  tx_args = base.stored_trainable_args
  wrap_tx = base.freezing_tx

  @jax.jit
  def begin(state, t):
    m = dict(state.method)
    m["trainable"] = masks.logical_and(masks.free(m["own"]), base.task_slice(state.params, rows, t))
    return state._replace(method=m)

  @jax.jit
  def prune(state, t):
    m = dict(state.method)
    cand = jax.tree.map(lambda tr, s: tr & s, m["trainable"], spec)
    n = masks.count_per_leaf(cand)
    keep_n = jax.tree.map(lambda c: jnp.round((1.0 - frac) * c).astype(jnp.int32), n)
    keep = topk.topk_mask(jax.tree.map(jnp.abs, state.params), keep_n, candidates=cand, spec=spec)
    keep = masks.logical_and(keep, cand)
    released = jax.tree.map(lambda c, k: c & ~k, cand, keep)
    params = jax.tree.map(lambda p, r: jnp.where(r, jnp.zeros_like(p), p), state.params, released)
    m["own"] = masks.assign(m["own"], keep, t + 1)
    m["trainable"] = jax.tree.map(lambda s, k, tr: k if s else tr, spec, keep, m["trainable"])
    return state._replace(params=params, method=m)

  @jax.jit
  def finish(state, t):
    m = dict(state.method)
    m["own"] = masks.assign(m["own"], m["trainable"], t + 1)
    m["trainable"] = masks.zeros(m["trainable"])
    return state._replace(method=m)

  def run_task(trainer, state, t):
    tt = jnp.int32(t)
    state = trainer.apply(state, lambda s: begin(s, tt))
    state = trainer.train(state, t, epochs=config.epochs, phase="train")
    state = trainer.apply(state, lambda s: prune(s, tt))
    if pc.retrain_epochs:
      state = trainer.train(state, t, epochs=pc.retrain_epochs, phase="retrain",
                            lr=pc.retrain_lr or config.learning_rate * 0.1)
    return trainer.apply(state, lambda s: finish(s, tt))

  def report(ctx, state):
    out = base.ownership_report(ctx, state.method["own"])
    # What the per-layer one-shot prune promises, from the shapes alone: every task trains all
    # free weights of a layer and keeps round((1 - f) * free) of them.
    sizes = [int(jnp.size(p)) for p, s in zip(jax.tree.leaves(ctx.params),
                                              jax.tree.leaves(spec)) if s]
    free, owned, expected = list(sizes), 0, []
    for _ in range(ctx.num_tasks):
      keep = [int(round((1.0 - frac) * f)) for f in free]
      owned += sum(keep)
      free = [f - k for f, k in zip(free, keep)]
      expected.append(owned / max(sum(sizes), 1))
    out["expected_density_per_task"] = expected
    return out

  return base.Method(name="packnet", run_task=run_task, init_state=init_state,
                     forward_params=forward_params, wrap_tx=wrap_tx, tx_args=tx_args,
                     report=report)
