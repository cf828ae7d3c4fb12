"""Sparsity distributions against hand-computed densities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import masks, sparsity


def _model():
  # A conv (3x3, 2 -> 4) and a dense (36 -> 10) plus a head: ERK hand computation below.
  return {
      "conv_0": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros(4)},
      "dense_0": {"kernel": jnp.zeros((36, 10))},
      "head": {"kernel": jnp.zeros((10, 2))},
  }


def test_uniform():
  d = sparsity.densities(_model(), 0.75)
  assert d["conv_0"]["kernel"] == pytest.approx(0.25)
  assert d["dense_0"]["kernel"] == pytest.approx(0.25)
  assert d["conv_0"]["bias"] == 1.0 and d["head"]["kernel"] == 1.0
  c = sparsity.target_counts(_model(), 0.75)
  assert c == {"conv_0": {"kernel": 18, "bias": 4}, "dense_0": {"kernel": 90},
               "head": {"kernel": 20}}


def test_erk_hand_computed():
  # raw ERK: conv (3+3+2+4)/72 = 1/6, dense (36+10)/360 = 23/180.
  # 80% sparsity: keep 0.2 * (72 + 360) = 86.4 -> eps = 86.4 / (72/6 + 360*23/180) = 86.4 / 58.
  eps = 86.4 / 58.0
  d = sparsity.densities(_model(), 0.8, distribution="erk")
  assert d["conv_0"]["kernel"] == pytest.approx(eps / 6)
  assert d["dense_0"]["kernel"] == pytest.approx(eps * 23 / 180)
  # ER ignores the kernel's spatial size in the numerator: conv (2+4)/72, dense 46/360.
  eps_er = 86.4 / (72 * 6 / 72 + 46)
  d = sparsity.densities(_model(), 0.8, distribution="er")
  assert d["conv_0"]["kernel"] == pytest.approx(eps_er * 6 / 72)
  c = sparsity.target_counts(_model(), 0.8, distribution="erk")
  # 72 * eps/6 = 17.876 -> 17 or 18; 360 * eps*23/180 = 68.52; exact total round(86.4) = 86.
  assert c["conv_0"]["kernel"] + c["dense_0"]["kernel"] == 86
  assert (c["conv_0"]["kernel"], c["dense_0"]["kernel"]) == (18, 68)


def test_erk_caps_small_layers_and_redistributes():
  params = {"a": {"kernel": jnp.zeros((2, 2))}, "b": {"kernel": jnp.zeros((100, 100))}}
  # raw: a = 4/4 = 1, b = 200/10000 = 0.02. 50% sparsity keeps 5002: eps = 5002 / (4 + 200) > 1,
  # so a is capped at density 1 and b takes the remaining 4998 of its 10000.
  d = sparsity.densities(params, 0.5, distribution="erk")
  assert d["a"]["kernel"] == 1.0
  assert d["b"]["kernel"] == pytest.approx(4998 / 10000)
  c = sparsity.target_counts(params, 0.5, distribution="erk")
  assert c == {"a": {"kernel": 4}, "b": {"kernel": 4998}}


def test_overrides_keep_overall_exact():
  params = _model()
  c = sparsity.target_counts(params, 0.5, overrides={r"conv_0": 0.0})
  assert c["conv_0"]["kernel"] == 72
  assert c["conv_0"]["kernel"] + c["dense_0"]["kernel"] == 216
  with pytest.raises(ValueError, match="cannot be reached"):
    sparsity.densities(params, 0.05, overrides={r"dense_0": 0.9})


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "x"])
def test_sparsity_out_of_range(bad):
  with pytest.raises(ValueError, match=r"sparsity must be"):
    sparsity.densities(_model(), bad)


def test_unknown_distribution():
  with pytest.raises(ValueError, match="unknown sparsity distribution"):
    sparsity.densities(_model(), 0.5, distribution="gaussian")


def test_uniform_counts_traced():
  params = _model()
  f = jax.jit(lambda s: sparsity.uniform_counts(params, s))
  c = f(jnp.float32(0.75))
  assert int(c["conv_0"]["kernel"]) == 18 and int(c["head"]["kernel"]) == 20


def test_exact_total_on_random_shapes():
  rng = np.random.default_rng(0)
  for _ in range(20):
    params = {f"l{i}": {"kernel": jax.ShapeDtypeStruct(
        tuple(rng.integers(1, 9, size=rng.integers(2, 5))), jnp.float32)} for i in range(4)}
    s = float(rng.uniform(0, 0.99))
    c = sparsity.target_counts(params, s, distribution="erk")
    n = sum(masks.size_per_leaf(params)[k]["kernel"] for k in params)
    assert sum(c[k]["kernel"] for k in params) == round((1 - s) * n)
    for k in params:
      assert 0 <= c[k]["kernel"] <= masks.size_per_leaf(params)[k]["kernel"]


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), "x", None])
def test_uniform_counts_refuses_bad_numbers(bad):
  # 1.5 used to give negative counts (a silently empty mask) and 1.0 was accepted, although
  # target_counts refuses both.
  with pytest.raises(ValueError, match=r"sparsity must be .*\[0, 1\)"):
    sparsity.uniform_counts(_model(), bad)
  with pytest.raises(ValueError, match=r"sparsity must be .*\[0, 1\)"):
    sparsity.target_counts(_model(), bad)


def _three_vectors():
  # 9736 weights in leaves of 3003, 3003 and 3730: per-leaf rounding at sparsity 0.9 keeps
  # 300 + 300 + 373 = 973, the exact overall count is round(973.6) = 974.
  params = {"a": {"kernel": jnp.zeros(3003)}, "b": {"kernel": jnp.zeros(3003)},
            "c": {"kernel": jnp.zeros(3730)}}
  spec = {"a": {"kernel": True}, "b": {"kernel": True}, "c": {"kernel": True}}
  return params, spec


def test_uniform_counts_and_target_counts_are_one_rule():
  params, spec = _three_vectors()
  host = sparsity.target_counts(params, 0.9, spec=spec)
  assert host == {"a": {"kernel": 301}, "b": {"kernel": 300}, "c": {"kernel": 373}}
  assert sum(jax.tree.leaves(host)) == 974
  eager = sparsity.uniform_counts(params, 0.9, spec)
  traced = jax.jit(lambda s: sparsity.uniform_counts(params, s, spec))(jnp.float32(0.9))
  for counts in (eager, traced):
    assert jax.tree.map(int, counts) == host
    assert all(c.dtype == jnp.int32 for c in jax.tree.leaves(counts))


def _abstract(shapes):
  return {f"l{i}": {"kernel": jax.ShapeDtypeStruct(tuple(s), jnp.float32), "bias":
                    jax.ShapeDtypeStruct((int(s[-1]),), jnp.float32)}
          for i, s in enumerate(shapes)}


@pytest.mark.parametrize("distribution", sparsity.DISTRIBUTIONS)
def test_traced_counts_equal_host_counts(distribution):
  # The traced rule (jit, vmapped over sparsities) gives the host's ints for the same float32
  # value, ERK included, on small trees and on a ~55M-weight tree near the traced limit.
  rng = np.random.default_rng(0)
  trees = [_abstract([(3, 3, 2, 4), (36, 10), (7, 5), (1, 9)]),
           _abstract([tuple(rng.integers(1, 30, size=rng.integers(2, 5))) for _ in range(6)]),
           _abstract([(4096, 8191), (3, 3, 512, 1021), (7, 13), (2 ** 24 - 12345, 1)])]
  ss = np.concatenate([[0.0, 0.5, 0.9, 0.95], rng.uniform(0, 1, size=28)]).astype(np.float32)
  for params in trees:
    traced = jax.device_get(jax.jit(jax.vmap(
        lambda s, p=params: sparsity.target_counts(p, s, distribution=distribution)))(ss))
    n = sum(x["kernel"].size for x in params.values())
    for j, s in enumerate(ss):
      host = sparsity.target_counts(params, float(s), distribution=distribution)
      assert jax.tree.map(lambda x, j=j: int(x[j]), traced) == host, (s, host)
      assert sum(x["kernel"] for x in host.values()) == sparsity.kept_total(float(s), n)


def test_traced_counts_with_overrides_and_hand_computed_erk(strict_dtypes):
  params = _model()
  f = jax.jit(lambda s: sparsity.target_counts(params, s, distribution="erk",
                                               overrides={r"dense_0": 0.5}))
  for s in (0.45, 0.5, 0.55):
    assert jax.tree.map(int, f(jnp.float32(s))) == sparsity.target_counts(
        params, s, distribution="erk", overrides={r"dense_0": 0.5})
  # Unreachable: refused for a number; for a traced value the budget is clipped (conv keeps 0).
  with pytest.raises(ValueError, match="cannot be reached"):
    sparsity.target_counts(params, 0.7, overrides={r"dense_0": 0.5})
  assert int(f(jnp.float32(0.7))["conv_0"]["kernel"]) == 0
  traced = jax.jit(lambda s: sparsity.target_counts(params, s, distribution="erk"))(0.8)
  assert (int(traced["conv_0"]["kernel"]), int(traced["dense_0"]["kernel"])) == (18, 68)


def test_traced_values_are_clipped_as_documented(strict_dtypes):
  params, spec = _three_vectors()
  f = jax.jit(lambda s: sparsity.uniform_counts(params, s, spec))
  assert jax.tree.leaves(jax.tree.map(int, f(jnp.float32(1.5)))) == [0, 0, 0]
  assert jax.tree.leaves(jax.tree.map(int, f(jnp.float32(1.0)))) == [0, 0, 0]
  assert jax.tree.leaves(jax.tree.map(int, f(jnp.float32(-0.5)))) == [3003, 3003, 3730]
  assert jax.tree.leaves(jax.tree.map(int, f(jnp.float32(np.nan)))) == [3003, 3003, 3730]


def test_traced_refusals():
  big = {"k": {"kernel": jax.ShapeDtypeStruct((2 ** 13, 2 ** 13), jnp.float32)}}
  with pytest.raises(ValueError, match=r"fewer than 67108864 maskable weights.*Python number"):
    jax.jit(lambda s: sparsity.target_counts(big, s))(0.5)
  with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\) here, got a traced"):
    jax.jit(lambda s: sparsity.densities(_model(), s))(0.5)


def test_er_uses_the_input_and_output_channels_of_a_conv_kernel():
  # A conv kernel (3, 3, 5, 7) whose spatial dims differ from its channels: ER's numerator is
  # n_in + n_out = 5 + 7 = 12 (not 3 + 3), ERK's is 3 + 3 + 5 + 7 = 18; the size is 315 either way.
  # With a dense (20, 10): ER 30 / 200, ERK 30 / 200. 70% sparsity keeps 0.3 * 515 = 154.5.
  params = {"conv": {"kernel": jnp.zeros((3, 3, 5, 7))}, "dense": {"kernel": jnp.zeros((20, 10))}}
  eps_er = 154.5 / (12 + 30)  # sum of raw density * size = sum of numerators
  d = sparsity.densities(params, 0.7, distribution="er")
  assert d["conv"]["kernel"] == pytest.approx(eps_er * 12 / 315)
  assert d["dense"]["kernel"] == pytest.approx(eps_er * 30 / 200)
  eps_erk = 154.5 / (18 + 30)
  d = sparsity.densities(params, 0.7, distribution="erk")
  assert d["conv"]["kernel"] == pytest.approx(eps_erk * 18 / 315)
  # Counts: kept_total = rint(154.5) = 154 (half to even) split 12 : 30 (ER) -> 44 and 110; and
  # 18 : 30 (ERK) -> 57.75 and 96.25 -> floors 57 + 96 = 153, the leftover to the larger
  # remainder (0.75, conv) -> 58 and 96.
  assert sparsity.target_counts(params, 0.7, distribution="er") == {
      "conv": {"kernel": 44}, "dense": {"kernel": 110}}
  assert sparsity.target_counts(params, 0.7, distribution="erk") == {
      "conv": {"kernel": 58}, "dense": {"kernel": 96}}


def test_erk_capping_repeats_until_no_leaf_exceeds_density_one():
  # ERK weights (sum of the shape): a (2, 2) -> 4 of 4, b (10, 10) -> 20 of 100, c (40, 40) -> 80
  # of 1600; 1704 weights, 70% sparsity keeps 0.3 * 1704 = 511.2. First pass: eps = 511.2 / 104,
  # a's density 4.9 > 1, b's 0.98 <= 1: only a is capped. Second pass: eps = 507.2 / 100 makes
  # b's density 1.01 > 1: b is capped too. Third: c gets (511.2 - 104) / 1600 = 0.2545, below 1.
  params = {"a": {"kernel": jnp.zeros((2, 2))}, "b": {"kernel": jnp.zeros((10, 10))},
            "c": {"kernel": jnp.zeros((40, 40))}}
  d = sparsity.densities(params, 0.7, distribution="erk")
  assert d["a"]["kernel"] == 1.0 and d["b"]["kernel"] == 1.0
  assert d["c"]["kernel"] == pytest.approx((511.2 - 104) / 1600)
  # Counts: rint(511.2) = 511 kept, a and b dense, c the remaining 407.
  expect = {"a": {"kernel": 4}, "b": {"kernel": 100}, "c": {"kernel": 407}}
  assert sparsity.target_counts(params, 0.7, distribution="erk") == expect
  traced = jax.jit(lambda s: sparsity.target_counts(params, s, distribution="erk"))(0.7)
  assert jax.tree.map(int, traced) == expect


def test_densities_with_an_override_hand_computed():
  # conv kernel (72) fixed at 25% sparsity keeps 54; 75% overall over 72 + 360 = 432 keeps 108, so
  # the dense kernel gets 108 - 54 = 54 of 360 (density 0.15); non-maskable leaves stay dense.
  d = sparsity.densities(_model(), 0.75, overrides={r"conv_0/kernel": 0.25})
  assert d["conv_0"]["kernel"] == pytest.approx(0.75)
  assert d["dense_0"]["kernel"] == pytest.approx(54 / 360)
  assert d["conv_0"]["bias"] == 1.0 and d["head"]["kernel"] == 1.0
  c = sparsity.target_counts(_model(), 0.75, overrides={r"conv_0/kernel": 0.25})
  assert (c["conv_0"]["kernel"], c["dense_0"]["kernel"]) == (54, 54)
