"""What the trainer carries between steps: the train state and the on-device data types."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class TrainState(NamedTuple):
  """Everything that changes during a run (a pytree; checkpointed whole)."""
  params: Any
  batch_stats: Any  # {} when the model has no running statistics
  opt_state: Any
  aux: Any  # method-trained variables other than params ({} if none)
  aux_opt_state: Any
  method: Any  # the method's non-trainable state
  step: jax.Array  # int32, global step counter


class DeviceData(NamedTuple):
  """One split of the stream on the device: [T, N_max, ...] arrays and valid counts [T]."""
  x: jax.Array
  y: jax.Array
  ids: jax.Array
  n: jax.Array


class EpochStats(NamedTuple):
  """Running means over one training epoch's valid rows (what the progress bar shows)."""
  loss: float
  accuracy: float


class TaskData(NamedTuple):
  """One task's padded arrays (or any same-shaped replacement: exemplars, data subsets)."""
  x: jax.Array  # uint8 [N_max, H, W, C]
  y: jax.Array  # int32 [N_max]
  ids: jax.Array  # int32 [N_max]
  n: jax.Array  # int32 scalar: valid rows


def initial(ctx, method, tx, aux_tx) -> TrainState:
  """The initial state of a run: fresh params, optimiser states, the method's state (on host)."""
  # Copies: the step donates the state, and the context's initial variables must survive it.
  v = jax.tree.map(jnp.copy, ctx.variables)
  aux = method.init_aux(ctx)
  return TrainState(
      params=v["params"], batch_stats=v.get("batch_stats", {}),
      opt_state=tx.init(v["params"]), aux=aux, aux_opt_state=aux_tx.init(aux),
      method=method.init_state(ctx), step=jnp.zeros((), jnp.int32))
