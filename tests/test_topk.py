"""Exact top-k with deterministic ties, under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import topk


def test_layerwise_exact_and_ties(strict_dtypes):
  scores = {"a": jnp.array([3.0, 1.0, 3.0, 3.0, -1.0, 0.0]), "b": jnp.array([[0.5, -0.5], [2.0, 2.0]])}
  f = jax.jit(lambda s, k: topk.topk_mask(s, k))
  out = f(scores, {"a": 2, "b": 3})
  # Ties at 3.0: the earliest indices win.
  np.testing.assert_array_equal(out["a"], [1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(out["b"], [[1, 0], [1, 1]])
  out = f(scores, {"a": 0, "b": 4})
  assert not out["a"].any() and out["b"].all()


def test_traced_k_does_not_retrace():
  traces = []

  @jax.jit
  def f(s, k):
    traces.append(1)
    return topk.topk_mask(s, k)

  s = {"w": jnp.arange(10.0)}
  for k in range(11):
    out = f(s, {"w": jnp.int32(k)})
    assert int(out["w"].sum()) == k
    if k:
      assert bool(out["w"][10 - k:].all())
  assert len(traces) == 1


def test_candidates_and_clamping():
  s = {"w": jnp.array([5.0, 4.0, 3.0, 2.0, 1.0])}
  cand = {"w": jnp.array([False, True, False, True, True])}
  out = jax.jit(topk.topk_mask)(s, {"w": 2}, candidates=cand)
  np.testing.assert_array_equal(out["w"], [0, 1, 0, 1, 0])
  out = topk.topk_mask(s, {"w": 9}, candidates=cand)  # more than candidates: all candidates
  np.testing.assert_array_equal(out["w"], [0, 1, 0, 1, 1])


def test_global_scope_and_spec():
  s = {"a": jnp.array([1.0, 9.0, 2.0]), "b": jnp.array([9.0, 3.0]), "bias": jnp.array([0.0])}
  spec = {"a": True, "b": True, "bias": False}
  out = jax.jit(lambda s: topk.topk_mask(s, 2, scope="global", spec=spec))(s)
  # Tie at 9.0 across leaves: both selected (k=2); with k=1 leaf order breaks it: 'a' first.
  np.testing.assert_array_equal(out["a"], [0, 1, 0])
  np.testing.assert_array_equal(out["b"], [1, 0])
  assert bool(out["bias"].all())
  out = topk.topk_mask(s, 1, scope="global", spec=spec)
  np.testing.assert_array_equal(out["a"], [0, 1, 0])
  np.testing.assert_array_equal(out["b"], [0, 0])
  out = topk.topk_mask(s, 4, scope="global", spec=spec)
  np.testing.assert_array_equal(out["a"], [0, 1, 1])
  np.testing.assert_array_equal(out["b"], [1, 1])


def test_negative_zero_inf_nan_order():
  x = jnp.array([-jnp.inf, -2.0, -0.0, 0.0, 1e-30, jnp.inf, jnp.nan, -1e30])
  keys = np.asarray(topk.ordered_key(x)).astype(np.int64)
  # Order: nan (as -inf) == -inf < -1e30 < -2 < -0.0 < 0.0 < 1e-30 < inf
  assert keys[6] == keys[0]
  assert keys[0] < keys[7] < keys[1] < keys[2] < keys[3] < keys[4] < keys[5]
  assert (keys > 0).all()


def test_bottomk():
  s = {"w": jnp.array([0.3, -0.1, 0.2, 0.0])}
  out = topk.bottomk_mask(s, {"w": 2})
  np.testing.assert_array_equal(out["w"], [0, 1, 0, 1])


def test_matches_sort_on_random_data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=1000).astype(np.float32)
  x[::7] = 0.25  # many ties
  for k in (0, 1, 17, 500, 999, 1000):
    out = np.asarray(topk.topk_mask({"w": jnp.asarray(x)}, {"w": k})["w"])
    order = np.lexsort((np.arange(1000), -x))  # by score desc, then index asc
    expect = np.zeros(1000, bool)
    expect[order[:k]] = True
    np.testing.assert_array_equal(out, expect)


def test_errors():
  with pytest.raises(ValueError, match="scope"):
    topk.topk_mask({"w": jnp.ones(3)}, 1, scope="row")
  with pytest.raises(ValueError, match="one count per leaf"):
    topk.topk_mask({"w": jnp.ones(3), "v": jnp.ones(2)}, 1)


def _brute_force_topk(flat_scores, flat_cands, k):
  """The k best candidates by (score desc, position asc), NaN as -inf, written with a sort."""
  x = np.where(np.isnan(flat_scores), -np.inf, flat_scores)
  idx = np.flatnonzero(flat_cands)
  order = idx[np.lexsort((idx, -x[idx]))]
  out = np.zeros(flat_scores.size, bool)
  out[order[:k]] = True
  return out


def test_global_scope_matches_sort_over_many_tied_leaves_with_candidates():
  # Four leaves of different shapes whose scores share few values (ties across every leaf at
  # almost any threshold), candidates and NaN: the global pick equals a sort of the concatenated
  # flat scores (jax.tree.leaves order, row-major), ties to the earliest leaf and position.
  rng = np.random.default_rng(0)
  shapes = {"a": (3, 4), "b": (5,), "c": (2, 3, 2), "d": (7,)}
  f = jax.jit(lambda s, c, k: topk.topk_mask(s, k, candidates=c, scope="global"))
  for trial in range(4):
    scores = {n: rng.integers(0, 4, size=s).astype(np.float32) for n, s in shapes.items()}
    scores["d"][rng.integers(0, 7)] = np.nan
    cands = {n: rng.random(s) < 0.8 for n, s in shapes.items()}
    flat_s = np.concatenate([scores[n].ravel() for n in sorted(shapes)])
    flat_c = np.concatenate([cands[n].ravel() for n in sorted(shapes)])
    for k in (0, 1, 5, 9, 14, int(flat_c.sum()), 60):
      out = f(scores, cands, jnp.int32(k))
      got = np.concatenate([np.asarray(out[n]).ravel() for n in sorted(shapes)])
      np.testing.assert_array_equal(got, _brute_force_topk(flat_s, flat_c, k), err_msg=(trial, k))
      assert got.sum() == min(k, flat_c.sum())


def test_bottomk_ties_go_to_the_earliest_position():
  # bottomk keeps topk's tie rule: among equal lowest scores the earliest positions are picked.
  s = np.array([[2.0, 1.0, 1.0], [0.5, 1.0, 0.5], [1.0, 3.0, 0.5]], np.float32)
  for k in range(10):
    out = np.asarray(jax.jit(topk.bottomk_mask)({"w": s}, {"w": k})["w"]).ravel()
    np.testing.assert_array_equal(out, _brute_force_topk(-s.ravel(), np.ones(9, bool), k),
                                  err_msg=k)
