"""Sparsity and drop-fraction schedules: plain functions of a (possibly traced) step.

Layer 3 of the design. Every schedule is a callable ``step -> value`` (like optax schedules) built
from ``jnp`` operations, so it can run inside a jitted step with a traced step counter.

* :func:`one_shot`: jump to the target at a given step (PackNet's one-shot prune).
* :func:`cubic`: Zhu & Gupta (2017), eq. 1, the gradual schedule CPG compacts with.
* :func:`imp_sparsity` / :func:`imp_targets`: iterative magnitude pruning, a fixed fraction of the
  remaining weights per round, with a per-task curriculum of rounds (Lifelong Lottery Tickets).
* :func:`cosine_drop_fraction`: the cosine-annealed drop fraction of RigL / DST for CL.

Example::

  from sparse_cl_jax import schedules
  s = schedules.cubic(0.9, begin_step=0, end_step=400, frequency=10)
  s(200)                                   # 0.7875: 90% * (1 - (1 - 200/400)^3)
  schedules.imp_targets([1, 1, 2], rate=0.2)  # [[0.2], [0.36], [0.488, 0.5904]]
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp

from sparse_cl_jax import sparsity as sparsity_lib

Schedule = Callable[[object], jnp.ndarray]


def one_shot(target: float, *, at_step: int = 0) -> Schedule:
  """Sparsity 0 before ``at_step`` and ``target`` from then on."""
  target = sparsity_lib.check_sparsity(target)

  def schedule(step):
    return jnp.where(jnp.asarray(step) >= at_step, jnp.float32(target), jnp.float32(0.0))

  return schedule


def cubic(final_sparsity: float, *, begin_step: int, end_step: int,
          initial_sparsity: float = 0.0, frequency: int = 1) -> Schedule:
  """Gradual pruning schedule of Zhu & Gupta (2017), eq. 1.

  ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt))^3`` for ``t`` in ``[t_0, t_0 + n dt]``,
  where the mask is updated every ``frequency`` (dt) steps: ``t`` is rounded down to the last update
  step. Before ``begin_step`` the value is ``initial_sparsity``; after ``end_step``, the final one.
  """
  s_f = sparsity_lib.check_sparsity(final_sparsity, "final_sparsity")
  s_i = sparsity_lib.check_sparsity(initial_sparsity, "initial_sparsity")
  if end_step <= begin_step:
    raise ValueError(f"cubic schedule needs end_step > begin_step, got {begin_step}..{end_step}")
  if frequency < 1:
    raise ValueError(f"frequency must be >= 1, got {frequency}")
  span = float(end_step - begin_step)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    # From end_step on the value is final, also when end_step is off the update grid.
    t = jnp.where(t >= end_step, span, jnp.floor((t - begin_step) / frequency) * frequency)
    frac = jnp.clip(t / span, 0.0, 1.0)
    return jnp.float32(s_f) + jnp.float32(s_i - s_f) * (1.0 - frac) ** 3

  return schedule


def imp_sparsity(rounds, *, rate: float = 0.2):
  """Sparsity after ``rounds`` IMP rounds, each removing ``rate`` of the remaining weights."""
  sparsity_lib.check_sparsity(rate, "rate")
  return 1.0 - (1.0 - rate) ** jnp.asarray(rounds, jnp.float32)


def imp_targets(curriculum: Sequence[int], *, rate: float = 0.2) -> list[list[float]]:
  """Per task, the sparsity targets of its IMP rounds under a curriculum of rounds per task.

  Lifelong Lottery Tickets (Chen et al. 2021, Sec. 3.2) prunes with a curriculum such as
  ``[1, 1, 2, 3, 5]`` rounds for 5 tasks; sparsity accumulates across tasks.
  """
  sparsity_lib.check_sparsity(rate, "rate")
  if any(int(r) < 0 for r in curriculum):
    raise ValueError(f"curriculum entries must be >= 0, got {list(curriculum)}")
  out, done = [], 0
  for rounds in curriculum:
    task = []
    for _ in range(int(rounds)):
      done += 1
      task.append(float(1.0 - (1.0 - rate) ** done))
    out.append(task)
  return out


def cosine_drop_fraction(initial: float = 0.5, *, total_steps: int,
                         final: float = 0.0) -> Schedule:
  """``final + (initial - final) * (1 + cos(pi * t / T)) / 2``, constant ``final`` after T."""
  if not 0.0 <= final <= initial <= 1.0:
    raise ValueError(f"need 0 <= final <= initial <= 1, got initial={initial}, final={final}")
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")

  def schedule(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
    return jnp.float32(final) + jnp.float32(initial - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))

  return schedule
