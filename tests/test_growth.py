"""Drop-and-grow: exact counts, hand-computed picks, unfired growth, moment resets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_cl_jax import criteria, growth, masks


def test_drop_and_grow_hand_computed(strict_dtypes):
  m = {"w": jnp.array([1, 1, 1, 1, 0, 0, 0, 0], bool), "b": jnp.ones(2, bool)}
  w = {"w": jnp.array([0.1, -0.9, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0]), "b": jnp.ones(2)}
  g = {"w": jnp.array([9.0, 9.0, 9.0, 9.0, 0.3, -0.8, 0.1, 0.7]), "b": jnp.ones(2)}
  f = jax.jit(lambda m, ds, gs, frac: growth.drop_and_grow(
      m, ds, gs, frac, spec={"w": True, "b": False}))
  res = f(m, criteria.magnitude(w), criteria.gradient(w, grads=g), jnp.float32(0.5))
  # Drop the 2 smallest |w| among active: idx 0 (0.1), 3 (0.2). Grow the 2 largest |g| among the
  # inactive: idx 5 (0.8), 7 (0.7). Previously active positions are never grown.
  np.testing.assert_array_equal(res.dropped["w"], [1, 0, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(res.grown["w"], [0, 0, 0, 0, 0, 1, 0, 1])
  np.testing.assert_array_equal(res.masks["w"], [0, 1, 1, 0, 0, 1, 0, 1])
  assert bool(res.masks["b"].all()) and not res.changed["b"].any()


def test_exact_counts_random_and_no_retrace():
  traces = []

  @jax.jit
  def update(m, key, frac):
    traces.append(1)
    w = criteria.random(m, key=key)
    gs = criteria.random(m, key=jax.random.fold_in(key, 1))
    return growth.drop_and_grow(m, w, gs, frac)

  rng = np.random.default_rng(0)
  m = {"a": jnp.asarray(rng.random((20, 30)) > 0.8), "c": jnp.asarray(rng.random((3, 3, 4, 8)) > 0.5)}
  counts = jax.tree.map(lambda x: int(x.sum()), m)
  for i, frac in enumerate([0.5, 0.3, 0.1, 0.0, 1.0]):
    res = update(m, jax.random.key(i), jnp.float32(frac))
    assert jax.tree.map(lambda x: int(x.sum()), res.masks) == counts
    for old, new, d, gr in zip(*map(jax.tree.leaves, (m, res.masks, res.dropped, res.grown))):
      assert not (d & ~old).any() and not (gr & old).any()
      assert int(d.sum()) == int(gr.sum())
    m = res.masks
  assert len(traces) == 1


def test_unfired_growth_never_picks_used_positions():
  m = {"w": jnp.array([1, 1, 0, 0, 0, 0], bool)}
  used = {"w": jnp.array([1, 1, 1, 1, 0, 0], bool)}
  scores = {"w": jnp.array([0.0, 0.0, 9.0, 8.0, 1.0, 2.0])}
  res = growth.drop_and_grow(m, criteria.magnitude(scores), scores, 1.0,
                             grow_candidates=masks.logical_not(used))
  np.testing.assert_array_equal(res.grown["w"], [0, 0, 0, 0, 1, 1])
  # Only one never-used position left: the drop count shrinks so the count stays exact.
  used2 = {"w": jnp.array([1, 1, 1, 1, 1, 0], bool)}
  res = growth.drop_and_grow(m, criteria.magnitude(scores), scores, 1.0,
                             grow_candidates=masks.logical_not(used2))
  assert int(res.masks["w"].sum()) == 2 and int(res.grown["w"].sum()) == 1
  np.testing.assert_array_equal(growth.mark_used(used, res.masks)["w"], [1, 1, 1, 1, 0, 1])


def test_drop_candidates_protect_frozen():
  m = {"w": jnp.array([1, 1, 1, 0, 0], bool)}
  mine = {"w": jnp.array([0, 1, 1, 0, 0], bool)}  # position 0 belongs to an earlier task
  s = {"w": jnp.array([0.0, 0.5, 0.4, 0.0, 0.0])}
  g = {"w": jnp.array([0.0, 0.0, 0.0, 1.0, 2.0])}
  res = growth.drop_and_grow(m, s, g, 0.5, drop_candidates=mine)
  np.testing.assert_array_equal(res.masks["w"], [1, 1, 0, 0, 1])


def test_regrow_modes():
  p = {"w": jnp.array([1.0, 2.0, 3.0])}
  gr = {"w": jnp.array([False, True, False])}
  np.testing.assert_array_equal(growth.regrow(p, gr)["w"], [1.0, 0.0, 3.0])
  np.testing.assert_array_equal(
      growth.regrow(p, gr, mode="init", init_params={"w": jnp.full(3, 7.0)})["w"], [1.0, 7.0, 3.0])
  with pytest.raises(ValueError, match="init_params"):
    growth.regrow(p, gr, mode="init")
  with pytest.raises(ValueError, match="mode"):
    growth.regrow(p, gr, mode="he")


@pytest.mark.parametrize("make", [lambda: optax.adam(1e-2), lambda: optax.sgd(0.1, momentum=0.9),
                                  lambda: optax.chain(optax.clip(1.0), optax.adamw(1e-2))])
def test_reset_moments_any_optax_state(make):
  tx = make()
  p = {"w": jnp.array([1.0, 2.0, 3.0]), "v": jnp.ones((2, 2))}
  state = tx.init(p)
  _, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
  changed = {"w": jnp.array([False, True, False]), "v": jnp.zeros((2, 2), bool)}
  new = jax.jit(lambda s, c: growth.reset_moments(tx, s, c))(state, changed)
  mom = criteria.find_momentum(new, p)
  np.testing.assert_array_equal(mom["w"] == 0, [False, True, False])
  assert bool((mom["v"] != 0).all())
  for path_val in optax.tree_utils.tree_get_all_with_path(new, "nu"):
    np.testing.assert_array_equal(path_val[1]["w"] == 0, [False, True, False])


def test_apply_topology_zeroes_dropped_and_sets_grown():
  m = {"w": jnp.array([1, 1, 0, 0], bool)}
  p = {"w": jnp.array([0.1, -2.0, 5.0, 7.0])}
  res = growth.drop_and_grow(m, criteria.magnitude(p), {"w": jnp.array([0.0, 0.0, 1.0, 2.0])}, 0.5)
  np.testing.assert_array_equal(res.dropped["w"], [1, 0, 0, 0])
  np.testing.assert_array_equal(res.grown["w"], [0, 0, 0, 1])
  out = jax.jit(growth.apply_topology)(p, res)
  np.testing.assert_array_equal(out["w"], [0.0, -2.0, 5.0, 0.0])
  out = growth.apply_topology(p, res, mode="init", init_params={"w": jnp.full(4, 3.0)})
  np.testing.assert_array_equal(out["w"], [0.0, -2.0, 5.0, 3.0])
