"""PrAC lottery tickets (issue 13): forgetting statistics, PrAC sets, early-bird, IMP, accounting.

Pure parts on hand-made inputs with exact expected values; the search end to end on a tiny MLP on
the embedded digits (one shared run, a resumed copy, a transfer to another architecture and the
record-driven baselines).
"""

import csv
import dataclasses
import functools
import json
import math
import os
from typing import NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import checkpoint
from sparse_cl_jax import experiment
from sparse_cl_jax import masks
from sparse_cl_jax import train
from sparse_cl_jax.methods import prac
from sparse_cl_jax.methods import prac_sets

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEVER = prac_sets.NEVER_LEARNED


def as_coded_forget_times(record):
  """The authors' ``forget_times`` + the ``-1`` rule of ``sorted_examples`` (utils/setup.py)."""
  if record[0] < 0:
    return -1
  offset, number, learned = NEVER, NEVER, False
  for v in record:
    if not learned:
      if v == 1:
        learned = True
        if number == offset:
          number = 0
    elif v == 0:
      learned = False
      number += 1
  return number


# --------------------------------------------------------------------------------------------------
# Forgetting statistics and PrAC sets.


def test_forgetting_events_on_a_hand_made_history():
  # Columns: never learned; learned, forgotten, relearned, forgotten; always correct; unseen;
  # learned late; learned, unseen epoch, forgotten.
  history = np.array([[0, 1, 1, -1, 0, 1],
                      [0, 0, 1, -1, 1, -1],
                      [0, 1, 1, -1, 1, 0],
                      [0, 0, 1, -1, 1, 1]])
  scores = prac_sets.scores_from_history(history)
  np.testing.assert_array_equal(scores, [NEVER, 2, 0, -1, 0, 1])
  cet = np.asarray(prac_sets.critical_for_training(scores, rule="zero_out", threshold=0))
  np.testing.assert_array_equal(cet, [True, True, False, False, False, True])
  cet2 = np.asarray(prac_sets.critical_for_training(scores, rule="zero_out", threshold=1))
  np.testing.assert_array_equal(cet2, [True, True, False, False, False, False])
  # The constant rule keeps the most forgotten; ties (examples 2 and 4, both 0) by lower index.
  for keep, want in ((3, [0, 1, 5]), (4, [0, 1, 2, 5]), (5, [0, 1, 2, 4, 5])):
    got = np.flatnonzero(np.asarray(prac_sets.critical_for_training(scores, rule="constant",
                                                               keep=keep)))
    np.testing.assert_array_equal(got, want)


def test_online_statistics_match_the_authors_count_on_random_histories():
  rng = np.random.default_rng(0)
  history = rng.choice([-1, 0, 1], p=[0.1, 0.4, 0.5], size=(9, 300))
  history[0, :250] = rng.choice([0, 1], size=250)  # seen in the first epoch (as coded)
  history[:, 250:] = -1  # outside the round's set
  want = [as_coded_forget_times(history[:, j]) for j in range(history.shape[1])]
  np.testing.assert_array_equal(prac_sets.scores_from_history(history), want)


def test_after_step_ignores_padding_rows_under_jit():
  fs = prac_sets.forgetting_init(4)
  upd = jax.jit(prac_sets.forgetting_update)
  ids = jnp.array([0, 1, -1, 1], jnp.int32)
  fs = upd(fs, ids[:2], jnp.array([True, True]), jnp.array([True, True]))
  # Padding: id -1 and a repeated valid id marked invalid must change nothing.
  fs = upd(fs, ids, jnp.array([False, True, False, False]), jnp.array([True, True, False, False]))
  np.testing.assert_array_equal(np.asarray(prac_sets.forgetting_scores(fs)), [1, 0, -1, -1])


def test_disagreement_set_on_a_toy_pair_of_models():
  w = np.array([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0]])  # dense
  m = np.array([[1, 1], [1, 1], [0, 1]], bool)  # the pruned model loses w[2, 0]
  x = np.array([[1.0, 0.0, 0.0],  # class 0 for both
                [0.0, 1.0, 0.0],  # class 1 for both
                [0.0, 0.5, 1.5],  # dense: 0.75 vs 0.5 -> 0; pruned: 0 vs 0.5 -> 1
                [0.0, 0.5, 1.5]])  # same disagreement, but a padding row
  dense = np.argmax(x @ w, -1)
  pruned = np.argmax(x @ (w * m), -1)
  got = np.asarray(prac_sets.disagreement(dense, pruned, np.array([True, True, True, False])))
  np.testing.assert_array_equal(got, [False, False, True, False])


class FakeState(NamedTuple):
  """The two fields of the train state the method's jitted state updates below read."""
  params: dict
  method: dict


def test_next_prac_set_joins_cet_and_the_dense_disagreement_on_a_hand_made_round():
  # Stream ids 0..7; this task's rows are ids 2..6 (offset 2), its last row is padding.
  history = np.full((3, 8), -1)
  history[:, 0] = [1, 0, 0]  # another task's ids: critical if the offset were ignored
  history[:, 1] = [0, 0, 0]
  history[:, 2] = [1, 0, 1]  # row 0: forgotten once -> CET
  history[:, 3] = [1, 1, 1]  # row 1: never forgotten
  history[:, 4] = [0, 0, 0]  # row 2: never learned -> CET
  history[:, 5] = [1, 1, 1]  # row 3: never forgotten
  history[:, 6] = [1, 0, 0]  # row 4: forgotten, but a padding row
  fs = prac_sets.forgetting_init(8)
  for row in history:
    fs = prac_sets.forgetting_update(fs, jnp.arange(8), jnp.asarray(row == 1),
                                     jnp.asarray(row >= 0))
  valid = jnp.array([True, True, True, True, False])
  step = jax.jit(functools.partial(prac_sets.next_set, n_max=5, rule="zero_out", threshold=0))
  state = FakeState({}, {"fs": fs, "dense_pred": jnp.zeros((5,), jnp.int32),
                         "member": jnp.zeros((5,), bool)})
  # Round 0: the dense network's round; its predictions are kept, the set is the CET alone.
  pred0 = jnp.array([0, 1, 2, 3, 4], jnp.int32)
  state, counts = step(state, pred0, valid, jnp.int32(2), jnp.int32(0), jnp.asarray(False))
  np.testing.assert_array_equal(np.asarray(state.method["member"]), [1, 0, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(state.method["dense_pred"]), [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(np.asarray(counts), [2, 0, 2])
  # Round 1: a model that disagrees with the dense one on rows 1, 3 and the padding row 4; the
  # statistics are the same hand-made ones. The dense predictions stay round 0's.
  pred1 = jnp.array([0, 9, 2, 9, 9], jnp.int32)
  state, counts = step(state, pred1, valid, jnp.int32(2), jnp.int32(0), jnp.asarray(True))
  np.testing.assert_array_equal(np.asarray(state.method["member"]), [1, 1, 1, 1, 0])
  np.testing.assert_array_equal(np.asarray(state.method["dense_pred"]), [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(np.asarray(counts), [2, 2, 4])
  # Round 2: a model that agrees with the dense one except on row 0 (already a CET row).
  pred2 = jnp.array([7, 1, 2, 3, 4], jnp.int32)
  state, counts = step(state, pred2, valid, jnp.int32(2), jnp.int32(0), jnp.asarray(True))
  np.testing.assert_array_equal(np.asarray(state.method["member"]), [1, 0, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(counts), [2, 1, 2])


# --------------------------------------------------------------------------------------------------
# Early-bird, dynamic iterations, IMP.


def _flip(mask, k):
  out = mask.copy()
  out[:k] = ~out[:k]
  return out


def test_early_bird_stops_exactly_where_a_hand_made_mask_sequence_says():
  spec = {"a": True, "head": False}
  base_mask = np.array([True] * 12 + [False] * 8)
  head = np.ones((3,), bool)
  # Differences to the previous epoch (remaining = 20 weights: 1 -> 0.05 < eps, 2 -> 0.1 > eps).
  diffs = [None, 4, 0, 1, 2, 0, 1, 0, 0, 0, 0, 1]
  seq, cur = [], base_mask
  for d in diffs:
    if d:
      cur = _flip(cur, d)
    seq.append({"a": jnp.asarray(cur), "head": jnp.asarray(head)})
  # Distances: e1 .2 (start), e2 0, e3 .05, e4 .1, e5 0, e6 .05, e7 0, e8 0, ...; the queue of 5
  # holds only values below eps from e8 (e4..e8 has e4 = .1), i.e. first at e9.
  assert prac.early_bird_stop_epoch(seq, 20, spec, eps=0.08, queue_length=5) == 9
  assert prac.early_bird_stop_epoch(seq, 20, spec, eps=0.08, queue_length=3) == 7
  # Never above eps: the queue never starts (as coded), so it never stops.
  calm = [{"a": jnp.asarray(base_mask), "head": jnp.asarray(head)}] * 12
  assert prac.early_bird_stop_epoch(calm, 20, spec, eps=0.08) is None
  # The distance is normalised by the unpruned weights: 4 / 100 is below eps from the start.
  assert prac.early_bird_stop_epoch(seq, 100, spec, eps=0.08, queue_length=5) is None


def test_early_bird_step_compares_the_would_be_magnitude_masks_of_consecutive_epochs():
  # 32 weights, 30 alive (the 2 pruned ones hold large values: never candidates); keep 24 of the
  # 30: the would-be mask keeps the 24 largest alive magnitudes.
  spec = {"a": True}
  alive = np.arange(32) < 30
  mask = {"a": jnp.asarray(alive)}

  def weights(swaps):
    w = np.concatenate([np.arange(1.0, 31.0), [100.0, 100.0]])  # position i holds i + 1
    for i, j in swaps:
      w[i], w[j] = w[j], w[i]
    return {"a": jnp.asarray(w)}

  # Epoch 0: positions 6..29 kept. Epoch 1: values 5 <-> 8 and 6 <-> 7 swap places, so positions
  # 4, 5 enter and 6, 7 leave (4 / 30 above eps: the queue starts). Epoch 2: also 4 <-> 9, i.e.
  # position 3 enters and 8 leaves (2 / 30 = 0.067 < eps). Epoch 3: unchanged (0). Queue of 2:
  # (0.067, 0.133) after epoch 2, (0, 0.067) after epoch 3 -> stop at epoch 3.
  e1 = [(4, 7), (5, 6)]
  epochs = [weights([]), weights(e1), weights(e1 + [(3, 8)]), weights(e1 + [(3, 8)]),
            weights(e1 + [(3, 8)])]
  step = jax.jit(functools.partial(prac.early_bird_step, spec=spec, eps=0.08))
  state = FakeState(epochs[0], {"mask": mask, "eb": prac.early_bird_init(mask, 2)._asdict()})
  dists, stops = [], []
  for e, params in enumerate(epochs):
    state, dist, stop = step(state._replace(params=params), jnp.int32(24), jnp.int32(30),
                             jnp.int32(e))
    dists.append(float(dist))
    stops.append(bool(stop))
  np.testing.assert_allclose(dists[1:4], [4 / 30, 2 / 30, 0.0], rtol=1e-6)
  assert stops.index(True) == 3, stops


def test_search_stops_on_early_bird_or_the_epoch_budget_but_never_before_the_rewind_point():
  stop = prac.search_should_stop
  # (epoch, early-bird says stop, stop after this many epochs, rewinding point) -> stop?
  table = [((0, False, None, None), False), ((4, True, None, None), True),
           ((0, False, 1, None), True), ((1, False, 3, None), False), ((2, False, 3, None), True),
           # The rewinding point after 3 epochs is captured at epoch index 2: no stop before.
           ((0, True, None, 3), False), ((1, True, None, 3), False), ((2, True, None, 3), True),
           ((1, False, 1, 3), False), ((2, False, 1, 3), True), ((5, False, None, 3), False)]
  for (epoch, eb_stop, stop_after, rewind_epoch), want in table:
    got = stop(epoch, eb_stop=eb_stop, stop_after=stop_after, rewind_epoch=rewind_epoch)
    assert got == want, (epoch, eb_stop, stop_after, rewind_epoch)


def test_dynamic_iteration_scaling():
  # CIFAR-10 as coded: 182 epochs, milestones 91 / 136, a PrAC set of 16500 of 45000 examples.
  e, ms = prac.dynamic_schedule(182, [91, 136], 16500, 45000)
  assert (e, ms) == (66, [33, 49])
  assert prac.dynamic_schedule(182, [91, 136], 45000, 45000) == (182, [91, 136])
  assert prac.dynamic_schedule(10, [5], 1, 45000) == (1, [0])  # never 0 epochs
  lrs = [train.lr_for_epoch(1.0, k, e, prac.milestone_fractions(e, ms), 0.1) for k in range(e)]
  assert [k for k in range(1, e) if lrs[k] != lrs[k - 1]] == [33, 49]


def test_search_schedule_per_mode_by_hand():
  c = tiny()
  trainer = experiment.build(c)
  plan = dataclasses.replace(prac.make_plan(c, trainer.ctx), epochs=10, milestones=[5, 8])
  sched = prac.search_schedule
  # PrAC, dynamic iterations: a set of 37 of 100 examples runs int(10 * 0.37) = 3 epochs with the
  # milestones int(5 * 0.37) = int(1.85) = 1 and int(8 * 0.37) = int(2.96) = 2.
  assert sched(plan, 1, 37, 100) == (3, [1, 2], None)
  assert sched(plan, 0, 100, 100) == (10, [5, 8], None)
  assert sched(plan, 2, 1, 100) == (1, [0, 0], None)  # at least one epoch
  assert sched(dataclasses.replace(plan, dynamic_iterations=False), 1, 37, 100) == (
      10, [5, 8], None)
  assert sched(dataclasses.replace(plan, mode="imp"), 1, 37, 100) == (10, [5, 8], None)
  # Random pruning trains only up to the rewinding point.
  assert sched(dataclasses.replace(plan, mode="random_prune", rewind_epoch=2), 0, 100, 100) == (
      10, [5, 8], 2)
  # Record-driven baselines: the recorded round's plan, stopped after the epochs it ran.
  record = {"rounds": [{"planned_epochs": 9, "milestone_epochs": [4, 6], "epochs": 9},
                       {"planned_epochs": 4, "milestone_epochs": [2, 3], "epochs": 3}]}
  snip = dataclasses.replace(plan, mode="snip", record=record)
  assert sched(snip, 1, 37, 100) == (4, [2, 3], 3)


def test_imp_density_is_exactly_0_8_to_the_r_global_and_nested():
  key = jax.random.key(3)
  params = {"conv_0": {"kernel": jax.random.normal(key, (3, 3, 1, 8))},
            "dense_0": {"kernel": 0.3 * jax.random.normal(jax.random.fold_in(key, 1), (72, 40)),
                        "bias": jnp.ones((40,))},
            "head": {"kernel": jnp.ones((40, 10)), "bias": jnp.ones((10,))}}
  spec = masks.maskable(params)
  assert not spec["head"]["kernel"] and spec["conv_0"]["kernel"]
  total = prac.spec_total(params, spec)
  mask = masks.ones(params)
  prune = jax.jit(lambda p, m, k: prac.magnitude_prune(p, m, k, spec))
  for r in range(1, 6):
    new = prune(params, mask, jnp.int32(prac.imp_kept(total, r)))
    kept = int(masks.count(new, spec))
    assert kept == round(total * 0.8 ** r)
    assert abs(kept / total - 0.8 ** r) <= 0.5 / total
    for old_l, new_l in zip(jax.tree.leaves(mask), jax.tree.leaves(new)):
      assert not np.any(np.asarray(new_l) & ~np.asarray(old_l))  # nested
    mags = [(np.abs(np.asarray(p)), np.asarray(o), np.asarray(n))
            for p, o, n, s in zip(jax.tree.leaves(params), jax.tree.leaves(mask),
                                  jax.tree.leaves(new), jax.tree.leaves(spec)) if s]
    pruned_now = np.concatenate([a[o & ~n] for a, o, n in mags])
    kept_now = np.concatenate([a[n] for a, o, n in mags])
    assert pruned_now.max() <= kept_now.min()  # global magnitude, first conv included
    assert np.all(np.asarray(new["head"]["kernel"])) and np.all(np.asarray(new["dense_0"]["bias"]))
    mask = new


def test_bad_config_values_raise_one_line():
  cfg = load("runlocal")
  for field, value, allowed in (("mode", "lottery", "prac"), ("rewind", "late", "rewind_lt"),
                                ("data_rule", "constent", "zero_out")):
    c = load("runlocal")
    c.prac[field] = value
    with pytest.raises(ValueError) as info:
      prac.check_config(c)
    msg = str(info.value)
    assert "\n" not in msg and f"config.prac.{field}={value!r}" in msg and allowed in msg
  cfg.prac.mode = "random_subset"
  with pytest.raises(ValueError, match="subset_from"):
    prac.check_config(cfg)


# --------------------------------------------------------------------------------------------------
# The search end to end (tiny MLP on digits).


def load(arg="runlocal"):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("prac_cfg", os.path.join(_REPO, "configs",
                                                                          "prac.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.progress = False
  return c


def tiny(**prac_overrides):
  c = load("runlocal")
  c.max_train_per_task = 150
  c.hidden = (16,)
  c.epochs = 6
  c.checkpoint_every_epochs = 2
  for k, v in prac_overrides.items():
    c.prac[k] = v
  return c


def comparable(results):
  kept = {k: v for k, v in results.items() if k not in ("train_seconds", "trace_counts")}
  return json.dumps(kept, sort_keys=True, default=str)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("prac_ref"))
  saved = []
  original = checkpoint.Checkpointer.save

  def save(self, step, state, meta):
    original(self, step, state, meta)
    saved.append((meta["task"], meta["op"], meta["epoch"]))

  with mock.patch.object(checkpoint.Checkpointer, "save", save):
    results = experiment.run(tiny(), workdir, print_summary=False)
  return workdir, results, saved


def test_rounds_report_and_step_counts_add_up(reference):
  workdir, r, _ = reference
  rounds = r["rounds"]
  c = tiny()
  assert len(rounds) == c.prac.rounds
  n = rounds[0]["subset_size"]
  trainer = experiment.build(c)
  total = prac.spec_total(trainer.ctx.params, trainer.ctx.spec)
  for i, row in enumerate(rounds):
    assert row["density"] == round(total * 0.8 ** (i + 1)) / total
    assert row["steps"] == row["epochs"] * math.ceil(row["subset_size"] / c.batch_size)
    assert row["ticket_steps"] == c.epochs * math.ceil(n / c.batch_size)
    assert 0.0 <= row["test_accuracy"] <= 1.0 and row["val_accuracy"] >= 0.0
    if i:
      assert row["subset_size"] == rounds[i - 1]["next_subset_size"]
      assert row["planned_epochs"] == prac.dynamic_schedule(c.epochs, [], row["subset_size"],
                                                            n)[0]
  assert r["steps_total"] == sum(row["steps"] for row in rounds)
  assert r["vanilla_imp_steps_total"] == c.prac.rounds * c.epochs * math.ceil(n / c.batch_size)
  assert r["optimizer_steps_run"] == r["steps_total"] + sum(row["ticket_steps"] for row in rounds)
  # The per-epoch log agrees: one row per epoch each search round ran.
  with open(os.path.join(workdir, "metrics.csv")) as f:
    phases = [row["phase"] for row in csv.DictReader(f)]
  for i, row in enumerate(rounds):
    assert phases.count(f"search {i}") == row["epochs"]
  dens = [row["density"] for row in rounds]
  assert r["density_per_task"] == r["expected_density_per_task"]
  assert dens[-1] == r["density_per_task"][0]
  assert all(b < a for a, b in zip(dens, dens[1:]))
  # Sets of every size train with one compiled step (padded to the stream's shape).
  assert len({row["subset_size"] for row in rounds}) > 1
  assert r["trace_counts"].get("train_step") == 1, r["trace_counts"]
  assert r["trace_counts"].get("eval") == 1 and r["trace_counts"].get("outputs") == 1


def test_learning_rates_follow_the_milestones_scaled_to_each_round_set(reference):
  workdir, r, _ = reference
  c = tiny()
  assert (c.epochs, tuple(c.lr_milestones)) == (6, (0.5, 0.75))
  full = [3, 4]  # milestone epochs of the full schedule: 0.5 * 6 and 0.75 * 6 = 4.5, rounded to 4
  n_all = r["rounds"][0]["subset_size"]
  with open(os.path.join(workdir, "metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  checked = set()
  for row in rows:
    kind, rnd = row["phase"].split()
    n = r["rounds"][int(rnd)]["subset_size"] if kind == "search" else n_all
    # Dynamic iterations: milestone m of the full schedule moves to int(m * |P| / N).
    milestones = [int(m * n / n_all) for m in full]
    k = int(row["epoch"]) - 1  # 0-based epoch of the phase
    want = c.learning_rate * c.lr_decay ** sum(1 for m in milestones if k >= m)
    assert math.isclose(float(row["learning_rate"]), want, rel_tol=1e-6), row
    checked.add(row["phase"])
  # A later round trains on a smaller set, with milestones that moved.
  assert "search 1" in checked and r["rounds"][1]["subset_size"] < n_all


@pytest.mark.parametrize("min_full, want", [
    # As coded: 7,800 of 54,000 examples (14.4%) with 8 epochs and x0.1 at epochs 4 and 6 (the
    # Fashion-MNIST preset): int(8 * 0.144) = 1 epoch, milestones int(0.58) = int(0.87) = 0, so
    # the round's one epoch runs at 1% of the learning rate.
    (0, [0.01]),
    # With at least 3 epochs at the full rate, both milestones and the end move 3 epochs later.
    (3, [1.0, 1.0, 1.0, 0.01]),
])
def test_the_learning_rate_a_round_gets_by_hand(min_full, want):
  """The schedule a search round hands the trainer, read back through the trainer's rule."""
  planned, ms = prac.dynamic_schedule(8, [4, 6], 7800, 54000, min_full_lr_epochs=min_full)
  fractions = prac.milestone_fractions(planned, ms)
  got = [train.optim.lr_for_epoch(1.0, e, planned, fractions, 0.1) for e in range(planned)]
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_every_later_round_trains_its_floor_of_epochs_at_the_full_rate(tmp_path):
  """With ``min_full_lr_epochs=3`` every search round's first decay comes after its third epoch
  (read from metrics.csv, the rates the optimiser really got), and each rate is the preset's
  learning rate times 0.1 per milestone passed, the milestones moved by hand: round r on n_r of N
  examples has ``e = int(6 n_r / N)`` epochs and milestones ``int(3 n_r / N)``,
  ``int(4 n_r / N)``, all moved later by ``max(0, 3 - int(3 n_r / N))``."""
  c = tiny(rounds=3, early_bird=False, min_full_lr_epochs=3)
  r = experiment.run(c, str(tmp_path), print_summary=False)
  with open(tmp_path / "metrics.csv") as f:
    rows = [row for row in csv.DictReader(f) if row["phase"].startswith("search")]
  n_all = r["rounds"][0]["subset_size"]
  shifted = 0
  for i, rnd in enumerate(r["rounds"]):
    lrs = [float(row["learning_rate"]) for row in rows if row["phase"] == f"search {i}"]
    n = rnd["subset_size"]
    first, second = 3 * n // n_all, 4 * n // n_all
    shift = max(0, 3 - first)
    shifted += shift > 0
    want = [c.learning_rate * c.lr_decay ** ((k >= first + shift) + (k >= second + shift))
            for k in range(max(1, 6 * n // n_all) + shift)]
    np.testing.assert_allclose(lrs, want, rtol=1e-6, err_msg=f"round {i}")
    assert lrs[:3] == [c.learning_rate] * 3
  assert shifted  # a later round's set is small enough that the floor moved its milestones


class Killed(BaseException):
  """Stands in for SIGKILL (not an Exception: nothing on the way catches it)."""


def test_a_run_killed_inside_the_search_resumes_and_ends_identical(reference, tmp_path):
  _, results, saved = reference
  inside = [p for p in saved if p[1] or p[2]]
  assert len(inside) >= 6, saved
  target = inside[(2 * len(inside)) // 3]  # in a later round: earlier ops are replayed
  original = checkpoint.Checkpointer.save

  def killing_save(self, step, state, meta):
    original(self, step, state, meta)
    if (meta["task"], meta["op"], meta["epoch"]) == target:
      raise Killed(str(target))

  with mock.patch.object(checkpoint.Checkpointer, "save", killing_save), pytest.raises(Killed):
    experiment.run(tiny(), str(tmp_path), print_summary=False)
  resumed = experiment.run(tiny(), str(tmp_path), print_summary=False)
  assert comparable(resumed) == comparable(results)


def test_rewinding_restores_exactly():
  c = tiny(rewind="rewind_lt", rewind_epoch=2)
  c.norm = "batch"  # running statistics are rewound too
  trainer = experiment.build(c)
  assert jax.tree.leaves(trainer.ctx.variables["batch_stats"])
  starts, captured = [], {}
  real_train = trainer.train

  def spy(state, t, *, phase, epoch_end=None, **kw):
    starts.append((phase, jax.device_get(state.params), jax.device_get(state.batch_stats),
                   jax.device_get(state.method["mask"])))

    def ee(s, epoch):
      if phase == "search 0" and epoch == 1:
        captured["p"], captured["bs"] = jax.device_get(s.params), jax.device_get(s.batch_stats)
      return epoch_end(s, epoch)

    return real_train(state, t, phase=phase, epoch_end=ee, **kw)

  trainer.train = spy
  trainer.begin_task(0)
  trainer.method.run_task(trainer, trainer.init_state(), 0)
  init = jax.device_get(trainer.ctx.params)
  assert starts[0][0] == "search 0"
  jax.tree.map(np.testing.assert_array_equal, starts[0][1], init)
  jax.tree.map(np.testing.assert_array_equal, starts[0][2],
               jax.device_get(trainer.ctx.variables["batch_stats"]))
  assert [s[0] for s in starts[1:]] == ["ticket 0", "search 1", "ticket 1"]
  for phase, params, bs, mask in starts[1:]:
    want = jax.tree.map(lambda p, m: np.where(m, p, np.zeros_like(p)), captured["p"], mask)
    jax.tree.map(np.testing.assert_array_equal, params, want)
    jax.tree.map(np.testing.assert_array_equal, bs, captured["bs"])
    assert int(masks.count(mask, trainer.ctx.spec)) < prac.spec_total(init, trainer.ctx.spec)


def test_the_disagreement_set_compares_round_0_and_round_r_best_validation_models():
  """Issue 26: the critical examples for pruning of round r are the rows on which round 0's and
  round r's best-validation models (not their last epochs) predict different classes."""
  c = tiny(rounds=3, early_bird=False, dynamic_iterations=False)
  c.epochs = 4
  trainer = experiment.build(c)
  # Every search epoch's validation accuracy is scripted: the best is epoch 1 of 4, so the
  # best-validation model of each round differs from its last-epoch model.
  script = [0.5, 0.9, 0.2, 0.1]
  snaps, fs_of_round, now = {}, {}, {}
  real_train, real_accuracy = trainer.train, trainer.accuracy

  def spy(state, t, *, phase, epoch_end=None, **kw):
    kind, r = phase.split()
    if kind == "ticket":  # the round's forgetting statistics, before the next round resets them
      fs_of_round[int(r)] = jax.device_get(state.method["fs"])
      return real_train(state, t, phase=phase, epoch_end=epoch_end, **kw)
    snaps[int(r)] = []

    def ee(s, epoch):
      snaps[int(r)].append((jax.device_get(s.params), jax.device_get(s.batch_stats)))
      now["search_epoch"] = epoch
      try:
        return epoch_end(s, epoch)
      finally:
        del now["search_epoch"]

    return real_train(state, t, phase=phase, epoch_end=ee, **kw)

  def accuracy(state, t, *, split="test", current, data=None):
    if split == "val" and "search_epoch" in now:
      return script[now["search_epoch"]]
    return real_accuracy(state, t, split=split, current=current, data=data)

  trainer.train, trainer.accuracy = spy, accuracy
  trainer.begin_task(0)
  state = trainer.method.run_task(trainer, trainer.init_state(), 0)
  rows = trainer.method.report(trainer.ctx, state)["rounds"]
  assert [len(snaps[r]) for r in range(3)] == [4, 4, 4]
  data = trainer.task_data(0)
  n = int(np.asarray(trainer.ctx.stream.n_train)[0])

  def classes(params, bs):
    """A model's classes on the unaugmented training rows (its own weights, no mask)."""
    probe = state._replace(params=trainer.put(params), batch_stats=trainer.put(bs),
                           method={**state.method, "mask": masks.ones(params)})
    logits = trainer.outputs(probe, data, view_task=0, current=0)["logits"]
    return np.argmax(np.asarray(logits), -1)[:n]

  best = [classes(*snaps[r][1]) for r in range(3)]
  last = [classes(*snaps[r][-1]) for r in range(3)]
  # The construction tells the models apart: round 0's best and last models disagree somewhere,
  # and so would the sets built from the last epochs.
  assert np.any(best[0] != last[0])
  np.testing.assert_array_equal(np.asarray(state.method["dense_pred"])[:n], best[0])
  assert rows[0]["critical_pruning"] == 0
  for r in (1, 2):
    cep = best[0] != best[r]
    assert not np.array_equal(cep, last[0] != last[r])
    if r == 2:  # nor is it round 1's model that round 2 is compared with
      assert not np.array_equal(cep, best[1] != best[2])
    assert rows[r]["critical_pruning"] == int(cep.sum()), (r, rows[r])
  # Round 2 trains on round 1's critical examples for training (forgotten at least once, or never
  # learned: threshold 0) united with its critical examples for pruning.
  ids = np.asarray(data.ids)[:n]
  seen, ever, count = (np.asarray(fs_of_round[1][k])[ids] for k in ("seen", "ever", "count"))
  cet = seen & (~ever | (count > 0))
  assert rows[1]["critical_training"] == int(cet.sum())
  np.testing.assert_array_equal(np.asarray(state.method["members"])[2, :n],
                                cet | (best[0] != best[1]))


def run_direct(config):
  """The method's search and report without the experiment loop (no checkpoints, no files)."""
  trainer = experiment.build(config)
  trainer.begin_task(0)
  state = trainer.method.run_task(trainer, trainer.init_state(), 0)
  return trainer.method.report(trainer.ctx, state)


def members_of(results):
  return prac_sets.decode_members(results["prac_sets"])


def test_transfer_of_prac_sets_to_another_architecture(reference):
  workdir, ref, _ = reference
  c = tiny(subset_from=workdir)
  c.hidden = (24, 12)  # a deeper, wider MLP
  r = run_direct(c)
  np.testing.assert_array_equal(members_of(r), members_of(ref))
  assert [x["subset_size"] for x in r["rounds"]] == [x["subset_size"] for x in ref["rounds"]]
  assert all(x["next_subset_size"] is None for x in r["rounds"])  # no statistics recomputed
  assert r["vanilla_imp_steps_total"] == ref["vanilla_imp_steps_total"]
  assert r["optimizer_steps_run"] > 0


def test_random_subset_and_random_reinit_follow_the_prac_record(reference):
  workdir, ref, _ = reference
  rs = run_direct(tiny(mode="random_subset", subset_from=workdir))
  for a, b in zip(rs["rounds"], ref["rounds"]):
    assert (a["subset_size"], a["steps"], a["epochs"]) == (b["subset_size"], b["steps"],
                                                           b["epochs"])
  assert rs["steps_total"] == ref["steps_total"]
  assert not np.array_equal(members_of(rs)[1], members_of(ref)[1])
  ri = run_direct(tiny(mode="random_reinit", subset_from=workdir))
  assert ri["steps_total"] == 0
  got, want = prac_sets.decode_pruned_at(ri["prac_sets"]), prac_sets.decode_pruned_at(ref["prac_sets"])
  assert got.keys() == want.keys()
  for k in got:
    np.testing.assert_array_equal(got[k], want[k])
  assert all(x["test_accuracy"] is not None for x in ri["rounds"])


@pytest.mark.parametrize("mode", ["snip", "grasp", "synflow", "random_prune", "imp"])
def test_baseline_modes_hit_the_densities(mode):
  c = tiny(mode=mode)
  c.epochs = 3
  r = run_direct(c)
  assert r["density_per_task"] == r["expected_density_per_task"]
  n = r["rounds"][0]["subset_size"]
  per_round = 0 if mode == "random_prune" else c.epochs * math.ceil(n / c.batch_size)
  assert [x["steps"] for x in r["rounds"]] == [per_round] * c.prac.rounds
  assert r["iterations_saved_vs_vanilla_imp"] == (1.0 if mode == "random_prune" else 0.0)
