"""The speed paths of issue 10 compute what the stock paths compute.

* ``ops.conv_general_dilated`` (custom VJP) and ``ops.max_pool`` against ``lax`` / Flax: values
  and gradients, at top level and inside ``lax.fori_loop``.
* Every registered conv model: same params, outputs and gradients with the fast ops on and off.
* The trainer's two epoch loops (``'device'`` and ``'host'``) end with identical states.
* ``compute_dtype='bfloat16'`` keeps params and optimiser state in float32.
* The persistent compilation cache writes executables where it is told, and can be turned off.
"""

import os

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import experiment
from sparse_cl_jax import models
from sparse_cl_jax import ops
from sparse_cl_jax import runtime

_NHWC = ("NHWC", "HWIO", "NHWC")
_RNG = np.random.default_rng(0)


def _normal(shape):
  return jnp.asarray(_RNG.normal(size=shape), jnp.float32)


CONV_CASES = [
    # input, kernel, strides, padding, kernel dilation
    ((2, 9, 9, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 9, 9, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((2, 10, 10, 3), (3, 3, 3, 4), (2, 2), "SAME", (1, 1)),
    ((2, 11, 10, 3), (3, 3, 3, 4), (2, 1), "VALID", (2, 2)),
    ((2, 16, 16, 3), (7, 7, 3, 5), (2, 2), ((3, 3), (3, 3)), (1, 1)),
    ((2, 8, 8, 3), (1, 1, 3, 5), (2, 2), "VALID", (1, 1)),
    ((2, 12, 12, 3), (3, 3, 3, 4), (3, 3), ((0, 2), (1, 0)), (1, 1)),
    ((2, 10, 10, 3), (3, 3, 3, 4), (2, 2), "VALID", (1, 1)),  # last row unread: cropped
    # One input channel: the forward pass is a sum of shifted images (ops._shifted_sum).
    ((2, 9, 9, 1), (3, 3, 1, 4), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 11, 10, 1), (3, 3, 1, 4), (2, 1), "VALID", (2, 2)),
    ((2, 12, 12, 1), (3, 3, 1, 4), (3, 3), ((0, 2), (1, 0)), (1, 1)),
    ((2, 10, 10, 1), (5, 5, 1, 3), (2, 2), "SAME", (1, 1)),
]


@pytest.mark.parametrize("xs,ws,strides,padding,dilation", CONV_CASES)
def test_conv_values_and_gradients_match_lax(xs, ws, strides, padding, dilation):
  x, w = _normal(xs), _normal(ws)

  def loss(conv):
    def f(x, w):
      y = conv(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=_NHWC)
      return jnp.sum(jnp.sin(y)), y
    return f

  with runtime.use_fast_ops(True):
    (l1, y1), g1 = jax.jit(jax.value_and_grad(loss(ops.conv_general_dilated), (0, 1),
                                              has_aux=True))(x, w)
  (l2, y2), g2 = jax.jit(jax.value_and_grad(loss(lax.conv_general_dilated), (0, 1),
                                            has_aux=True))(x, w)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_gradient_inside_fori_loop_equals_top_level():
  x, w = _normal((4, 8, 8, 3)), _normal((3, 3, 3, 6))

  def grad_w(w):
    f = lambda w: jnp.sum(ops.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=_NHWC) ** 2)
    return jax.grad(f)(w)

  with runtime.use_fast_ops(True):
    top = jax.jit(grad_w)(w)
    looped = jax.jit(lambda w: lax.fori_loop(0, 2, lambda i, a: a + grad_w(w),
                                             jnp.zeros_like(w)))(w)
  np.testing.assert_allclose(looped, 2 * top, rtol=1e-5, atol=1e-4)


def test_one_channel_training_forward_is_a_shifted_sum_and_evaluation_a_convolution():
  x1, w1 = _normal((2, 8, 8, 1)), _normal((3, 3, 1, 4))
  x3, w3 = _normal((2, 8, 8, 3)), _normal((3, 3, 3, 4))
  pads = ((1, 1), (1, 1))
  train = lambda x, w: ops._conv_fwd(x, w, (1, 1), pads, (1, 1), None)[0]  # noqa: E731
  evaluate = lambda x, w: ops.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC)  # noqa: E731
  with runtime.use_fast_ops(True):
    assert "conv_general_dilated" not in str(jax.make_jaxpr(train)(x1, w1))
    assert "conv_general_dilated" in str(jax.make_jaxpr(train)(x3, w3))
    assert "conv_general_dilated" in str(jax.make_jaxpr(evaluate)(x1, w1))
    np.testing.assert_allclose(train(x1, w1), evaluate(x1, w1), rtol=1e-5, atol=1e-5)


def test_conv_second_order_gradient_matches_lax():
  """GraSP differentiates a gradient again (a Hessian-vector product): the custom backward pass,
  its transposes and its optimization barrier must be differentiable and exact."""
  for xs, ws in (((2, 8, 8, 1), (3, 3, 1, 4)), ((2, 8, 8, 3), (3, 3, 3, 4))):
    x, w, v = _normal(xs), _normal(ws), _normal(ws)

    def hvp(conv):
      loss = lambda w: jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)))  # noqa: E731
      return jax.jit(lambda w: jax.grad(lambda w: jnp.vdot(jax.grad(loss)(w), v))(w))(w)

    with runtime.use_fast_ops(True):
      fast = hvp(ops.conv_general_dilated)
    np.testing.assert_allclose(fast, hvp(lax.conv_general_dilated), rtol=1e-4, atol=1e-4)


def test_conv_takes_the_stock_path_when_off_or_unsupported():
  x, w = _normal((2, 6, 6, 4)), _normal((3, 3, 2, 4))
  with runtime.use_fast_ops(True):
    grouped = jax.make_jaxpr(lambda x: ops.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=_NHWC, feature_group_count=2))(x)
  assert "custom_vjp" not in str(grouped)
  w2 = _normal((3, 3, 4, 4))
  with runtime.use_fast_ops(False):
    off = jax.make_jaxpr(lambda x: ops.conv_general_dilated(
        x, w2, (1, 1), "SAME", dimension_numbers=_NHWC))(x)
  assert "custom_vjp" not in str(off)
  with runtime.use_fast_ops(True):
    on = jax.make_jaxpr(lambda x: ops.conv_general_dilated(
        x, w2, (1, 1), "SAME", dimension_numbers=_NHWC))(x)
  assert "custom_vjp" in str(on)


# Windows that leave rows and columns out, or pad one side only, or do not tile.
_MORE_POOLS = [
    ((2, 2), (3, 3), "VALID", (2, 8, 8, 3)),  # strides longer than the window: gaps
    ((2, 3), (2, 2), "VALID", (2, 9, 10, 3)),  # tiling rows, overlapping columns
    ((2, 2), (2, 2), "SAME", (2, 7, 7, 3)),  # tiling after a one-sided pad
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (2, 9, 9, 3)),  # overlapping, every row reached
]


@pytest.mark.parametrize("window,strides,padding,shape", [
    ((2, 2), (2, 2), "VALID", (2, 8, 8, 3)),
    ((2, 2), (2, 2), "VALID", (2, 9, 9, 3)),  # odd size: the last row/column is dropped
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (2, 8, 8, 3)),  # CLNP's overlapping pool
    ((3, 3), (1, 1), "SAME", (2, 7, 7, 3)),
] + _MORE_POOLS)
def test_max_pool_values_and_gradients_match_flax(window, strides, padding, shape):
  x = _normal(shape)  # continuous values: no ties inside a window
  with runtime.use_fast_ops(True):
    y1, g1 = jax.jit(jax.value_and_grad(
        lambda x: jnp.sum(jnp.sin(ops.max_pool(x, window, strides, padding)))))(x)
    p1 = ops.max_pool(x, window, strides, padding)
  y2, g2 = jax.value_and_grad(
      lambda x: jnp.sum(jnp.sin(nn.max_pool(x, window, strides, padding))))(x)
  np.testing.assert_array_equal(p1, nn.max_pool(x, window, strides, padding))
  np.testing.assert_allclose(y1, y2, rtol=1e-6)
  np.testing.assert_array_equal(g1, g2)


def test_max_pool_gives_a_tie_s_gradient_to_the_first_maximum():
  """Positive ties are common (a constant background gives equal activations): the whole gradient
  of a window goes to its first maximum in row-major order, as the stock ``reduce_window`` and
  PyTorch's ``max_pool2d`` give it."""
  x = 0.1 * _normal((1, 4, 2, 2))
  x = x.at[0, :2].set(0.7)  # window 1 (channel 0): a four-way tie
  x = x.at[0, 2, :, 1].set(2.0)  # window 2 (channel 1): a two-way tie in its second row
  weights = _normal((1, 2, 1, 2))
  with runtime.use_fast_ops(True):
    fast = jax.jit(jax.grad(lambda x: jnp.sum(ops.max_pool(x, (2, 2), (2, 2)) * weights)))(x)
  w = np.asarray(weights)
  expected = np.zeros(x.shape, np.float32)
  expected[0, 0, 0, :] = w[0, 0, 0, :]  # window 1, both channels: its first element
  expected[0, 2, 0, 1] = w[0, 1, 0, 1]  # window 2, channel 1: the first of the two
  k = int(np.argmax(np.asarray(x[0, 2:, :, 0]).ravel()))  # window 2, channel 0: no tie
  expected[0, 2 + k // 2, k % 2, 0] = w[0, 1, 0, 0]
  np.testing.assert_array_equal(fast, expected)


@pytest.mark.parametrize("window,strides,padding,shape", [
    ((2, 2), (2, 2), "VALID", (2, 8, 8, 3)),  # tiling windows: _tiled_max
    ((2, 2), (2, 2), "VALID", (2, 9, 9, 3)),  # odd size: _tiled_max on the rows windows reach
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (2, 8, 8, 3)),  # CLNP's overlapping pool: _strided_max
    ((3, 3), (1, 1), "SAME", (2, 7, 7, 3)),
] + _MORE_POOLS)
def test_max_pool_gradients_equal_flax_where_many_elements_tie(window, strides, padding, shape):
  # Three values only: most windows hold a tie for their maximum, some of them at 0 after ReLU.
  x = jnp.asarray(np.random.default_rng(7).integers(-1, 2, shape), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(8).normal(size=nn.max_pool(
      x, window, strides, padding).shape), jnp.float32)

  def g(pool):
    return jax.jit(jax.grad(lambda x: jnp.sum(pool(x, window, strides, padding) * weights)))(x)

  with runtime.use_fast_ops(True):
    fast = g(ops.max_pool)
  # Exact but for the order in which overlapping windows add their shares (1 ulp).
  np.testing.assert_allclose(fast, g(nn.max_pool), rtol=1e-6, atol=0)


def test_max_pool_ties_after_relu_pass_no_gradient_either_way():
  x = jnp.concatenate([-jnp.ones((1, 2, 2, 1)), _normal((1, 2, 2, 1))], axis=1)  # a 0-tie window

  def g(pool):
    return jax.grad(lambda x: jnp.sum(pool(jax.nn.relu(x), (2, 2), (2, 2), "VALID") * 3.0))(x)

  with runtime.use_fast_ops(True):
    fast = g(ops.max_pool)
  np.testing.assert_array_equal(fast, g(nn.max_pool))


@pytest.mark.parametrize("name,kwargs,shape", [
    ("small_convnet", {}, (3, 12, 12, 1)),
    ("clnp_convnet", {"norm": "batch"}, (3, 16, 16, 3)),
    # Stride-2 convolutions, option-A shortcuts, task BatchNorm (VGG and ResNet-18 use the same
    # ops; their compile time would dominate the suite).
    ("resnet20", {"depth": 8, "width_multiplier": 0.5, "norm": "task_batch"}, (2, 16, 16, 3)),
])
def test_models_same_with_fast_and_stock_ops(name, kwargs, shape):
  model = models.create(name, num_heads=2, num_classes=3, **kwargs)
  # Its own generator: the input must not depend on which tests ran before in the process.
  x = jnp.asarray(np.random.default_rng(11).normal(size=shape), jnp.float32)
  with runtime.use_fast_ops(False):
    v_stock = models.init(model, jax.random.key(0), (1,) + shape[1:])
  with runtime.use_fast_ops(True):
    v_fast = models.init(model, jax.random.key(0), (1,) + shape[1:])
  assert jax.tree.structure(v_fast) == jax.tree.structure(v_stock)
  jax.tree.map(np.testing.assert_array_equal, v_fast, v_stock)
  mutable = ["batch_stats"] if "batch_stats" in v_stock else False

  def loss(params, stats):
    v = {"params": params, **({"batch_stats": stats} if stats else {})}
    out = model.apply(v, x, task=1, train=True, mutable=mutable,
                      rngs={"dropout": jax.random.key(1)})
    logits = out[0] if mutable else out
    return jnp.sum(jnp.tanh(logits)), logits

  def run(fast):
    with runtime.use_fast_ops(fast):
      return jax.jit(jax.value_and_grad(loss, has_aux=True))(
          v_stock["params"], v_stock.get("batch_stats", {}))

  (l1, y1), g1 = run(True)
  (l2, y2), g2 = run(False)
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4), g1, g2)


def _tiny_packnet(**overrides):
  c = config_lib.base("packnet")
  c.model = "small_convnet"
  c.num_tasks = 2
  c.epochs = 1
  c.batch_size = 32
  c.max_train_per_task = 100
  c.max_eval_per_task = 50
  c.progress = False
  c.checkpoint_every_epochs = 0
  import ml_collections  # pylint: disable=g-import-not-at-top
  c.packnet = ml_collections.ConfigDict(
      {"prune_fraction": 0.5, "retrain_epochs": 1, "retrain_lr": 0.01})
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_device_and_host_epoch_loops_give_identical_states():
  states = {}
  for loop in ("device", "host"):
    trainer = experiment.build(_tiny_packnet(epoch_loop=loop))
    state = trainer.init_state()
    trainer.begin_task(0)
    state = trainer.method.run_task(trainer, state, 0)
    states[loop] = jax.device_get(state)
    assert trainer.loop == loop
    assert trainer.trace_counts["run_steps" if loop == "device" else "host_step"] == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               states["device"], states["host"])
  assert runtime.epoch_loop("auto") in ("device", "host")
  with pytest.raises(ValueError, match="epoch_loop"):
    runtime.epoch_loop("fast")


def test_bfloat16_compute_keeps_float32_state():
  trainer = experiment.build(_tiny_packnet(compute_dtype="bfloat16"))
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.train(state, 0, epochs=1)
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert np.isfinite(trainer.accuracy(state, 0, split="val", current=0))
  with pytest.raises(ValueError, match="compute_dtype"):
    config_lib.validate(_tiny_packnet(compute_dtype="float16"))


def test_compilation_cache_writes_where_told_and_turns_off(tmp_path, monkeypatch):
  before = runtime.compilation_cache_dir(None)
  try:
    path = runtime.enable_compilation_cache(str(tmp_path / "xla"))
    assert path == str(tmp_path / "xla")
    f = jax.jit(lambda a: jnp.sin(a) @ jnp.cos(a).T + 1.2345)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    f(jnp.ones((17, 13))).block_until_ready()
    assert os.listdir(path), "nothing was written to the compilation cache"
    assert runtime.enable_compilation_cache("none") is None
    assert runtime.compilation_cache_dir("none") is None
    monkeypatch.setenv("SPARSE_CL_JAX_CACHE_DIR", str(tmp_path / "env"))
    assert runtime.compilation_cache_dir("") == str(tmp_path / "env")
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      runtime.cache_min_compile_seconds())
    runtime.enable_compilation_cache(before or "none")


def test_runs_that_differ_only_in_seed_share_every_compiled_step(tmp_path):
  # The seed changes the split (so the normalisation), the dropout and augmentation keys: all of
  # them reach the jitted steps as data, so the second run compiles nothing new.
  before = runtime.compilation_cache_dir(None)
  try:
    path = runtime.enable_compilation_cache(str(tmp_path / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    files, means = [], []
    for seed in (0, 1):
      c = _tiny_packnet(seed=seed, augment="crop_flip", augment_padding=1,
                        compilation_cache=str(tmp_path / "xla"))
      c.method = "finetune"
      trainer = experiment.build(c)
      means.append(trainer.stream.mean)
      state = trainer.init_state()
      trainer.begin_task(0)
      state = trainer.train(state, 0, epochs=1)
      trainer.accuracy(state, 0, split="val", current=0)
      files.append(set(os.listdir(path)))
    assert not np.array_equal(means[0], means[1])  # the seeds' splits differ
    assert files[0] and files[1] == files[0], sorted(files[1] - files[0])
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      runtime.cache_min_compile_seconds())
    runtime.enable_compilation_cache(before or "none")
