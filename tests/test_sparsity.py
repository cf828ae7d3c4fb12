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
    params = {f"l{i}": {"kernel": jnp.zeros(tuple(rng.integers(1, 9, size=rng.integers(2, 5))))}
              for i in range(4)}
    s = float(rng.uniform(0, 0.99))
    c = sparsity.target_counts(params, s, distribution="erk")
    n = sum(masks.size_per_leaf(params)[k]["kernel"] for k in params)
    assert sum(c[k]["kernel"] for k in params) == round((1 - s) * n)
    for k in params:
      assert 0 <= c[k]["kernel"] <= masks.size_per_leaf(params)[k]["kernel"]
