"""Lifelong Lottery Tickets' lottery teaching (Chen et al., ICLR 2021, Sec. 4.3).

After each task (:mod:`sparse_cl_jax.methods.llt`), in the order the method runs them:

1. :func:`add_exemplars`: the task's exemplars are appended to the class-IL memory.
2. :func:`query`: the penultimate features of the unlabeled pool (:func:`load_pool`) and of every
   stored exemplar are computed; for each exemplar in memory order its ``k`` nearest pool images
   by squared L2, greedily without duplicates (:func:`knn_select`, ``select_knn`` as coded), are
   kept with the current model's logits (both heads) on them: the next task's distillation
   targets.
3. Every step of the next task adds :func:`kd_loss` on a sub-batch of those images into both heads.

The functions here return values, never a new state: the method writes them into its state
inside its recorded trainer operations.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import data as data_lib


# --------------------------------------------------------------------------------------------------
# The unlabeled pool.


def load_pool(config, stream) -> np.ndarray:
  """The unlabeled pool images (uint8 [P, H, W, C]) that ``config.llt.pool`` names.

  * ``'auto'``: the training images of ``config.dataset`` that the labeled stream uses neither for
    training nor for validation (:func:`data.unused_train_rows`), labels discarded; cap the
    stream (``max_train_per_task``) so that some remain.
  * ``'npz:<path>'``: array ``x`` (or ``images``) of an ``.npz`` file.
  * a dataset name of :func:`data.load_source` (e.g. ``'mnist'``, ``'tfds:...'``): its training
    images, from ``llt.pool_data_dir``.
  * ``'none'``: no pool (lottery teaching off).

  ``llt.pool_max > 0`` keeps a random subset of that many (from ``config.seed``).
  """
  lc = config.llt
  name = str(lc.pool)
  shape = tuple(stream.input_shape)
  if name == "none":
    return np.zeros((0,) + shape, np.uint8)
  if name == "auto":
    if config.dataset == "arrays":
      raise ValueError("config.llt.pool='auto' needs a named dataset to find the unused training "
                       "images; with dataset='arrays' write the pool to an .npz and pass "
                       "--config.llt.pool=npz:<path>")
    source = data_lib.load_source(config.dataset, data_dir=config.data_dir or None,
                                  seed=config.seed)
    rows = data_lib.unused_train_rows(
        source, scenario=config.scenario, num_tasks=config.num_tasks,
        class_order=config_lib.class_order(config), val_fraction=config.val_fraction,
        seed=config.seed, max_train_per_task=config.max_train_per_task or None,
        max_eval_per_task=config.max_eval_per_task or None)
    x = source.x_train[rows]
  elif name.startswith("npz:"):
    path = name[4:]
    if not os.path.isfile(path):
      raise ValueError(f"config.llt.pool={name!r}: no file {path}")
    with np.load(path) as f:
      key = "x" if "x" in f else ("images" if "images" in f else None)
      if key is None:
        raise ValueError(f"config.llt.pool={name!r}: the file has no array 'x' or 'images' "
                         f"(it has {sorted(f.keys())})")
      x = np.asarray(f[key])
  else:
    try:
      source = data_lib.load_source(name, data_dir=lc.pool_data_dir or None, seed=config.seed)
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"config.llt.pool={name!r}: {e}") from None
    x = source.x_train
  if x.ndim == 3:
    x = x[..., None]
  if x.dtype != np.uint8 or x.ndim != 4:
    raise ValueError(f"config.llt.pool={name!r}: images must be uint8 [N, H, W, C], got "
                     f"{x.dtype} {x.shape}")
  if config.get("image_size", 0) and tuple(x.shape[1:3]) != shape[:2]:
    src = data_lib.from_arrays(x, np.zeros(len(x), np.int32), x[:1], np.zeros(1, np.int32),
                               name="pool")
    x = data_lib.resize_source(src, int(config.image_size)).x_train
  if tuple(x.shape[1:]) != shape:
    raise ValueError(f"config.llt.pool={name!r}: pool images are {tuple(x.shape[1:])}, the "
                     f"stream's are {shape}")
  cap = int(lc.pool_max)
  if cap and len(x) > cap:
    rng = np.random.default_rng((config.seed, 0x11f))
    x = x[np.sort(rng.choice(len(x), cap, replace=False))]
  return np.ascontiguousarray(x)


def pool_device(trainer, pool: np.ndarray, cache: dict) -> jax.Array:
  """The pool on the device, put there once (kept in ``cache['pool']``)."""
  if "pool" not in cache:
    cache["pool"] = trainer.put(jnp.asarray(pool))
  return cache["pool"]


# --------------------------------------------------------------------------------------------------
# 1. The exemplar memory.


def add_exemplars(trainer, state, t: int, *, stream, per_class: int, selection: str,
                  key: jax.Array) -> dict:
  """Task t's exemplars appended to the memory (rows ``mem_end[t]..mem_end[t+1]``).

  Args:
    trainer: the run's trainer (features for herding; puts the new arrays on the device).
    state: the train state; its method state holds ``mem`` and ``mem_end``.
    t: the task just trained (0-based).
    stream: the task stream (task t's training images and labels).
    per_class: exemplars per class.
    selection: ``'random'`` or ``'herding'`` (:func:`data.select_exemplars`).
    key: the method's key; task t's draw uses ``fold_in(key, 100 + t)``.

  Returns:
    ``{'mem': {'x', 'y'}, 'mem_end'}``, the method state's new memory fields.
  """
  task = stream.task(t)
  feats = None
  if selection == "herding":
    out = trainer.outputs(state, trainer.task_data(t), view_task=t, features=True)
    feats = np.asarray(out["features"])[:len(task.y_train)]
  pick = data_lib.select_exemplars(task.y_train, per_class, method=selection, features=feats,
                                   key_or_seed=jax.random.fold_in(key, 100 + t))
  m = state.method
  start = int(m["mem_end"][t])
  mem_x = np.array(jax.device_get(m["mem"]["x"]))
  mem_y = np.array(jax.device_get(m["mem"]["y"]))
  mem_x[start:start + len(pick)] = task.x_train[pick]
  mem_y[start:start + len(pick)] = task.y_train[pick]
  ends = np.array(jax.device_get(m["mem_end"]))
  ends[t + 1:] = start + len(pick)
  return {"mem": trainer.put({"x": jnp.asarray(mem_x), "y": jnp.asarray(mem_y)}),
          "mem_end": trainer.put(jnp.asarray(ends))}


# --------------------------------------------------------------------------------------------------
# 2. The query: nearest pool images of the stored exemplars, with the teacher's logits.


def query(trainer, state, t: int, *, pool: jax.Array, k: int, memory_mb: float, mem_cap: int,
          capacity: int, cols: int) -> dict:
  """Lottery teaching's query with the current model (after task t) as the teacher.

  Args:
    trainer: the run's trainer (features and logits, task t's view).
    state: the train state; its method state holds the memory (``mem``, ``mem_end``).
    t: the task just trained (0-based).
    pool: uint8 [P, ...] the unlabeled pool on the device.
    k: nearest pool images per exemplar.
    memory_mb: budget of one distance block (:func:`knn_block_rows`).
    mem_cap: rows of the memory.
    capacity: rows of the result (:func:`knn_select`).
    cols: classes the teacher has seen (the KD columns).

  Returns:
    ``{'idx', 'logits', 'n', 'cols'}``: the selected pool rows, the teacher's logits (both heads)
    on them, how many, and the teacher's class count (for the caller to ``trainer.put``).
  """
  m = state.method
  P = int(pool.shape[0])
  po = trainer.outputs(state, {"x": pool, "n": jnp.int32(P)}, view_task=t, features=True)
  mem = {"x": m["mem"]["x"], "n": m["mem_end"][t + 1]}
  eo = trainer.outputs(state, mem, view_task=t, features=True)
  block = knn_block_rows(P, memory_mb)
  idx, n = knn_select(po["features"], jnp.int32(P), eo["features"], m["mem_end"][t + 1],
                      k=k, block=min(block, mem_cap), capacity=capacity)
  return {"idx": idx, "logits": jnp.take(po["logits"], idx, axis=0), "n": n,
          "cols": jnp.int32(cols)}


def knn_block_rows(pool_rows: int, memory_mb: float) -> int:
  """Exemplar rows per block so that a [block, pool_rows] f32 distance block fits the budget."""
  return max(1, int(memory_mb * 2 ** 20) // (4 * max(pool_rows, 1)))


@functools.partial(jax.jit, static_argnames=("k", "block", "capacity"))
def knn_select(pool_feat, pool_n, ex_feat, ex_n, *, k: int, block: int, capacity: int):
  """Greedy k-nearest pool rows per exemplar, without duplicates (``select_knn`` as coded).

  For each valid exemplar in order, its ``k`` nearest pool rows by squared L2 distance
  (``|e|^2 + |p|^2 - 2 e.p``) among the valid pool rows no earlier exemplar took (ties: the
  lower pool index). Distances are computed on the device for ``block`` exemplars at a time (a
  ``[block, P]`` matrix, never ``[M, P]``); a pool too small for every request is used up.

  Args:
    pool_feat: f32 [P, D]; rows ``>= pool_n`` are ignored.
    pool_n: int32 scalar.
    ex_feat: f32 [M, D]; rows ``>= ex_n`` are ignored.
    ex_n: int32 scalar.
    k: neighbours per exemplar (static).
    block: exemplar rows per distance block (static; :func:`knn_block_rows`).
    capacity: length of the result (static; at least ``min(M * k, P)`` to hold every pick).

  Returns:
    (indices int32 [capacity] in selection order, 0 past the count; count int32).
  """
  pool_feat = jnp.asarray(pool_feat, jnp.float32)
  ex_feat = jnp.asarray(ex_feat, jnp.float32)
  P, D = pool_feat.shape
  M = ex_feat.shape[0]
  kk = min(int(k), P)
  nb = -(-M // block)
  ex = jnp.pad(ex_feat, ((0, nb * block - M), (0, 0)))
  pool_sq = jnp.sum(pool_feat * pool_feat, axis=-1)
  pool_ok = jnp.arange(P, dtype=jnp.int32) < pool_n
  inf = jnp.float32(jnp.inf)

  def block_body(b, carry):
    rows = jax.lax.dynamic_slice(ex, (b * block, 0), (block, D))
    dist = (jnp.sum(rows * rows, axis=-1)[:, None] + pool_sq[None, :]
            - 2.0 * jnp.matmul(rows, pool_feat.T, precision=jax.lax.Precision.HIGHEST))

    def row_body(i, carry):
      taken, out, count = carry
      d = jnp.where(taken | ~pool_ok, inf, dist[i])
      neg, idx = jax.lax.top_k(-d, kk)
      ok = jnp.isfinite(neg) & (b * block + i < ex_n)
      out = jax.lax.dynamic_update_slice(out, jnp.where(ok, idx, -1).astype(jnp.int32), (count,))
      taken = taken.at[idx].max(ok)
      return taken, out, count + jnp.sum(ok, dtype=jnp.int32)

    return jax.lax.fori_loop(0, block, row_body, carry)

  init = (jnp.zeros((P,), jnp.bool_), jnp.full((capacity + kk,), -1, jnp.int32), jnp.int32(0))
  _, out, count = jax.lax.fori_loop(0, nb, block_body, init)
  out = out[:capacity]
  return jnp.where(out < 0, 0, out), count


# --------------------------------------------------------------------------------------------------
# 3. The distillation term of every later step.


def kd_loss(student, teacher, num_cols, temperature: float, valid) -> jax.Array:
  """Soft cross-entropy at temperature T times T^2, over the first ``num_cols`` columns.

  ``loss_fn_kd`` of the authors' code (Hinton et al. 2015; Li & Hoiem 2017): with
  ``p = softmax(teacher / T)`` and ``log q = log_softmax(student / T)`` over the previous model's
  classes (columns ``< num_cols``), ``T^2 * mean_rows(-sum_j p_j log q_j)`` over the valid rows.

  Args:
    student: f32 [B, K] logits of the model being trained.
    teacher: f32 [B, K] stored logits of the previous model.
    num_cols: int (may be traced): the previous model's number of classes.
    temperature: T.
    valid: bool [B].

  Returns:
    The scalar loss (0 when no row is valid).
  """
  cols = jnp.arange(student.shape[-1], dtype=jnp.int32)[None, :] < num_cols
  low = jnp.finfo(jnp.float32).min
  s = jnp.where(cols, student / temperature, low)
  tt = jnp.where(cols, teacher / temperature, low)
  p = jax.nn.softmax(tt, axis=-1)
  logq = jax.nn.log_softmax(s, axis=-1)
  per_row = -jnp.sum(jnp.where(cols, p * logq, 0.0), axis=-1)
  w = valid.astype(jnp.float32)
  return jnp.sum(jnp.where(valid, per_row, 0.0)) / jnp.maximum(jnp.sum(w), 1.0) * temperature ** 2
