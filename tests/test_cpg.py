"""CPG / PAE: allocation levels, the per-task view, exactness after picking, growth and
compaction, and the choice of the compaction stage against the accuracy goal."""

import copy
import importlib.util
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import experiment
from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax import methods
from sparse_cl_jax import models
from sparse_cl_jax import train
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
  """Wraps a real trainer: training does nothing, validation accuracies come from a script.

  Every ``train`` call leaves ``last_train_stats`` with the training accuracy ``train_accuracy``
  (what CPG's ``cpg.min_train_acc`` rule reads).
  """

  def __init__(self, trainer, accuracies, train_accuracy=0.5):
    self._trainer = trainer
    self._acc = list(accuracies)
    self.val_data = trainer.val_data
    self.evaluated = 0
    self.train_accuracy = train_accuracy
    self.last_train_stats = None

  def apply(self, state, fn):
    return fn(state)

  def train(self, state, t, **kwargs):
    del t, kwargs
    self.last_train_stats = train.EpochStats(loss=1.0, accuracy=self.train_accuracy)
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


# --------------------------------------------------------------------------------------------------
# The paper's fine-Avg / fine-Max goals, the as-coded training-accuracy rule, weight decay,
# per-task biases and BatchNorm rows (issue 11).


class RecordingTrainer(ScriptedTrainer):
  """Training records the (host) state it starts from, then ``mark`` stands in for training."""

  def __init__(self, trainer, accuracies, mark):
    super().__init__(trainer, accuracies)
    self.starts = []
    self._mark = mark

  def train(self, state, t, **kwargs):
    self.starts.append((t, kwargs, jax.device_get((state.params, state.batch_stats))))
    return self._mark(state, t, len(self.starts))


def _fresh_state(trainer, method):
  state = trainer.init_state()
  return state._replace(method=trainer.put(method.init_state(trainer.ctx)),
                        aux=trainer.put(method.init_aux(trainer.ctx)))


def _set(tree, path, fn):
  """A copy of a nested dict with the leaf at ``path`` ('a/b') replaced by ``fn(leaf)``."""
  head, _, rest = path.partition("/")
  out = dict(tree)
  out[head] = fn(tree[head]) if not rest else _set(tree[head], rest, fn)
  return out


@pytest.mark.parametrize("goal", ["fine_avg", "fine_max"])
def test_fine_goals_follow_the_papers_fine_tuning_sequences(tiny_run, goal):
  trainer, _, _ = tiny_run
  c = copy.deepcopy(trainer.config)
  c.cpg.goal, c.cpg.goal_repeats, c.cpg.goal_finetune_lr = goal, 2, 0.123
  c.cpg.stages, c.cpg.retrain_epochs = (), 0
  method = cpg.make(c, trainer.ctx)

  def mark(state, t, call):  # the "trained" model's head row t holds the call number
    return state._replace(params=_set(state.params, "head/kernel",
                                      lambda k: k.at[t].set(float(call))))

  seq = [0.5, 0.6, 0.7, 0.4, 0.9, 0.8]  # sequence r, task k: seq[3 r + k]
  rec = RecordingTrainer(trainer, seq + [0.95], mark)
  state = method.run_task(rec, _fresh_state(trainer, method), 0)
  runs = np.asarray(seq).reshape(2, 3)
  want = runs.mean(axis=0) if goal == "fine_avg" else runs.max(axis=0)
  m = jax.device_get(state.method)
  np.testing.assert_allclose(m["goal_runs"], runs, rtol=1e-6)
  np.testing.assert_allclose(m["goals"], want, rtol=1e-6)
  assert method.report(trainer.ctx, state)["goal_per_task"][0] == pytest.approx(want[0])
  # Two sequences of three reference trainings, then the task's own training.
  assert [t for t, _, _ in rec.starts] == [0, 1, 2, 0, 1, 2, 0]
  init = jax.device_get(trainer.ctx.params)
  for call, (k, kwargs, (params, _)) in enumerate(rec.starts[:6], start=1):
    r = (call - 1) // 3
    if k == 0:  # from scratch: the network's initial values, the config's lr
      assert kwargs["lr"] == c.learning_rate
      np.testing.assert_array_equal(params["dense_0"]["kernel"], init["dense_0"]["kernel"])
      continue
    # Fine-tuned from the same sequence's model of an earlier task j, its head row j included.
    assert kwargs["lr"] == 0.123
    source_call = float(params["head"]["kernel"][k].flat[0])
    j = int(source_call) - (3 * r + 1)
    assert 0 <= j < k and np.all(params["head"]["kernel"][k] == source_call), (call, k, j)


def test_goal_finetune_was_renamed():
  c = _config("pae")
  c.cpg.goal = "finetune"
  ctx = types.SimpleNamespace(model=types.SimpleNamespace(norm="none"))
  with pytest.raises(ValueError, match="renamed.*current_finetune.*fine_avg"):
    cpg.make(c, ctx)


@pytest.mark.parametrize("method_name", ["packnet", "individual", "piggyback", "cpg", "pae"])
def test_isolation_methods_refuse_shared_batch_norm(method_name):
  c = _config(method_name)
  ctx = types.SimpleNamespace(model=types.SimpleNamespace(norm="batch"))
  with pytest.raises(ValueError, match="norm='batch' shares BatchNorm running statistics"):
    methods.make(method_name, c, ctx)


@pytest.mark.parametrize("min_train_acc,train_acc,chosen,evaluated", [
    (0.95, 0.95, 0.0, 1),  # not above 0.95: the width does not count, nothing is pruned
    (0.95, 0.96, 0.5, 2),
    (0.0, 0.1, 0.5, 2),  # rule off
])
def test_a_stage_counts_only_above_the_training_accuracy(tiny_run, min_train_acc, train_acc,
                                                         chosen, evaluated):
  trainer, _, _ = tiny_run
  c = copy.deepcopy(trainer.config)
  c.cpg.goal, c.cpg.goal_values = "fixed", (0.5,)
  c.cpg.levels, c.cpg.stages, c.cpg.reserve_for_remaining = (1.0,), (0.5,), False
  c.cpg.min_train_acc = min_train_acc
  method = cpg.make(c, trainer.ctx)
  # The rule reads the last epoch's running training accuracy the trainer recorded.
  scripted = ScriptedTrainer(trainer, [0.95, 0.95], train_accuracy=train_acc)
  state = method.run_task(scripted, _fresh_state(trainer, method), 0)
  assert method.report(trainer.ctx, state)["chosen_sparsity_per_task"][0] == chosen
  assert scripted.evaluated == evaluated


def test_cpg_weight_decay_reaches_only_maskable_weights(tiny_run):
  trainer, _, _ = tiny_run
  c = copy.deepcopy(trainer.config)
  c.cpg.weight_decay, c.weight_decay, c.learning_rate, c.momentum = 0.1, 0.0, 1.0, 0.0
  method = cpg.make(c, trainer.ctx)
  tx = method.wrap_tx(train.make_base_tx(c))
  params = trainer.ctx.params
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params, frozen=masks_lib.zeros(params))
  spec = trainer.ctx.spec
  for path, u, p, s in zip(masks_lib.paths(params), jax.tree.leaves(updates),
                           jax.tree.leaves(params), jax.tree.leaves(spec)):
    if s:  # conv / dense kernels: SGD on grad + wd * w
      np.testing.assert_allclose(u, -0.1 * np.asarray(p), rtol=1e-6, err_msg=path)
    else:  # heads, biases (and norm rows) are never decayed
      assert not np.any(np.asarray(u)), path


@pytest.mark.parametrize("norm,option", [("none", "per_task_biases"),
                                         ("task_batch", "norm_from_previous")])
@pytest.mark.parametrize("on", [True, False])
def test_as_coded_per_task_biases_and_norm_rows(norm, option, on):
  c = _config()
  c.num_tasks, c.class_order, c.norm = 2, "0,1,2,3", norm
  c.cpg.goal, c.cpg.goal_values = "fixed", (0.0,)
  c.cpg.stages, c.cpg.retrain_epochs = (), 0
  c.cpg[option] = on
  trainer = experiment.build(c)
  method = trainer.method

  def mark(state, t, call):
    del call
    tr = state.method["trainable"]
    params = state.params
    if norm == "none":  # "training" writes t + 1 into every trainable bias position
      params = _set(params, "dense_0/bias",
                    lambda b: jnp.where(tr["dense_0"]["bias"], float(t + 1), b))
      return state._replace(params=params)
    params = _set(params, "norm_0/scale", lambda s: s.at[t].set(10.0 * (t + 1)))
    stats = _set(state.batch_stats, "norm_0/mean", lambda s: s.at[t].set(5.0 + t))
    return state._replace(params=params, batch_stats=stats)

  rec = RecordingTrainer(trainer, [0.9, 0.9], mark)
  state = _fresh_state(trainer, method)
  x = trainer.task_data(0, "test").x[:20]
  for t in range(2):
    state = method.run_task(rec, state, t)
    if t == 0:
      task0 = _logits(trainer, state, 0, 0, x)
  np.testing.assert_array_equal(_logits(trainer, state, 0, 1, x), task0)  # zero forgetting
  _, _, (start1, stats1) = rec.starts[1]
  base_units = trainer.config.hidden[0]
  if option == "per_task_biases":
    view = lambda task: np.asarray(method.forward_params(
        state.params, state.aux, state.method, jnp.int32(task), jnp.int32(1))["dense_0"]["bias"])
    np.testing.assert_array_equal(start1["dense_0"]["bias"][:base_units], 1.0)  # from task 1's
    np.testing.assert_array_equal(view(0)[:base_units], 1.0)
    # With per-task biases task 2 trains its own copy; otherwise task 1 owns (froze) them.
    np.testing.assert_array_equal(view(1)[:base_units], 2.0 if on else 1.0)
  else:
    scale, mean = start1["norm_0"]["scale"][1], stats1["norm_0"]["mean"][1]
    np.testing.assert_array_equal(scale[:base_units], 10.0 if on else 1.0)
    np.testing.assert_array_equal(mean[:base_units], 5.0 if on else 0.0)


# --------------------------------------------------------------------------------------------------
# The phases of Algorithm 1 called alone (issue 26): the compaction schedule, the acceptance rule,
# growth, and what picking trains and freezes.


def _layout(trainer, c):
  return cpg.make_layout(trainer.ctx, c.cpg, picking=c.method == "cpg",
                         goal_repeats=int(c.cpg.goal_repeats))


def _started(trainer, method, lay, t=0):
  return cpg.start_task(_fresh_state(trainer, method), jnp.int32(t), lay=lay)


def test_stage_points_follow_the_cubic_ramp_by_hand():
  # Zhu & Gupta: s_t = s + (s_prev - s) (1 - t / ramp)^3 at every mask update, s after the ramp.
  np.testing.assert_allclose(cpg.stage_points(0.5, 0.2, 4, 1),
                             [0.2, 0.3734375, 0.4625, 0.4953125, 0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(cpg.stage_points(0.5, 0.2, 4, 2), [0.2, 0.4625, 0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(cpg.stage_points(0.5, 0.2, 5, 2), [0.2, 0.4352, 0.4976, 0.5],
                             rtol=1e-6)


class HookTrainer(ScriptedTrainer):
  """Training runs the method's hook as the trainer does (after every ``hook_every``-th of the
  ``epochs * ceil(n / batch_size)`` steps) and records the trainable count of every maskable
  layer after each call."""

  def __init__(self, trainer, accuracies, batch_size):
    super().__init__(trainer, accuracies)
    self.batch_size = batch_size
    self.kept = []
    self.spec = trainer.ctx.spec

  def train(self, state, t, *, epochs=0, hook=None, hook_every=0, **kwargs):
    state = super().train(state, t)
    if hook is None:
      return state
    steps = epochs * -(-int(self.task_data(t).n) // self.batch_size)
    for step in range(1, steps + 1):
      if step % hook_every == 0:
        state = hook(state, step)
        self.kept.append(_trainable_counts(state, self.spec))
    return state


def _trainable_counts(state, spec):
  tr = jax.device_get(state.method["trainable"])
  return [int(np.sum(x)) for x, s in zip(jax.tree.leaves(tr), jax.tree.leaves(spec)) if s]


def test_compaction_prunes_on_the_cubic_schedule_stage_by_stage(tiny_run):
  trainer, _, _ = tiny_run
  c = copy.deepcopy(trainer.config)
  c.cpg.goal, c.cpg.goal_values = "fixed", (0.5,)
  c.cpg.stages = (0.3, 0.6)
  c.cpg.stage_epochs, c.cpg.ramp_epochs, c.cpg.prune_every = 2, 1.5, 1
  method, lay = cpg.make(c, trainer.ctx), _layout(trainer, c)
  state = _started(trainer, method, lay)
  m = jax.device_get(state.method)
  # Candidates: the base width's weights of every maskable layer (nothing owned yet).
  n0 = [int(np.sum(a <= 0)) for a, s in zip(jax.tree.leaves(m["alloc"]),
                                             jax.tree.leaves(trainer.ctx.spec)) if s]
  hooks = HookTrainer(trainer, [0.9, 0.9], c.batch_size)
  state, chosen, acc = cpg.compact(hooks, state, 0, 0.5, True, 0.9, 0, config=c, lay=lay)
  assert (chosen, acc) == (0.6, 0.9)
  # By hand: 100 examples in batches of 64 are 2 steps an epoch, so a stage is 4 steps with a
  # mask update after each; the ramp lasts round(1.5 * 2) = 3 steps, from the previous stage's
  # sparsity.
  assert -(-int(trainer.task_data(0).n) // c.batch_size) == 2
  want = []
  for s_prev, s in ((0.0, 0.3), (0.3, 0.6)):
    for step in (1, 2, 3, 4):
      s_t = s + (s_prev - s) * (1.0 - min(step / 3.0, 1.0)) ** 3
      want.append([_kept(n, s_t) for n in n0])
  assert hooks.kept == want
  assert _trainable_counts(state, trainer.ctx.spec) == [_kept(n, 0.6) for n in n0]


@pytest.mark.parametrize("stop_at_first_miss,chosen,evaluated", [(True, 0.4, 3), (False, 0.8, 4)])
def test_compaction_accepts_a_stage_at_goal_minus_tolerance(tiny_run, stop_at_first_miss, chosen,
                                                             evaluated):
  trainer, _, _ = tiny_run
  c = copy.deepcopy(trainer.config)
  c.cpg.stages, c.cpg.goal_tolerance = (0.2, 0.4, 0.6, 0.8), 0.25
  c.cpg.stop_at_first_miss = stop_at_first_miss
  method, lay = cpg.make(c, trainer.ctx), _layout(trainer, c)
  # Goal 0.75 - tolerance 0.25 = 0.5: stage 0.2 passes, 0.4 passes exactly, 0.6 misses, 0.8
  # passes again.
  accs = [0.6, 0.5, 0.49, 0.9]
  scripted = ScriptedTrainer(trainer, list(accs))
  _, s, acc = cpg.compact(scripted, _started(trainer, method, lay), 0, 0.75, True, 0.95, 0,
                          config=c, lay=lay)
  assert (s, acc, scripted.evaluated) == (chosen, accs[int(chosen / 0.2) - 1], evaluated)
  assert cpg.meets_goal(0.5, 0.75, 0.25) and not cpg.meets_goal(0.49, 0.75, 0.25)


def test_reserve_sparsity_by_hand():
  # 1 - round(1 / (remaining + 1), 1): a task leaves a tenth-rounded share for each later task.
  assert cpg.reserve_sparsity(0, 3) == pytest.approx(0.7)  # 1 - round(0.333, 1)
  assert cpg.reserve_sparsity(1, 3) == pytest.approx(0.5)
  assert cpg.reserve_sparsity(0, 5) == pytest.approx(0.8)
  assert cpg.reserve_sparsity(2, 3) == 0.0  # the last task keeps everything


@pytest.mark.parametrize("t,chosen,evaluated", [(0, 0.8, 4), (1, 0.6, 3)])
def test_compaction_at_the_maximum_width_prunes_to_the_reserve(tiny_run, t, chosen, evaluated):
  trainer, _, _ = tiny_run  # 3 tasks
  c = copy.deepcopy(trainer.config)
  c.cpg.stages = (0.2, 0.4, 0.6, 0.8)
  method, lay = cpg.make(c, trainer.ctx), _layout(trainer, c)
  scripted = ScriptedTrainer(trainer, [0.1] * 4)  # every stage misses the goal
  # Goal missed at the widest level: stages run (whatever their accuracy) until the previous one
  # reached the reserve sparsity, 0.7 for task 1 of 3 and 0.5 for task 2.
  level = len(c.cpg.levels) - 1
  _, s, _ = cpg.compact(scripted, _started(trainer, method, lay, t), t, 0.9, False, 0.1, level,
                        config=c, lay=lay)
  assert (s, scripted.evaluated) == (chosen, evaluated)


@pytest.mark.parametrize("accs,levels,want", [
    ([0.9], (1.0, 1.5), (0.9, True, 0, 1)),
    ([0.25, 0.5], (1.0, 1.5), (0.5, True, 1, 2)),  # misses at 1x, meets goal - tol at 1.5x
    ([0.25, 0.3], (1.0, 1.5), (0.3, False, 1, 2)),  # misses everywhere: stops at the widest
    ([0.25], (1.0,), (0.25, False, 0, 1)),  # nowhere to grow
])
def test_pick_and_grow_widens_after_each_miss(tiny_run, accs, levels, want):
  trainer, _, _ = tiny_run
  c = copy.deepcopy(trainer.config)
  c.cpg.levels, c.cpg.goal_tolerance = levels, 0.25
  method, lay = cpg.make(trainer.config, trainer.ctx), _layout(trainer, c)
  scripted = ScriptedTrainer(trainer, list(accs))
  alloc = jax.device_get(_fresh_state(trainer, method).method["alloc"])
  state, acc, met, level, attempts = cpg.pick_and_grow(
      scripted, _started(trainer, method, lay), 0, 0.75, config=c, lay=lay, alloc=alloc)
  assert (acc, met, level, attempts) == want
  m = jax.device_get(state.method)
  assert int(m["level"][0]) == level
  # After growing, the task trains the positions of its new level too.
  k, a = m["trainable"]["dense_0"]["kernel"], m["alloc"]["dense_0"]["kernel"]
  np.testing.assert_array_equal(k, a <= level)


def test_mask_lr_fn_by_hand():
  fn = cpg.mask_lr_fn(5e-4, 10, ((0.5, 0.2), (0.7, 0.0)), True)
  lrs = [fn(e) for e in range(10)]
  np.testing.assert_allclose(lrs, [5e-4] * 5 + [1e-4] * 2 + [0.0] * 3, rtol=1e-12)
  assert cpg.mask_lr_fn(5e-4, 10, (), False)(0) == 0.0  # PAE: no mask to train


@pytest.fixture(scope="module")
def second_task_started():
  """A 2-task CPG run after task 1 (half of its weights kept), task 2 just started."""
  c = _config()
  c.num_tasks, c.class_order = 2, "0,1,2,3"
  c.cpg.goal, c.cpg.goal_values = "fixed", (0.0,)
  c.cpg.stages, c.cpg.retrain_epochs = (0.5,), 0
  c.cpg.mask_lr, c.cpg.mask_lr_schedule = 0.05, ()
  trainer = experiment.build(c)
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.method.run_task(trainer, state, 0)
  trainer.begin_task(1)
  lay = _layout(trainer, c)
  state = cpg.start_task(state, jnp.int32(1), lay=lay)
  return trainer, c, lay, state


def test_pick_trains_the_mask_over_old_weights_and_the_free_weights_only(second_task_started):
  trainer, c, lay, state = second_task_started
  before = jax.device_get(state)
  state, _ = cpg.pick(trainer, cpg._copy(state), 1, 0, config=c, picking=True)
  after = jax.device_get(state)
  own = before.method["own"]["dense_0"]["kernel"]
  alloc = before.method["alloc"]["dense_0"]["kernel"]
  w0, w1 = before.params["dense_0"]["kernel"], after.params["dense_0"]["kernel"]
  p0, p1 = before.aux["pick"]["dense_0"]["kernel"], after.aux["pick"]["dense_0"]["kernel"]
  old, free = own == 1, (own == 0) & (alloc <= 0)
  assert old.any() and free.any()
  # Frozen: task 1's weights and every position beyond the task's level, bit for bit.
  np.testing.assert_array_equal(w1[old], w0[old])
  np.testing.assert_array_equal(w1[alloc > 0], w0[alloc > 0])
  # Trained: the free weights at the task's level ...
  assert np.mean(w1[free] != w0[free]) > 0.5
  # ... and the picking mask, which starts at cpg.mask_init and learns only over old weights.
  np.testing.assert_array_equal(p0, np.float32(c.cpg.mask_init))
  assert np.mean(p1[old] != p0[old]) > 0.5
  np.testing.assert_array_equal(p1[~old], p0[~old])
  # The heads: task 2's row trains, task 1's is frozen.
  h0, h1 = before.params["head"]["kernel"], after.params["head"]["kernel"]
  np.testing.assert_array_equal(h1[0], h0[0])
  assert np.any(h1[1] != h0[1])


def test_start_task_gives_a_fresh_picking_mask_and_trains_free_allocated_weights(
    second_task_started):
  trainer, c, lay, state = second_task_started
  used = state._replace(aux=jax.tree.map(lambda x: x + 0.5, state.aux))  # a mask trained before
  m = jax.device_get(cpg.start_task(used, jnp.int32(1), lay=lay))
  np.testing.assert_array_equal(m.aux["pick"]["dense_0"]["kernel"], np.float32(c.cpg.mask_init))
  own = m.method["own"]["dense_0"]["kernel"]
  alloc = m.method["alloc"]["dense_0"]["kernel"]
  tr = m.method["trainable"]
  np.testing.assert_array_equal(tr["dense_0"]["kernel"], (own == 0) & (alloc <= 0))
  head_alloc = m.method["alloc"]["head"]["kernel"]
  np.testing.assert_array_equal(tr["head"]["kernel"][1], head_alloc[1] <= 0)
  assert not tr["head"]["kernel"][0].any()
