"""Tests for CLNP (sparse_cl_jax.methods.clnp): statistics, partition, exactness, selection."""

import collections
import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import experiment
from sparse_cl_jax import masks
from sparse_cl_jax import models
from sparse_cl_jax import train
from sparse_cl_jax.methods import base
from sparse_cl_jax.methods import clnp

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg="runlocal", **overrides):
  spec = importlib.util.spec_from_file_location("config_clnp",
                                                os.path.join(_REPO, "configs", "clnp.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.progress = False
  for k, v in overrides.items():
    if "." in k:
      a, b = k.split(".")
      c[a][b] = v
    else:
      c[k] = v
  return c


def _identity_view(params, aux, mstate, task, current):
  del aux, mstate, task, current
  return params


def _task_data(x, n):
  x = jnp.asarray(x)
  rows = x.shape[0]
  return train.TaskData(x=x, y=jnp.zeros((rows,), jnp.int32), ids=jnp.arange(rows, dtype=jnp.int32),
                        n=jnp.int32(n))


def _params(model, input_shape, seed=0):
  """Params of the model's structure filled from NumPy (compiling a model's init is slow on CPU)."""
  like = jax.eval_shape(lambda k: model.init(k, jnp.zeros(input_shape), task=0, train=False),
                        jax.random.key(0))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), like)


def _masks(lay, owner, params, task, training, phase):
  """Every mask of the partition, computed in one jitted call."""

  @jax.jit
  def f(owner, params):
    return {"owner": clnp.weight_owner(lay, owner, params),
            "inter": clnp.interference_masks(lay, owner, params, task),
            "free": clnp.free_masks(lay, owner, params),
            "view": clnp.view_masks(lay, owner, params, task, training),
            "train": clnp.trainable_masks(lay, owner, params, task, phase)}

  return jax.device_get(f(owner, params))


def _layout(model, params, input_shape, num_tasks=2):
  rows = base.task_rows(params, num_tasks, multi_head=model.num_heads > 1,
                        per_task_norm=getattr(model, "norm", "none") == "task_batch")
  return clnp.make_layout(model, params, input_shape, rows)


# --------------------------------------------------------------------------------------------------
# Tiny MLP, by hand: 2 inputs -> 3 -> 2 -> head.

_X = np.array([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0], [100.0, 100.0]], np.float32)  # row 4: padding
_MLP_PARAMS = {
    "dense_0": {"kernel": np.array([[1, -1, 0], [0, 1, -2]], np.float32),
                "bias": np.array([0, 0, 1], np.float32)},
    "dense_1": {"kernel": np.array([[1, 0], [-1, 1], [0, 1]], np.float32),
                "bias": np.array([0, -1], np.float32)},
}


def _tiny_mlp(num_heads):
  model = models.create("mlp", num_heads=num_heads, num_classes=2, hidden=(3, 2), norm="none")
  params = dict(_params(model, (1, 1, 2, 1)))
  params.update(_MLP_PARAMS)
  return model, params


def test_unit_means_tiny_mlp_by_hand():
  model, params = _tiny_mlp(1)
  lay = _layout(model, params, (1, 1, 2, 1))
  assert lay.names == ("dense_0", "dense_1") and lay.units == (3, 2)
  f = clnp.make_unit_means(model, lambda x: x.astype(jnp.float32), lay, _identity_view,
                           batch_size=2, has_batch_stats=False)
  means = f(params, {}, {}, _task_data(_X.reshape(4, 1, 2, 1), 3), jnp.int32(0))
  # relu(x W0 + b0): [1, 1, 0], [3, 0, 3], [0, 1, 0]; relu(h W1 + b1): [0, 0], [3, 2], [0, 0].
  np.testing.assert_allclose(means["dense_0"], [4 / 3, 2 / 3, 1.0], rtol=1e-6)
  np.testing.assert_allclose(means["dense_1"], [1.0, 2 / 3], rtol=1e-6)
  # Partition at theta = 0.8: units 0 and 2 of dense_0 and unit 0 of dense_1 become task 1's.
  free = {"dense_0": jnp.zeros(3, jnp.int32), "dense_1": jnp.zeros(2, jnp.int32)}
  owner = clnp.activate(free, means, {"dense_0": 0.8, "dense_1": 0.8}, 0)
  np.testing.assert_array_equal(owner["dense_0"], [1, 0, 1])
  np.testing.assert_array_equal(owner["dense_1"], [1, 0])


@pytest.mark.parametrize("num_heads", [1, 2])
def test_partition_tiny_mlp_by_hand(num_heads):
  model, params = _tiny_mlp(num_heads)
  lay = _layout(model, params, (1, 1, 2, 1))
  owner = {"dense_0": jnp.array([1, 0, 1], jnp.int32), "dense_1": jnp.array([1, 0], jnp.int32)}
  T, F = True, False
  m0 = _masks(lay, owner, params, 0, False, clnp.PRUNED)  # task 0, finished
  m1 = _masks(lay, owner, params, 1, True, clnp.TRAIN)  # task 1, training
  w, inter, free, view = m0["owner"], m0["inter"], m0["free"], m0["view"]
  view1, tr = m1["view"], m1["train"]
  np.testing.assert_array_equal(w["dense_0"]["kernel"], [[1, 0, 1], [1, 0, 1]])
  np.testing.assert_array_equal(w["dense_1"]["kernel"], [[1, 0], [0, 0], [1, 0]])
  np.testing.assert_array_equal(inter["dense_0"]["kernel"], np.zeros((2, 3), bool))
  np.testing.assert_array_equal(inter["dense_1"]["kernel"], [[F, F], [T, F], [F, F]])
  np.testing.assert_array_equal(free["dense_0"]["kernel"], [[F, T, F], [F, T, F]])
  np.testing.assert_array_equal(free["dense_1"]["kernel"], [[F, T], [F, T], [F, T]])
  np.testing.assert_array_equal(free["dense_0"]["bias"], [F, T, F])
  # Task 0's finished view: active -> active weights only.
  np.testing.assert_array_equal(view["dense_0"]["kernel"], [[T, F, T], [T, F, T]])
  np.testing.assert_array_equal(view["dense_0"]["bias"], [T, F, T])
  np.testing.assert_array_equal(view["dense_1"]["kernel"], [[T, F], [F, F], [T, F]])
  # Task 1 before pruning also sees the free units; interference into task 0's unit stays cut.
  np.testing.assert_array_equal(view1["dense_1"]["kernel"], [[T, T], [F, T], [T, T]])
  np.testing.assert_array_equal(tr["dense_0"]["kernel"], [[F, T, F], [F, T, F]])
  np.testing.assert_array_equal(tr["dense_1"]["kernel"], [[F, T], [F, T], [F, T]])
  np.testing.assert_array_equal(tr["dense_1"]["bias"], [F, T])
  head_view, head_view1, head_tr = (view["head"]["kernel"], view1["head"]["kernel"],
                                    tr["head"]["kernel"])
  if num_heads == 1:  # rows: final units; a single head sees only the task's own units
    np.testing.assert_array_equal(head_view[0], [[T, T], [F, F]])
    np.testing.assert_array_equal(head_view1[0], [[F, F], [T, T]])
    np.testing.assert_array_equal(head_tr[0], [[F, F], [T, T]])
    np.testing.assert_array_equal(free["head"]["kernel"][0], [[F, F], [T, T]])
    assert not np.any(tr["head"]["bias"])  # the shared output bias belongs to the first task
  else:  # head row 0 sees the active units; row 1 is task 1's, all of it trainable
    np.testing.assert_array_equal(head_view[0], [[T, T], [F, F]])
    np.testing.assert_array_equal(inter["head"]["kernel"][0], [[F, F], [T, T]])
    np.testing.assert_array_equal(head_tr, [[[F, F], [F, F]], [[T, T], [T, T]]])
    np.testing.assert_array_equal(tr["head"]["bias"], [[F, F], [T, T]])


def test_begin_keeps_the_new_head_row_and_cuts_hidden_interference_only():
  """Sec. 2.1: free weights re-initialised, interference into owned units zeroed; the new task's
  head row starts from its initial values (the paper zeroes nothing there before pruning)."""
  model, params = _tiny_mlp(2)
  params["head"] = {"kernel": np.full((2, 2, 2), 0.5, np.float32),
                    "bias": np.zeros((2, 2), np.float32)}
  lay = _layout(model, params, (1, 1, 2, 1))
  fresh = jax.tree.map(lambda a: np.full_like(a, 7.0), params)
  begin = jax.jit(lambda o, p, f, t: clnp.begin_params(lay, o, p, f, t))
  # Task 0, every unit free: hidden weights and biases re-drawn, the head untouched (not zero).
  free_owner = {"dense_0": jnp.zeros(3, jnp.int32), "dense_1": jnp.zeros(2, jnp.int32)}
  out = jax.device_get(begin(free_owner, params, fresh, 0))
  np.testing.assert_array_equal(out["head"]["kernel"], params["head"]["kernel"])
  np.testing.assert_array_equal(out["dense_0"]["kernel"], np.full((2, 3), 7.0))
  # Task 1 after task 0 owns units 0 and 2 (layer 0) and 0 (layer 1).
  owner = {"dense_0": jnp.array([1, 0, 1], jnp.int32), "dense_1": jnp.array([1, 0], jnp.int32)}
  out = jax.device_get(begin(owner, params, fresh, 1))
  np.testing.assert_array_equal(out["head"]["kernel"], params["head"]["kernel"])  # both rows
  k1 = params["dense_1"]["kernel"]
  # Column 0 (task 0's unit): kept, except from the free unit 1 (interference -> 0.0); column 1
  # (free unit): re-initialised.
  np.testing.assert_array_equal(out["dense_1"]["kernel"], [[k1[0, 0], 7.0], [0.0, 7.0],
                                                           [k1[2, 0], 7.0]])
  np.testing.assert_array_equal(out["dense_0"]["bias"], [0.0, 7.0, 1.0])
  # Pruning task 1 later cuts its head row from the units left inactive (commit's interference).
  inter = jax.device_get(jax.jit(lambda o, p: clnp.interference_masks(lay, o, p, 1))(owner,
                                                                                     params))
  np.testing.assert_array_equal(inter["head"]["kernel"][1], [[False, False], [True, True]])


# --------------------------------------------------------------------------------------------------
# Tiny convnet (small_convnet at width 1/16: conv 2, conv 4, dense 16), checked against NumPy.


def _pool(a):
  b, h, w, c = a.shape
  return a.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def test_unit_means_and_partition_tiny_convnet():
  model = models.create("small_convnet", num_heads=1, num_classes=3, width_multiplier=1 / 16)
  params = _params(model, (1, 8, 8, 1))
  rng = np.random.default_rng(0)
  k0 = np.zeros((3, 3, 1, 2), np.float32)  # centre taps only: a per-pixel affine map
  k0[1, 1, 0] = [1.0, -1.0]
  k1 = np.zeros((3, 3, 2, 4), np.float32)
  k1[1, 1] = rng.normal(size=(2, 4))
  params["conv_0"] = {"kernel": k0, "bias": np.array([0.0, 0.5], np.float32)}
  params["conv_1"] = {"kernel": k1, "bias": np.array([0.1, -0.2, 0.0, 0.3], np.float32)}
  lay = _layout(model, params, (1, 8, 8, 1))
  assert lay.names == ("conv_0", "conv_1", "dense_0") and lay.units == (2, 4, 16)
  assert lay.positions == (64, 16, 1)
  x = rng.uniform(-1, 1, size=(5, 8, 8, 1)).astype(np.float32)
  f = clnp.make_unit_means(model, lambda v: v.astype(jnp.float32), lay, _identity_view,
                           batch_size=2, has_batch_stats=False)
  means = f(jax.tree.map(jnp.asarray, params), {}, {}, _task_data(x, 4), jnp.int32(0))
  xv = x[:4, :, :, 0]
  a0 = np.stack([np.maximum(xv, 0), np.maximum(0.5 - xv, 0)], -1)  # [4, 8, 8, 2]
  a1 = np.maximum(_pool(a0) @ k1[1, 1] + params["conv_1"]["bias"], 0)  # [4, 4, 4, 4]
  a2 = np.maximum(_pool(a1).reshape(4, -1) @ params["dense_0"]["kernel"]
                  + params["dense_0"]["bias"], 0)
  np.testing.assert_allclose(means["conv_0"], a0.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(means["conv_1"], a1.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(means["dense_0"], a2.mean(axis=0), rtol=1e-5, atol=1e-6)
  # Partition: conv_0 unit 0 is task 1's; conv_1 units 1, 2 are task 1's; dense units 0..3.
  owner = {"conv_0": jnp.array([1, 0], jnp.int32), "conv_1": jnp.array([0, 1, 1, 0], jnp.int32),
           "dense_0": jnp.array([1] * 4 + [0] * 12, jnp.int32)}
  m0 = _masks(lay, owner, params, 0, False, clnp.PRUNED)
  w, inter = m0["owner"], m0["inter"]
  expect = np.zeros((3, 3, 2, 4), np.int32)
  expect[:, :, 0, 1:3] = 1  # from the active channel 0 into the active channels 1, 2
  np.testing.assert_array_equal(w["conv_1"]["kernel"], expect)
  expect_i = np.zeros((3, 3, 2, 4), bool)
  expect_i[:, :, 1, 1:3] = True  # from the inactive channel 1 into the active channels
  np.testing.assert_array_equal(inter["conv_1"]["kernel"], expect_i)
  # dense_0's 16 inputs are the flattened 2x2x4 map: input i is conv_1 channel i % 4.
  in_owner = np.tile([0, 1, 1, 0], 4)
  expect_d = np.where((in_owner[:, None] >= 1) & (np.arange(16) < 4)[None, :], 1, 0)
  np.testing.assert_array_equal(w["dense_0"]["kernel"], expect_d)
  np.testing.assert_array_equal(inter["dense_0"]["kernel"],
                                (in_owner[:, None] == 0) & (np.arange(16) < 4)[None, :])


def test_layout_wide_fcn_conv_head():
  model = models.create("clnp_wide_fcn", num_heads=1, num_classes=10, width_multiplier=1 / 64,
                        norm="task_batch", num_tasks=3)
  params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), task=0, train=False),
                          jax.random.key(0))["params"]
  lay = _layout(model, params, (1, 32, 32, 3), num_tasks=3)
  assert lay.names == tuple(f"conv_{i}" for i in range(5)) and not lay.multi_head
  assert lay.roles["norm_0/scale"] == ("row",) and lay.roles["head/kernel"] == ("head_kernel",)
  # The 3x3 output conv: input channel c sits at D positions c, c + C, ...
  owner = {n: jnp.zeros((u,), jnp.int32) for n, u in zip(lay.names, lay.units)}
  owner["conv_4"] = owner["conv_4"].at[0].set(1)
  w = jax.jit(lambda o: clnp.weight_owner(lay, o, params)["head"]["kernel"])(owner)
  c = lay.units[-1]
  assert w.shape == (1, 9 * c, 10)
  np.testing.assert_array_equal(np.asarray(w)[0, :, 0], np.tile(np.eye(c, dtype=int)[0], 9))


def test_make_refuses_what_cannot_forget_nothing():
  def ctx(incremental="task", norm="none"):
    return types.SimpleNamespace(stream=types.SimpleNamespace(incremental=incremental),
                                 model=types.SimpleNamespace(norm=norm))

  with pytest.raises(ValueError, match="chain network"):
    clnp.make(_config(model="resnet20"), ctx())
  with pytest.raises(ValueError, match="task id"):
    clnp.make(_config(incremental="class"), ctx(incremental="class"))
  with pytest.raises(ValueError, match="task_batch"):
    clnp.make(_config(model="small_convnet"), ctx(norm="batch"))


# --------------------------------------------------------------------------------------------------
# Graceful forgetting.


def test_search_thresholds_respects_margin():
  grid = [0.0, 0.1, 0.2, 0.3, 0.4]
  accs = {0.0: 0.900, 0.1: 0.899, 0.2: 0.897, 0.3: 0.899, 0.4: 0.850}
  seen = []

  def evaluate(theta):
    seen.append(theta.copy())
    return accs[round(float(theta[0]), 6)], 100 - int(100 * theta[0])

  theta, acc, units, within = clnp.search_thresholds(evaluate, grid, [1.0, 1.0], 0.898)
  # The largest threshold within the margin (0.2 dips below it, 0.3 does not; 0.4 is out).
  np.testing.assert_allclose(theta, [0.3, 0.3], rtol=1e-6)
  assert within and acc == 0.899 and acc >= 0.898 and units == 70
  assert len(seen) == len(grid)
  # Nothing within the margin: the smallest thresholds, flagged.
  theta, acc, _, within = clnp.search_thresholds(evaluate, grid, [1.0, 1.0], 0.95)
  assert not within and float(theta[0]) == 0.0

  # Per layer (last hidden layer first): accuracy falls with theta_1 fast, with theta_0 slowly.
  def evaluate2(theta):
    return 0.9 - 0.02 * theta[0] - 0.1 * theta[1], int(100 - 10 * theta.sum())

  theta, acc, _, within = clnp.search_thresholds(evaluate2, grid, [1.0, 2.0], 0.9 - 0.025,
                                                 mode="per_layer")
  # Layer 1 first (scale 2): a loss of 0.1 * 0.4 = 0.04 > 0.025 but 0.1 * 0.2 = 0.02 fits -> 0.2;
  # then layer 0 within the 0.005 left: 0.02 * 0.2 = 0.004 fits, 0.02 * 0.3 = 0.006 does not.
  np.testing.assert_allclose(theta, [0.2, 0.2], rtol=1e-6)
  assert within and acc >= 0.875 - 1e-12
  # A layer without free units keeps the smallest threshold (raising it would change nothing).
  theta, _, _, _ = clnp.search_thresholds(evaluate2, grid, [1.0, 2.0], 0.9 - 0.025,
                                          mode="per_layer", movable=[True, False])
  np.testing.assert_allclose(theta, [0.4, 0.0], rtol=1e-6)


def test_select_keeps_the_sparsest_within_margin():
  unpruned = [0.90, 0.91, 0.85]
  pruned = [0.905, 0.905, -1]
  assert clnp.select(unpruned, pruned, [50, 40, -1], [True, True, False]) == 1
  assert clnp.select(unpruned, pruned, [40, 40, -1], [True, True, False]) == 0  # tie: earlier
  assert clnp.select(unpruned, pruned, [40, 30, 10], [True, False, False]) == 0
  assert clnp.select(unpruned, pruned, [40, 30, 10], [False, False, False]) == 1  # fallback


def _settings(theta_grid=(0.05, 0.1, 0.2, 0.3, 0.4), theta_scale=(1.0, 1.0), margin=0.03,
              mode="shared"):
  return clnp.Settings(l1=np.zeros(3, np.float32), finetune_l1=np.zeros(3, np.float32),
                       theta_scale=np.asarray(theta_scale, np.float32),
                       theta_grid=np.asarray(theta_grid, np.float32), margin=margin,
                       theta_search=mode, grid=[(1.0, 0.1)] * 3, epochs=1, finetune_epochs=0,
                       finetune_lr=0.0)


# Three candidates of a net with hidden layers a (4 units) and b (3 units); unit 0 of a is owned by
# an earlier task. Validation accuracy of each pruned at a shared threshold value (by hand).
_MEANS = [{"a": np.array([9.0, 0.2, 0.25, 0.05], np.float32),
           "b": np.array([0.3, 0.1, 0.5], np.float32)},
          {"a": np.array([9.0, 0.35, 0.4, 0.31], np.float32),
           "b": np.array([0.6, 0.7, 0.05], np.float32)},
          {"a": np.ones(4, np.float32), "b": np.ones(3, np.float32)}]
_UNPRUNED = [0.90, 0.91, 0.80]
_PRUNED_ACC = [{0.05: 0.90, 0.1: 0.89, 0.2: 0.885, 0.3: 0.87, 0.4: 0.86},
               {0.05: 0.91, 0.1: 0.90, 0.2: 0.89, 0.3: 0.885, 0.4: 0.80}]


def _hand_accuracy(calls, table=None):
  def accuracy(g, theta_vec):
    calls.append(g)
    return (table or _PRUNED_ACC)[g][round(float(theta_vec[0]), 6)]
  return accuracy


def test_graceful_forgetting_keeps_the_sparsest_candidate_within_the_margin():
  """Steps 3-4 on hand-made activations and accuracies (margin 0.03: floor 0.91 - 0.03 = 0.88)."""
  owner = {"a": np.array([1, 0, 0, 0]), "b": np.zeros(3, int)}
  calls = []
  c = clnp.graceful_forgetting(_hand_accuracy(calls), _UNPRUNED, _MEANS, owner, names=("a", "b"),
                               settings=_settings(), prev_theta=np.zeros(2), task=0)
  # Candidate 2 (0.80) is below the floor: never evaluated pruned.
  assert 2 not in calls and c.pruned[2] == -1 and c.units[2] == -1 and not c.eligible[2]
  # Candidate 0: 0.2 is the largest value with accuracy >= 0.88 (0.885). Kept free units (mean
  # strictly above 0.2): a: 0.25 (0.2 itself is not above); b: 0.3, 0.5 -> 1 owned + 3 = 4 units.
  # Candidate 1: 0.3 (0.885); kept: a: 0.35, 0.4, 0.31; b: 0.6, 0.7 -> 1 + 5 = 6 units.
  np.testing.assert_allclose(c.thetas, [[0.2, 0.2], [0.3, 0.3], [0.0, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(c.units, [4, 6, -1])
  np.testing.assert_allclose(c.pruned, [0.885, 0.885, -1.0])
  np.testing.assert_array_equal(c.eligible, [True, True, False])
  assert c.index == 0  # the sparsest, though candidate 1 was better before pruning
  recs = jax.device_get(clnp.choice_records(c))
  np.testing.assert_array_equal(recs["choice"], [0, 1])
  np.testing.assert_array_equal(recs["grid_units"], [4, 6, -1])
  np.testing.assert_allclose(recs["grid_val"][:, 0], _UNPRUNED, rtol=1e-6)


def test_graceful_forgetting_layer_without_free_units_and_fallback():
  # Task 1; layer b has no free unit left: it keeps the previous task's threshold 0.6, and its
  # owned units all count: candidate 0 keeps a's 0.25 -> 4 + 1 = 5 units, candidate 1 -> 4 + 3.
  owner = {"a": np.array([1, 0, 0, 0]), "b": np.array([1, 1, 1])}
  c = clnp.graceful_forgetting(_hand_accuracy([]), _UNPRUNED, _MEANS, owner, names=("a", "b"),
                               settings=_settings(), prev_theta=np.array([0.7, 0.6]), task=1)
  np.testing.assert_array_equal(c.units, [5, 7, -1])
  assert c.index == 0
  np.testing.assert_allclose(c.thetas[0], [0.2, 0.6], rtol=1e-6)
  np.testing.assert_allclose(c.thetas[1], [0.3, 0.3], rtol=1e-6)  # not chosen: as searched
  # Nothing stays within the margin after pruning: the best unpruned candidate (1) at the lowest
  # thresholds (0.05 x per-layer scale 1, 2), flagged.
  low = [{v: 0.5 for v in (0.05, 0.1, 0.2, 0.3, 0.4)}] * 2
  owner = {"a": np.array([1, 0, 0, 0]), "b": np.zeros(3, int)}
  c = clnp.graceful_forgetting(_hand_accuracy([], low), _UNPRUNED, _MEANS, owner,
                               names=("a", "b"), settings=_settings(theta_scale=(1.0, 2.0)),
                               prev_theta=np.zeros(2), task=0)
  assert c.index == 1 and not c.eligible.any()
  np.testing.assert_allclose(c.thetas[1], [0.05, 0.1], rtol=1e-6)
  np.testing.assert_array_equal(jax.device_get(clnp.choice_records(c))["choice"], [1, 0])


_State = collections.namedtuple("_State", "params method")


def _head(num_heads):
  return {"kernel": np.arange(1, 1 + num_heads * 4, dtype=np.float32).reshape(num_heads, 2, 2),
          "bias": np.zeros((num_heads, 2), np.float32)}


def test_commit_keeps_units_above_threshold_zeroes_interference_and_freezes_them():
  """Step 5 on the tiny multi-head MLP: which units are kept, what is zeroed, what is frozen."""
  model, params = _tiny_mlp(2)
  params["head"] = _head(2)
  lay = _layout(model, params, (1, 1, 2, 1))
  m = clnp.init_state(lay, np.zeros(3, np.float32), num_tasks=2, num_grid=1)
  state = _State(jax.tree.map(jnp.asarray, params), m)
  # Unit 1 of dense_0 sits exactly at the threshold: not kept (strictly above only).
  means = {"dense_0": jnp.array([0.9, 0.8, 2.0]), "dense_1": jnp.array([0.81, 0.1])}
  records = {"choice": jnp.array([0, 1], jnp.int32)}
  out = jax.device_get(jax.jit(lambda s, mn, th: clnp.commit(lay, s, mn, th, 0, records))(
      state, means, jnp.array([0.8, 0.8], jnp.float32)))
  np.testing.assert_array_equal(out.method["owner"]["dense_0"], [1, 0, 1])
  np.testing.assert_array_equal(out.method["owner"]["dense_1"], [1, 0])
  assert int(out.method["phase"]) == clnp.PRUNED
  np.testing.assert_allclose(out.method["theta"], [[0.8, 0.8], [0.0, 0.0]])
  np.testing.assert_array_equal(out.method["choice"], [[0, 1], [-1, -1]])
  # Interference set to 0.0: dense_1 from the inactive unit 1 into the kept unit 0, and head row
  # 0 from the inactive final unit 1. Everything else, the free unit's inputs included, is kept.
  k1 = _MLP_PARAMS["dense_1"]["kernel"]
  np.testing.assert_array_equal(out.params["dense_1"]["kernel"],
                                [[k1[0, 0], k1[0, 1]], [0.0, k1[1, 1]], [k1[2, 0], k1[2, 1]]])
  np.testing.assert_array_equal(out.params["head"]["kernel"], [[[1, 2], [0, 0]], [[5, 6], [7, 8]]])
  np.testing.assert_array_equal(out.params["dense_0"]["kernel"], _MLP_PARAMS["dense_0"]["kernel"])
  # Frozen for task 0 after pruning: all but its own weights (kept units, from kept units).
  T, F = True, False
  frozen0 = jax.device_get(clnp.frozen_tx_args(lay, params, out.method, 0))[base.FROZEN_ARG]
  np.testing.assert_array_equal(frozen0["dense_0"]["kernel"], [[F, T, F], [F, T, F]])
  np.testing.assert_array_equal(frozen0["dense_1"]["kernel"], [[F, T], [T, T], [F, T]])
  np.testing.assert_array_equal(frozen0["dense_0"]["bias"], [F, T, F])
  np.testing.assert_array_equal(frozen0["head"]["kernel"], [[[F, F], [T, T]], [[T, T], [T, T]]])
  # Task 1 trains (phase TRAIN): task 0's weights and the zeroed interference stay frozen.
  m1 = dict(out.method, phase=jnp.int32(clnp.TRAIN))
  frozen1 = jax.device_get(clnp.frozen_tx_args(lay, params, m1, 1))[base.FROZEN_ARG]
  np.testing.assert_array_equal(frozen1["dense_0"]["kernel"], [[T, F, T], [T, F, T]])
  np.testing.assert_array_equal(frozen1["dense_1"]["kernel"], [[T, F], [T, F], [T, F]])
  np.testing.assert_array_equal(frozen1["dense_1"]["bias"], [T, F])
  np.testing.assert_array_equal(frozen1["head"]["kernel"], [[[T, T], [T, T]], [[F, F], [F, F]]])


def test_l1_penalty_on_the_trainable_weights_by_hand():
  """Sec. 2.2: per-layer L1 on the kernels the task trains; biases never penalised."""
  model, params = _tiny_mlp(2)
  params["head"] = _head(2)
  lay = _layout(model, params, (1, 1, 2, 1))
  idx = clnp.l1_layers(lay)
  m = clnp.init_state(lay, np.array([1.0, 2.0, 3.0], np.float32), num_tasks=2, num_grid=1)
  pen = jax.jit(lambda p, m, t: clnp.l1_penalty(lay, idx, p, m, t))
  # Task 0, all free: |W0| = 5, |W1| = 4, head row 0: 1 + 2 + 3 + 4 = 10.
  np.testing.assert_allclose(pen(params, m, 0), 1 * 5 + 2 * 4 + 3 * 10, rtol=1e-6)
  # Task 1 after task 0 owns units 0, 2 and 0: only the free unit's inputs and head row 1
  # (5 + 6 + 7 + 8 = 26): |W0[:, 1]| = 2, |W1[:, 1]| = 2.
  m["owner"] = {"dense_0": jnp.array([1, 0, 1]), "dense_1": jnp.array([1, 0])}
  np.testing.assert_allclose(pen(params, m, 1), 1 * 2 + 2 * 2 + 3 * 26, rtol=1e-6)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_record_reuse_counts_earlier_units_active_on_the_task(num_heads):
  """Step 6: task 1 reuses earlier units whose mean activation is above its threshold."""
  model, params = _tiny_mlp(num_heads)
  lay = _layout(model, params, (1, 1, 2, 1))
  m = clnp.init_state(lay, np.zeros(3, np.float32), num_tasks=2, num_grid=1)
  m["owner"] = {"dense_0": jnp.array([1, 2, 1]), "dense_1": jnp.array([1, 2])}
  m["theta"] = jnp.array([[0.0, 0.0], [0.5, 0.5]], jnp.float32)
  # dense_0: unit 0 (task 0's, 0.6 > 0.5) counts, unit 2 (0.5) does not, unit 1 is task 1's own.
  means = {"dense_0": jnp.array([0.6, 0.9, 0.5]), "dense_1": jnp.array([0.7, 0.9])}
  out = jax.jit(lambda s, mn: clnp.record_reuse(lay, s, mn, 1))(_State(params, m), means)
  # A single head masks task 0's final units out: nothing reused there.
  np.testing.assert_array_equal(out.method["reused"], [[0, 0], [1, 1 if num_heads > 1 else 0]])


# --------------------------------------------------------------------------------------------------
# End to end on digits: exactness, single- and multi-head.


def _task0_outputs(trainer, state, current):
  """Logits of task 0 on its test data, with the method's view after ``current``."""

  @jax.jit
  def f(state, x):
    fp = trainer.method.forward_params(state.params, state.aux, state.method, 0, current)
    variables = {"params": fp}
    if trainer.has_batch_stats:
      variables["batch_stats"] = state.batch_stats
    return trainer.model.apply(variables, trainer.stream.normalize(x), task=0, train=False)

  return np.asarray(f(state, trainer.task_data(0, "test").x))


@pytest.mark.parametrize("multi_head,norm", [(True, "none"), (False, "task_batch")])
def test_exactly_zero_interference_and_bit_identical_earlier_task(multi_head, norm):
  # Multi-head MLP without norm; single-head MLP with per-task BatchNorm and fine-tuning after
  # pruning (the convnet partition is checked by hand above).
  config = _config(multi_head=multi_head, norm=norm, num_tasks=5,
                   **{"clnp.grid_l1_scale": (1.0, 3.0),
                      "clnp.finetune_epochs": 0 if multi_head else 1})
  trainer = experiment.build(config)
  lay = clnp.layout_of(trainer.ctx)
  state = trainer.init_state()
  outputs, views = [], []
  for t in range(2):
    trainer.begin_task(t)
    state = trainer.method.run_task(trainer, state, t)
    m = jax.device_get(state.method)
    own = m["owner"]
    # Interference weights: exactly +0.0 (into owned units from units inactive at their task).
    inter_fn = jax.jit(lambda o, p, task: clnp.interference_masks(lay, o, p, task))
    for task in range(t + 1):
      inter = inter_fn(own, state.params, task)
      for path, p, i in zip(masks.paths(state.params), jax.tree.leaves(state.params),
                            jax.tree.leaves(inter)):
        vals = np.asarray(p)[np.asarray(i)]
        assert np.all(vals == 0.0) and not np.any(np.signbit(vals)), (t, task, path)
    # Graceful forgetting kept the pruned model within the margin of the best candidate.
    gv = m["grid_val"][t]
    g, within = m["choice"][t]
    assert within == 1 and gv[g, 1] >= gv[:, 0].max() - config.clnp.margin - 1e-6
    assert np.all(own[lay.names[-1]] <= t + 1)
    outputs.append(_task0_outputs(trainer, state, t))
    view_fn = jax.jit(lambda o, p: masks.apply(p, clnp.view_masks(lay, o, p, 0, False)))
    views.append(jax.device_get(view_fn(own, state.params)))
    views[-1]["_stats"] = jax.device_get(state.batch_stats)
  assert np.sum(m["owner"][lay.names[0]] == 2) + np.sum(m["owner"][lay.names[-1]] == 2) > 0
  np.testing.assert_array_equal(outputs[1], outputs[0])  # bit-identical logits of task 0
  for a, b in zip(jax.tree.leaves(views[0]), jax.tree.leaves(views[1])):
    if a.ndim and a.shape[0] == config.num_tasks:  # per-task rows: task 0's row
      a, b = a[0], b[0]
    np.testing.assert_array_equal(a, b)
  report = trainer.method.report(trainer.ctx, state)
  layer = report["neurons_per_layer"][lay.names[0]]
  assert layer["new_per_task"][0] == int(np.sum(m["owner"][lay.names[0]] == 1))
  assert len(report["clnp"]["selection"]) == config.num_tasks
