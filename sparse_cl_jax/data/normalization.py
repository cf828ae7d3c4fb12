"""Per-channel normalisation of uint8 images: the statistics of a stream's training images and
the jit-compatible map ``(x / 255 - mean) / std``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_cl_jax import types

# Source rows counted per histogram update (bounds the working memory of `channel_stats`).
_STATS_CHUNK_ROWS = 4096


def normalize(x: types.Array, mean: types.Array, std: types.Array) -> jax.Array:
  """``(x / 255 - mean) / std`` with per-channel ``mean``/``std`` [C]; jit-compatible.

  Broadcasting is explicit (same rank), so it works under ``jax_numpy_rank_promotion='raise'``.

  Args:
    x: images [..., C], any dtype (uint8 expected).
    mean: [C] in [0, 1] units.
    std: [C].

  Returns:
    float32 array shaped like ``x``.
  """
  x = jnp.asarray(x).astype(jnp.float32)
  shape = (1,) * (x.ndim - 1) + (-1,)
  mean = jnp.reshape(jnp.asarray(mean, jnp.float32), shape)
  std = jnp.reshape(jnp.asarray(std, jnp.float32), shape)
  return (x * jnp.float32(1.0 / 255.0) - mean) / std


def channel_stats(images: np.ndarray,
                  rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Exact per-channel mean/std in [0, 1] units of ``images[rows[t]]`` over all tasks t.

  Pixel permutations do not change a histogram, so the source rows suffice; tasks with the same
  rows (a permuted stream) are counted once and weighted.
  """
  channels = images.shape[-1]
  hist = np.zeros((channels, 256), np.int64)
  per_rows = {}
  for idx in rows:
    key = idx.tobytes()
    if key not in per_rows:
      counts = np.zeros((channels, 256), np.int64)
      for start in range(0, idx.size, _STATS_CHUNK_ROWS):
        flat = images[idx[start:start + _STATS_CHUNK_ROWS]].reshape(-1, channels)
        for c in range(channels):
          counts[c] += np.bincount(flat[:, c], minlength=256)
      per_rows[key] = counts
    hist += per_rows[key]
  values = np.arange(256, dtype=np.float64) / 255.0
  total = np.maximum(hist.sum(axis=1), 1)
  mean = hist @ values / total
  var = np.maximum(hist @ values**2 / total - mean**2, 0.0)
  return mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-6).astype(np.float32)
