"""Optax transforms: sparsity kept, frozen weights bit-identical, masks as data (no retrace)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_cl_jax import masks, transforms


def _problem(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"dense_0": {"kernel": jax.random.normal(k1, (6, 5)), "bias": jnp.zeros(5)},
            "head": {"kernel": jax.random.normal(k2, (5, 3))}}
  x = jax.random.normal(k3, (16, 6))
  y = jnp.arange(16) % 3

  def loss(p):
    h = jax.nn.relu(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"][None, :])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["head"]["kernel"], y).mean()

  return params, loss


OPTIMISERS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "adam_l2": lambda: optax.chain(optax.add_decayed_weights(5e-4), optax.adam(1e-2)),
    "sgd_momentum_wd": lambda: optax.chain(optax.add_decayed_weights(5e-4),
                                           optax.sgd(0.1, momentum=0.9)),
    "sgd_nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_frozen_bit_identical_and_masked_zero_after_200_steps(name):
  params, loss = _problem()
  rng = np.random.default_rng(1)
  sparse = masks.ones(params)
  sparse["dense_0"]["kernel"] = jnp.asarray(rng.random((6, 5)) > 0.5)
  frozen = masks.zeros(params)
  frozen["dense_0"]["kernel"] = jnp.asarray(rng.random((6, 5)) > 0.6)
  frozen["head"]["kernel"] = jnp.asarray(rng.random((5, 3)) > 0.5)
  tx = optax.chain(OPTIMISERS[name](), transforms.keep_sparse(), transforms.freeze())
  state = tx.init(params)

  @jax.jit
  def step(p, s, sparse, frozen):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p, sparse_mask=sparse, frozen=frozen)
    return optax.apply_updates(p, u), s

  p = params
  for _ in range(200):
    p, state = step(p, state, sparse, frozen)
  for p0, p1, f, m in zip(*map(jax.tree.leaves, (params, p, frozen, sparse))):
    p0, p1, f, m = map(np.asarray, (p0, p1, f, m))
    # Frozen: bit-identical (compare the raw bits, not just values).
    np.testing.assert_array_equal(p1.view(np.uint32)[f & m], p0.view(np.uint32)[f & m])
    # Masked out (and not frozen): exactly +0.0.
    assert (p1.view(np.uint32)[~m & ~f] == 0).all()
    # Trainable positions moved.
    assert (p1[m & ~f] != p0[m & ~f]).any()


def test_changing_masks_does_not_retrace():
  params, loss = _problem()
  tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), transforms.keep_sparse(),
                   transforms.freeze())
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(p, s, sparse, frozen):
    traces.append(1)
    u, s = tx.update(jax.grad(loss)(p), s, p, sparse_mask=sparse, frozen=frozen)
    return optax.apply_updates(p, u), s

  rng = np.random.default_rng(0)
  for _ in range(5):
    sparse = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) > 0.3), params)
    frozen = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) > 0.7), params)
    params, state = step(params, state, sparse, frozen)
  assert len(traces) == 1


def test_keep_sparse_zeroes_previously_nonzero_and_hand_update():
  p = {"w": jnp.array([1.0, -2.0, 3.0])}
  g = {"w": jnp.array([0.5, 0.5, 0.5])}
  tx = optax.chain(optax.sgd(0.1), transforms.keep_sparse())
  u, _ = jax.jit(lambda g, p, m: tx.update(g, tx.init(p), p, sparse_mask=m))(
      g, p, {"w": jnp.array([True, False, True])})
  np.testing.assert_allclose(u["w"], [-0.05, 2.0, -0.05])
  new = optax.apply_updates(p, u)
  np.testing.assert_array_equal(np.asarray(new["w"]).view(np.uint32)[1], 0)


def test_mask_updates_and_masked_decay_hand_computed():
  p = {"w": jnp.array([1.0, 2.0, 4.0])}
  g = {"w": jnp.array([1.0, 1.0, 1.0])}
  tx = optax.chain(transforms.add_masked_decayed_weights(0.5), transforms.mask_updates())
  u, _ = tx.update(g, tx.init(p), p, decay_mask={"w": jnp.array([True, False, True])},
                   trainable={"w": jnp.array([True, True, False])})
  np.testing.assert_allclose(u["w"], [1.5, 1.0, 0.0])
  tx = transforms.scale_by_mask()
  u, _ = tx.update(g, tx.init(p), p, decay_mask={"w": jnp.array([0.5, 0.0, 2.0])})
  np.testing.assert_allclose(u["w"], [0.5, 0.0, 2.0])


def test_clear_errors():
  params, _ = _problem()
  tx = transforms.keep_sparse()
  with pytest.raises(ValueError, match=r"sparse_mask=mask_tree"):
    tx.update(params, tx.init(params), params)
  bad = masks.ones(params)
  del bad["head"]
  with pytest.raises(ValueError, match="missing leaves.*head/kernel"):
    tx.update(params, tx.init(params), params, sparse_mask=bad)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params), None, sparse_mask=masks.ones(params))


def test_binarize_ste_hand_computed():
  w = jnp.array([2.0, -3.0, 0.5])
  m = jnp.array([0.01, 0.001, 0.006])
  x = jnp.array([1.0, 1.0, 2.0])

  def f(m):
    return jnp.sum(w * transforms.binarize_ste(m, 5e-3) * x)

  val, grad = jax.jit(jax.value_and_grad(f))(m)
  assert float(val) == pytest.approx(2.0 + 0.0 + 1.0)
  # Straight-through: d/dm = d/d(binary mask) = w * x, for active and inactive entries alike.
  np.testing.assert_allclose(grad, [2.0, -3.0, 1.0])


def test_optax_masked_with_maskable_spec_for_static_leaf_choices():
  # Static, leaf-level choice (never decay biases, norms or heads): optax.masked takes the
  # tree of Python bools from masks.maskable directly.
  params = {"dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "norm_0": {"scale": jnp.ones(2)}, "head": {"kernel": jnp.ones((2, 2))}}
  spec = masks.maskable(params)
  tx = optax.masked(optax.add_decayed_weights(0.5), spec)
  zero = jax.tree.map(jnp.zeros_like, params)
  u, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(zero, params)
  np.testing.assert_array_equal(u["dense_0"]["kernel"], jnp.full((2, 2), 0.5))
  for leaf in (u["dense_0"]["bias"], u["norm_0"]["scale"], u["head"]["kernel"]):
    np.testing.assert_array_equal(leaf, jnp.zeros_like(leaf))


def _wrapped_case():
  p = {"conv": {"kernel": jnp.arange(6.0).reshape(2, 3) - 2.0, "bias": jnp.ones(3)},
       "head": {"kernel": jnp.ones((3, 2))}}
  sparse = masks.ones(p)
  sparse["conv"]["kernel"] = jnp.array([[True, False, True], [False, True, True]])
  frozen = masks.zeros(p)
  frozen["head"]["kernel"] = jnp.array([[True, False]] * 3)
  return p, sparse, frozen


def _inner():
  return optax.chain(optax.sgd(0.5), transforms.keep_sparse(), transforms.freeze())


WRAPPERS = {
    "multi_transform": lambda compat: optax.multi_transform(
        {"sparse": _inner(), "plain": optax.sgd(0.1)},
        {"conv": {"kernel": "sparse", "bias": "plain"}, "head": {"kernel": "sparse"}},
        mask_compatible_extra_args=compat),
    "masked": lambda compat: optax.chain(
        optax.masked(_inner(), {"conv": {"kernel": True, "bias": False}, "head": {"kernel": True}},
                     mask_compatible_extra_args=compat),
        optax.masked(optax.sgd(0.1), {"conv": {"kernel": False, "bias": True},
                                      "head": {"kernel": False}})),
    # Prefix masks: a whole subtree is left out (one MaskedNode in place of a dict).
    "masked_prefix": lambda compat: optax.chain(
        optax.masked(_inner(), {"conv": True, "head": False}, mask_compatible_extra_args=compat),
        optax.masked(_inner(), {"conv": False, "head": True}, mask_compatible_extra_args=compat)),
}


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_inside_masked_and_multi_transform_hand_computed(name, compat):
  # With mask_compatible_extra_args=False (optax's default) the transforms used to refuse the
  # user's correct, params-shaped mask ("unexpected leaves").
  p, sparse, frozen = _wrapped_case()
  tx = WRAPPERS[name](compat)
  g = jax.tree.map(jnp.ones_like, p)
  u, _ = jax.jit(lambda g, s, p, a, b: tx.update(g, s, p, sparse_mask=a, frozen=b))(
      g, tx.init(p), p, sparse, frozen)
  # conv/kernel: sgd(0.5) -> -0.5 where active, -w where masked out.
  np.testing.assert_array_equal(u["conv"]["kernel"], [[-0.5, 1.0, -0.5], [-1.0, -0.5, -0.5]])
  # head/kernel: frozen column 0 gets exactly 0, the other column -0.5.
  np.testing.assert_array_equal(u["head"]["kernel"], [[0.0, -0.5]] * 3)
  bias = -0.5 if name == "masked_prefix" else -0.1
  np.testing.assert_allclose(u["conv"]["bias"], [bias] * 3)


def test_wrapped_mask_errors_still_name_the_leaves():
  p, sparse, frozen = _wrapped_case()
  tx = WRAPPERS["multi_transform"](False)
  del sparse["head"]
  with pytest.raises(ValueError, match=r"keep_sparse mask 'sparse_mask' .*missing leaves "
                                       r"\['head/kernel'\]"):
    tx.update(p, tx.init(p), p, sparse_mask=sparse, frozen=frozen)
  _, sparse, _ = _wrapped_case()
  frozen["conv"]["kernel"] = jnp.zeros((3, 2), bool)
  with pytest.raises(ValueError, match=r"freeze mask 'frozen' .*shapes: conv/kernel: \(3, 2\) vs "
                                       r"params \(2, 3\)"):
    tx.update(p, tx.init(p), p, sparse_mask=sparse, frozen=frozen)


def _decay_momentum_run(order, steps_before=3, steps_after=5):
  """SGD with momentum and weight decay, ``freeze`` placed ``order``; the frozen set is switched
  on after ``steps_before`` steps (so momentum has accumulated there). Returns the params when
  freezing began, the final params, the frozen mask and the momentum trace at the end."""
  decay_sgd = [optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9)]
  tx = optax.chain(*(decay_sgd + [transforms.freeze()] if order == "last"
                     else [transforms.freeze()] + decay_sgd))
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)}
  frozen = {"w": jnp.asarray(np.arange(24).reshape(4, 6) % 2 == 0)}
  nothing = masks.zeros(params)
  state = tx.init(params)

  @jax.jit
  def step(p, s, g, f):
    u, s = tx.update(g, s, p, frozen=f)
    return optax.apply_updates(p, u), s

  rng = np.random.default_rng(1)
  for i in range(steps_before + steps_after):
    if i == steps_before:
      at_freeze = params
    g = {"w": jnp.asarray(rng.uniform(0.5, 1.5, (4, 6)), jnp.float32)}  # nonzero everywhere
    params, state = step(params, state, g, nothing if i < steps_before else frozen)
  return at_freeze, params, frozen, optax.tree_utils.tree_get(state, "trace")


def test_freeze_last_keeps_frozen_weights_bit_identical_under_decay_and_momentum():
  # The contract (module docstring, README "Use the transforms in your own JAX code"): freeze goes
  # LAST, after weight decay and momentum, and frozen weights then stay bit-identical.
  at_freeze, final, frozen, trace = _decay_momentum_run("last")
  f = np.asarray(frozen["w"])
  a, b = np.asarray(at_freeze["w"]), np.asarray(final["w"])
  np.testing.assert_array_equal(b[f].view(np.uint32), a[f].view(np.uint32))
  assert (b[~f] != a[~f]).all()  # the others trained on
  # The momentum trace of the frozen positions is far from zero: without freeze it would move them.
  assert (np.abs(np.asarray(trace["w"])[f]) > 0.1).all()


def test_freeze_first_lets_decay_and_momentum_move_frozen_weights():
  # Why the order matters: freeze first only zeroes the gradient; the weight decay added after it
  # and the momentum accumulated before the freeze still update the frozen weights.
  at_freeze, final, frozen, _ = _decay_momentum_run("first")
  f = np.asarray(frozen["w"])
  assert (np.asarray(final["w"])[f] != np.asarray(at_freeze["w"])[f]).all()
  # Each mechanism alone moves them too: momentum without decay ...
  p = {"w": jnp.ones(3)}
  tx = optax.chain(transforms.freeze(), optax.sgd(0.1, momentum=0.9))
  s = tx.init(p)
  _, s = tx.update({"w": jnp.ones(3)}, s, p, frozen=masks.zeros(p))
  u, _ = tx.update({"w": jnp.ones(3)}, s, p, frozen=masks.ones(p))
  np.testing.assert_allclose(u["w"], [-0.09] * 3, rtol=1e-6)  # -0.1 * 0.9 * trace 1
  # ... and decay without momentum, from the very first step: -0.1 * (0 + 0.5 * w).
  tx = optax.chain(transforms.freeze(), optax.add_decayed_weights(0.5), optax.sgd(0.1))
  u, _ = tx.update({"w": jnp.ones(3)}, tx.init(p), {"w": jnp.full(3, 2.0)}, frozen=masks.ones(p))
  np.testing.assert_allclose(u["w"], [-0.1] * 3, rtol=1e-6)


def test_freeze_keeps_a_negative_zero_weight_bit_identical():
  p = {"w": jnp.array([-0.0, 1.0, -2.0])}
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), transforms.freeze())
  u, _ = tx.update({"w": jnp.ones(3)}, tx.init(p), p, frozen=masks.ones(p))
  new = optax.apply_updates(p, u)
  np.testing.assert_array_equal(np.asarray(new["w"]).view(np.uint32),
                                np.asarray(p["w"]).view(np.uint32))


def test_binarize_ste_is_strict_at_the_threshold():
  # Piggyback as coded: mask = real > threshold, so a value exactly at the threshold is off.
  m = jnp.array([0.005, 0.0050001, 0.0049999, -1.0], jnp.float32)
  np.testing.assert_array_equal(transforms.binarize_ste(m, jnp.float32(0.005)), [0, 1, 0, 0])
