"""Device-side batching inside jit: a per-epoch order of the padded rows and each batch's rows.

A task's ``N_max`` rows are padded; ``n_valid`` (may be traced) says how many lead. The epoch
order puts the valid rows first, and a batch's padding positions come back with ``valid=False``
to mask the loss, so one compiled step serves every task and epoch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparse_cl_jax import types


def epoch_permutation(key: types.PRNGKey, n_valid: types.Array, n_max: int) -> jax.Array:
  """A random order of ``0..n_max-1`` with the valid rows (``< n_valid``) first.

  The valid indices come in uniformly random order, then the padding indices in increasing order.
  ``n_valid`` may be traced; ``n_max`` must be static.

  Args:
    key: PRNG key.
    n_valid: number of valid rows (int scalar, may be traced).
    n_max: padded number of rows (static int).

  Returns:
    int32 [n_max].
  """
  perm = jax.random.permutation(key, n_max).astype(jnp.int32)
  # Sort key: -1 for every valid index (a stable sort keeps their random order), the index itself
  # for padding (increasing order after the valid ones).
  return perm[jnp.argsort(jnp.where(perm < n_valid, -1, perm), stable=True)]


def num_batches(n_valid: Any, batch_size: int) -> Any:
  """``ceil(n_valid / batch_size)``; works on Python ints and (traced) integer arrays."""
  return (n_valid + batch_size - 1) // batch_size


def batch_indices(perm: types.Array, step: types.Array, batch_size: int,
                  n_valid: types.Array) -> tuple[jax.Array, jax.Array]:
  """Rows of batch ``step`` of an epoch order, and which of them are valid.

  The last batch of an epoch is partly padding: those positions get a valid (repeated) index and
  ``valid=False``, so mask the loss with it (e.g. ``sum(loss * valid) / max(sum(valid), 1)``).

  Args:
    perm: int [n_max] from `epoch_permutation`.
    step: batch number within the epoch (may be traced).
    batch_size: static batch size.
    n_valid: number of valid rows (may be traced).

  Returns:
    (indices int32 [batch_size], valid bool [batch_size]).
  """
  positions = step * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
  indices = jnp.take(perm, jnp.minimum(positions, perm.shape[0] - 1))
  return indices.astype(jnp.int32), positions < n_valid
