"""Criteria against hand-computed scores."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_cl_jax import criteria


def test_magnitude_random_registry():
  p = {"w": jnp.array([-2.0, 1.0]), "b": jnp.array([[0.5]])}
  s = jax.jit(criteria.magnitude)(p)
  np.testing.assert_array_equal(s["w"], [2.0, 1.0])
  r1 = criteria.get("random")(p, key=jax.random.key(0))
  r2 = criteria.random(p, key=jax.random.key(0))
  assert jax.tree.structure(r1) == jax.tree.structure(p)
  np.testing.assert_array_equal(r1["w"], r2["w"])
  assert not np.array_equal(np.asarray(r1["w"]), np.asarray(criteria.random(p, key=jax.random.key(1))["w"]))
  with pytest.raises(ValueError, match="needs `key`"):
    criteria.random(p)
  with pytest.raises(ValueError, match="unknown criterion"):
    criteria.get("hessian")
  assert set(criteria.CRITERIA) >= {"magnitude", "random", "gradient", "momentum", "snip",
                                    "grasp", "synflow", "activation"}


def _linear():
  p = {"w": jnp.array([1.0, -2.0, 3.0])}
  x = jnp.array([2.0, 1.0, -1.0])
  loss = lambda p: 0.5 * jnp.sum(p["w"] * x) ** 2  # noqa: E731
  return p, x, loss


def test_gradient_and_snip_hand_computed():
  p, x, loss = _linear()
  # s = w.x = 2 - 2 - 3 = -3; dL/dw = s * x = [-6, -3, 3].
  np.testing.assert_allclose(criteria.gradient(p, loss_fn=loss)["w"], [6.0, 3.0, 3.0])
  np.testing.assert_allclose(criteria.snip(p, loss_fn=loss)["w"], [6.0, 6.0, 9.0])
  # With a mask, evaluated on the masked network: w = [1, 0, 3], s = -1, g = [-2, -1, 1].
  m = {"w": jnp.array([True, False, True])}
  np.testing.assert_allclose(jax.jit(lambda p, m: criteria.snip(p, masks=m, loss_fn=loss))(p, m)["w"],
                             [2.0, 0.0, 3.0])
  g = {"w": jnp.array([1.0, -1.0, 0.5])}
  np.testing.assert_allclose(criteria.gradient(p, grads=g)["w"], [1.0, 1.0, 0.5])


def test_grasp_hand_computed():
  p, x, loss = _linear()
  # H = x x^T, g = s x with s = -3, so Hg = x (x.g) = x * (s |x|^2) = x * (-18).
  hg = x * (-3.0 * 6.0)
  np.testing.assert_allclose(criteria.grasp(p, loss_fn=loss)["w"], p["w"] * hg, rtol=1e-6)


def test_synflow_hand_computed():
  p = {"a": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "b": jnp.array([[2.0], [-1.0]])}
  apply_fn = lambda p, x: x @ p["a"] @ p["b"]  # noqa: E731
  # R = 1^T |A| |B| (input ones of shape (1, 2)); dR/dA_ij = |B|_j, dR/dB_j = sum_i |A|_ij.
  s = criteria.synflow(p, apply_fn=apply_fn, input_shape=(1, 2))
  np.testing.assert_allclose(s["a"], np.abs(p["a"]) * np.array([[2.0, 1.0]]))
  np.testing.assert_allclose(s["b"], np.abs(p["b"]) * np.array([[4.0], [2.5]]))
  with pytest.raises(ValueError, match="apply_fn"):
    criteria.synflow(p, input_shape=(1, 2))


def test_momentum_from_adam_and_sgd():
  p = {"w": jnp.array([1.0, 2.0])}
  g = {"w": jnp.array([-1.0, 2.0])}
  for tx, expect in [(optax.adam(1e-3), [0.1, 0.2]), (optax.sgd(0.1, momentum=0.9), [1.0, 2.0])]:
    s = tx.init(p)
    _, s = tx.update(g, s, p)
    np.testing.assert_allclose(criteria.momentum(p, opt_state=s)["w"], expect, rtol=1e-6)
  with pytest.raises(ValueError, match="first-moment"):
    criteria.momentum(p, opt_state=optax.sgd(0.1).init(p))


def test_activation_per_unit():
  acts = {"dense_0": jnp.array([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]]),
          "conv_0": jnp.arange(16.0).reshape(2, 2, 2, 2)}
  s = criteria.activation(None, activations=acts)
  np.testing.assert_allclose(s["dense_0"], [2.0, 0.0, 1.0])
  np.testing.assert_allclose(s["conv_0"], [7.0, 8.0])


def test_random_scores_are_independent_per_leaf_and_reproducible():
  # Three leaves of one shape (plus one of another): each must get its own stream. Identical
  # scores would give identical random masks in every same-shaped layer.
  p = {"a": jnp.zeros((16, 8)), "b": jnp.ones((16, 8)), "c": jnp.zeros((16, 8)),
       "d": jnp.zeros((5,))}
  key = jax.random.key(3)
  s = {k: np.asarray(v) for k, v in criteria.random(p, key=key).items()}
  for x, y in [("a", "b"), ("a", "c"), ("b", "c")]:
    # Independent uniforms: almost no position ties, and the rankings are unrelated.
    assert np.mean(s[x] == s[y]) < 0.01, (x, y)
    assert abs(np.corrcoef(s[x].ravel(), s[y].ravel())[0, 1]) < 0.3, (x, y)
  for v in s.values():
    assert v.dtype == np.float32 and (v >= 0).all() and (v < 1).all()
  # The same key gives bit-identical scores, eagerly and under jit; the values of the params
  # do not matter, only their shapes.
  again = jax.jit(lambda p, k: criteria.random(p, key=k))(jax.tree.map(lambda x: x + 5.0, p), key)
  for k in p:
    np.testing.assert_array_equal(np.asarray(again[k]).view(np.uint32), s[k].view(np.uint32))
  other = criteria.random(p, key=jax.random.key(4))
  for k in p:
    assert not np.array_equal(np.asarray(other[k]), s[k]), k
