"""Drop-and-grow: exact counts, hand-computed picks, unfired growth, moment resets."""

import math
import warnings

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


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "x", None])
def test_fraction_outside_unit_interval_refused(bad):
  m = {"w": jnp.array([1, 1, 0, 0], bool)}
  s = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
  with pytest.raises(ValueError, match=r"fraction must be .*\[0, 1\]"):
    growth.drop_and_grow(m, s, s, bad)


def test_traced_fraction_is_clipped_as_documented():
  m = {"w": jnp.array([1, 1, 0, 0], bool)}
  s = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
  f = jax.jit(lambda frac: growth.drop_and_grow(m, s, s, frac).masks["w"])
  np.testing.assert_array_equal(f(jnp.float32(1.5)), f(jnp.float32(1.0)))
  np.testing.assert_array_equal(f(jnp.float32(1.0)), [0, 0, 1, 1])
  np.testing.assert_array_equal(f(jnp.float32(np.nan)), m["w"])
  np.testing.assert_array_equal(f(jnp.float32(-2.0)), m["w"])


def _blocked_gradient_case():
  # Growth scored with a gradient taken through masks.apply: 0 at every inactive position.
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w": jax.random.normal(k1, (8, 6))}
  x = jax.random.normal(k2, (16, 8))
  mask = {"w": jnp.asarray(np.random.default_rng(0).random((8, 6)) < 0.3)}
  loss = lambda p: jnp.mean(jnp.tanh(x @ p["w"]) ** 2)
  blocked = jax.grad(lambda p: loss(masks.apply(p, mask)))(params)
  return params, mask, loss, blocked


def test_tied_growth_warns_raises_or_is_ignored():
  params, mask, loss, blocked = _blocked_gradient_case()
  assert float(jnp.abs(blocked["w"])[~mask["w"]].max()) == 0.0
  args = (mask, criteria.magnitude(params), criteria.gradient(params, grads=blocked), 0.5)
  with pytest.warns(growth.TiedGrowthWarning, match=r"'w'.*loss_fn=loss"):
    res = growth.drop_and_grow(*args)
  assert bool(res.tied_growth["w"])
  # The tie rule picked the first inactive flat indices: what the warning is about.
  n = int(res.grown["w"].sum())
  first = np.flatnonzero(~np.asarray(mask["w"]).reshape(-1))[:n]
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(res.grown["w"]).reshape(-1)), first)
  with pytest.raises(ValueError, match="same grow score"):
    growth.drop_and_grow(*args, on_tied_growth="raise")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    growth.drop_and_grow(*args, on_tied_growth="ignore")
    # The dense gradient (the criterion differentiates at the masked weights) does not tie and
    # grows the top-|grad| candidates.
    dense = criteria.gradient(params, masks=mask, loss_fn=loss)
    res = growth.drop_and_grow(mask, criteria.magnitude(params), dense, 0.5)
  assert not bool(res.tied_growth["w"])
  g, grown, cand = np.asarray(dense["w"]), np.asarray(res.grown["w"]), ~np.asarray(mask["w"])
  assert grown.sum() > 0 and g[grown].min() > g[cand & ~grown].max()
  with pytest.raises(ValueError, match="on_tied_growth must be one of"):
    growth.drop_and_grow(*args, on_tied_growth="error")


def test_tied_growth_is_reported_inside_jit():
  params, mask, _, blocked = _blocked_gradient_case()
  scores = criteria.gradient(params, grads=blocked)

  def run(mode):
    f = jax.jit(lambda m, s: growth.drop_and_grow(m, criteria.magnitude(params), s, 0.5,
                                                  on_tied_growth=mode).tied_growth["w"])
    out = f(mask, scores).block_until_ready()
    jax.effects_barrier()
    return out

  with pytest.warns(growth.TiedGrowthWarning, match="same grow score"):
    assert bool(run("warn"))
  with pytest.raises(Exception, match="same grow score"):
    run("raise")


def _reset_case():
  p = {"conv": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "head": {"kernel": jnp.ones((3, 2))}}
  changed = jax.tree.map(lambda x: jnp.zeros(x.shape, bool).at[(0,) * x.ndim].set(True), p)
  return p, changed


def _label_fn(params):
  return {k: {n: ("decay" if n == "kernel" else "plain") for n in v} for k, v in params.items()}


WRAPPED = {
    "masked": lambda: optax.masked(optax.adam(1e-2), {"conv": {"kernel": True, "bias": False},
                                                      "head": {"kernel": True}}),
    "masked_prefix": lambda: optax.masked(optax.sgd(0.1, momentum=0.9), {"conv": True,
                                                                          "head": False}),
    "multi_transform": lambda: optax.multi_transform(
        {"decay": optax.adamw(1e-2, weight_decay=0.1), "plain": optax.sgd(0.1, momentum=0.9)},
        {"conv": {"kernel": "decay", "bias": "plain"}, "head": {"kernel": "decay"}}),
    "multi_transform_label_fn": lambda: optax.multi_transform(
        {"decay": optax.adamw(1e-2, weight_decay=0.1), "plain": optax.sgd(0.1, momentum=0.9)},
        _label_fn),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
    "multi_steps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
}


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_reset_moments_wrapped_optax_states(name):
  # optax.masked / multi_transform states hold MaskedNode where a group keeps no state; they used
  # to fail with "pytree structure error ... MaskedNode".
  tx = WRAPPED[name]()
  p, changed = _reset_case()
  state = tx.init(p)
  _, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
  new = jax.jit(lambda s, c: growth.reset_moments(tx, s, c))(state, changed)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  n_moments = 0
  for old_leaf, new_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(new)):
    old_leaf, new_leaf = np.asarray(old_leaf), np.asarray(new_leaf)
    if old_leaf.shape in ((2, 3), (3,), (3, 2)) and np.issubdtype(old_leaf.dtype, np.floating):
      n_moments += 1  # a params-shaped moment (or accumulated gradient): reset at changed only
      flat_old, flat_new = old_leaf.reshape(-1), new_leaf.reshape(-1)
      assert flat_new[0] == 0.0
      np.testing.assert_array_equal(flat_new[1:], flat_old[1:])
    else:
      np.testing.assert_array_equal(new_leaf, old_leaf)  # counts, hyperparameters
  assert n_moments > 0


def _random_topology(seed):
  """Masks, distinct (tie-free) scores and candidate sets for a brute-force comparison."""
  rng = np.random.default_rng(seed)
  shapes = {"a": (7, 5), "b": (3, 2, 4), "c": (9,)}
  m = {k: jnp.asarray(rng.random(s) < 0.45) for k, s in shapes.items()}
  # Distinct scores: a permutation per leaf, so "the n lowest / highest" is unambiguous.
  drop = {k: jnp.asarray(rng.permutation(np.prod(s)).reshape(s), jnp.float32)
          for k, s in shapes.items()}
  grow = {k: jnp.asarray(rng.permutation(np.prod(s)).reshape(s), jnp.float32)
          for k, s in shapes.items()}
  dc = {k: jnp.asarray(rng.random(s) < 0.8) for k, s in shapes.items()}
  gc = {k: jnp.asarray(rng.random(s) < 0.7) for k, s in shapes.items()}
  return m, drop, grow, dc, gc


_drop_and_grow_jit = jax.jit(lambda m, d, g, frac, dc, gc: growth.drop_and_grow(
    m, d, g, frac, drop_candidates=dc, grow_candidates=gc))


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.75])
def test_reported_changes_equal_the_brute_force_mask_difference(fraction):
  # The reported dropped / grown / changed sets must be exactly what differs between the old and
  # the new mask, computed here with NumPy from the two masks alone; the counts follow the
  # documented n = floor(fraction * droppable), capped by the growth candidates, and the picks
  # are the n lowest drop scores / n highest grow scores (written out with argsort).
  for seed in range(3):
    m, drop, grow, dc, gc = _random_topology(seed)
    res = _drop_and_grow_jit(m, drop, grow, jnp.float32(fraction), dc, gc)
    for k in m:
      old, new = np.asarray(m[k]), np.asarray(res.masks[k])
      np.testing.assert_array_equal(np.asarray(res.dropped[k]), old & ~new, err_msg=k)
      np.testing.assert_array_equal(np.asarray(res.grown[k]), new & ~old, err_msg=k)
      np.testing.assert_array_equal(np.asarray(res.changed[k]), old != new, err_msg=k)
      droppable = (old & np.asarray(dc[k])).reshape(-1)
      growable = (~old & np.asarray(gc[k])).reshape(-1)
      n = min(math.floor(fraction * int(droppable.sum())), int(growable.sum()))
      ds, gs = np.asarray(drop[k]).reshape(-1), np.asarray(grow[k]).reshape(-1)
      idx = np.flatnonzero(droppable)
      expect_drop = np.zeros(old.size, bool)
      expect_drop[idx[np.argsort(ds[idx])[:n]]] = True
      idx = np.flatnonzero(growable)
      expect_grow = np.zeros(old.size, bool)
      expect_grow[idx[np.argsort(-gs[idx])[:n]]] = True
      np.testing.assert_array_equal((old & ~new).reshape(-1), expect_drop, err_msg=k)
      np.testing.assert_array_equal((new & ~old).reshape(-1), expect_grow, err_msg=k)


@pytest.mark.parametrize("make", [lambda: optax.sgd(0.1, momentum=0.9), lambda: optax.adam(1e-2)])
def test_reset_moments_zeroes_exactly_the_positions_whose_mask_changed(make):
  # After a few steps with nonzero gradients every moment is nonzero. Resetting at the reported
  # changes must zero the moments exactly where old_mask != new_mask (NumPy, from the masks) and
  # leave every other moment bit-identical; resetting at the grown set zeroes exactly the
  # positions that became active.
  m, drop, grow, dc, gc = _random_topology(7)
  params = jax.tree.map(lambda s: s / 10.0, drop)
  tx = make()
  state = tx.init(params)
  rng = np.random.default_rng(1)
  for _ in range(3):
    g = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.5, 1.5, p.shape), jnp.float32), params)
    _, state = tx.update(g, state, params)
  res = growth.drop_and_grow(m, drop, grow, 0.5, drop_candidates=dc, grow_candidates=gc)
  old = jax.tree.map(np.asarray, m)
  new = jax.tree.map(np.asarray, res.masks)
  assert sum(int((old[k] != new[k]).sum()) for k in old) > 0
  for reset_at, expect in ((res.changed, {k: old[k] != new[k] for k in old}),
                           (res.grown, {k: new[k] & ~old[k] for k in old})):
    before = criteria.find_momentum(state, params)
    after = criteria.find_momentum(growth.reset_moments(tx, state, reset_at), params)
    for k in old:
      b, a = np.asarray(before[k]), np.asarray(after[k])
      assert (b != 0).all()
      np.testing.assert_array_equal(a == 0, expect[k], err_msg=k)
      np.testing.assert_array_equal(a[~expect[k]].view(np.uint32), b[~expect[k]].view(np.uint32))
