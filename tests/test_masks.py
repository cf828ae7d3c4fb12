"""Mask algebra on small hand-written trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import masks


def _params():
  return {
      "conv_0": {"kernel": jnp.arange(8.0).reshape(1, 2, 2, 2) - 4.0, "bias": jnp.ones(2)},
      "norm_0": {"scale": jnp.ones(2)},
      "head": {"kernel": jnp.ones((2, 3, 2))},
  }


def test_paths_and_maskable_defaults():
  p = _params()
  assert masks.paths(p) == ["conv_0/bias", "conv_0/kernel", "head/kernel", "norm_0/scale"]
  spec = masks.maskable(p)
  assert spec == {"conv_0": {"kernel": True, "bias": False}, "norm_0": {"scale": False},
                  "head": {"kernel": False}}
  spec2 = masks.maskable(p, include=(r"kernel$", r"bias$"), exclude=())
  assert spec2["head"]["kernel"] and spec2["conv_0"]["bias"] and not spec2["norm_0"]["scale"]
  spec3 = masks.maskable(p, predicate=lambda path, x: x.ndim == 4)
  assert masks.maskable_paths(spec3) == ["conv_0/kernel"]


def test_apply_count_density_under_jit(strict_dtypes):
  p = _params()
  m = masks.ones(p)
  m["conv_0"]["kernel"] = jnp.array([True, False] * 4).reshape(1, 2, 2, 2)
  out = jax.jit(masks.apply)(p, m)
  np.testing.assert_array_equal(out["conv_0"]["kernel"].ravel(), [-4, 0, -2, 0, 0, 0, 2, 0])
  # Masked-out negative weights become +0.0, not -0.0.
  assert not np.signbit(np.asarray(out["conv_0"]["kernel"]).ravel()[1])
  assert int(jax.jit(masks.count)(m)) == 4 + 2 + 2 + 12
  spec = masks.maskable(p)
  assert int(masks.count(m, spec)) == 4
  assert float(masks.density(m, spec)) == 0.5
  dpl = jax.jit(masks.density_per_leaf)(m)
  assert float(dpl["conv_0"]["kernel"]) == 0.5 and float(dpl["head"]["kernel"]) == 1.0
  assert masks.size_per_leaf(p)["head"]["kernel"] == 12
  assert int(jax.tree.leaves(masks.count_per_leaf(m))[1]) == 4


def test_ownership_views(strict_dtypes):
  own = {"w": jnp.array([0, 1, 2, 3, 0, 2], jnp.int32)}

  @jax.jit
  def views(own, t):
    return (masks.visible(own, t), masks.trainable(own, t), masks.free(own),
            masks.training_view(own, t), masks.owned_by(own, t))

  vis, tr, fr, tv, ob = views(own, jnp.int32(2))
  np.testing.assert_array_equal(vis["w"], [0, 1, 1, 0, 0, 1])
  np.testing.assert_array_equal(tr["w"], [1, 0, 1, 0, 1, 1])
  np.testing.assert_array_equal(fr["w"], [1, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(tv["w"], [1, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(ob["w"], [0, 0, 1, 0, 0, 1])
  sel = {"w": jnp.array([1, 1, 0, 0, 1, 0], bool)}
  own2 = jax.jit(masks.assign)(own, sel, jnp.int32(4))
  np.testing.assert_array_equal(own2["w"], [4, 1, 2, 3, 4, 2])
  keep = {"w": jnp.array([1, 1, 0, 1, 1, 1], bool)}
  own3 = jax.jit(masks.release)(own2, keep, jnp.int32(2))
  np.testing.assert_array_equal(own3["w"], [4, 1, 0, 3, 4, 2])


def test_check_like_names_the_problem():
  p = _params()
  bad = masks.ones(p)
  del bad["norm_0"]
  with pytest.raises(ValueError, match="missing leaves.*norm_0/scale"):
    masks.check_like(p, bad)
  bad = masks.ones(p)
  bad["conv_0"]["bias"] = jnp.ones(3, bool)
  with pytest.raises(ValueError, match=r"conv_0/bias: \(3,\) vs params \(2,\)"):
    masks.check_like(p, bad)
  bad = masks.ones(p)
  bad["conv_0"]["bias"] = None
  with pytest.raises(ValueError, match="missing leaves.*conv_0/bias"):
    masks.check_like(p, bad)


def test_pack_roundtrip_and_size():
  rng = np.random.default_rng(0)
  p = {"a": np.zeros((3, 5)), "b": np.zeros((7,)), "c": {"d": np.zeros((2, 2, 2, 3))}}
  m = jax.tree.map(lambda x: rng.random(x.shape) > 0.5, p)
  packed = masks.pack(m)
  assert packed["a"].dtype == np.uint8 and packed["a"].size == 2  # 15 bits -> 2 bytes
  back = masks.unpack(packed, p)
  for x, y in zip(jax.tree.leaves(m), jax.tree.leaves(back)):
    np.testing.assert_array_equal(x, y)
  assert masks.packed_nbytes(m) == 2 + 1 + 3
  with pytest.raises(ValueError, match="has 3 bytes, expected 1"):
    masks.unpack({**packed, "b": np.zeros(3, np.uint8)}, p)


def test_ownership_pack_roundtrip():
  own = {"a": np.array([[0, 5, 3], [1, 2, 4]]), "b": np.array([5, 0])}
  assert masks.ownership_bits(5) == 3 and masks.ownership_bits(1) == 1
  packed = masks.pack_ownership(own, 5)
  assert packed["a"].size == 3  # 6 elements * 3 bits = 18 bits -> 3 bytes
  back = masks.unpack_ownership(packed, own, 5)
  np.testing.assert_array_equal(back["a"], own["a"])
  np.testing.assert_array_equal(back["b"], own["b"])
  with pytest.raises(ValueError, match="outside 0..3"):
    masks.pack_ownership(own, 3)


def test_ownership_bits_is_the_smallest_width_holding_every_owner():
  # Owners are 0..T (0 = free): the width b must satisfy 2**b > T, found here by counting up.
  for num_tasks in range(1, 40):
    b = 1
    while 2 ** b <= num_tasks:
      b += 1
    assert masks.ownership_bits(num_tasks) == b, num_tasks
  # At a power of two the top owner needs the extra bit: owner 4 of 4 tasks round-trips.
  own = {"a": np.array([4, 0, 3, 4, 1, 2, 4])}
  back = masks.unpack_ownership(masks.pack_ownership(own, 4), own, 4)
  np.testing.assert_array_equal(back["a"], own["a"])


def test_release_frees_only_the_owner_positions_not_kept():
  # Brute force over random ownership and keep masks: a position is freed iff the owner holds it
  # and keep does not select it; every other position (other tasks', free ones) is untouched.
  rng = np.random.default_rng(0)
  own = {"w": rng.integers(0, 4, size=(6, 7)).astype(np.int32)}
  keep = {"w": rng.random((6, 7)) < 0.5}
  assert ((own["w"] != 2) & ~keep["w"]).any()  # other owners' positions outside keep exist
  got = np.asarray(jax.jit(masks.release)(own, keep, jnp.int32(2))["w"])
  expect = own["w"].copy()
  for i, j in np.ndindex(expect.shape):
    if expect[i, j] == 2 and not keep["w"][i, j]:
      expect[i, j] = 0
  np.testing.assert_array_equal(got, expect)


def test_default_maskable_matches_whole_path_components():
  # 'kernel' and 'head' are whole path components: a module merely named like them is not caught.
  p = {"head": {"kernel": jnp.ones((2, 2))}, "model": {"head": {"kernel": jnp.ones((2, 2))}},
       "multihead_attn": {"kernel": jnp.ones((2, 2))}, "heads_proj": {"kernel": jnp.ones((2, 2))},
       "dense": {"kernel": jnp.ones((2, 2)), "kernel_scale": jnp.ones(2)}}
  assert masks.maskable(p) == {
      "head": {"kernel": False}, "model": {"head": {"kernel": False}},
      "multihead_attn": {"kernel": True}, "heads_proj": {"kernel": True},
      "dense": {"kernel": True, "kernel_scale": False}}


def test_from_spec_and_where_spec():
  p = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
  spec = {"a": True, "b": False}
  m = masks.from_spec(p, spec)
  assert bool(m["a"].all()) and not bool(m["b"].any()) and m["a"].dtype == jnp.bool_
  given = {"a": jnp.array([[1, 0, 1], [0, 0, 1]], bool), "b": jnp.array([1, 0, 1, 0], bool)}
  out = masks.where_spec(spec, given)
  np.testing.assert_array_equal(out["a"], given["a"])
  np.testing.assert_array_equal(out["b"], [True] * 4)
  np.testing.assert_array_equal(masks.where_spec(spec, given, fill=False)["b"], [False] * 4)
