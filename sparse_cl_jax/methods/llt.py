"""Lifelong Lottery Tickets (Chen, Zhang, Liu, Chang, Wang; ICLR 2021): class-incremental tickets.

Paper: "Long Live the Lottery: The Existence of Winning Tickets in Lifelong Learning"; the
authors' code is VITA-Group/Lifelong-Learning-LTH (``main_TD.py``, ``main_BU.py``,
``trainer.py``). ``config.llt.mode`` selects one of four systems that share one class-IL framework:

* The framework (paper App. A2.2, ``trainer.train_KD``). An exemplar memory keeps
  ``llt.exemplars_per_class`` images of every class seen (``data.select_exemplars``, random or
  herding). The model has two heads on the same features (``OUTPUT_COPIES = 2``: main head = the
  first K outputs, auxiliary head = the next K; evaluation reads the main head, argmax over every
  class seen so far). Task 1 trains both heads on the same batches of its own data (``train()``
  as coded). Every later step draws four sub-batches of ``batch_size // 4`` rows: ``random`` (new
  data and old exemplars together, the epoch's source) for the auxiliary head; ``new`` and
  ``old`` (class-balanced: ``int(sub / (1 + t))`` new rows and ``int(sub * t / (1 + t))`` old
  rows, the rest of each static sub-batch marked invalid) for the main head; ``unlabeled`` (pool
  images with the previous model's stored logits) for lottery teaching. The loss is
  ``aux_CE + gamma1 * KD_aux + gamma2 * (main_CE + gamma1 * KD_main)`` (as coded: gamma1 = 1,
  gamma2 = 0.5), main_CE summed over the balanced rows / sub (the as-coded ``coef_new``/``coef_old``
  weighting). All four sub-batches go through the network as one batch (one forward).
* Lottery teaching (Sec. 4.3). After each task, the penultimate features of the unlabeled pool and
  of every stored exemplar are computed; for each exemplar in memory order its ``llt.knn``
  nearest pool images by squared L2, greedily without duplicates (``select_knn`` as coded), are
  kept with the model's logits (both heads) on them. Every later step adds KD (soft
  cross-entropy at temperature T, times T^2, over the previous model's classes: ``loss_fn_kd``) on
  a sub-batch of them into both heads. The query runs on the device in blocks of exemplars whose
  distance rows fit ``llt.knn_memory_mb``.
* ``'td'`` top-down pruning (Sec. 4.1, Alg. 1, ``main_TD.py``): after task t,
  ``llt.curriculum[t]`` IMP rounds, each removing ``llt.prune_fraction`` of the remaining maskable
  weights by global magnitude (conv and dense kernels, never heads or norms), retraining between
  rounds (``llt.retrain_epochs`` at ``llt.retrain_lr``); then the kernels are rewound
  (``llt.rewind``: original init 'init' = LT, 'random' re-init, previous task's weights 'task' =
  TR, 'late' = the weights after epoch ``llt.late_epoch`` of task 1, or 'none' = fine-tune) and
  the next task trains that ticket. After the last task's rounds the last task is trained again
  on the final ticket (as coded). The accuracy row after task t is the model trained on task t.
* ``'bu'`` bottom-up pruning (Sec. 4.2, Alg. 2, ``main_BU.py``): task 1 is pruned round by round
  while the validation accuracy stays within ``llt.bu_max_drop`` of the dense model or the
  sparsity is below ``llt.bu_base_sparsity``. For each later task a dense reference continues
  from the previous reference, and the ticket starts from the previous reference's weights masked
  (TR, or ``llt.rewind``); the ticket's mask is kept when its validation accuracy is within
  ``llt.bu_accept`` of the reference's; otherwise ``llt.bu_regrow`` of the pruned positions are
  re-grown from the new reference by magnitude and pruned back ``llt.prune_fraction`` of the
  re-grown ones at a time while the same rule holds. Masks only grow after task 1.
  ``llt.l1 > 0`` adds an l1 penalty on the kernels (the l1 BU variant of Table 1).
* ``'dense'``: the same class-IL training without pruning (the paper's full dense model).
* ``'imp'``: plain IMP, as the TD machinery with a uniform schedule of the same total number of
  rounds, no lottery teaching and no rewinding (pruned weights are fine-tuned).

``results.json`` adds ``remaining_weights`` (fraction of the maskable weights the model evaluated
after each task computes with; also ``density_per_task``), ``rewind_points`` (per task, where the
ticket's kernels were rewound to) and ``llt``: the resolved curriculum / rewinding / lottery
teaching, pool size, unlabeled images selected after each task, ``prune_rounds`` (TD: rounds
after each task; BU: task 1's accepted rounds, later the pruning-back rounds after a re-growth),
and for BU the reference's and the ticket's validation accuracies and which tasks re-grew.

Every decision uses validation data (never test). Everything a resumed run needs (memory, query
results, stored logits, masks, rewinding weights, the BU reference) lives in the method state, so
a run resumed inside a task ends with identical results.

Example::

  python experiments/main.py --config=configs/llt.py --workdir=/tmp/llt
  python experiments/main.py --config=configs/llt.py:fashion_mnist --workdir=/tmp/llt_fm \\
      --config.llt.mode=bu
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import data as data_lib
from sparse_cl_jax import masks
from sparse_cl_jax import models
from sparse_cl_jax import topk
from sparse_cl_jax import transforms
from sparse_cl_jax.methods import base

DEFAULT_NORM = "batch"  # class-IL, one shared head: plain BatchNorm (PreAct-ResNet18 as coded)
OUTPUT_COPIES = 2  # main head = first K logits, auxiliary head = next K

MODES = ("td", "bu", "dense", "imp")
REWINDS = ("auto", "init", "random", "task", "late", "none")
SELECTIONS = ("random", "herding")
TD_CURRICULUM_5 = (1, 1, 2, 3, 5)  # paper Sec. 4.1 / main_TD.py --prune_scheduler

# Rewinding codes kept in the method state (per task) and their names in results.json.
_NO_REWIND, _INIT, _RANDOM, _TASK, _LATE = 0, 1, 2, 3, 4
_REWIND_CODES = {"none": _NO_REWIND, "init": _INIT, "random": _RANDOM, "task": _TASK,
                 "late": _LATE}
_ACTIVE_ARG = "llt_active"


# --------------------------------------------------------------------------------------------------
# Pure pieces (each tested on its own).


def sub_batch_sizes(batch_size: int, t: int) -> tuple[int, int, int]:
  """(sub, new rows, old rows) of the balanced main-head sub-batches at task ``t`` (0-based).

  As coded (``dataloader.setup_dataset``): ``sub = batch_size // 4``; the new-class loader draws
  ``int(sub / (1 + t))`` rows and the exemplar loader ``int(sub * t / (1 + t))``.
  """
  sub = batch_size // 4
  return sub, sub // (1 + t), (sub * t) // (1 + t)


def balanced_counts(sub: int, task):
  """:func:`sub_batch_sizes`'s new and old counts for a traced task (int32 scalars)."""
  t = jnp.asarray(task, jnp.int32)
  return jnp.int32(sub) // (1 + t), (jnp.int32(sub) * t) // (1 + t)


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


def kept_after(n: int, fraction: float, rounds: int) -> int:
  """Weights kept of ``n`` after ``rounds`` IMP rounds of ``fraction`` each: ``round(n * (1 -
  fraction) ** rounds)``, the nearest weight to exactly 0.8^r for the default 20% (as coded,
  PyTorch's pruning container rounds every round, which drifts by a few weights)."""
  return int(round(int(n) * (1.0 - float(fraction)) ** int(rounds)))


def prune_keep(mask, params, spec, keep) -> masks.types.Masks:
  """One IMP round: the ``keep`` largest-|w| weights among those ``mask`` keeps (global scope).

  Only maskable leaves (``spec``) take part; others stay all-True. ``keep`` may be traced; the
  result keeps exactly ``min(keep, count)`` weights (:func:`topk.topk_mask`).
  """
  cand = masks.where_spec(spec, mask, fill=False)
  kept = topk.topk_mask(jax.tree.map(jnp.abs, params), keep, candidates=cand, scope="global",
                        spec=spec)
  return masks.where_spec(spec, masks.logical_and(kept, cand))


def regrow(mask, ref_params, spec, grow):
  """BU capacity expansion: ``mask`` plus the ``grow`` largest-|w| of the reference's weights at the
  positions ``mask`` pruned (``partly_prune_model`` as coded). The result contains ``mask``."""
  pruned = jax.tree.map(lambda m, s: (~m) & s, mask, spec)
  grown = topk.topk_mask(jax.tree.map(jnp.abs, ref_params), grow, candidates=pruned,
                         scope="global", spec=spec)
  return jax.tree.map(lambda m, g, p, s: (m | (g & p)) if s else jnp.ones_like(m), mask, grown,
                      pruned, spec)


def prune_back(base_mask, mask, params, spec, keep):
  """BU pruning back: keep ``keep`` largest-|w| of the re-grown positions (``mask`` minus
  ``base_mask``); ``base_mask`` is never touched (``partly_prune_model_iter``)."""
  grown = jax.tree.map(lambda m, b, s: (m & ~b) if s else jnp.zeros_like(m), mask, base_mask, spec)
  kept = topk.topk_mask(jax.tree.map(jnp.abs, params), keep, candidates=grown, scope="global",
                        spec=spec)
  return jax.tree.map(lambda b, k, g, s: (b | (k & g)) if s else jnp.ones_like(b), base_mask, kept,
                      grown, spec)


def rewind(params, mask, source, spec):
  """The ticket's start: maskable kernels from ``source`` times ``mask``; every other leaf of
  ``params`` unchanged (as coded, ``utils.rewind`` touches the pruned conv weights only)."""
  return jax.tree.map(
      lambda p, m, s, sp: jnp.where(m, s, jnp.zeros_like(s)).astype(p.dtype) if sp else p,
      params, mask, source, spec)


def parse_curriculum(value, num_tasks: int, mode: str) -> tuple[int, ...]:
  """IMP rounds after each task: ``llt.curriculum`` ('auto' or 'n1,n2,...')."""
  if value in ("auto", "", None):
    if num_tasks == len(TD_CURRICULUM_5):
      rounds = TD_CURRICULUM_5
    elif mode in ("td", "imp"):
      raise ValueError(f"config.llt.curriculum='auto' is the paper's 5-task schedule "
                       f"{','.join(map(str, TD_CURRICULUM_5))}; with num_tasks={num_tasks} give "
                       f"{num_tasks} comma-separated round counts, e.g. --config.llt.curriculum="
                       f"{','.join(['1'] * num_tasks)}")
    else:
      return (0,) * num_tasks
    if mode == "imp":  # no curriculum: the same total, spread evenly (earlier tasks first)
      total = sum(rounds)
      rounds = tuple(total // num_tasks + (1 if i < total % num_tasks else 0)
                     for i in range(num_tasks))
    return tuple(rounds)
  try:
    rounds = tuple(int(v) for v in str(value).split(","))
  except ValueError:
    rounds = ()
  if len(rounds) != num_tasks or min(rounds) < 0:
    raise ValueError(f"config.llt.curriculum={value!r} must be 'auto' or {num_tasks} "
                     "comma-separated non-negative round counts (one per task)")
  return rounds


def expected_counts(total: int, rounds, fraction: float) -> list[int]:
  """TD/IMP: maskable weights of the model evaluated after each task (exact counts).

  The model of task t carries the rounds of tasks before t; the last task is retrained on the
  ticket of every round (as coded), so its count has them all.
  """
  before = np.cumsum((0,) + tuple(rounds))
  return [kept_after(total, fraction, int(r)) for r in before[:len(rounds) - 1]] + [
      kept_after(total, fraction, int(before[-1]))]


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


# --------------------------------------------------------------------------------------------------
# Config checks.


def _check(config) -> None:
  lc = config.llt
  if lc.mode not in MODES:
    raise ValueError(f"config.llt.mode={lc.mode!r} is not valid; choose one of {list(MODES)}")
  if config.incremental != "class":
    raise ValueError(f"config.incremental={config.incremental!r}: Lifelong Lottery Tickets is a "
                     "class-incremental method; set --config.incremental=class")
  if lc.rewind not in REWINDS:
    raise ValueError(f"config.llt.rewind={lc.rewind!r} is not valid; choose one of "
                     f"{list(REWINDS)}")
  if lc.exemplar_selection not in SELECTIONS:
    raise ValueError(f"config.llt.exemplar_selection={lc.exemplar_selection!r} is not valid; "
                     f"choose one of {list(SELECTIONS)}")
  for field, low in (("exemplars_per_class", 1), ("knn", 1), ("bu_max_rounds", 1),
                     ("retrain_epochs", 0), ("late_epoch", 0), ("pool_max", 0)):
    v = lc[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f"config.llt.{field}={v!r} must be an integer >= {low}")
  for field in ("gamma1", "gamma2", "bu_max_drop", "bu_accept", "l1"):
    v = lc[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
      raise ValueError(f"config.llt.{field}={v!r} must be a number >= 0")
  for field in ("temperature", "knn_memory_mb", "retrain_lr"):
    v = lc[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
      raise ValueError(f"config.llt.{field}={v!r} must be a number > 0")
  for field, high_ok in (("prune_fraction", False), ("bu_regrow", True)):
    v = lc[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
        0 < v < 1 or (high_ok and v == 1)):
      raise ValueError(f"config.llt.{field}={v!r} must be in (0, {'1]' if high_ok else '1)'}")
  if not 0 <= lc.bu_base_sparsity < 1:
    raise ValueError(f"config.llt.bu_base_sparsity={lc.bu_base_sparsity!r} must be in [0, 1)")
  if lc.late_epoch > config.epochs:
    raise ValueError(f"config.llt.late_epoch={lc.late_epoch} must be <= config.epochs="
                     f"{config.epochs} (late rewinding: the weights after that epoch of task 1)")
  if config.batch_size < 4:
    raise ValueError(f"config.batch_size={config.batch_size} must be >= 4 (four sub-batches of "
                     "batch_size // 4 rows)")
  pool = str(lc.pool)
  if not pool:
    raise ValueError("config.llt.pool='' is not valid; use 'auto', 'none', 'npz:<path>' or a "
                     "dataset name")


def resolved(config) -> dict:
  """The settings the mode implies: curriculum, rewinding, lottery teaching."""
  lc = config.llt
  mode = lc.mode
  rounds = parse_curriculum(lc.curriculum, int(config.num_tasks), mode)
  if mode in ("dense", "bu"):
    rounds = (0,) * int(config.num_tasks)
  rw = lc.rewind
  if rw == "auto":
    rw = {"td": "init", "bu": "task", "imp": "none", "dense": "none"}[mode]
  teach = bool(lc.lottery_teaching) and mode != "imp"
  if teach and str(lc.pool) == "none":
    raise ValueError("config.llt.pool='none' leaves lottery teaching without images; set "
                     "--config.llt.lottery_teaching=False or name a pool")
  return {"rounds": rounds, "rewind": rw, "teach": teach}


# --------------------------------------------------------------------------------------------------
# The method.


def make(config, ctx: base.Context) -> base.Method:
  """Lifelong Lottery Tickets with ``config.llt.*`` (see the module docstring and configs/llt.py)."""
  _check(config)
  lc = config.llt
  settings = resolved(config)
  mode, rounds, rewind_kind, teach = (lc.mode, settings["rounds"], settings["rewind"],
                                      settings["teach"])
  stream = ctx.stream
  T = ctx.num_tasks
  K = int(stream.num_outputs)
  spec = ctx.spec
  total = int(sum(int(np.size(p)) for p, s in zip(jax.tree.leaves(ctx.params),
                                                  jax.tree.leaves(spec)) if s))
  if total == 0:
    raise ValueError("Lifelong Lottery Tickets: the model has no maskable weights (config."
                     "mask_include / mask_exclude)")
  sub = int(config.batch_size) // 4
  frac = float(lc.prune_fraction)
  seen = np.asarray(stream.head_mask).sum(axis=1).astype(np.int32)  # classes seen up to task t
  seen_dev = jnp.asarray(seen)
  input_shape = tuple(stream.input_shape)
  mem_cap = int(lc.exemplars_per_class) * int(stream.num_classes_total)
  pool_np = load_pool(config, stream) if teach else np.zeros((0,) + input_shape, np.uint8)
  P = int(pool_np.shape[0])
  if teach and P == 0:
    raise ValueError(f"config.llt.pool={lc.pool!r} holds no images (with pool='auto', cap the "
                     "labeled stream: --config.max_train_per_task=...)")
  unl_cap = max(1, min(mem_cap * int(lc.knn), P))
  gamma1, gamma2, temp = float(lc.gamma1), float(lc.gamma2), float(lc.temperature)
  keep_late = rewind_kind == "late"
  needs_snap = mode in ("td", "imp", "bu")
  key = jax.random.wrap_key_data(ctx.key)
  cache: dict = {}

  def zeros_like_params(tree):
    return jax.tree.map(jnp.zeros_like, tree)

  def empty_unl():
    return {"idx": jnp.zeros((unl_cap,), jnp.int32),
            "logits": jnp.zeros((unl_cap, OUTPUT_COPIES * K), jnp.float32),
            "n": jnp.int32(0), "cols": jnp.int32(0)}

  def init_state(ctx):
    params = ctx.params
    bs = ctx.variables.get("batch_stats", {})
    m = {
        "mask": masks.ones(params),
        "use_mask": jnp.asarray(mode != "dense"),
        "mem": {"x": jnp.zeros((mem_cap,) + input_shape, jnp.uint8),
                "y": jnp.zeros((mem_cap,), jnp.int32)},
        "mem_end": jnp.zeros((T + 1,), jnp.int32),  # memory rows of tasks < t, at index t
        "unl": empty_unl(), "unl_next": empty_unl(),
        "remaining": jnp.zeros((T,), jnp.float32),
        "rewind": jnp.zeros((T,), jnp.int32),
        "rounds": jnp.zeros((T,), jnp.int32),
        "selected": jnp.zeros((T,), jnp.int32),
        "ref_acc": jnp.full((T,), -1.0, jnp.float32),  # -1: not measured (BU only)
        "ticket_acc": jnp.full((T,), -1.0, jnp.float32),
        "final_acc": jnp.full((T,), -1.0, jnp.float32),
        "regrown": jnp.zeros((T,), jnp.int32),
        "count_start": jnp.zeros((T,), jnp.int32),  # BU: mask count when task t began
    }
    if needs_snap:
      m.update(snap=zeros_like_params(params), snap_bs=zeros_like_params(bs),
               snap_mask=masks.ones(params), start=zeros_like_params(params),
               start_bs=zeros_like_params(bs), next_mask=masks.ones(params))
    if mode == "bu":
      m.update(ref=zeros_like_params(params), ref_bs=zeros_like_params(bs),
               base_mask=masks.ones(params))
    if keep_late:
      m["late"] = zeros_like_params(params)
    return m

  def active(m):
    off = ~m["use_mask"]
    return jax.tree.map(lambda k: k | off, m["mask"])

  def forward_params(params, aux, m, task, current):
    del aux, task, current
    return masks.apply(params, active(m))

  def wrap_tx(tx):
    return optax.chain(tx, transforms.keep_sparse(mask_arg=_ACTIVE_ARG))

  def tx_args(m, task):
    del task
    return {_ACTIVE_ARG: active(m)}

  penalty = None
  if float(lc.l1) > 0:
    l1 = float(lc.l1)

    def penalty(params, aux, m, task):
      del aux, task
      fp = masks.apply(params, active(m))
      return l1 * sum(jnp.sum(jnp.abs(p)) for p, s in zip(jax.tree.leaves(fp),
                                                          jax.tree.leaves(spec)) if s)

  def eval_logits(logits):
    return logits[:, :K]

  def masked_ce(logits, y, task):
    cols = jnp.arange(K, dtype=jnp.int32)[None, :] < seen_dev[task]
    return optax.softmax_cross_entropy_with_integer_labels(
        jnp.where(cols, logits, jnp.finfo(jnp.float32).min), y)

  def step_loss(fwd, params, aux, m, batch_stats, batches, task):
    fp = forward_params(params, aux, m, task, task)
    if "new" not in batches:  # task 1 (as coded train()): both heads on the same batch
      b = batches["random"]
      logits, new_bs = fwd(fp, batch_stats, b["x"], b["valid"], task)
      v = b["valid"]
      w = jnp.maximum(jnp.sum(v.astype(jnp.float32)), 1.0)
      main = jnp.sum(jnp.where(v, masked_ce(logits[:, :K], b["y"], task), 0.0)) / w
      aux_l = jnp.sum(jnp.where(v, masked_ce(logits[:, K:], b["y"], task), 0.0)) / w
      loss = main + aux_l
      pred_logits, y, count_rows = logits[:, :K], b["y"], v
    else:
      n_new, n_old = balanced_counts(sub, task)
      rows = jnp.arange(sub, dtype=jnp.int32)
      parts = [("random", batches["random"]["valid"]),
               ("new", batches["new"]["valid"] & (rows < n_new)),
               ("old", batches["old"]["valid"] & (rows < n_old))]
      if "unlabeled" in batches:
        parts.append(("unlabeled", batches["unlabeled"]["valid"]))
      x = jnp.concatenate([batches[n]["x"] for n, _ in parts])
      valid = jnp.concatenate([v for _, v in parts])
      logits, new_bs = fwd(fp, batch_stats, x, valid, task)
      out = dict(zip([n for n, _ in parts], jnp.split(logits, len(parts))))
      vr = parts[0][1]
      w = jnp.maximum(jnp.sum(vr.astype(jnp.float32)), 1.0)
      aux_ce = jnp.sum(jnp.where(vr, masked_ce(out["random"][:, K:], batches["random"]["y"],
                                               task), 0.0)) / w
      main_ce = (jnp.sum(jnp.where(parts[1][1], masked_ce(out["new"][:, :K],
                                                          batches["new"]["y"], task), 0.0))
                 + jnp.sum(jnp.where(parts[2][1], masked_ce(out["old"][:, :K],
                                                            batches["old"]["y"], task), 0.0))
                 ) / sub
      kd_main = kd_aux = jnp.float32(0.0)
      if "unlabeled" in batches:
        u = batches["unlabeled"]
        cols = m["unl"]["cols"]
        kd_main = kd_loss(out["unlabeled"][:, :K], u["logits"][:, :K], cols, temp, u["valid"])
        kd_aux = kd_loss(out["unlabeled"][:, K:], u["logits"][:, K:], cols, temp, u["valid"])
      loss = aux_ce + gamma1 * kd_aux + gamma2 * (main_ce + gamma1 * kd_main)
      pred_logits, y, count_rows = out["random"][:, :K], batches["random"]["y"], vr
    cols = jnp.arange(K, dtype=jnp.int32)[None, :] < seen_dev[task]
    pred = jnp.argmax(jnp.where(cols, pred_logits, jnp.finfo(jnp.float32).min), -1)
    n = jnp.sum(count_rows.astype(jnp.float32))
    correct = jnp.sum(jnp.where(count_rows, pred == y, False).astype(jnp.float32))
    return loss, (new_bs, jnp.stack([loss * n, correct, n]), {})

  # ------------------------------------------------------------------------------------------------
  # Host-side plumbing (each runs inside a recorded trainer.apply, or builds sources).

  def copy(tree):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)

  def with_m(state, **fields):
    m = dict(state.method)
    m.update(fields)
    return state._replace(method=m)

  @jax.jit
  def random_rows(task_x, task_y, n_new, mem_x, mem_y, n_old):
    n_rows = task_x.shape[0] + mem_x.shape[0]
    i = jnp.arange(n_rows, dtype=jnp.int32)
    src = jnp.clip(jnp.where(i < n_new, i, task_x.shape[0] + i - n_new), 0, n_rows - 1)
    x = jnp.take(jnp.concatenate([task_x, mem_x]), src, axis=0)
    y = jnp.take(jnp.concatenate([task_y, mem_y]), src, axis=0)
    return x, y, (n_new + n_old).astype(jnp.int32)

  def pool_device(trainer):
    if "pool" not in cache:
      cache["pool"] = trainer.put(jnp.asarray(pool_np))
    return cache["pool"]

  def sources(trainer, state, t):
    """The sources of task t's training (``t`` 0-based; task 1 has one)."""
    d = trainer.task_data(t)
    if t == 0:
      return {"random": _source({"x": d.x, "y": d.y, "n": d.n}, config.batch_size, "epoch")}
    # Copies: the train step donates the state, so a source must not share its buffers.
    m = copy({"mem": state.method["mem"], "mem_end": state.method["mem_end"],
              "unl": state.method["unl"]})
    n_old = m["mem_end"][t]
    x, y, n = random_rows(d.x, d.y, d.n, m["mem"]["x"], m["mem"]["y"], n_old)
    out = {"random": _source({"x": x, "y": y, "n": n}, sub, "epoch"),
           "new": _source({"x": d.x, "y": d.y, "n": d.n}, sub, "cycle"),
           "old": _source({"x": m["mem"]["x"], "y": m["mem"]["y"], "n": n_old}, sub, "cycle")}
    if teach:
      u = m["unl"]
      out["unlabeled"] = _source({"x": jnp.take(pool_device(trainer), u["idx"], axis=0),
                                  "logits": u["logits"], "n": u["n"]}, sub, "cycle",
                                 augment=False)
    return out

  def train_phase(trainer, state, t, *, epochs, phase, retrain=False, epoch_end=None):
    if retrain:
      return trainer.train(state, t, epochs=epochs, phase=phase, lr=float(lc.retrain_lr),
                           lr_milestones=(), sources=sources(trainer, state, t),
                           epoch_end=epoch_end)
    return trainer.train(state, t, epochs=epochs, phase=phase, sources=sources(trainer, state, t),
                         epoch_end=epoch_end)

  def late_hook(state, epoch):
    if keep_late and epoch + 1 == int(lc.late_epoch):
      state = with_m(state, late=copy(state.params))
    return state, False

  def first_training(trainer, state, t, phase="train"):
    hook = late_hook if (t == 0 and keep_late) else None
    if t == 0 and keep_late and int(lc.late_epoch) == 0:
      state = trainer.apply(state, lambda s: with_m(s, late=copy(trainer.initial_params())))
    return train_phase(trainer, state, t, epochs=config.epochs, phase=phase, epoch_end=hook)

  def add_exemplars(trainer, state, t):
    """Task t's exemplars appended to the memory (rows mem_end[t]..mem_end[t+1])."""
    task = stream.task(t)
    feats = None
    if lc.exemplar_selection == "herding":
      out = trainer.outputs(state, trainer.task_data(t), view_task=t, features=True)
      feats = np.asarray(out["features"])[:len(task.y_train)]
    pick = data_lib.select_exemplars(
        task.y_train, int(lc.exemplars_per_class), method=lc.exemplar_selection,
        features=feats, key_or_seed=jax.random.fold_in(key, 100 + t))
    m = state.method
    start = int(m["mem_end"][t])
    mem_x = np.array(jax.device_get(m["mem"]["x"]))
    mem_y = np.array(jax.device_get(m["mem"]["y"]))
    mem_x[start:start + len(pick)] = task.x_train[pick]
    mem_y[start:start + len(pick)] = task.y_train[pick]
    ends = np.array(jax.device_get(m["mem_end"]))
    ends[t + 1:] = start + len(pick)
    return with_m(state, mem=trainer.put({"x": jnp.asarray(mem_x), "y": jnp.asarray(mem_y)}),
                  mem_end=trainer.put(jnp.asarray(ends)))

  def query(trainer, state, t):
    """Lottery teaching's query with the current model as the teacher (into unl_next)."""
    m = state.method
    pool = {"x": pool_device(trainer), "n": jnp.int32(P)}
    po = trainer.outputs(state, pool, view_task=t, features=True)
    mem = {"x": m["mem"]["x"], "n": m["mem_end"][t + 1]}
    eo = trainer.outputs(state, mem, view_task=t, features=True)
    block = knn_block_rows(P, float(lc.knn_memory_mb))
    idx, n = knn_select(po["features"], jnp.int32(P), eo["features"], m["mem_end"][t + 1],
                        k=int(lc.knn), block=min(block, mem_cap), capacity=unl_cap)
    nxt = {"idx": idx, "logits": jnp.take(po["logits"], idx, axis=0), "n": n,
           "cols": jnp.int32(seen[t])}
    return with_m(state, unl_next=trainer.put(nxt),
                  selected=m["selected"].at[t].set(n))

  def after_training(trainer, state, t):
    """Memory and (for every task but the last) the lottery-teaching query."""
    state = trainer.apply(state, lambda s: add_exemplars(trainer, s, t))
    if teach and t < T - 1:
      state = trainer.apply(state, lambda s: query(trainer, s, t))
    return state

  def record(state, t, **values):
    m = state.method
    upd = {}
    for k, v in values.items():
      upd[k] = m[k].at[t].set(jnp.asarray(v, m[k].dtype))
    return with_m(state, **upd)

  def density(m):
    return masks.count(m["mask"], spec).astype(jnp.float32) / jnp.float32(total)

  def rewind_source(trainer, state, t, snap_params):
    if rewind_kind == "init":
      return trainer.initial_params()
    if rewind_kind == "random":
      fresh = models.init(ctx.model, jax.random.fold_in(key, 1000 + t), (1,) + input_shape)
      return fresh["params"]
    if rewind_kind == "task":
      return snap_params
    if rewind_kind == "late":
      return state.method["late"]
    return None

  # ------------------------------------------------------------------------------------------------
  # Dense and top-down (TD / plain IMP).

  def run_td(trainer, state, t):
    if t > 0:
      def begin(s):
        m = s.method
        nxt = {"mask": copy(m["next_mask"]), "unl": copy(m["unl_next"])}
        return s._replace(params=copy(m["start"]), batch_stats=copy(m["start_bs"]),
                          method={**m, **nxt})
      state = trainer.apply(state, begin)
    state = first_training(trainer, state, t)
    state = after_training(trainer, state, t)
    n_rounds = rounds[t]

    def snapshot(s):
      return with_m(s, snap=copy(s.params), snap_bs=copy(s.batch_stats),
                    snap_mask=copy(s.method["mask"]))

    state = trainer.apply(state, snapshot)
    # Host mirror of the mask count (decisions never read the state: it may be a later one on
    # replay); before the rounds of task t the mask holds the rounds of tasks < t.
    done = sum(rounds[:t])
    for r in range(n_rounds):
      keep = kept_after(total, frac, done + r + 1)

      def prune(s, keep=keep):
        new = prune_keep(s.method["mask"], s.params, spec, jnp.int32(keep))
        return s._replace(params=masks.apply(s.params, new), method={**s.method, "mask": new})

      state = trainer.apply(state, prune)
      if r < n_rounds - 1 and int(lc.retrain_epochs) > 0:
        state = train_phase(trainer, state, t, epochs=int(lc.retrain_epochs),
                            phase=f"prune round {r + 1}", retrain=True)
    code = _REWIND_CODES[rewind_kind] if n_rounds > 0 else _NO_REWIND

    def stash(s):
      m = s.method
      src = rewind_source(trainer, s, t, m["snap"]) if code != _NO_REWIND else None
      start = rewind(s.params, m["mask"], src, spec) if src is not None else masks.apply(
          s.params, m["mask"])
      m = {**m, "start": copy(start), "start_bs": copy(s.batch_stats),
           "next_mask": copy(m["mask"]), "mask": copy(m["snap_mask"])}
      s = s._replace(params=copy(m["snap"]), batch_stats=copy(m["snap_bs"]), method=m)
      return record(s, t, remaining=density(m), rewind=code, rounds=n_rounds)

    state = trainer.apply(state, stash)
    if t == T - 1 and n_rounds > 0:  # as coded: the last task is retrained on the final ticket
      def final(s):
        m = s.method
        s = s._replace(params=copy(m["start"]), batch_stats=copy(m["start_bs"]),
                       method={**m, "mask": copy(m["next_mask"])})
        return record(s, t, remaining=density(s.method))

      state = trainer.apply(state, final)
      state = train_phase(trainer, state, t, epochs=config.epochs, phase="ticket retrain")
    return state

  def run_dense(trainer, state, t):
    if t > 0:
      state = trainer.apply(state, lambda s: with_m(s, unl=copy(s.method["unl_next"])))
    state = first_training(trainer, state, t)
    state = after_training(trainer, state, t)
    return trainer.apply(state, lambda s: record(s, t, remaining=1.0))

  # ------------------------------------------------------------------------------------------------
  # Bottom-up (BU).

  def val_acc(trainer, state, t) -> float:
    return float(np.mean([trainer.evaluate(state, j, split="val", current=t)
                          for j in range(t + 1)]))

  def keep_pruning(drop: float, sparsity: float) -> bool:
    # As coded (main_BU.py): go on while the drop is within the threshold or the base sparsity
    # is not reached yet.
    return drop <= float(lc.bu_max_drop) or sparsity < float(lc.bu_base_sparsity)

  def save_accepted(s):
    return with_m(s, snap=copy(s.params), snap_bs=copy(s.batch_stats),
                  snap_mask=copy(s.method["mask"]))

  def restore_accepted(s):
    m = s.method
    return s._replace(params=copy(m["snap"]), batch_stats=copy(m["snap_bs"]),
                      method={**m, "mask": copy(m["snap_mask"])})

  def run_bu(trainer, state, t):
    if t == 0:
      state = trainer.apply(state, lambda s: with_m(s, use_mask=jnp.asarray(False)))
      state = first_training(trainer, state, t)
      state = after_training(trainer, state, t)
      state = trainer.apply(state, lambda s: with_m(s, ref=copy(s.params),
                                                    ref_bs=copy(s.batch_stats)))
      ref_acc = val_acc(trainer, state, t)
      state = trainer.apply(state, lambda s: save_accepted(with_m(s, use_mask=jnp.asarray(True))))
      acc = ref_acc
      kept_rounds = 0
      for r in range(int(lc.bu_max_rounds)):
        keep = kept_after(total, frac, r + 1)

        def prune(s, keep=keep):
          new = prune_keep(s.method["mask"], s.params, spec, jnp.int32(keep))
          return s._replace(params=masks.apply(s.params, new), method={**s.method, "mask": new})

        state = trainer.apply(state, prune)
        if int(lc.retrain_epochs) > 0:
          state = train_phase(trainer, state, t, epochs=int(lc.retrain_epochs),
                              phase=f"prune round {r + 1}", retrain=True)
        acc_r = val_acc(trainer, state, t)
        if not keep_pruning(ref_acc - acc_r, 1.0 - keep / total):
          break
        acc = acc_r
        kept_rounds = r + 1
        state = trainer.apply(state, save_accepted)
      state = trainer.apply(state, restore_accepted)
      return trainer.apply(state, lambda s: record(s, t, remaining=density(s.method),
                                                   rewind=_NO_REWIND, ref_acc=ref_acc,
                                                   ticket_acc=acc, final_acc=acc,
                                                   rounds=kept_rounds))

    # Later tasks: the dense reference continues from the previous reference ...
    def begin(s):
      m = s.method
      m = {**m, "unl": copy(m["unl_next"]), "start": copy(m["ref"]),
           "start_bs": copy(m["ref_bs"]), "use_mask": jnp.asarray(False),
           "count_start": m["count_start"].at[t].set(masks.count(m["mask"], spec))}
      return s._replace(params=copy(m["ref"]), batch_stats=copy(m["ref_bs"]), method=m)

    state = trainer.apply(state, begin)
    state = first_training(trainer, state, t, phase="reference")
    state = after_training(trainer, state, t)  # the reference is the teacher (as coded)
    state = trainer.apply(state, lambda s: with_m(s, ref=copy(s.params),
                                                  ref_bs=copy(s.batch_stats)))
    ref_acc = val_acc(trainer, state, t)
    code = _REWIND_CODES[rewind_kind]

    # ... and the ticket starts from the previous reference (TR) or another rewinding point.
    def ticket_start(s):
      m = s.method
      src = rewind_source(trainer, s, t, m["start"]) if code != _NO_REWIND else m["start"]
      params = rewind(m["start"], m["mask"], src, spec)
      return s._replace(params=copy(params), batch_stats=copy(m["start_bs"]),
                        method={**m, "use_mask": jnp.asarray(True)})

    state = trainer.apply(state, ticket_start)
    state = train_phase(trainer, state, t, epochs=config.epochs, phase="ticket")
    acc = val_acc(trainer, state, t)
    ticket_acc = acc
    regrown = kept_rounds = 0
    if ref_acc - acc > float(lc.bu_accept):
      regrown = 1
      # Read from the state, written by this task's first operation (a replayed run that
      # resumes later in the task reads the same value).
      count = int(jax.device_get(state.method["count_start"])[t])
      pruned = total - count
      grow = int(round(float(lc.bu_regrow) * pruned))

      def expand(s, grow=grow):
        m = s.method
        new = regrow(m["mask"], m["ref"], spec, jnp.int32(grow))
        m = {**m, "base_mask": copy(m["mask"]), "mask": new}
        return s._replace(params=masks.apply(m["ref"], new), batch_stats=copy(m["ref_bs"]),
                          method=m)

      state = trainer.apply(state, expand)
      count += grow
      grown = grow
      for r in range(int(lc.bu_max_rounds)):
        if int(lc.retrain_epochs) > 0:
          state = train_phase(trainer, state, t, epochs=int(lc.retrain_epochs),
                              phase=f"regrow round {r + 1}", retrain=True)
        acc_r = val_acc(trainer, state, t)
        if r > 0 and not keep_pruning(ref_acc - acc_r, 1.0 - count / total):
          state = trainer.apply(state, restore_accepted)
          break
        acc = acc_r
        kept_rounds = r  # pruning-back rounds behind the accepted model
        state = trainer.apply(state, save_accepted)
        if r == int(lc.bu_max_rounds) - 1 or grown == 0:
          break
        keep_grown = kept_after(grow, frac, r + 1)

        def shrink(s, keep_grown=keep_grown):
          m = s.method
          new = prune_back(m["base_mask"], m["mask"], s.params, spec, jnp.int32(keep_grown))
          return s._replace(params=masks.apply(s.params, new), method={**m, "mask": new})

        state = trainer.apply(state, shrink)
        count -= grown - keep_grown
        grown = keep_grown
    return trainer.apply(state, lambda s: record(s, t, remaining=density(s.method), rewind=code,
                                                 ref_acc=ref_acc, ticket_acc=ticket_acc,
                                                 final_acc=acc, regrown=regrown,
                                                 rounds=kept_rounds))

  def run_task(trainer, state, t):
    if mode == "dense":
      return run_dense(trainer, state, t)
    if mode in ("td", "imp"):
      return run_td(trainer, state, t)
    return run_bu(trainer, state, t)

  def report(ctx, state):
    m = jax.device_get(state.method)
    names = {v: k for k, v in _REWIND_CODES.items()}
    rem = [float(v) for v in np.asarray(m["remaining"])]
    points = []
    for t in range(T):
      code = int(m["rewind"][t])
      if code == _LATE:
        points.append(f"late: after epoch {int(lc.late_epoch)} of task 1")
      elif code == _TASK:
        points.append(f"task: weights after task {t + 1}" if mode != "bu"
                      else f"task: reference weights after task {t}")
      else:
        points.append(names[code])
    out = {"remaining_weights": rem, "density_per_task": rem, "rewind_points": points,
           "llt": {"mode": mode, "curriculum": list(rounds), "rewind": rewind_kind,
                   "lottery_teaching": teach, "pool_size": P,
                   "unlabeled_selected": [int(v) for v in np.asarray(m["selected"])],
                   "exemplars": int(np.asarray(m["mem_end"])[-1]),
                   "prune_rounds": [int(v) for v in np.asarray(m["rounds"])]}}
    if mode == "bu":
      out["llt"].update(
          reference_val_accuracy=[float(v) for v in np.asarray(m["ref_acc"])],
          ticket_val_accuracy=[float(v) for v in np.asarray(m["ticket_acc"])],
          final_ticket_val_accuracy=[float(v) for v in np.asarray(m["final_acc"])],
          regrown=[bool(v) for v in np.asarray(m["regrown"])])
    if mode in ("td", "imp"):
      out["expected_density_per_task"] = [c / total for c in expected_counts(total, rounds, frac)]
    if mode == "dense":
      out["expected_density_per_task"] = [1.0] * T
    return out

  method = base.Method(name="llt", run_task=run_task, init_state=init_state,
                       forward_params=forward_params, wrap_tx=wrap_tx, tx_args=tx_args,
                       penalty=penalty, report=report, step_loss=step_loss,
                       eval_logits=eval_logits)
  return method


def _source(data, batch_size, order, augment=True):
  from sparse_cl_jax import train  # pylint: disable=g-import-not-at-top  (train imports methods)
  return train.Source(data=data, batch_size=int(batch_size), order=order, augment=augment)

