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

import functools

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


def init_state(ctx: base.Context) -> dict:
  """Nothing owned, nothing trainable."""
  return {"own": masks.new_ownership(ctx.params), "trainable": masks.zeros(ctx.params)}


def forward_params(params, aux, m, task, current):
  """``Method.forward_params``: the weights of :func:`view`, the others zero."""
  del aux
  return masks.apply(params, view(m["own"], task, current))


def start_task(state, t, *, rows):
  """Step 1's mask: task ``t`` trains the free weights and its own rows (head, norm row)."""
  m = dict(state.method)
  m["trainable"] = masks.logical_and(masks.free(m["own"]), base.task_slice(state.params, rows, t))
  return state._replace(method=m)


def prune(state, t, *, spec, fraction: float):
  """Step 2: per layer, keeps the ``round((1 - fraction) * n)`` largest ``|w|`` of the ``n``
  maskable weights task ``t`` trained (ties: the earliest position, :func:`topk.topk_mask`);
  the others are set to zero and released. Kept weights are owned by owner ``t + 1`` and stay
  the trainable ones for retraining."""
  m = dict(state.method)
  cand = jax.tree.map(lambda tr, s: tr & s, m["trainable"], spec)
  n = masks.count_per_leaf(cand)
  keep_n = jax.tree.map(lambda c: jnp.round((1.0 - fraction) * c).astype(jnp.int32), n)
  keep = topk.topk_mask(jax.tree.map(jnp.abs, state.params), keep_n, candidates=cand, spec=spec)
  keep = masks.logical_and(keep, cand)
  released = jax.tree.map(lambda c, k: c & ~k, cand, keep)
  params = jax.tree.map(lambda p, r: jnp.where(r, jnp.zeros_like(p), p), state.params, released)
  m["own"] = masks.assign(m["own"], keep, t + 1)
  m["trainable"] = jax.tree.map(lambda s, k, tr: k if s else tr, spec, keep, m["trainable"])
  return state._replace(params=params, method=m)


def finish_task(state, t):
  """Step 4: what task ``t`` trained becomes its own, frozen for good."""
  m = dict(state.method)
  m["own"] = masks.assign(m["own"], m["trainable"], t + 1)
  m["trainable"] = masks.zeros(m["trainable"])
  return state._replace(method=m)


def run_task(trainer, state, t, *, config, start, prune_fn, finish):
  """Task ``t``: train, prune, retrain, freeze (``start`` / ``prune_fn`` / ``finish``: the jitted
  :func:`start_task`, :func:`prune` and :func:`finish_task`)."""
  pc = config.packnet
  tt = jnp.int32(t)
  state = trainer.apply(state, lambda s: start(s, tt))
  state = trainer.train(state, t, epochs=config.epochs, phase="train")
  state = trainer.apply(state, lambda s: prune_fn(s, tt))
  if pc.retrain_epochs:
    state = trainer.train(state, t, epochs=pc.retrain_epochs, phase="retrain",
                          lr=pc.retrain_lr or config.learning_rate * 0.1)
  return trainer.apply(state, lambda s: finish(s, tt))


def expected_density(sizes, fraction: float, num_tasks: int) -> list[float]:
  """What the per-layer one-shot prune promises, from the layer sizes alone: every task trains
  all free weights of a layer and keeps ``round((1 - fraction) * free)`` of them."""
  free, owned, expected = list(sizes), 0, []
  for _ in range(num_tasks):
    keep = [int(round((1.0 - fraction) * f)) for f in free]
    owned += sum(keep)
    free = [f - k for f, k in zip(free, keep)]
    expected.append(owned / max(sum(sizes), 1))
  return expected


def report(ctx, state, *, fraction: float) -> dict:
  """Ownership figures and the density the prune promises (``expected_density_per_task``)."""
  out = base.ownership_report(ctx, state.method["own"])
  sizes = [int(jnp.size(p)) for p, s in zip(jax.tree.leaves(ctx.params),
                                            jax.tree.leaves(ctx.spec)) if s]
  out["expected_density_per_task"] = expected_density(sizes, fraction, ctx.num_tasks)
  return out


def check(config, ctx: base.Context) -> float:
  """``config.packnet.prune_fraction``, after refusing what PackNet cannot run."""
  if getattr(ctx.model, "norm", "none") == "batch":
    raise ValueError("PackNet: norm='batch' shares BatchNorm running statistics across "
                     "tasks, so earlier tasks would silently forget; use norm='task_batch' (the "
                     "default) or 'batch_stats_only'")
  return float(config.packnet.prune_fraction)  # in [0, 1): its rule in configs/packnet.py


def make(config, ctx: base.Context) -> base.Method:
  """PackNet with ``config.packnet.{prune_fraction, retrain_epochs, retrain_lr}``."""
  frac = check(config, ctx)
  return base.Method(
      name="packnet",
      run_task=functools.partial(
          run_task, config=config,
          start=jax.jit(functools.partial(start_task, rows=ctx.task_rows)),
          prune_fn=jax.jit(functools.partial(prune, spec=ctx.spec, fraction=frac)),
          finish=jax.jit(finish_task)),
      init_state=init_state, forward_params=forward_params, wrap_tx=base.freezing_tx,
      tx_args=base.stored_trainable_args, report=functools.partial(report, fraction=frac))
