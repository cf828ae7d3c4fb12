"""Fine-tuning: train every task in turn with no protection (the lower bound).

Example::

  python experiments/main.py --config=configs/finetune.py --workdir=/tmp/ft
"""

from __future__ import annotations

import functools

from sparse_cl_jax.methods import base

DEFAULT_NORM = "batch"


def run_task(trainer, state, t, *, epochs: int):
  """Trains task ``t`` for ``epochs`` epochs with the config's optimiser."""
  return trainer.train(state, t, epochs=epochs)


def report(ctx, state) -> dict:
  """Every task uses the whole network; no masks are stored."""
  del state
  return {"density_per_task": [1.0] * ctx.num_tasks, "mask_bits": 0}


def make(config, ctx: base.Context) -> base.Method:
  """Plain sequential training; the config's optimiser and ``epochs`` per task."""
  del ctx
  return base.Method(name="finetune", run_task=functools.partial(run_task, epochs=config.epochs),
                     report=report)
