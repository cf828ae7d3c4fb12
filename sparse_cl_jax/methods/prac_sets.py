"""PrAC sets: which training examples the next round of the PrAC search trains on, and their record.

Zhang et al. (ICML 2021), ``shared/papers/prac_lottery_tickets_icml2021.txt`` Sec. 3.1. The set of
a round is the union of

* the critical examples for training (Approach I, Algorithm 1 lines 5-6): forgetting statistics
  (Toneva et al. 2019) counted online on the training minibatches of the round; an example is
  forgotten when it goes from correctly to incorrectly classified, and examples never classified
  correctly rank as the most forgettable (:func:`forgetting_update`,
  :func:`critical_for_training`);
* the critical examples for pruning (Approach II, line 10): the examples on which the dense and
  the pruned network predict different classes (:func:`disagreement`).

:func:`next_members` joins the two for one task's rows; :func:`set_recording` and :func:`next_set`
keep the sets in the method state, :func:`subset_data` gives a set's training data and
:func:`predictions` a model's classes on the training rows. A finished run leaves the sets of its
rounds and its nested masks as a JSON record (:func:`encode_sets`); baselines and transfer runs
read it back (``prac.subset_from``, :func:`load_record`).
"""

from __future__ import annotations

import base64
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

DATA_RULES = ("zero_out", "constant")
# Score of an example that was never classified correctly (as coded: an offset of 200000).
NEVER_LEARNED = 2 ** 30


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


# --------------------------------------------------------------------------------------------------
# Critical examples for training (CET) and for pruning (CEP), and the next round's set.


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


def rows_of_task(by_id, offset, n_max: int):
  """Per-id values of one task's examples in row order (ids are contiguous within a task)."""
  idx = jnp.clip(offset + jnp.arange(n_max), 0, by_id.shape[0] - 1)
  return by_id[idx]


def next_members(fs: dict, dense_pred, pred, valid, offset, keep, later, *, n_max: int, rule: str,
                 threshold: int):
  """The next round's PrAC set of one task's rows (Algorithm 1 lines 6 and 10).

  Args:
    fs: this round's forgetting statistics (by stream train id).
    dense_pred: int [n_max] predictions of the dense network (round 0's best-validation model).
    pred: int [n_max] predictions of this round's best-validation model.
    valid: bool [n_max] the task's real rows.
    offset: the task's first train id.
    keep: the ``constant`` rule's set size.
    later: bool, from round 1 on (round 0's network *is* the dense one: no CEP, and its
      predictions become ``dense_pred``).
    n_max: rows per task (static).
    rule / threshold: :func:`critical_for_training`'s rule (static).

  Returns:
    ``(member, cet, cep, dense_pred)``: bool [n_max] sets and the dense predictions to keep.
  """
  scores = rows_of_task(forgetting_scores(fs), offset, n_max)
  cet = critical_for_training(scores, rule=rule, threshold=threshold, keep=keep) & valid
  cep = later & disagreement(dense_pred, pred, valid)
  return cet | cep, cet, cep, jnp.where(later, dense_pred, pred)


# --------------------------------------------------------------------------------------------------
# The sets in the method state (``member``: this round's set; ``members``: every round's), their
# training data and the predictions the critical examples for pruning compare.


def set_recording(state, on, member, r, *, num_ids: int):
  """Round ``r``'s set := ``member``; forgetting statistics restart, counted iff ``on``."""
  m = dict(state.method)
  m["recording"] = jnp.asarray(on, jnp.bool_)
  m["fs"] = forgetting_init(num_ids)
  m["member"] = member
  m["members"] = m["members"].at[r].set(member)
  return state._replace(method=m)


def next_set(state, pred, valid, offset, keep, later, *, n_max: int, rule: str, threshold: int):
  """:func:`next_members` from the state's statistics and dense predictions into the state
  (``member``, ``dense_pred``); also the sizes int32 [3] (CET, CEP, PrAC set)."""
  m = dict(state.method)
  member, cet, cep, m["dense_pred"] = next_members(
      m["fs"], m["dense_pred"], pred, valid, offset, keep, later, n_max=n_max, rule=rule,
      threshold=threshold)
  m["member"] = member
  counts = jnp.stack([jnp.sum(cet, dtype=jnp.int32), jnp.sum(cep, dtype=jnp.int32),
                      jnp.sum(m["member"], dtype=jnp.int32)])
  return state._replace(method=m), counts


def subset_data(trainer, state, t: int, n_max: int):
  """Task ``t``'s training data restricted to ``state.method['member']`` (padded to ``n_max``)."""
  full = trainer.task_data(t)
  member = state.method["member"]
  rows = jnp.nonzero(member, size=n_max, fill_value=0)[0].astype(jnp.int32)
  n = jnp.sum(member, dtype=jnp.int32)
  return type(full)(jnp.take(full.x, rows, axis=0), jnp.take(full.y, rows, axis=0),
                    jnp.take(full.ids, rows, axis=0), n)


def predictions(trainer, state, t: int, params, bs) -> jax.Array:
  """int32 [n_max]: the classes a model predicts on task ``t``'s unaugmented training rows
  (evaluation mode)."""
  probe = state._replace(params=params, batch_stats=bs)
  logits = trainer.outputs(probe, trainer.task_data(t), view_task=t, current=t)["logits"]
  if trainer.class_il:
    logits = jnp.where(trainer.head_mask[t][None, :], logits, jnp.finfo(logits.dtype).min)
  return jnp.argmax(logits, -1).astype(jnp.int32)


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
  """``{leaf path: int8 array}`` from :func:`encode_sets` (0 = kept, r + 1 = pruned in round r)."""
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
