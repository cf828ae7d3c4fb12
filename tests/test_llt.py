"""Lifelong Lottery Tickets (sparse_cl_jax/methods/llt.py): the pieces against hand-made cases.

* the lottery-teaching query against a brute-force greedy search (ties and an exhausted pool
  included; no duplicates);
* the KD loss against a value computed by hand;
* the total step loss ``aux + g1 * KD_aux + g2 * (main + g1 * KD_main)`` against each term
  computed with numpy from known logits;
* the balanced sub-batch sizes (and the rows the step really marks valid);
* TD rounds keep exactly 0.8^r of the maskable weights; heads, biases and norms never pruned;
* BU re-growth and pruning back only ever grow the previous mask; BU's accept and keep-pruning
  boundaries (exactly at / just past the threshold) on scripted accuracies;
* TD over several rounds and tasks: the stashed ticket, the rewinding and the restored model, and
  every retrain distils from the task's own stored targets;
* rewinding changes exactly the masked kernels and nothing else;
* the unlabeled pool 'auto' is exactly the training images the stream leaves unused;
* runs resumed inside a task (TD and BU) end with identical results.
"""

import dataclasses
import importlib.util
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import checkpoint
from sparse_cl_jax import config as config_lib
from sparse_cl_jax import data
from sparse_cl_jax import experiment
from sparse_cl_jax import masks
from sparse_cl_jax.methods import llt
from sparse_cl_jax.methods import llt_step
from sparse_cl_jax.methods import llt_teaching

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg="runlocal", **llt_fields):
  spec = importlib.util.spec_from_file_location(
      "config_llt", os.path.join(_REPO, "configs", "llt.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.progress = False
  for k, v in llt_fields.items():
    c.llt[k] = v
  return c


# --------------------------------------------------------------------------------------------------
# Lottery teaching: the kNN query.


def _brute_force(pool, pool_n, ex, ex_n, k):
  taken = np.zeros(len(pool), bool)
  picks = []
  for i in range(ex_n):
    d = ((ex[i][None, :] - pool) ** 2).sum(-1).astype(np.float64)
    d[taken] = np.inf
    d[pool_n:] = np.inf
    order = np.argsort(d, kind="stable")[:k]  # ties: the lower index first
    order = [j for j in order if np.isfinite(d[j])]
    picks.extend(order)
    taken[order] = True
  return np.asarray(picks, np.int64)


@pytest.mark.parametrize("pool_n,k,block", [(33, 4, 2), (10, 4, 3), (37, 1, 16)])
def test_knn_query_matches_brute_force_greedy_without_duplicates(pool_n, k, block):
  rng = np.random.default_rng(0)
  # Small integer features: squared distances are exact in float32 and many tie.
  pool = rng.integers(0, 4, (37, 3)).astype(np.float32)
  ex = rng.integers(0, 4, (9, 3)).astype(np.float32)
  ex_n = 7
  capacity = min(9 * k, 37)
  idx, n = llt_teaching.knn_select(jnp.asarray(pool), jnp.int32(pool_n), jnp.asarray(ex),
                                   jnp.int32(ex_n), k=k, block=block, capacity=capacity)
  want = _brute_force(pool, pool_n, ex, ex_n, k)
  assert int(n) == len(want) == min(ex_n * k, pool_n)
  np.testing.assert_array_equal(np.asarray(idx)[:int(n)], want)
  assert len(set(want.tolist())) == len(want) and want.max() < pool_n


def test_knn_block_respects_the_memory_budget():
  assert llt_teaching.knn_block_rows(1000, 1.0) == 2 ** 20 // 4000
  assert llt_teaching.knn_block_rows(10 ** 9, 1.0) == 1  # never fewer than one row


# --------------------------------------------------------------------------------------------------
# The KD loss and the balanced sub-batches.


def test_kd_loss_against_hand_computed_value():
  student = jnp.asarray([[1.0, 2.0, 9.0], [5.0, -3.0, 0.0]])
  teacher = jnp.asarray([[2.0, 0.0, -5.0], [0.0, 0.0, 0.0]])
  valid = jnp.asarray([True, False])  # the second row must not count
  got = float(llt_teaching.kd_loss(student, teacher, 2, 2.0, valid))
  # Old classes = the first two columns; T = 2.
  p = [math.exp(1.0) / (math.exp(1.0) + 1.0), 1.0 / (math.exp(1.0) + 1.0)]
  z = math.log(math.exp(0.5) + math.exp(1.0))
  logq = [0.5 - z, 1.0 - z]
  want = -(p[0] * logq[0] + p[1] * logq[1]) * 4.0
  assert got == pytest.approx(want, rel=1e-6)
  # By hand: p = (0.7311, 0.2689), log q = (-0.9741, -0.4741): 4 * 0.8396 = 3.3584.
  assert want == pytest.approx(3.3584, abs=1e-4)


def test_balanced_sub_batch_sizes_as_coded():
  traced = jax.jit(jax.vmap(llt_step.balanced_counts, in_axes=(None, 0)), static_argnums=0)
  for batch in (256, 128, 64, 30):
    sub = batch // 4
    n_new, n_old = map(np.asarray, traced(sub, jnp.arange(10, dtype=jnp.int32)))
    for t in range(10):
      want = (int(sub / (1 + t)), int(sub * t / (1 + t)))  # dataloader.setup_dataset as coded
      assert llt_step.sub_batch_sizes(batch, t) == (sub,) + want
      assert (int(n_new[t]), int(n_old[t])) == want


def _np_ce(row, y, cols):
  z = row[:cols].astype(np.float64)
  return float(np.log(np.sum(np.exp(z))) - z[y])


def _np_kd(student, teacher, cols, temperature):
  s = student[:cols].astype(np.float64) / temperature
  t = teacher[:cols].astype(np.float64) / temperature
  p = np.exp(t) / np.sum(np.exp(t))
  logq = s - np.log(np.sum(np.exp(s)))
  return float(-np.sum(p * logq)) * temperature ** 2


def test_step_loss_total_against_each_term_computed_by_hand():
  K, sub, task = 4, 4, 1
  seen = np.asarray([2, 3], np.int32)  # task 2 sees classes 0..2 (column 3 unseen); teacher: 0..1
  g1, g2, temperature = 0.3, 0.7, 2.0
  rng = np.random.default_rng(0)
  table = (rng.normal(size=(4 * sub, 2 * K)) * 3).astype(np.float32)  # logits of image id i
  stored = (rng.normal(size=(sub, 2 * K)) * 3).astype(np.float32)  # the teacher's
  ids = {name: np.arange(i * sub, (i + 1) * sub) for i, name in
         enumerate(("old", "unlabeled", "random", "new"))}  # rows of the table, in any order
  y = {"random": np.asarray([0, 2, 1, 2]), "new": np.asarray([2, 2, 2, 2]),
       "old": np.asarray([0, 1, 1, 0])}
  valid = {"random": np.asarray([True, True, True, False]),  # the epoch's padded last batch
           "new": np.ones(sub, bool), "old": np.ones(sub, bool),
           "unlabeled": np.asarray([True, True, False, True])}
  batches = {n: {"x": jnp.asarray(ids[n]), "valid": jnp.asarray(valid[n])} for n in ids}
  for n in y:
    batches[n]["y"] = jnp.asarray(y[n], jnp.int32)
  batches["unlabeled"]["logits"] = jnp.asarray(stored)

  def fwd(fp, batch_stats, x, valid, task):  # the logits of each image, wherever its row is
    del fp, valid, task
    return jnp.take(jnp.asarray(table), x, axis=0), batch_stats

  m = {"unl": {"cols": jnp.int32(2)}}
  loss, (_, stats, _) = llt_step.step_loss(
      fwd, {}, {}, m, {}, batches, jnp.int32(task), forward_params=lambda p, a, m, t, c: p,
      num_outputs=K, sub=sub, seen=jnp.asarray(seen), gamma1=g1, gamma2=g2,
      temperature=temperature)
  main, aux = (lambda row: row[:K]), (lambda row: row[K:])
  # aux: mean CE of the auxiliary head over the 3 valid random rows, classes 0..2.
  aux_ce = np.mean([_np_ce(aux(table[i]), c, 3) for i, c in zip(ids["random"][:3], y["random"])])
  # main: CE of the main head over the balanced rows (2 new + 2 old at task 2 of sub 4) / sub.
  main_ce = sum(_np_ce(main(table[ids[n][j]]), y[n][j], 3) for n in ("new", "old")
                for j in range(2)) / sub
  # KD over the teacher's 2 classes, the 3 valid unlabeled rows, each head against its own.
  rows = [j for j in range(sub) if valid["unlabeled"][j]]
  kd_main = np.mean([_np_kd(main(table[ids["unlabeled"][j]]), main(stored[j]), 2, temperature)
                     for j in rows])
  kd_aux = np.mean([_np_kd(aux(table[ids["unlabeled"][j]]), aux(stored[j]), 2, temperature)
                    for j in rows])
  want = aux_ce + g1 * kd_aux + g2 * (main_ce + g1 * kd_main)
  assert min(aux_ce, main_ce, kd_main, kd_aux) > 0.1  # every term weighs in
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # Accuracy counts: the main head's argmax over the seen classes on the valid random rows.
  correct = sum(int(np.argmax(main(table[i])[:3]) == c)
                for i, c in zip(ids["random"][:3], y["random"]))
  np.testing.assert_allclose(np.asarray(stats), [want * 3, correct, 3], rtol=1e-5)

  # Task 1: both heads' mean CE over the valid rows of its only source, classes 0..1.
  y1 = np.asarray([0, 1, 1, 0])
  first = {"random": dict(batches["random"], y=jnp.asarray(y1, jnp.int32))}
  loss1, _ = llt_step.step_loss(
      fwd, {}, {}, m, {}, first, jnp.int32(0), forward_params=lambda p, a, m, t, c: p,
      num_outputs=K, sub=sub, seen=jnp.asarray(seen), gamma1=g1, gamma2=g2,
      temperature=temperature)
  want1 = sum(_np_ce(main(table[i]), c, 2) + _np_ce(aux(table[i]), c, 2)
              for i, c in zip(ids["random"][:3], y1)) / 3
  assert float(loss1) == pytest.approx(want1, rel=1e-5)


@pytest.fixture(scope="module")
def trainer():
  c = _config()
  c.batch_size = 64
  return experiment.build(c)


def test_step_marks_exactly_the_balanced_rows_valid(trainer):
  K = trainer.stream.num_outputs
  sub = 16

  @jax.jit
  def valid_rows(state, rows, task):
    captured = []

    def fwd(fp, batch_stats, x, valid, task, *, train=True):
      del fp, task, train
      captured.append(valid)
      return jnp.zeros((x.shape[0], 2 * K), jnp.float32), batch_stats

    trainer.method.step_loss(fwd, state.params, state.aux, state.method, state.batch_stats, rows,
                             task)
    return captured[0]

  rows = {name: {"x": jnp.zeros((sub, 8, 8, 1), jnp.uint8), "y": jnp.zeros((sub,), jnp.int32),
                 "valid": jnp.ones((sub,), bool)} for name in ("random", "new", "old")}
  rows["random"]["valid"] = jnp.arange(sub) < 11  # the epoch's last, padded batch
  state = trainer.init_state()
  for t, (n_new, n_old) in ((1, (8, 8)), (3, (4, 12)), (4, (3, 12))):
    v = np.asarray(valid_rows(state, rows, jnp.int32(t))).reshape(3, sub)
    assert v[0].sum() == 11 and v[1].sum() == n_new and v[2].sum() == n_old
    assert v[1][:n_new].all() and v[2][:n_old].all()


# --------------------------------------------------------------------------------------------------
# Pruning, growth, rewinding.


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"conv_0": {"kernel": jnp.asarray(rng.normal(size=(5, 5, 5, 5)), jnp.float32)},
          "dense_0": {"kernel": jnp.asarray(rng.normal(size=(25, 75)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(75,)), jnp.float32)},
          "norm_0": {"scale": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
          "head": {"kernel": jnp.asarray(rng.normal(size=(1, 75, 4)), jnp.float32)}}


def test_td_rounds_leave_exactly_0_8_to_the_rounds_of_the_maskable_weights():
  params = _tree()
  spec = masks.maskable(params)
  assert masks.maskable_paths(spec) == ["conv_0/kernel", "dense_0/kernel"]
  mask = masks.ones(params)
  prune = jax.jit(lambda m, p, k: llt.prune_keep(m, p, spec, k))
  for r in range(1, 7):
    mask = prune(mask, params, jnp.int32(llt.kept_after(2500, 0.2, r)))
    if r <= 4:  # 625 + 1875 weights: 2500 * 0.8^r is an integer for r <= 4, and it is kept
      assert int(masks.count(mask, spec)) == 2500 * 4 ** r // 5 ** r
    else:  # else the nearest integer (819.2 -> 819, 655.36 -> 655)
      assert int(masks.count(mask, spec)) == {5: 819, 6: 655}[r]
    for path, m in masks.leaves_with_paths(mask):
      if path not in ("conv_0/kernel", "dense_0/kernel"):
        assert bool(np.all(m)), path  # heads, biases, norms are never pruned
    # Global magnitude: every kept weight is at least as large as every pruned one.
    w = np.concatenate([np.abs(np.asarray(params[k]["kernel"])).ravel()
                        for k in ("conv_0", "dense_0")])
    m = np.concatenate([np.asarray(mask[k]["kernel"]).ravel() for k in ("conv_0", "dense_0")])
    assert w[m].min() >= w[~m].max()
  # The model after task t carries the rounds of tasks < t; the last, every round.
  assert llt.expected_counts(2500, (1, 1, 3), 0.2) == [2500, 2000, 819]


def test_bu_growth_and_pruning_back_only_grow_the_mask():
  params, ref = _tree(0), _tree(1)
  spec = masks.maskable(params)
  base = llt.prune_keep(masks.ones(params), params, spec, jnp.int32(200))
  grown = llt.regrow(base, ref, spec, jnp.int32(1000))
  assert int(masks.count(grown, spec)) == 1200
  for b, g in zip(jax.tree.leaves(base), jax.tree.leaves(grown)):
    assert bool(np.all(np.asarray(g) | ~np.asarray(b)))  # base is inside grown
  # The re-grown positions are the largest |ref| among the pruned ones.
  r = np.concatenate([np.abs(np.asarray(ref[k]["kernel"])).ravel() for k in ("conv_0", "dense_0")])
  b = np.concatenate([np.asarray(base[k]["kernel"]).ravel() for k in ("conv_0", "dense_0")])
  g = np.concatenate([np.asarray(grown[k]["kernel"]).ravel() for k in ("conv_0", "dense_0")])
  assert r[g & ~b].min() >= r[~g].max()
  back = llt.prune_back(base, grown, params, spec, jnp.int32(300))
  assert int(masks.count(back, spec)) == 500
  for bb, k, gg in zip(jax.tree.leaves(base), jax.tree.leaves(back), jax.tree.leaves(grown)):
    bb, k, gg = map(np.asarray, (bb, k, gg))
    assert np.all(k | ~bb) and np.all(gg | ~k)  # base <= pruned-back <= grown


# BU decisions on hand-made accuracies: dyadic values, so every difference is exact in binary.
_EPS = 2.0 ** -10


def test_bu_accept_and_keep_pruning_boundaries():
  assert llt.bu_accepts(0.75, 0.5, 0.25)  # exactly at the threshold: the ticket is kept
  assert not llt.bu_accepts(0.75, 0.5 - _EPS, 0.25)  # just past it: capacity re-grows
  assert llt.bu_accepts(0.5, 0.75, 0.0)  # better than the reference
  rule = dict(max_drop=0.25, base_sparsity=0.5)
  assert llt.keep_pruning(0.25, 0.75, **rule)  # drop exactly at max_drop: go on
  assert not llt.keep_pruning(0.25 + _EPS, 0.75, **rule)  # just past, sparse enough: stop
  assert llt.keep_pruning(0.75, 0.5 - _EPS, **rule)  # below the base sparsity: go on anyway
  assert not llt.keep_pruning(0.75, 0.5, **rule)  # at the base sparsity the drop decides


class _State(NamedTuple):
  params: dict
  batch_stats: dict
  method: dict


class _ScriptedTrainer:
  """Runs every operation at once; each validation evaluation returns the next scripted value."""

  def __init__(self, accuracies):
    self.accuracies = list(accuracies)

  def apply(self, state, fn):
    return fn(state)

  def evaluate(self, state, j, *, split, current):
    del state, j, current
    assert split == "val"
    return self.accuracies.pop(0)


def _bu_setup(trainer, params, **fields):
  setup = llt.build_setup(_config(), trainer.ctx)
  return dataclasses.replace(setup, spec=masks.maskable(params), total=2500, frac=0.2,
                             retrain_epochs=0, bu_max_rounds=10, **fields)


def test_bu_task1_prunes_while_the_drop_is_within_the_threshold(trainer):
  params = _tree()
  setup = _bu_setup(trainer, params, bu_max_drop=0.25, bu_base_sparsity=0.5)
  ones = masks.ones(params)
  state = _State(params, {}, {"mask": ones, "snap": params, "snap_bs": {}, "snap_mask": ones})
  # Reference 0.75. Rounds keep 2000, 1600, 1280 (sparsity < 0.5: go on whatever the drop),
  # 1024 (drop exactly 0.25: accepted), 819 (drop just past 0.25: stop, back to 1024).
  script = _ScriptedTrainer([0.25, 0.5, 0.5, 0.5, 0.5 - _EPS, 0.75])
  state, acc, rounds = llt.bu_base_rounds(setup, script, state, 0.75)
  assert (rounds, acc) == (4, 0.5) and script.accuracies == [0.75]  # the 6th never asked
  assert int(masks.count(state.method["snap_mask"], setup.spec)) == 1024
  assert int(masks.count(state.method["mask"], setup.spec)) == 819  # the rejected round


def test_bu_regrowth_prunes_back_while_the_drop_is_within_the_threshold(trainer):
  params, ref = _tree(0), _tree(1)
  setup = _bu_setup(trainer, params, bu_max_drop=0.25, bu_base_sparsity=0.0, bu_regrow=0.8)
  base = llt.prune_keep(masks.ones(params), params, setup.spec, jnp.int32(1024))
  state = _State(params, {}, {"mask": base, "ref": ref, "ref_bs": {}, "snap": params,
                              "snap_bs": {}, "snap_mask": base, "base_mask": base,
                              "count_start": jnp.asarray([1024, 1024], jnp.int32)})
  # Task 2 (two evaluations a round, equal so the mean is exact), reference 0.75: 0.8 * 1476
  # pruned positions re-grow (1181, always accepted), then 945 of them (drop exactly 0.25:
  # accepted), then 756 (drop just past: back to 1024 + 945 weights).
  accs = [0.25, 0.5, 0.5 - _EPS]
  script = _ScriptedTrainer([a for a in accs for _ in range(2)])
  state, acc, rounds = llt.regrow_rounds(setup, script, state, 1, 0.75, 0.0)
  assert (rounds, acc) == (1, 0.5) and not script.accuracies
  mask = state.method["mask"]
  assert int(masks.count(mask, setup.spec)) == 1024 + 945
  for b, k in zip(jax.tree.leaves(base), jax.tree.leaves(mask)):
    assert bool(np.all(np.asarray(k) | ~np.asarray(b)))  # the base mask is kept
  # The weights are the reference's under the accepted mask (re-grown from the reference).
  for (path, k), r, w in zip(masks.leaves_with_paths(mask), jax.tree.leaves(ref),
                             jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(w), np.where(np.asarray(k), np.asarray(r), 0.0),
                                  err_msg=path)


def test_rewinding_restores_exactly_the_masked_kernels_and_nothing_else():
  params, source = _tree(0), _tree(1)
  spec = masks.maskable(params)
  mask = llt.prune_keep(masks.ones(params), params, spec, jnp.int32(900))
  out = llt.rewind(params, mask, source, spec)
  for path, o in masks.leaves_with_paths(out):
    p = dict(masks.leaves_with_paths(params))[path]
    s = dict(masks.leaves_with_paths(source))[path]
    m = dict(masks.leaves_with_paths(mask))[path]
    if path in ("conv_0/kernel", "dense_0/kernel"):
      np.testing.assert_array_equal(np.asarray(o), np.where(np.asarray(m), np.asarray(s), 0.0))
    else:
      np.testing.assert_array_equal(np.asarray(o), np.asarray(p))


def test_td_stashes_the_rewound_ticket_and_evaluates_the_trained_model(trainer):
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.method.run_task(trainer, state, 0)
  m = jax.device_get(state.method)
  init = jax.device_get(trainer.initial_params())
  spec = trainer.ctx.spec
  total = sum(int(np.size(p)) for p, s in zip(jax.tree.leaves(init), jax.tree.leaves(spec)) if s)
  # Task 1 has one round (1,1,2,3,5): round(0.8 * total) weights are kept.
  assert int(masks.count(m["next_mask"], spec)) == round(0.8 * total)
  assert int(masks.count(m["mask"], spec)) == total  # the evaluated (trained) model is dense
  for (path, st), nm, ini, sn, pr, s in zip(masks.leaves_with_paths(m["start"]),
                                            jax.tree.leaves(m["next_mask"]),
                                            jax.tree.leaves(init), jax.tree.leaves(m["snap"]),
                                            jax.tree.leaves(jax.device_get(state.params)),
                                            jax.tree.leaves(spec)):
    if s:  # kernels: the original init under the new mask (LT)
      np.testing.assert_array_equal(st, np.where(nm, ini, 0.0), err_msg=path)
    else:  # everything else continues (no retraining after the last round: the trained values)
      np.testing.assert_array_equal(st, sn, err_msg=path)
    np.testing.assert_array_equal(pr, sn, err_msg=path)  # the trained model is restored


@pytest.fixture(scope="module")
def td_run():
  """The first three of five TD tasks (2, 3, 2 rounds): each task's method state and every
  training's sources."""
  c = _config(curriculum="2,3,2,1,1")
  tr = experiment.build(c)
  calls = []
  train = tr.train

  def spy(state, t, **kwargs):
    u = kwargs["sources"].get("unlabeled")
    calls.append({"t": t, "phase": kwargs["phase"], "lr": kwargs.get("lr"),
                  "targets": None if u is None else jax.device_get(
                      {"logits": u.data["logits"], "n": u.data["n"]})})
    out = train(state, t, **kwargs)
    calls[-1]["params_after"] = jax.device_get(out.params)
    return out

  tr.train = spy
  state = tr.init_state()
  after = []
  for t in range(3):
    tr.begin_task(t)
    state = tr.method.run_task(tr, state, t)
    after.append(jax.device_get({"m": state.method, "params": state.params}))
  spec = tr.ctx.spec
  init = jax.device_get(tr.initial_params())
  total = sum(int(np.size(p)) for p, s in zip(jax.tree.leaves(init), jax.tree.leaves(spec)) if s)
  return {"after": after, "calls": calls, "spec": spec, "init": init, "total": total,
          "retrain_lr": float(c.llt.retrain_lr)}


def _kernels(tree, spec):
  return [np.asarray(a) for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(spec)) if s]


def _count(mask, spec):
  return sum(int(k.sum()) for k in _kernels(mask, spec))


def _inside(small, big, spec):
  return all(np.all(b | ~a) for a, b in zip(_kernels(small, spec), _kernels(big, spec)))


def test_td_rounds_stash_and_rewind_across_rounds_and_tasks(td_run):
  after, spec, init, total = td_run["after"], td_run["spec"], td_run["init"], td_run["total"]
  phases = [[c["phase"] for c in td_run["calls"] if c["t"] == t] for t in range(3)]
  # Retrains run between a task's rounds only, at the retrain lr.
  assert phases == [["train", "prune round 1"], ["train", "prune round 1", "prune round 2"],
                    ["train", "prune round 1"]]
  assert [c["lr"] for c in td_run["calls"] if c["phase"].startswith("prune")] == [
      td_run["retrain_lr"]] * 4
  # Every round keeps round(total * 0.8^r), r counting the rounds of every task so far.
  want = [round(total * 0.8 ** r) for r in (2, 5, 7)]
  assert [_count(a["m"]["next_mask"], spec) for a in after] == want
  # Round 1 of task 1 keeps the largest |w| of the trained model: the ticket lies inside them.
  w = np.concatenate([np.abs(k).ravel() for k in _kernels(after[0]["m"]["snap"], spec)])
  first = w >= np.sort(w)[::-1][round(total * 0.8) - 1]
  nm = np.concatenate([k.ravel() for k in _kernels(after[0]["m"]["next_mask"], spec)])
  assert first.sum() == round(total * 0.8) and np.all(first | ~nm)
  for t, a in enumerate(after):
    m = a["m"]
    # The evaluated model is the trained one: dense at task 1, later the previous ticket.
    assert _count(m["mask"], spec) == (total if t == 0 else want[t - 1])
    for p, sn in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(m["snap"])):
      np.testing.assert_array_equal(p, sn)
    if t > 0:  # task t trained the ticket task t - 1 stashed, and its weights stayed inside it
      assert _inside(m["snap_mask"], after[t - 1]["m"]["next_mask"], spec)
      assert _count(m["snap_mask"], spec) == want[t - 1]
      assert _inside(m["next_mask"], after[t - 1]["m"]["next_mask"], spec)
      for k, p in zip(_kernels(m["snap_mask"], spec), _kernels(m["snap"], spec)):
        assert np.all(p[~k] == 0)
    # The next task's start: the original init under the ticket (LT rewinding).
    for k, st, ini in zip(_kernels(m["next_mask"], spec), _kernels(m["start"], spec),
                          _kernels(init, spec)):
      np.testing.assert_array_equal(st, np.where(k, ini, 0.0))
  # Task 2 prunes 3 rounds with 2 retrains between them: the stashed ticket's other leaves
  # (biases) continue from the last retrain, not from the trained model the task is evaluated as.
  last = [c for c in td_run["calls"] if c["t"] == 1][-1]
  assert last["phase"] == "prune round 2"
  others = [(st, la, sn) for st, la, sn, s in zip(
      jax.tree.leaves(after[1]["m"]["start"]), jax.tree.leaves(last["params_after"]),
      jax.tree.leaves(after[1]["m"]["snap"]), jax.tree.leaves(spec)) if not s]
  assert others
  for st, la, _ in others:
    np.testing.assert_array_equal(st, la)
  assert any(not np.array_equal(st, sn) for st, _, sn in others)
  m = after[2]["m"]
  assert list(m["rounds"]) == [2, 3, 2, 0, 0] and list(m["rewind"]) == [1, 1, 1, 0, 0]  # 'init'
  # remaining_weights: what the evaluated model of each task computes with.
  np.testing.assert_allclose(m["remaining"][:3], [1.0, want[0] / total, want[1] / total],
                             rtol=1e-6)


def test_every_training_of_a_task_distils_from_its_own_stored_targets(td_run):
  after, calls = td_run["after"], td_run["calls"]
  assert all(c["targets"] is None for c in calls if c["t"] == 0)  # task 1 has no teacher
  for t in (1, 2):
    # Task t's targets: the query of the model after task t - 1 (the current model's own query,
    # made after its training, is the next task's).
    own = after[t - 1]["m"]["unl_next"]
    assert int(own["n"]) > 0
    task_calls = [c for c in calls if c["t"] == t]
    assert len(task_calls) >= 2  # the training and the retrains after the query
    for c in task_calls:
      np.testing.assert_array_equal(c["targets"]["logits"], own["logits"], err_msg=c["phase"])
      assert int(c["targets"]["n"]) == int(own["n"]), c["phase"]
  # Task 2 queried a new teacher before its retrains: the two sets differ.
  assert not np.array_equal(after[0]["m"]["unl_next"]["logits"],
                            after[1]["m"]["unl_next"]["logits"])


# --------------------------------------------------------------------------------------------------
# The unlabeled pool and the config.


def test_pool_auto_is_the_training_images_the_stream_leaves_unused():
  source = data.load_source("digits", seed=3)  # digits' own train/test split follows the seed
  kwargs = dict(num_tasks=5, class_order="natural", val_fraction=0.1, seed=3,
                max_train_per_task=100, max_eval_per_task=None)
  stream = data.make_stream(source, incremental="class", **kwargs)
  rows = data.stream_source_rows(source, **kwargs)
  for t in range(5):
    n = int(stream.n_train[t])
    np.testing.assert_array_equal(source.x_train[rows["train"][t]], stream.x_train[t, :n])
    nv = int(stream.n_val[t])
    np.testing.assert_array_equal(source.x_train[rows["val"][t]], stream.x_val[t, :nv])
  unused = data.unused_train_rows(source, **kwargs)
  used = np.concatenate(rows["train"] + rows["val"])
  assert np.intersect1d(unused, used).size == 0
  assert unused.size + used.size == source.x_train.shape[0]
  c = _config()
  c.seed = 3
  c.max_train_per_task = 100
  pool = llt_teaching.load_pool(c, stream)
  np.testing.assert_array_equal(pool, source.x_train[unused])


@pytest.mark.parametrize("field,value,match", [
    ("mode", "topdown", r"config\.llt\.mode='topdown' is not valid"),
    ("curriculum", "1,2", r"config\.llt\.curriculum='1,2' must be 'auto' or 5"),
    ("rewind", "best", r"config\.llt\.rewind='best' is not valid"),
    ("prune_fraction", 1.0, r"config\.llt\.prune_fraction=1\.0 must be in \(0, 1\)"),
    ("late_epoch", 9, r"config\.llt\.late_epoch=9 must be <= config\.epochs=2"),
])
def test_bad_config_values_fail_with_one_line(field, value, match):
  c = _config(**{field: value})
  with pytest.raises(ValueError, match=match):
    experiment.build(c)


def test_presets_resolve():
  for arg in (None, "runlocal", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet"):
    c = _config(arg)
    config_lib.validate(c)
    r = llt.resolved(c)
    assert len(r["rounds"]) == c.num_tasks
  assert llt.resolved(_config(mode="imp"))["rounds"] == (3, 3, 2, 2, 2)
  assert llt.resolved(_config(mode="imp"))["teach"] is False
  assert llt.resolved(_config("cifar10"))["rounds"] == (1, 1, 2, 3, 5)


# --------------------------------------------------------------------------------------------------
# End to end: BU masks grow; resumed runs end identical.


def _tiny(mode, **fields):
  c = _config(mode=mode, **fields)
  c.num_tasks = 2
  c.epochs = 2
  c.max_train_per_task = 60
  c.checkpoint_every_epochs = 1
  c.llt.curriculum = "1,2"
  c.llt.retrain_epochs = 2
  c.llt.bu_max_rounds = 3
  c.llt.bu_accept = 0.0  # any shortfall against the reference re-grows
  return c


# Checkpoint saves of these runs (one after every epoch but an operation's last, one per task):
# TD task 1: train 1, task end 1; task 2: train 1, retrain between its two rounds 1 -> the 4th
# save is inside that retrain. BU task 1: train 1, three prune rounds' retrains 3, task end 1;
# task 2: reference 1, ticket 1, re-grow rounds 1, 2 -> the 9th save is inside the second re-grow
# round (after pruning back), whose decisions read the mask count the task began with.
# TD rewinds to late weights (kept by an epoch_end hook of task 1); BU selects exemplars by herding
# and starts its tickets from a random re-initialisation: all three must survive the resume.
@pytest.mark.parametrize("mode,crash_at,fields", [
    ("td", 4, {"rewind": "late"}),
    ("bu", 9, {"rewind": "random", "exemplar_selection": "herding"})])
def test_run_resumed_inside_a_task_ends_identical(mode, crash_at, fields, tmp_path, monkeypatch):
  full = experiment.run(_tiny(mode, **fields), str(tmp_path / "full"), print_summary=False)
  original = checkpoint.Checkpointer.save
  calls = {"n": 0, "meta": None}

  def crash(self, step, state, meta):
    original(self, step, state, meta)
    calls["n"] += 1
    if calls["n"] == crash_at:
      calls["meta"] = dict(meta)
      raise KeyboardInterrupt("simulated preemption")

  monkeypatch.setattr(checkpoint.Checkpointer, "save", crash)
  with pytest.raises(KeyboardInterrupt):
    experiment.run(_tiny(mode, **fields), str(tmp_path / "r"), print_summary=False)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original)
  meta = calls["meta"]
  assert meta["task"] == 1 and meta["epoch"] == 1 and meta["op"] > 2, meta  # mid-operation
  resumed = experiment.run(_tiny(mode, **fields), str(tmp_path / "r"), print_summary=False)
  np.testing.assert_array_equal(resumed["accuracy_matrix"], full["accuracy_matrix"])
  assert resumed["remaining_weights"] == full["remaining_weights"]
  assert resumed["llt"] == full["llt"]
  rem = full["remaining_weights"]
  if mode == "td":
    assert rem == [1.0, full["expected_density_per_task"][1]]
    assert full["rewind_points"] == ["late: after epoch 1 of task 1"] * 2
  else:
    assert full["llt"]["regrown"] == [False, True]
    assert full["rewind_points"] == ["none", "random"]
    assert rem[0] < 1.0 and rem[1] > rem[0]  # task 1 pruned; task 2's mask grew
