"""CPG / PAE: allocation levels, the per-task view, exactness after picking, growth and
compaction, and the choice of the compaction stage against the accuracy goal."""

import copy
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import experiment
from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax import models
from sparse_cl_jax.methods import base
from sparse_cl_jax.methods import cpg

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name="cpg", arg="runlocal"):
  path = os.path.join(_REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.progress = False
  return c


def _count(tree):
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def _kept(n, sparsity):
  """What prune_to keeps of n candidates at a (float32) sparsity."""
  return n - int(np.round(np.float32(sparsity) * np.float32(n)))


# --------------------------------------------------------------------------------------------------
# Allocation levels: growing = enlarging a pre-allocated region.


@pytest.mark.parametrize("name,kwargs,shape", [
    ("mlp", {"hidden": (8, 6)}, (8, 8, 1)),
    ("small_convnet", {"norm": "task_batch"}, (8, 8, 1)),
])
def test_allocation_levels_embed_the_narrow_networks(name, kwargs, shape):
  levels = (1.0, 1.5, 2.0)
  mult = cpg.channel_multipliers(levels)
  wide = models.create(name, num_heads=3, num_classes=2, num_tasks=3, width_multiplier=mult[-1],
                       **kwargs)
  # Only the shapes of the params matter; running statistics as initialised (mean 0, var 1).
  abstract = jax.eval_shape(
      lambda k: wide.init(k, jnp.zeros((1,) + shape), task=0, train=False), jax.random.key(0))
  variables = {c: masks_lib.map_with_path(
      lambda p, x: jnp.ones(x.shape, x.dtype) if p.endswith("var") else jnp.zeros(x.shape, x.dtype),
      v) for c, v in abstract.items()}
  rows = base.task_rows(variables["params"], 3, multi_head=True,
                        per_task_norm=kwargs.get("norm") == "task_batch")
  alloc = cpg.allocation_levels(wide, variables, shape, mult, rows)
  for lv, m in enumerate(mult):
    narrow = models.create(name, num_heads=3, num_classes=2, num_tasks=3, width_multiplier=m,
                           **kwargs)
    narrow_n = _count(jax.eval_shape(
        lambda k, n=narrow: n.init(k, jnp.zeros((1,) + shape), task=0, train=False),
        jax.random.key(0))["params"])
    # The positions allocated at level lv are exactly as many as the narrow network has params.
    assert sum(int(np.sum(a <= lv)) for a in jax.tree.leaves(alloc)) == narrow_n
  # The widest level allocates everything; a hidden layer's units are a prefix.
  assert all(int(np.max(a)) <= 2 for a in jax.tree.leaves(alloc))
  first = "dense_0" if name == "mlp" else "conv_0"
  k = alloc[first]["kernel"]
  assert np.all(np.diff(np.min(k.reshape(-1, k.shape[-1]), axis=0)) >= 0)


def test_channel_multipliers_count_parameters_as_coded():
  assert cpg.channel_multipliers((1.0, 1.5)) == [1.0, math.sqrt(1.5)]
  assert cpg.channel_multipliers((1.0, 2.0), "channels") == [1.0, 2.0]
  with pytest.raises(ValueError):
    cpg.channel_multipliers((1.5, 1.0))


# --------------------------------------------------------------------------------------------------
# The view of a task: picking, ownership, allocation (hand-built trees).


def test_view_rules():
  w = jnp.arange(1.0, 7.0).reshape(1, 6)
  params = {"d": {"kernel": w}, "head": {"kernel": jnp.ones((2, 2, 1))}}
  spec = {"d": {"kernel": True}, "head": {"kernel": False}}
  rows = {"d": {"kernel": False}, "head": {"kernel": True}}
  own = {"d": {"kernel": jnp.array([[1, 1, 2, 0, 0, 0]], jnp.int32)},
         "head": {"kernel": jnp.zeros((2, 2, 1), jnp.int32)}}
  alloc = {"d": {"kernel": jnp.array([[0, 0, 0, 0, 1, 1]], jnp.int8)},
           "head": {"kernel": jnp.array([[[0], [1]], [[0], [1]]], jnp.int8)}}
  bits = cpg.piggyback.new_bits(params, spec, 3)
  picks = {"d": {"kernel": jnp.array([[True, False, True, True, True, True]])},
           "head": {"kernel": jnp.zeros((), bool)}}
  bits = cpg.piggyback.set_bits(bits, picks, 1, spec)  # task 1 (index) keeps old weight 0 only
  m = {"own": own, "alloc": alloc, "level": jnp.array([0, 0, 1], jnp.int32), "bits": bits}
  live = {"d": {"kernel": jnp.array([[0.01, 0.0, 0.01, 0.01, 0.01, 0.01]])},
          "head": {"kernel": jnp.zeros(())}}

  def v(task, current, picking=True):
    out = cpg.view(params, live, m, task, current, spec=spec, rows=rows, picking=picking,
                   threshold=5e-3)
    return np.asarray(out["d"]["kernel"])[0], np.asarray(out["head"]["kernel"])

  # Task 0 finished (current 2): only its own weights.
  np.testing.assert_array_equal(v(0, 2)[0], [1, 2, 0, 0, 0, 0])
  # Task 1 finished: its stored picks on task 0's weights, its own weight, no free weights.
  np.testing.assert_array_equal(v(1, 2)[0], [1, 0, 3, 0, 0, 0])
  # Task 2 being trained at level 1: live picks on old weights, free allocated weights.
  d, h = v(2, 2)
  np.testing.assert_array_equal(d, [1, 0, 3, 4, 5, 6])
  np.testing.assert_array_equal(h[:, :, 0], [[1, 1], [1, 1]])
  # Task 1 being trained at level 0: the level-1 positions stay hidden, also in its head.
  m0 = dict(m, level=jnp.array([0, 0, 0], jnp.int32))
  out = cpg.view(params, live, m0, 1, 1, spec=spec, rows=rows, picking=True, threshold=5e-3)
  np.testing.assert_array_equal(np.asarray(out["d"]["kernel"])[0], [1, 0, 3, 4, 0, 0])
  np.testing.assert_array_equal(np.asarray(out["head"]["kernel"])[1, :, 0], [1, 0])
  # PAE (no picking): every old weight is used.
  np.testing.assert_array_equal(v(1, 2, picking=False)[0], [1, 2, 3, 0, 0, 0])
  # A task not trained yet sees every owned weight, unpicked.
  np.testing.assert_array_equal(v(2, 1)[0], [1, 2, 3, 0, 0, 0])


# --------------------------------------------------------------------------------------------------
# A real tiny run: growth, picking and compaction leave earlier tasks bit-identical.


def _logits(trainer, state, task, current, x):
  fp = trainer.method.forward_params(state.params, state.aux, state.method, jnp.int32(task),
                                     jnp.int32(current))
  variables = {"params": fp}
  if trainer.has_batch_stats:
    variables["batch_stats"] = state.batch_stats
  return np.asarray(trainer.model.apply(variables, trainer.stream.normalize(x), task=task,
                                        train=False))


@pytest.fixture(scope="module")
def tiny_run():
  c = _config()
  c.num_tasks = 3
  c.class_order = "0,1,2,3,4,5"  # three 2-class tasks
  c.cpg.goal = "fixed"
  # Task 1 meets any goal; task 2 can never meet 1.01 (it grows to the maximum width, then is
  # compacted "to leave room" as coded); task 3 meets its goal again.
  c.cpg.goal_values = (0.0, 1.01, 0.0)
  c.cpg.mask_lr = 0.05  # picks flip within the few steps of this run
  c.cpg.mask_lr_schedule = ()
  c.cpg.retrain_mask_lr = 0.05
  trainer = experiment.build(c)
  state = trainer.init_state()
  x = trainer.task_data(0, "test").x[:40]
  seen = {}
  for t in range(3):
    trainer.begin_task(t)
    state = trainer.method.run_task(trainer, state, t)
    for j in range(t + 1):
      seen[(j, t)] = _logits(trainer, state, j, t, x)
  return trainer, state, seen


def test_earlier_tasks_bit_identical_after_picking_growth_and_compaction(tiny_run):
  trainer, state, seen = tiny_run
  for (j, t), logits in seen.items():
    np.testing.assert_array_equal(logits, seen[(j, j)], err_msg=f"task {j} after task {t}")
  rep = trainer.method.report(trainer.ctx, state)
  # Something did happen in later tasks: growth, picking and compaction.
  assert rep["level_per_task"] == [0, 1, 1]
  assert rep["picked_fraction_per_task"][1] < 1.0 and rep["picked_fraction_per_task"][2] < 1.0
  assert all(s > 0 for s in rep["chosen_sparsity_per_task"][:2])


def test_growth_changes_the_allocated_width(tiny_run):
  trainer, state, _ = tiny_run
  m = jax.device_get(state.method)
  k = m["alloc"]["dense_0"]["kernel"]  # [64, 39]: hidden units are the last axis
  hidden = trainer.config.hidden[0]
  assert k.shape[-1] == round(hidden * math.sqrt(1.5))
  units = lambda lv: int(np.sum(np.any(k <= lv, axis=0)))
  assert units(0) == hidden and units(1) == k.shape[-1]
  # Task 1 (level 0) owns nothing beyond the base width; task 2 owns some new units' weights.
  own = m["own"]["dense_0"]["kernel"]
  assert not np.any((own == 1) & (k > 0))
  assert np.any((own == 2) & (k == 1))
  rep = trainer.method.report(trainer.ctx, state)
  assert rep["expansion"] == pytest.approx(k.shape[-1] / hidden)
  assert rep["attempts_per_task"] == [1, 2, 1]


def test_compaction_keeps_exact_counts_of_the_chosen_stage(tiny_run):
  trainer, state, _ = tiny_run
  m = jax.device_get(state.method)
  rep = trainer.method.report(trainer.ctx, state)
  s = rep["chosen_sparsity_per_task"]
  assert s[0] == pytest.approx(0.8) and s[1] == pytest.approx(0.5)  # 1 - round(1/2, 1) = 0.5
  for a, o, sp in zip(jax.tree.leaves(m["alloc"]), jax.tree.leaves(m["own"]),
                      jax.tree.leaves(trainer.ctx.spec)):
    if not sp:
      continue
    n0 = int(np.sum(a <= 0))
    assert int(np.sum(o == 1)) == _kept(n0, 0.8)
    n1 = int(np.sum(a <= 1)) - int(np.sum(o == 1))
    assert int(np.sum(o == 2)) == _kept(n1, 0.5)


# --------------------------------------------------------------------------------------------------
# Compaction against a hand-set goal with scripted validation accuracies.


class ScriptedTrainer:
  """Wraps a real trainer: training does nothing, validation accuracies come from a script."""

  def __init__(self, trainer, accuracies):
    self._trainer = trainer
    self._acc = list(accuracies)
    self.val_data = trainer.val_data
    self.evaluated = 0

  def apply(self, state, fn):
    return fn(state)

  def train(self, state, t, **kwargs):
    del t, kwargs
    return state

  def evaluate(self, state, t, **kwargs):
    del state, t, kwargs
    self.evaluated += 1
    return self._acc.pop(0)

  def task_data(self, t, split="train"):
    return self._trainer.task_data(t, split)

  def put(self, x):
    return self._trainer.put(x)

  def initial_params(self):
    return self._trainer.initial_params()


@pytest.mark.parametrize("stop_at_first_miss,expected", [(True, 0.4), (False, 0.8)])
def test_compaction_stops_at_the_goal(tiny_run, stop_at_first_miss, expected):
  trainer, _, _ = tiny_run
  c = copy.deepcopy(trainer.config)
  c.cpg.goal = "fixed"
  c.cpg.goal_values = (0.92,)
  c.cpg.stages = (0.2, 0.4, 0.6, 0.8)
  c.cpg.stop_at_first_miss = stop_at_first_miss
  method = cpg.make(c, trainer.ctx)
  state = trainer.init_state()
  # trained 0.95 (meets 0.92), then per stage 0.95, 0.93, 0.90 (misses), 0.97.
  scripted = ScriptedTrainer(trainer, [0.95, 0.95, 0.93, 0.90, 0.97])
  state = method.run_task(scripted, state, 0)
  rep = method.report(trainer.ctx, state)
  assert rep["chosen_sparsity_per_task"][0] == pytest.approx(expected)
  assert rep["goal_per_task"][0] == pytest.approx(0.92)
  assert scripted.evaluated == (4 if stop_at_first_miss else 5)
  m = jax.device_get(state.method)
  for a, o, sp in zip(jax.tree.leaves(m["alloc"]), jax.tree.leaves(m["own"]),
                      jax.tree.leaves(trainer.ctx.spec)):
    if sp:
      n0 = int(np.sum(a <= 0))
      assert int(np.sum(o == 1)) == _kept(n0, expected)


def test_goal_missed_everywhere_keeps_the_unpruned_model_without_reserve(tiny_run):
  trainer, _, _ = tiny_run
  c = copy.deepcopy(trainer.config)
  c.cpg.goal = "fixed"
  c.cpg.goal_values = (0.99,)
  c.cpg.levels = (1.0,)  # no growth possible
  c.cpg.stages = (0.2, 0.4)
  c.cpg.reserve_for_remaining = False
  method = cpg.make(c, trainer.ctx)
  scripted = ScriptedTrainer(trainer, [0.9])
  state = method.run_task(scripted, trainer.init_state(), 0)
  rep = method.report(trainer.ctx, state)
  assert rep["chosen_sparsity_per_task"][0] == 0.0 and scripted.evaluated == 1
