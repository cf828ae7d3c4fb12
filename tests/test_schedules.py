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


def test_cubic_update_steps_count_from_begin_step_not_from_zero():
  # Zhu & Gupta eq. 1 with the docstring's convention: the mask is updated at t0, t0 + dt, ...,
  # t0 + n dt and between updates the value of the last update holds. Here t0 = 103 is not a
  # multiple of dt = 10, n dt = 40, s_i = 0.1, s_f = 0.8, so updates happen at 103, 113, 123,
  # 133, 143 (not at 110, 120, ...). By hand, s = 0.8 - 0.7 * (1 - k/4)^3 after update k:
  # k=1: 0.8 - 0.7 * 27/64 = 0.5046875; k=2: 0.8 - 0.7/8 = 0.7125; k=3: 0.8 - 0.7/64 = 0.7890625.
  s = jax.jit(schedules.cubic(0.8, begin_step=103, end_step=143, initial_sparsity=0.1,
                              frequency=10))
  expected = {0: 0.1, 102: 0.1, 103: 0.1, 110: 0.1, 112: 0.1,
              113: 0.5046875, 120: 0.5046875, 122: 0.5046875,
              123: 0.7125, 130: 0.7125, 132: 0.7125,
              133: 0.7890625, 140: 0.7890625, 142: 0.7890625,
              143: 0.8, 150: 0.8, 1000: 0.8}
  got = {t: float(s(jnp.int32(t))) for t in expected}
  assert got == pytest.approx(expected, rel=1e-6)


def test_cubic_reaches_final_sparsity_after_end_step_off_the_update_grid():
  # begin 0, end 10, dt 4: updates at 0, 4, 8; "after end_step, the final one" (docstring).
  s = schedules.cubic(0.8, begin_step=0, end_step=10, frequency=4)
  assert float(s(8)) == pytest.approx(0.8 * (1 - 0.2 ** 3))  # the update at step 8, frac 8/10
  assert [float(s(t)) for t in (11, 12, 50)] == pytest.approx([0.8, 0.8, 0.8])
