"""Fine-tuning: train every task in turn with no protection (the lower bound)."""

from __future__ import annotations

from sparse_cl_jax.methods import base

DEFAULT_NORM = "batch"


def make(config, ctx: base.Context) -> base.Method:
  """Plain sequential training; the config's optimiser and ``epochs`` per task.

  Example::

    python experiments/main.py --config=configs/finetune.py --workdir=/tmp/ft
  """

  def run_task(trainer, state, t):
    return trainer.train(state, t, epochs=config.epochs)

  def report(ctx, state):
    del state
    return {"density_per_task": [1.0] * ctx.num_tasks, "mask_bits": 0}

  return base.Method(name="finetune", run_task=run_task, report=report)
