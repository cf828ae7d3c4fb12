"""Schedules: hand-computed values, traced steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import schedules


def test_one_shot():
  s = jax.jit(schedules.one_shot(0.6, at_step=10))
  assert float(s(9)) == 0.0 and float(s(10)) == pytest.approx(0.6)


def test_cubic_zhu_gupta():
  s = schedules.cubic(0.9, begin_step=100, end_step=500, frequency=10)
  js = jax.jit(s)
  assert float(js(0)) == 0.0
  assert float(js(100)) == 0.0
  assert float(js(300)) == pytest.approx(0.9 * (1 - 0.5 ** 3))
  # Rounded down to the last update step: 305 behaves like 300.
  assert float(js(305)) == pytest.approx(float(js(300)))
  assert float(js(500)) == pytest.approx(0.9) and float(js(10_000)) == pytest.approx(0.9)
  s2 = schedules.cubic(0.8, begin_step=0, end_step=4, initial_sparsity=0.5)
  np.testing.assert_allclose([float(s2(t)) for t in range(5)],
                             [0.5, 0.8 - 0.3 * 0.75 ** 3, 0.8 - 0.3 * 0.125, 0.8 - 0.3 / 64, 0.8],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="end_step > begin_step"):
    schedules.cubic(0.9, begin_step=5, end_step=5)
  with pytest.raises(ValueError, match="final_sparsity must be in"):
    schedules.cubic(1.0, begin_step=0, end_step=5)


def test_imp():
  got = schedules.imp_targets([1, 1, 2], rate=0.2)
  assert [len(t) for t in got] == [1, 1, 2]
  assert sum(got, []) == pytest.approx([0.2, 0.36, 0.488, 0.5904])
  assert schedules.imp_targets([0, 2])[1] == pytest.approx([0.2, 0.36])
  assert float(schedules.imp_sparsity(jnp.int32(3))) == pytest.approx(0.488)
  with pytest.raises(ValueError):
    schedules.imp_targets([1, -1])


def test_cosine_drop_fraction():
  s = jax.jit(schedules.cosine_drop_fraction(0.5, total_steps=100, final=0.005))
  assert float(s(0)) == pytest.approx(0.5)
  assert float(s(50)) == pytest.approx(0.005 + 0.495 * 0.5)
  assert float(s(100)) == pytest.approx(0.005) and float(s(200)) == pytest.approx(0.005)
