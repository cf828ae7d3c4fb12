"""PrAC lottery tickets (Zhang, Chen, Chen & Wang, ICML 2021): IMP on pruning-aware critical sets.

"Efficient Lottery Ticket Finding: Less Data is More" (``shared/papers/prac_lottery_tickets_icml2021
.txt``, Algorithm 1). Single-task ticket finding: iterative magnitude pruning (IMP, 20% of the
remaining weights per round, global over the conv and dense kernels, the classifier head excluded)
with rewinding, where every round after the first trains only on the *PrAC set*:

* critical examples for training (Sec. 3.1, Approach I): forgetting statistics (Toneva et al.
  2019) counted online on the training minibatches of the round (``after_step``): an example is
  forgotten when it goes from correctly to incorrectly classified; examples never classified
  correctly rank as the most forgettable. Rule ``zero_out`` (as coded, threshold 0) keeps examples
  forgotten more than ``threshold`` times or never learned; rule ``constant`` (as coded,
  "constent") keeps the ``int(N * (1 - data_rate) ** (r + 1))`` most forgotten;
* critical examples for pruning (Approach II), from round 1 on: examples of the whole, unaugmented
  training set on which the dense network and the current pruned network (each its best-validation
  weights of its round, evaluation mode) predict different classes.

Dynamic iterations (Sec. 3.2 i): a round on a set of ``n`` examples runs ``int(E * n / N)`` epochs
over the set only, with the learning-rate milestones scaled the same way. Early stopping (Sec. 3.2
ii, as coded): after every epoch, the mask the next prune would produce from the current weights;
its Hamming distance to the previous epoch's such mask, divided by the number of unpruned
weights, enters a queue of 5 (once a distance above ``eps`` was seen); the round stops once every
distance in the queue is below ``eps`` (0.08).

``prac.mode`` picks the system or a baseline (see ``MODES``). Every round's ticket is retrained
from its rewinding point on the full training set for the full schedule; its test accuracy at the
epoch of best validation accuracy is reported (the authors' ``main_train.py`` protocol). The whole
search runs inside the task's ``run_task`` as recorded trainer operations, so a run killed
anywhere resumes and ends identical; forgetting statistics live in the method state.

Example::

  python experiments/main.py --config=configs/prac.py --workdir=/tmp/prac
  python experiments/main.py --config=configs/prac.py --workdir=/tmp/imp --config.prac.mode=imp
"""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_cl_jax import criteria
from sparse_cl_jax import masks
from sparse_cl_jax import models
from sparse_cl_jax import topk
from sparse_cl_jax import transforms
from sparse_cl_jax import types
from sparse_cl_jax.methods import base

DEFAULT_NORM = "batch"

MODES = ("prac", "imp", "random_subset", "random_prune", "random_reinit", "snip", "grasp",
         "synflow")
REWIND = ("lt", "rewind_lt")
DATA_RULES = ("zero_out", "constant")
# Modes whose search reuses a finished run's per-round record (``prac.subset_from``).
NEEDS_SOURCE = ("random_subset", "random_reinit")
MAY_USE_SOURCE = ("prac", "random_subset", "random_reinit", "snip", "grasp", "synflow")
# Score of an example that was never classified correctly (as coded: an offset of 200000).
NEVER_LEARNED = 2 ** 30
SPARSE_ARG = "sparse_mask"

# Integer per-round records: ilog[t, r, field].
I_STEPS, I_EPOCHS, I_PLANNED, I_SUBSET, I_NEXT, I_CET, I_CEP, I_KEPT, I_TICKET_STEPS = range(9)
NUM_I = 9
# Float per-round records: flog[t, r, field].
F_SEARCH_VAL, F_TICKET_VAL, F_TICKET_TEST, F_TICKET_FINAL_TEST, F_TICKET_BEST_EPOCH = range(5)
NUM_F = 5


# --------------------------------------------------------------------------------------------------
# Forgetting statistics (Toneva et al. 2019; the authors' ``forget_times``), online.


def forgetting_init(num_ids: int) -> dict:
  """Empty statistics for ``num_ids`` examples (indexed by stream train id)."""
  return {"seen": jnp.zeros((num_ids,), jnp.bool_),  # observed in this round
          "learned": jnp.zeros((num_ids,), jnp.bool_),  # the last observation was correct
          "ever": jnp.zeros((num_ids,), jnp.bool_),  # some observation was correct
          "count": jnp.zeros((num_ids,), jnp.int32)}  # correct -> incorrect transitions


def forgetting_update(fs: dict, ids, correct, valid) -> dict:
  """Adds one minibatch's observations (``ids`` int [B], ``correct``/``valid`` bool [B]).

  An example is forgotten when its previous observation was correct and this one is not. Rows
  with ``valid=False`` (padding) change nothing. Works under ``jax.jit``.
  """
  n = fs["count"].shape[0]
  idx = jnp.where(valid, ids, n).astype(jnp.int32)  # out of range: dropped by the scatters
  safe = jnp.clip(idx, 0, n - 1)
  prev = fs["learned"][safe]
  forgot = valid & prev & ~correct
  return {"seen": fs["seen"].at[idx].set(True, mode="drop"),
          "learned": fs["learned"].at[idx].set(correct, mode="drop"),
          "ever": fs["ever"].at[idx].set(fs["ever"][safe] | correct, mode="drop"),
          "count": fs["count"].at[idx].add(forgot.astype(jnp.int32), mode="drop")}


def forgetting_scores(fs: dict) -> jax.Array:
  """int32 [N]: -1 if not observed, ``NEVER_LEARNED`` if never correct, else forgetting events."""
  return jnp.where(~fs["seen"], -1, jnp.where(fs["ever"], fs["count"], NEVER_LEARNED))


def scores_from_history(history) -> np.ndarray:
  """Forgetting scores from a correctness history ``[observations, N]`` (1, 0, or -1 = unseen).

  The reference the online statistics are tested against; also handy for offline records.
  """
  h = np.asarray(history)
  fs = forgetting_init(h.shape[1])
  ids = jnp.arange(h.shape[1], dtype=jnp.int32)
  for row in h:
    fs = forgetting_update(fs, ids, jnp.asarray(row == 1), jnp.asarray(row >= 0))
  return np.asarray(forgetting_scores(fs))


def critical_for_training(scores, *, rule: str, threshold: int = 0, keep: int = 0) -> jax.Array:
  """bool [N]: the critical examples for training (CET) from forgetting scores.

  ``rule='zero_out'`` (as coded): score > ``threshold`` (never-learned examples always qualify;
  examples not observed in the round, score -1, never do). ``rule='constant'``: the ``keep``
  highest scores, ties broken towards the lower index.
  """
  scores = jnp.asarray(scores, jnp.int32)
  if rule == "zero_out":
    return scores > threshold
  if rule == "constant":
    n = scores.shape[0]
    order = jnp.lexsort((jnp.arange(n, dtype=jnp.int32), -scores))  # score desc, then index
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return rank < keep
  raise ValueError(f"config.prac.data_rule={rule!r} is not valid; choose one of {list(DATA_RULES)}")


def disagreement(pred_a, pred_b, valid) -> jax.Array:
  """bool [N]: valid rows on which two models' predicted classes differ (critical for pruning)."""
  return jnp.asarray(valid) & (jnp.asarray(pred_a) != jnp.asarray(pred_b))


# --------------------------------------------------------------------------------------------------
# Dynamic iterations.


def dynamic_schedule(epochs: int, milestone_epochs, subset: int, total: int):
  """Epochs and LR milestone epochs of a round on ``subset`` of ``total`` examples (as coded).

  ``int(epochs * subset / total)`` epochs (at least 1) and ``int(m * subset / total)`` for every
  milestone epoch ``m``; the authors' ``args.epochs`` / ``decreasing_lr`` rescaling.
  """
  if total <= 0 or not 0 <= subset <= total:
    raise ValueError(f"subset={subset} must be in [0, total={total}]")
  e = max(1, int(epochs * subset / total))
  return e, [int(m * subset / total) for m in milestone_epochs]


def milestone_fractions(epochs: int, milestone_epochs) -> tuple:
  """Milestone epochs as the trainer's fractions of the phase's epochs (exact after rounding)."""
  return tuple(m / epochs for m in milestone_epochs)


# --------------------------------------------------------------------------------------------------
# Pruning.


def imp_kept(total: int, prunes: int, rate: float = 0.2) -> int:
  """Weights kept after ``prunes`` IMP prunes: ``round(total * (1 - rate) ** prunes)``."""
  return int(round(total * (1.0 - rate) ** prunes))


def spec_total(params, spec) -> int:
  """Number of maskable weights."""
  return sum(int(np.size(p)) for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(spec)) if s)


def prune_to(scores: types.Scores, mask: types.Masks, keep, spec: types.LeafSpec) -> types.Masks:
  """The ``keep`` highest-scoring alive weights, globally over the maskable leaves (bool tree).

  Pruned positions stay pruned (only ``mask`` positions are candidates); leaves outside ``spec``
  stay all-True. Exact count, deterministic ties (:func:`topk.topk_mask`).
  """
  sel = topk.topk_mask(scores, keep, candidates=mask, scope="global", spec=spec)
  return jax.tree.map(lambda m, k, s: (m & k) if s else m, mask, sel, spec)


def magnitude_prune(params, mask, keep, spec):
  """IMP's global magnitude prune of the alive weights down to ``keep``."""
  return prune_to(criteria.magnitude(params), mask, keep, spec)


def hamming(a: types.Masks, b: types.Masks, spec: types.LeafSpec) -> jax.Array:
  """Number of maskable positions where two masks differ (int32)."""
  return sum(jnp.sum(x != y, dtype=jnp.int32)
             for x, y, s in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(spec)) if s)


# --------------------------------------------------------------------------------------------------
# Early-bird stopping (You et al. 2020 as extended by the authors' main_PrAC_imp.py).


class EarlyBird(NamedTuple):
  """Early-bird state of one round."""
  last: Any  # bool tree: the previous epoch's would-be mask
  queue: jax.Array  # f32 [queue_length], newest first, initialised to ones
  started: jax.Array  # bool: a distance above eps has been seen in this round


def early_bird_init(mask: types.Masks, queue_length: int) -> EarlyBird:
  return EarlyBird(last=jax.tree.map(jnp.array, mask), queue=jnp.ones((queue_length,), jnp.float32),
                   started=jnp.zeros((), jnp.bool_))


def early_bird_update(eb: EarlyBird, new_mask, remaining, epoch, spec, *, eps: float,
                      warmup: int = 0):
  """One epoch's check. Returns ``(eb, distance, stop)``; works under ``jax.jit``.

  As coded: epoch 0 only records its mask. Later epochs compute the distance to the previous
  epoch's mask normalised by ``remaining`` (unpruned weights at the round's start); once a
  distance above ``eps`` was seen (and past ``warmup`` epochs) it is pushed into the queue; stop
  when the queue's maximum is below ``eps``. The previous mask is not replaced on a stop.
  """
  epoch = jnp.asarray(epoch, jnp.int32)
  later = epoch > 0
  dist = hamming(eb.last, new_mask, spec).astype(jnp.float32) / jnp.maximum(
      jnp.asarray(remaining, jnp.float32), 1.0)
  started = jnp.where(later, eb.started | (dist > eps), eb.started)
  push = later & (epoch > warmup) & started
  queue = jnp.where(push, jnp.concatenate([dist[None], eb.queue[:-1]]), eb.queue)
  stop = later & (jnp.max(queue) < eps)
  last = jax.tree.map(lambda old, new: jnp.where(stop, old, new), eb.last, new_mask)
  return EarlyBird(last=last, queue=queue, started=started), dist, stop


def early_bird_stop_epoch(mask_sequence, remaining, spec, *, eps: float, queue_length: int = 5,
                          warmup: int = 0) -> int | None:
  """The epoch (0-based) at which a sequence of per-epoch masks stops training; None if never."""
  eb = early_bird_init(mask_sequence[0], queue_length)
  for e, m in enumerate(mask_sequence):
    eb, _, stop = early_bird_update(eb, m, remaining, e, spec, eps=eps, warmup=warmup)
    if bool(stop):
      return e
  return None


# --------------------------------------------------------------------------------------------------
# A finished run's per-round record, reused by baselines and for transfer (``prac.subset_from``).


def _b64(data: bytes) -> str:
  return base64.b64encode(zlib.compress(data, 9)).decode("ascii")


def _unb64(text: str) -> bytes:
  return zlib.decompress(base64.b64decode(text))


def labels_digest(y: np.ndarray) -> int:
  """crc32 of the training labels in row order: identifies the split a record was made on."""
  return int(zlib.crc32(np.ascontiguousarray(np.asarray(y, np.int32)).tobytes()))


def encode_sets(members: np.ndarray, planned, epochs, milestones, pruned_at: dict, *, y,
                arch: str) -> dict:
  """The JSON record of a search: per round its training set (bit-packed), planned epochs and
  milestone epochs, epochs run; the nested masks as ``pruned_at`` (0 = kept to the end, r + 1 =
  pruned by round r's prune), per maskable leaf."""
  members = np.asarray(members, bool)
  return {
      "num_train": int(members.shape[1]), "labels_crc32": labels_digest(y), "arch": arch,
      "rounds": [{"size": int(m.sum()), "planned_epochs": int(p), "epochs": int(e),
                  "milestone_epochs": [int(x) for x in ms],
                  "members": _b64(np.packbits(m).tobytes())}
                 for m, p, e, ms in zip(members, planned, epochs, milestones)],
      "pruned_at": {k: {"shape": list(v.shape), "data": _b64(np.asarray(v, np.int8).tobytes())}
                    for k, v in pruned_at.items()},
  }


def decode_members(record: dict) -> np.ndarray:
  """bool [rounds, num_train] from :func:`encode_sets`."""
  n = int(record["num_train"])
  return np.stack([np.unpackbits(np.frombuffer(_unb64(r["members"]), np.uint8))[:n].astype(bool)
                   for r in record["rounds"]])


def decode_pruned_at(record: dict) -> dict:
  return {k: np.frombuffer(_unb64(v["data"]), np.int8).reshape(v["shape"])
          for k, v in record["pruned_at"].items()}


def load_record(path: str) -> dict:
  """The ``prac_sets`` record of a finished run (its ``results.json`` or its workdir)."""
  if os.path.isdir(path):
    path = os.path.join(path, "results.json")
  if not os.path.exists(path):
    raise ValueError(f"config.prac.subset_from={path!r}: no such file (give a finished prac run's "
                     "results.json or workdir)")
  with open(path) as f:
    results = json.load(f)
  if "prac_sets" not in results:
    raise ValueError(f"config.prac.subset_from={path!r} holds no 'prac_sets' (not a prac run)")
  return results["prac_sets"]


# --------------------------------------------------------------------------------------------------
# The method.


def check_config(config) -> None:
  """One-line ValueErrors naming the field, the value and what is allowed."""
  pc = config.prac

  def choice(field, allowed):
    v = pc[field]
    if v not in allowed:
      raise ValueError(f"config.prac.{field}={v!r} is not valid; choose one of {list(allowed)}")

  choice("mode", MODES)
  choice("rewind", REWIND)
  choice("data_rule", DATA_RULES)
  r = pc.rounds
  if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 100:
    raise ValueError(f"config.prac.rounds={r!r} must be an integer in [1, 100]")
  if not 0.0 < float(pc.rate) < 1.0:
    raise ValueError(f"config.prac.rate={pc.rate!r} must be in (0, 1)")
  if not 0.0 < float(pc.data_rate) < 1.0:
    raise ValueError(f"config.prac.data_rate={pc.data_rate!r} must be in (0, 1)")
  if not 0.0 <= float(pc.eb_eps) <= 1.0:
    raise ValueError(f"config.prac.eb_eps={pc.eb_eps!r} must be in [0, 1]")
  q = pc.queue_length
  if isinstance(q, bool) or not isinstance(q, int) or q < 1:
    raise ValueError(f"config.prac.queue_length={q!r} must be an integer >= 1")
  th = pc.threshold
  if isinstance(th, bool) or not isinstance(th, int) or th < 0:
    raise ValueError(f"config.prac.threshold={th!r} must be an integer >= 0")
  k = pc.rewind_epoch
  if pc.rewind == "rewind_lt" and (isinstance(k, bool) or not isinstance(k, int)
                                   or not 1 <= k < config.epochs):
    raise ValueError(f"config.prac.rewind_epoch={k!r} must be an integer in [1, config.epochs="
                     f"{config.epochs}) for rewind='rewind_lt' (weights after that many epochs)")
  sb = pc.score_batches
  if isinstance(sb, bool) or not isinstance(sb, int) or sb < 1:
    raise ValueError(f"config.prac.score_batches={sb!r} must be an integer >= 1")
  if pc.mode in NEEDS_SOURCE and not pc.subset_from:
    raise ValueError(f"config.prac.subset_from='' but prac.mode={pc.mode!r} needs a finished prac "
                     "run's results.json (its per-round set sizes / masks)")
  if pc.subset_from and pc.mode not in MAY_USE_SOURCE:
    raise ValueError(f"config.prac.subset_from={pc.subset_from!r} is not used by prac.mode="
                     f"{pc.mode!r}; set it only for modes {list(MAY_USE_SOURCE)}")


def make(config, ctx: base.Context) -> base.Method:
  """PrAC lottery tickets / IMP baselines with ``config.prac.*`` (see ``configs/prac.py``)."""
  check_config(config)
  pc = config.prac
  mode, rounds, rate = pc.mode, int(pc.rounds), float(pc.rate)
  spec = ctx.spec
  stream = ctx.stream
  T = ctx.num_tasks
  n_max = int(stream.x_train.shape[1])
  num_ids = int(stream.num_train_ids)
  total = spec_total(ctx.params, spec)
  if total == 0:
    raise ValueError("PrAC: the model has no maskable weights (config.mask_include / mask_exclude)")
  E = int(config.epochs)
  base_milestones = [int(round(f * E)) for f in config.lr_milestones]
  has_bs = "batch_stats" in ctx.variables
  record = load_record(pc.subset_from) if pc.subset_from else None
  if record is not None:
    n0 = int(np.asarray(stream.n_train)[0])
    if T != 1 or record["num_train"] != n0 or record["labels_crc32"] != labels_digest(
        np.asarray(stream.y_train)[0, :n0]):
      raise ValueError(f"config.prac.subset_from={pc.subset_from!r} was made on another training "
                       f"split ({record['num_train']} examples); reuse it with the same dataset, "
                       "val_fraction and seed on a 1-task stream")
    if len(record["rounds"]) < rounds:
      raise ValueError(f"config.prac.rounds={rounds} but config.prac.subset_from holds only "
                       f"{len(record['rounds'])} rounds")
    if mode == "random_reinit":
      saved = decode_pruned_at(record)
      want = {p: np.shape(x) for (p, x), s in zip(masks.leaves_with_paths(ctx.params),
                                                  jax.tree.leaves(spec)) if s}
      got = {p: tuple(v.shape) for p, v in saved.items()}
      if want != got:
        raise ValueError(f"config.prac.subset_from={pc.subset_from!r}: its masks are for another "
                         f"architecture ({record['arch']}); random_reinit needs the same model")

  def first_ids():
    return [int(np.asarray(stream.ids_train)[t, 0]) for t in range(T)]

  offsets = first_ids()

  # ------------------------------------------------------------------------------------------------
  # State.

  def init_state(ctx):
    p = ctx.params
    bs = ctx.variables.get("batch_stats", {})
    m = {
        "mask": masks.ones(p),
        "pruned_at": jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.int8), p),
        "rewind": {"params": jax.tree.map(jnp.array, p),
                   "batch_stats": jax.tree.map(jnp.array, bs)},
        "eb": early_bird_init(masks.ones(p), int(pc.queue_length))._asdict(),
        "fs": forgetting_init(num_ids),
        "recording": jnp.zeros((), jnp.bool_),
        "member": jnp.zeros((n_max,), jnp.bool_),
        "members": jnp.zeros((rounds, n_max), jnp.bool_),
        "dense_pred": jnp.zeros((n_max,), jnp.int32),
        "eval": {"best_val": jnp.float32(-1.0), "test_at_best": jnp.float32(-1.0),
                 "best_epoch": jnp.int32(-1)},
        "ilog": jnp.zeros((T, rounds, NUM_I), jnp.int32),
        "flog": jnp.full((T, rounds, NUM_F), -1.0, jnp.float32)  # -1: not recorded,
    }
    if mode == "prac":
      m["best"] = {"params": jax.tree.map(jnp.array, p), "batch_stats": jax.tree.map(jnp.array, bs)}
    return m

  def forward_params(params, aux, m, task, current):
    del aux, task, current
    return masks.apply(params, m["mask"])

  def wrap_tx(tx):
    return optax.chain(tx, transforms.keep_sparse(mask_arg=SPARSE_ARG))

  def tx_args(m, task):
    del task
    return {SPARSE_ARG: m["mask"]}

  def after_step(m, out, task):
    del task
    fs = forgetting_update(m["fs"], out["ids"], out["correct"], out["valid"] & m["recording"])
    return {**m, "fs": fs}

  # ------------------------------------------------------------------------------------------------
  # Jitted pieces.

  @jax.jit
  def start_task(state, init_params, init_bs):
    """Dense network at the initial weights; the rewinding point is the initialisation."""
    m = dict(state.method)
    m["mask"] = masks.ones(init_params)
    m["pruned_at"] = jax.tree.map(jnp.zeros_like, m["pruned_at"])
    m["rewind"] = {"params": init_params, "batch_stats": init_bs}
    m["members"] = jnp.zeros_like(m["members"])
    return state._replace(params=jax.tree.map(jnp.copy, init_params),
                          batch_stats=jax.tree.map(jnp.copy, init_bs), method=m)

  @jax.jit
  def rewind_to(state, start_params, start_bs):
    """Params := the rewinding point times the current mask; fresh per-op records."""
    m = dict(state.method)
    params = masks.apply(start_params, m["mask"])
    m["eb"] = early_bird_init(m["mask"], int(pc.queue_length))._asdict()
    m["eval"] = {"best_val": jnp.float32(-1.0), "test_at_best": jnp.float32(-1.0),
                 "best_epoch": jnp.int32(-1)}
    if "best" in m:
      m["best"] = {"params": params, "batch_stats": start_bs}
    return state._replace(params=params, batch_stats=jax.tree.map(jnp.copy, start_bs), method=m)

  @jax.jit
  def set_recording(state, on, member, r):
    m = dict(state.method)
    m["recording"] = jnp.asarray(on, jnp.bool_)
    m["fs"] = forgetting_init(num_ids)
    m["member"] = member
    m["members"] = m["members"].at[r].set(member)
    return state._replace(method=m)

  @jax.jit
  def stop_recording(state):
    m = dict(state.method)
    m["recording"] = jnp.zeros((), jnp.bool_)
    return state._replace(method=m)

  @jax.jit
  def early_bird_step(state, keep, remaining, epoch):
    m = dict(state.method)
    new = magnitude_prune(state.params, m["mask"], keep, spec)
    eb, dist, stop = early_bird_update(EarlyBird(**m["eb"]), new, remaining, epoch, spec,
                                       eps=float(pc.eb_eps))
    m["eb"] = eb._asdict()
    return state._replace(method=m), dist, stop

  @jax.jit
  def snapshot_best(state, acc, epoch):
    m = dict(state.method)
    ev = dict(m["eval"])
    better = acc > ev["best_val"]
    ev["best_val"] = jnp.where(better, acc, ev["best_val"])
    ev["best_epoch"] = jnp.where(better, epoch, ev["best_epoch"])
    m["eval"] = ev
    if "best" in m:
      cur = {"params": state.params, "batch_stats": state.batch_stats}
      m["best"] = jax.tree.map(lambda new, old: jnp.where(better, new, old), cur, m["best"])
    return state._replace(method=m)

  @jax.jit
  def set_test_at_best(state, test):
    m = dict(state.method)
    m["eval"] = {**m["eval"], "test_at_best": jnp.asarray(test, jnp.float32)}
    return state._replace(method=m)

  @jax.jit
  def apply_prune(state, new_mask, r):
    m = dict(state.method)
    pruned = jax.tree.map(lambda old, new: old & ~new, m["mask"], new_mask)
    m["pruned_at"] = jax.tree.map(lambda pa, pr: jnp.where(pr, (r + 1).astype(jnp.int8), pa),
                                  m["pruned_at"], pruned)
    m["mask"] = new_mask
    return (state._replace(params=masks.apply(state.params, new_mask), method=m),
            masks.count(new_mask, spec))

  @jax.jit
  def prune_jit(scores, mask, keep):
    return prune_to(scores, mask, keep, spec)

  @jax.jit
  def next_set(state, pred, valid, offset, keep, later):
    """The next round's PrAC set: CET of this round's statistics, united from round 1 on with
    the examples the dense and this round's model disagree on; counts (CET, CEP, PrAC)."""
    m = dict(state.method)
    scores = _rows(forgetting_scores(m["fs"]), offset, n_max)
    cet = critical_for_training(scores, rule=pc.data_rule, threshold=int(pc.threshold),
                                keep=keep) & valid
    cep = later & disagreement(m["dense_pred"], pred, valid)
    m["dense_pred"] = jnp.where(later, m["dense_pred"], pred)
    m["member"] = cet | cep
    counts = jnp.stack([jnp.sum(cet, dtype=jnp.int32), jnp.sum(cep, dtype=jnp.int32),
                        jnp.sum(m["member"], dtype=jnp.int32)])
    return state._replace(method=m), counts

  @jax.jit
  def capture_rewind(state):
    m = dict(state.method)
    m["rewind"] = {"params": jax.tree.map(jnp.copy, state.params),
                   "batch_stats": jax.tree.map(jnp.copy, state.batch_stats)}
    return state._replace(method=m)

  @jax.jit
  def write_log(state, t, r, ivals, iset, fvals, fset):
    m = dict(state.method)
    m["ilog"] = m["ilog"].at[t, r].set(jnp.where(iset, ivals, m["ilog"][t, r]))
    m["flog"] = m["flog"].at[t, r].set(jnp.where(fset, fvals, m["flog"][t, r]))
    return state._replace(method=m)

  def log(state, t, r, ints: dict, floats: dict):
    """Writes the given fields of round ``r``'s records (one compiled shape for all calls)."""
    iv = np.zeros((NUM_I,), np.int32)
    iset = np.zeros((NUM_I,), bool)
    for k, v in ints.items():
      iv[k], iset[k] = int(v), True
    fv = np.zeros((NUM_F,), np.float32)
    fset = np.zeros((NUM_F,), bool)
    for k, v in floats.items():
      fv[k], fset[k] = float(v), True
    return write_log(state, jnp.int32(t), jnp.int32(r), jnp.asarray(iv), jnp.asarray(iset),
                     jnp.asarray(fv), jnp.asarray(fset))

  def key(t, r, salt):
    k = jax.random.wrap_key_data(ctx.key)
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(k, salt), t), r)

  # ------------------------------------------------------------------------------------------------
  # Host helpers (run inside recorded operations or on values they recorded).

  def subset_data(trainer, state, t):
    full = trainer.task_data(t)
    member = state.method["member"]
    rows = jnp.nonzero(member, size=n_max, fill_value=0)[0].astype(jnp.int32)
    n = jnp.sum(member, dtype=jnp.int32)
    return type(full)(jnp.take(full.x, rows, axis=0), jnp.take(full.y, rows, axis=0),
                      jnp.take(full.ids, rows, axis=0), n)

  def predictions(trainer, state, t, params, bs):
    probe = state._replace(params=params, batch_stats=bs)
    logits = trainer.outputs(probe, trainer.task_data(t), view_task=t, current=t)["logits"]
    if trainer.class_il:
      logits = jnp.where(trainer.head_mask[t][None, :], logits, jnp.finfo(logits.dtype).min)
    return jnp.argmax(logits, -1).astype(jnp.int32)

  scorers = {}

  def scorer(trainer):
    """The jitted SNIP / GraSP / SynFlow scores at the masked weights (one per trainer)."""
    if id(trainer) not in scorers:
      fwd = _forward(trainer)

      def scores(params, mask, bs, x, y, t):
        fp = masks.apply(params, mask)
        if mode == "synflow":
          extra = {"batch_stats": bs} if has_bs else {}

          def apply_fn(p, ones):
            return ctx.model.apply({"params": p, **extra}, ones, task=t, train=False)

          return criteria.synflow(fp, apply_fn=apply_fn,
                                  input_shape=(1,) + tuple(stream.input_shape))
        valid = jnp.ones((x.shape[0],), jnp.bool_)

        def loss_fn(p):
          logits, _ = fwd(p, bs, x, valid, t, train=False)
          return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        return criteria.get(mode)(fp, loss_fn=loss_fn)

      scorers[id(trainer)] = jax.jit(scores)
    return scorers[id(trainer)]

  def criterion_scores(trainer, state, t, r):
    """Scores of ``prac.score_batches`` batches of the round's training set (SynFlow: none)."""
    data = subset_data(trainer, state, t)
    n = int(data.n)
    rows = jax.random.permutation(key(t, r, 11), n)[:min(int(pc.score_batches) *
                                                         trainer.batch_size, n)]
    x = jnp.take(data.x, rows, axis=0)
    y = jnp.take(data.y, rows, axis=0)
    return scorer(trainer)(state.params, state.method["mask"], state.batch_stats, x, y,
                           jnp.int32(t))

  # ------------------------------------------------------------------------------------------------
  # The search and the ticket retraining, as recorded operations.

  def run_task(trainer, state, t):
    n_train = int(np.asarray(stream.n_train)[t])
    valid_rows = jnp.arange(n_max) < n_train
    init_bs = trainer.put(ctx.variables.get("batch_stats", {}))
    state = trainer.apply(state, lambda s: start_task(s, trainer.initial_params(), init_bs))
    src_members = decode_members(record) if record is not None else None
    reinit = None
    if mode == "random_reinit":
      v = models.init(ctx.model, key(t, 0, 23), (1,) + tuple(stream.input_shape))
      reinit = (trainer.put(v["params"]), trainer.put(v.get("batch_stats", {})))
    for r in range(rounds):
      keep = imp_kept(total, r + 1, rate)
      remaining = imp_kept(total, r, rate)

      # 1. This round's training set (round 0: everything, except for record-driven modes).
      def choose_set(s, r=r):
        if record is not None and mode in ("prac", "snip", "grasp", "synflow", "random_subset"):
          if mode == "random_subset":
            size = int(record["rounds"][r]["size"])
            perm = jax.random.permutation(key(t, r, 5), n_train)[:size]
            member = jnp.zeros((n_max,), jnp.bool_).at[perm].set(True)
          else:
            member = jnp.asarray(np.pad(src_members[r], (0, n_max - n_train)))
        elif mode == "prac" and r > 0:
          member = s.method["member"]  # chosen by the previous round's prune
        else:
          member = valid_rows
        return set_recording(s, mode == "prac" and record is None, member, jnp.int32(r))

      state = trainer.apply(state, choose_set)
      n_r = int(jnp.sum(state.method["member"]))

      # 2. Search training of round r (none for random pruning / random re-initialisation).
      trains = mode not in ("random_prune", "random_reinit") or (
          mode == "random_prune" and r == 0 and pc.rewind == "rewind_lt")
      if trains:
        if record is not None and mode != "prac":
          rr = record["rounds"][r]
          planned, ms, stop_after = int(rr["planned_epochs"]), rr["milestone_epochs"], int(
              rr["epochs"])
        elif mode == "prac" and pc.dynamic_iterations:
          planned, ms = dynamic_schedule(E, base_milestones, n_r, n_train)
          stop_after = None
        else:
          planned, ms, stop_after = E, base_milestones, None
        if mode == "random_prune":  # only to reach the rewinding point
          stop_after = int(pc.rewind_epoch)
        use_eb = mode == "prac" and bool(pc.early_bird)
        snap = mode == "prac"

        def epoch_end(s, epoch, r=r, planned=planned, stop_after=stop_after, use_eb=use_eb,
                      snap=snap, keep=keep, remaining=remaining):
          stop = False
          if r == 0 and pc.rewind == "rewind_lt" and epoch + 1 == int(pc.rewind_epoch):
            s = capture_rewind(s)
          if snap:
            acc = trainer.accuracy(s, t, split="val", current=t)
            s = snapshot_best(s, jnp.float32(acc), jnp.int32(epoch))
          if use_eb:
            s, _, eb_stop = early_bird_step(s, jnp.int32(keep), jnp.int32(remaining),
                                            jnp.int32(epoch))
            stop = bool(eb_stop)
          if stop_after is not None and epoch + 1 >= stop_after:
            stop = True
          if r == 0 and pc.rewind == "rewind_lt" and epoch + 1 < int(pc.rewind_epoch):
            stop = False  # never before the rewinding point exists
          return s, stop

        data = None if n_r == n_train and mode != "random_subset" else subset_data(trainer, state,
                                                                                   t)
        state = trainer.apply(state, lambda s: rewind_to(s, s.method["rewind"]["params"],
                                                          s.method["rewind"]["batch_stats"]))
        state = trainer.train(state, t, epochs=planned, phase=f"search {r}", data=data,
                              lr_milestones=milestone_fractions(planned, ms),
                              epoch_end=epoch_end)
      else:
        planned, ms = 0, []

      # 3. Prune (and, for PrAC, the next round's set).
      def prune(s, r=r, keep=keep, n_r=n_r, planned=planned, ms=ms, trains=trains):
        steps = trainer.last_train_steps if trains else 0
        epochs_run = trainer.last_train_epochs if trains else 0
        ints = {I_STEPS: steps, I_EPOCHS: epochs_run, I_PLANNED: planned, I_SUBSET: n_r}
        floats = {}
        if mode == "prac":
          floats[F_SEARCH_VAL] = float(s.method["eval"]["best_val"])
        if mode == "prac" and record is None:
          best = s.method["best"]
          pred = predictions(trainer, s, t, best["params"], best["batch_stats"])
          keep_c = int(n_train * (1.0 - float(pc.data_rate)) ** (r + 1))
          s, counts = next_set(s, pred, valid_rows, jnp.int32(offsets[t]), jnp.int32(keep_c),
                               jnp.asarray(r > 0))
          ints.update(dict(zip((I_CET, I_CEP, I_NEXT), map(int, jax.device_get(counts)))))
        if mode in ("imp", "prac", "random_subset"):
          new = prune_jit(criteria.magnitude(s.params), s.method["mask"], jnp.int32(keep))
        elif mode in ("snip", "grasp", "synflow"):
          new = prune_jit(criterion_scores(trainer, s, t, r), s.method["mask"], jnp.int32(keep))
        elif mode == "random_prune":
          scores = criteria.random(s.params, key=key(t, r, 3))
          new = prune_jit(scores, s.method["mask"], jnp.int32(keep))
        else:  # random_reinit: the saved PrAC ticket of this round
          saved = decode_pruned_at(record)
          leaves = []
          for (path, leaf), sp in zip(masks.leaves_with_paths(s.method["mask"]),
                                      jax.tree.leaves(spec)):
            if sp:
              pa = saved[path]
              leaves.append(jnp.asarray((pa == 0) | (pa > r + 1)))
            else:
              leaves.append(leaf)
          new = jax.tree.unflatten(jax.tree.structure(s.method["mask"]), leaves)
        s, kept = apply_prune(s, new, jnp.int32(r))
        ints[I_KEPT] = int(kept)  # measured, not the target
        return log(s, t, r, ints, floats)

      state = trainer.apply(state, prune)

      # 4. The ticket found by this round, retrained from its rewinding point on all the data.
      def ticket_start(s):
        s = stop_recording(s)
        if mode == "random_reinit":
          return rewind_to(s, *reinit)
        return rewind_to(s, s.method["rewind"]["params"], s.method["rewind"]["batch_stats"])

      state = trainer.apply(state, ticket_start)

      def ticket_end(s, epoch):
        acc = trainer.accuracy(s, t, split="val", current=t)
        prev = float(s.method["eval"]["best_val"])
        s = snapshot_best(s, jnp.float32(acc), jnp.int32(epoch))
        if acc > prev:
          s = set_test_at_best(s, jnp.float32(trainer.accuracy(s, t, split="test", current=t)))
        return s, False

      state = trainer.train(state, t, epochs=E, phase=f"ticket {r}", epoch_end=ticket_end)

      def ticket_record(s, r=r):
        ev = s.method["eval"]
        return log(s, t, r, {I_TICKET_STEPS: trainer.last_train_steps},
                   {F_TICKET_VAL: float(ev["best_val"]), F_TICKET_TEST: float(ev["test_at_best"]),
                    F_TICKET_FINAL_TEST: trainer.accuracy(s, t, split="test", current=t),
                    F_TICKET_BEST_EPOCH: float(ev["best_epoch"])})

      state = trainer.apply(state, ticket_record)
    return state

  # ------------------------------------------------------------------------------------------------
  # Report.

  def report(ctx, state):
    m = jax.device_get(state.method)
    ilog, flog = np.asarray(m["ilog"]), np.asarray(m["flog"])
    n_train = [int(x) for x in np.asarray(stream.n_train)]
    per_task = []
    for t in range(T):
      rows, cum = [], 0
      for r in range(rounds):
        iv, fv = ilog[t, r], flog[t, r]
        cum += int(iv[I_STEPS])
        rows.append({
            "round": r, "density": int(iv[I_KEPT]) / total, "steps": int(iv[I_STEPS]),
            "steps_cumulative": cum, "epochs": int(iv[I_EPOCHS]),
            "planned_epochs": int(iv[I_PLANNED]), "subset_size": int(iv[I_SUBSET]),
            "subset_fraction": int(iv[I_SUBSET]) / n_train[t],
            "next_subset_size": int(iv[I_NEXT]) if mode == "prac" and record is None else None,
            "critical_training": int(iv[I_CET]) if mode == "prac" and record is None else None,
            "critical_pruning": int(iv[I_CEP]) if mode == "prac" and record is None else None,
            "search_val_accuracy": _f(fv[F_SEARCH_VAL]),
            "val_accuracy": _f(fv[F_TICKET_VAL]), "test_accuracy": _f(fv[F_TICKET_TEST]),
            "final_test_accuracy": _f(fv[F_TICKET_FINAL_TEST]),
            "best_epoch": int(fv[F_TICKET_BEST_EPOCH]) if fv[F_TICKET_BEST_EPOCH] >= 0 else None,
            "ticket_steps": int(iv[I_TICKET_STEPS])})
      per_task.append(rows)
    last = per_task[-1]
    steps_total = sum(r["steps"] for r in last)
    nb = -(-n_train[-1] // int(config.batch_size))
    vanilla = rounds * E * nb
    out = {
        "rounds": last,
        "steps_total": steps_total,
        "vanilla_imp_steps_total": vanilla,
        "iterations_saved_vs_vanilla_imp": 1.0 - steps_total / vanilla,
        "density_per_task": [int(ilog[t, rounds - 1, I_KEPT]) / total for t in range(T)],
        "expected_density_per_task": [imp_kept(total, rounds, rate) / total] * T,
        "prac_mode": mode,
        # Every optimiser step of the run: the search's plus the ticket retrainings'.
        "optimizer_steps_run": int(jax.device_get(state.step)),
    }
    if T > 1:
      out["rounds_per_task"] = per_task
    kept_leaves = jax.tree.leaves(m["mask"])
    out["final_density_measured"] = sum(
        int(np.sum(k)) for k, s in zip(kept_leaves, jax.tree.leaves(spec)) if s) / total
    members = np.asarray(m["members"])[:, :n_train[-1]]
    ms_rows = [dynamic_schedule(E, base_milestones, r["subset_size"], n_train[-1])[1]
               if mode == "prac" and pc.dynamic_iterations else base_milestones for r in last]
    if record is not None and mode != "prac":
      ms_rows = [record["rounds"][r]["milestone_epochs"] for r in range(rounds)]
    pruned = {p: np.asarray(x) for (p, x), s in zip(masks.leaves_with_paths(m["pruned_at"]),
                                                    jax.tree.leaves(spec)) if s}
    out["prac_sets"] = encode_sets(
        members, [r["planned_epochs"] for r in last], [r["epochs"] for r in last], ms_rows,
        pruned, y=np.asarray(stream.y_train)[T - 1, :n_train[-1]], arch=str(config.model))
    return out

  return base.Method(name="prac", run_task=run_task, init_state=init_state,
                     forward_params=forward_params, wrap_tx=wrap_tx, tx_args=tx_args,
                     after_step=after_step, report=report)


def _rows(by_id, offset: int, n_max: int):
  """Per-id values of one task's examples in row order (ids are contiguous within a task)."""
  idx = jnp.clip(offset + jnp.arange(n_max), 0, by_id.shape[0] - 1)
  return by_id[idx]


def _f(x) -> float | None:
  """A recorded value, None where nothing was recorded (-1; the checkpoint refuses NaN)."""
  x = float(x)
  return x if math.isfinite(x) and x >= 0 else None


def _forward(trainer):
  """The trainer's model application (normalisation, compute dtype) for score computations."""
  from sparse_cl_jax import train  # pylint: disable=g-import-not-at-top
  return train.Forward(trainer, jnp.int32(0))
