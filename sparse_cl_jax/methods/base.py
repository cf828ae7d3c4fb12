"""Helpers shared by the methods, and the method protocol under its historical name.

:class:`Method` and :class:`Context` are defined in :mod:`sparse_cl_jax.protocol` (the harness
layer, so the trainer never imports a method module) and re-exported here: a method module builds
``base.Method(...)`` as before. The rest are helpers of the parameter-isolation methods (PackNet,
CPG, DST, CLNP): per-task rows, frozen-weight transforms, ownership reports.

Ownership convention shared by the parameter-isolation methods: the loop's task index ``t``
(0-based) owns weights as owner ``t + 1``; 0 means free.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax import protocol
from sparse_cl_jax import transforms
from sparse_cl_jax import types

Context = protocol.Context
Method = protocol.Method


# --------------------------------------------------------------------------------------------------
# Helpers shared by the parameter-isolation methods.


TASK_ROW_PATTERNS = (r"(^|/)head/(kernel|bias)$", r"(^|/)norm[^/]*/(scale|bias)$")


def task_rows(params: types.Params, num_tasks: int, *, multi_head: bool,
              per_task_norm: bool) -> types.LeafSpec:
  """Which leaves hold one row per task on axis 0 (multi-head heads, per-task BN affine)."""
  head = re.compile(TASK_ROW_PATTERNS[0])
  norm = re.compile(TASK_ROW_PATTERNS[1])

  def decide(path, leaf):
    shape = jnp.shape(leaf)
    if not shape or shape[0] != num_tasks:
      return False
    if head.search(path):
      return multi_head and num_tasks > 1
    if norm.search(path):
      return per_task_norm
    return False

  return masks_lib.map_with_path(decide, params)


def task_slice(params: types.Params, rows: types.LeafSpec, task) -> types.Masks:
  """True on row ``task`` of per-task leaves; True everywhere on shared leaves (traced task OK)."""

  def one(p, r):
    shape = jnp.shape(p)
    if not r:
      return jnp.ones(shape, jnp.bool_)
    idx = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return idx == jnp.asarray(task, jnp.int32)

  return jax.tree.map(one, params, rows)


FROZEN_ARG = "frozen"


def freezing_tx(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``wrap_tx`` of a method that freezes weights: ``tx`` then :func:`transforms.freeze`.

  The frozen mask is data, read from the ``frozen`` keyword of ``update`` (see
  :func:`frozen_args`), so changing it between tasks never retraces the step.
  """
  return optax.chain(tx, transforms.freeze(mask_arg=FROZEN_ARG))


def frozen_args(trainable: types.Masks) -> dict:
  """The ``tx_args`` of :func:`freezing_tx`: everything that is not ``trainable`` is frozen."""
  return {FROZEN_ARG: masks_lib.logical_not(trainable)}


def stored_trainable_args(mstate, task) -> dict:
  """``tx_args`` of methods whose state keeps the current task's mask as ``mstate['trainable']``."""
  del task
  return frozen_args(mstate["trainable"])


def shared_nonmaskable(spec: types.LeafSpec, rows: types.LeafSpec) -> types.LeafSpec:
  """Leaves that are neither maskable nor per-task: shared biases / norms (frozen after task 0)."""
  return jax.tree.map(lambda s, r: not s and not r, spec, rows)


def ownership_report(ctx: Context, own: types.Ownership) -> dict:
  """``report`` fields of an ownership-based method: density per task, mask bits, ownership.

  ``density_per_task[j]``: the fraction of maskable weights task j computes with at the end
  (owned by tasks 1..j+1). The harness turns ``mask_bits`` and ``ownership`` into model bytes
  and per-layer capacity.
  """
  total = sum(int(jnp.size(p)) for p, s in zip(jax.tree.leaves(ctx.params),
                                                jax.tree.leaves(ctx.spec)) if s)
  # On the host: eager device ops here would compile a small program per op in every process.
  owners = [np.asarray(o) for o, s in zip(jax.tree.leaves(jax.device_get(own)),
                                          jax.tree.leaves(ctx.spec)) if s]
  dens = []
  for j in range(ctx.num_tasks):  # masks.visible(own, j + 1), counted
    n = sum(int(np.count_nonzero((o >= 1) & (o <= j + 1))) for o in owners)
    dens.append(float(n) / max(total, 1))
  return {"density_per_task": dens, "mask_bits": masks_lib.ownership_bits(ctx.num_tasks),
          "ownership": own}
