"""Individual models: one independently initialised and trained network per task.

The reference of the CPG paper (Hung et al., NeurIPS 2019, Table 2 "Scratch" and Table 3
"Individual Models"): every task gets its own freshly initialised copy of the network, trained
from scratch on that task alone; nothing is shared, so nothing is forgotten and nothing transfers.
Its validation accuracies are CPG's default accuracy goals (``configs/cpg.py``).

Design (cheap and exact, one compile for the whole stream):

* the train state holds the network being trained; the method state holds a *bank* of the
  finished networks, one row per task (``[T, ...]`` for every shared leaf: kernels, biases,
  shared norms). Per-task leaves (heads, per-task BatchNorm rows, ``norm='task_batch'``) are
  already separate per task and are not banked.
* :func:`start_task` re-initialises every shared leaf and task t's rows to the network's initial
  values (a deliberate, per-task re-initialisation; as coded, the CPG authors' baseline script
  trains every task's model from the same seed, i.e. the same initial weights),
  :func:`finish_task` copies the trained shared leaves into bank row t.
* ``forward_params`` computes with the live params for the task being trained and with bank row
  ``task`` otherwise, so evaluation of an earlier task is bit-identical after later tasks.

Stored size (reported as ``model_bytes``, overriding the harness's single-copy count): T full
shared networks plus the per-task heads, norm rows and running statistics.

Example::

  python experiments/main.py --config=configs/individual.py --workdir=/tmp/individual
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparse_cl_jax import masks
from sparse_cl_jax import metrics
from sparse_cl_jax.methods import base

DEFAULT_NORM = "task_batch"
FORGETS_NOTHING = True


def init_state(ctx: base.Context) -> dict:
  """The bank: ``[T, ...]`` of every shared leaf (a placeholder ``[1]`` for per-task leaves)."""
  T = ctx.num_tasks
  bank = jax.tree.map(
      lambda p, r: jnp.zeros((1,), p.dtype) if r else jnp.broadcast_to(p, (T,) + p.shape),
      ctx.params, ctx.task_rows)
  return {"bank": jax.tree.map(jnp.array, bank), "trainable": masks.zeros(ctx.params)}


def forward_params(params, aux, m, task, current, *, rows):
  """The live params for the task being trained, bank row ``task`` otherwise."""
  del aux
  task = jnp.asarray(task, jnp.int32)
  cur = task == jnp.asarray(current, jnp.int32)
  return jax.tree.map(lambda p, b, r: p if r else jnp.where(cur, p, b[task]),
                      params, m["bank"], rows)


def start_task(state, t, fresh, *, rows):
  """Every shared leaf and task ``t``'s rows back to their initial values ``fresh``."""
  row_t = base.task_slice(state.params, rows, t)
  params = jax.tree.map(lambda p, f, rt: jnp.where(rt, f, p), state.params, fresh, row_t)
  m = dict(state.method)
  m["trainable"] = row_t
  return state._replace(params=params, method=m)


def finish_task(state, t, *, rows):
  """Copies the trained shared leaves into bank row ``t``."""
  m = dict(state.method)
  m["bank"] = jax.tree.map(lambda b, p, r: b if r else b.at[t].set(p), m["bank"],
                           state.params, rows)
  m["trainable"] = masks.zeros(m["trainable"])
  return state._replace(method=m)


def run_task(trainer, state, t, *, epochs: int, start, finish):
  """Task ``t`` from scratch (``start`` / ``finish``: the jitted :func:`start_task` and
  :func:`finish_task`)."""
  tt = jnp.int32(t)
  init = trainer.initial_params()
  state = trainer.apply(state, lambda s: start(s, tt, init))
  state = trainer.train(state, t, epochs=epochs)
  return trainer.apply(state, lambda s: finish(s, tt))


def report(ctx, state) -> dict:
  """T full shared networks plus the per-task rows and running statistics (``model_bytes``)."""
  T = ctx.num_tasks
  params = jax.device_get(state.params)
  row_leaves = jax.tree.leaves(ctx.task_rows)
  shared_n = sum(int(np.size(p)) for p, r in zip(jax.tree.leaves(params), row_leaves) if not r)
  rows_n = sum(int(np.size(p)) for p, r in zip(jax.tree.leaves(params), row_leaves) if r)
  stats_n = sum(int(np.size(x)) for x in jax.tree.leaves(jax.device_get(state.batch_stats)))
  weights = 4 * (T * shared_n + rows_n)
  per_task = 4 * stats_n
  # The harness's single-copy figure, for comparison.
  single = metrics.model_bytes(params, mask_bits=0, maskable=ctx.spec,
                               per_task_trees=[jax.device_get(state.batch_stats)])
  return {"density_per_task": [1.0] * T, "mask_bits": 0,
          "model_bytes": {"weights": weights, "masks": 0, "per_task": per_task,
                          "total": weights + per_task},
          "model_bytes_single_copy": single,
          "expansion": float(T), "redundant": 0.0}


def make(config, ctx: base.Context) -> base.Method:
  """Independent per-task models; ``config.epochs`` and the base optimiser per task."""
  if getattr(ctx.model, "norm", "none") == "batch":
    raise ValueError("Individual models: norm='batch' shares BatchNorm running statistics across "
                     "tasks, so earlier tasks would silently forget; use norm='task_batch' (the "
                     "default) or 'batch_stats_only'")
  rows = ctx.task_rows
  return base.Method(
      name="individual",
      run_task=functools.partial(
          run_task, epochs=config.epochs,
          start=jax.jit(functools.partial(start_task, rows=rows)),
          finish=jax.jit(functools.partial(finish_task, rows=rows))),
      init_state=init_state, forward_params=functools.partial(forward_params, rows=rows),
      wrap_tx=base.freezing_tx, tx_args=base.stored_trainable_args, report=report)
