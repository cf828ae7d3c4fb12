"""Tests for sparse_cl_jax.metrics against hand-computed values."""

import collections
import math

import numpy as np
import pytest

from sparse_cl_jax import metrics

# R[i, j]: accuracy on task j after training task i. The upper triangle is chosen so that a metric
# that wrongly reads it (forgetting) would give a different number.
R3 = np.array([
    [0.90, 0.99, 0.30],
    [0.92, 0.95, 0.40],
    [0.70, 0.85, 0.90],
])
B3 = np.array([0.10, 0.50, 0.25])  # Random-init accuracies.


def test_acc():
  assert metrics.acc(R3) == pytest.approx((0.70 + 0.85 + 0.90) / 3)


def test_bwt():
  assert metrics.bwt(R3) == pytest.approx(((0.70 - 0.90) + (0.85 - 0.95)) / 2)  # -0.15


def test_forgetting_uses_only_models_that_had_trained_the_task():
  # Task 0: best 0.92 (after task 1) -> 0.70; task 1: best 0.95 -> 0.85. R3[0, 1] = 0.99 (before
  # task 1 was trained) must not count.
  assert metrics.forgetting(R3) == pytest.approx(((0.92 - 0.70) + (0.95 - 0.85)) / 2)  # 0.16


def test_fwt_gem():
  assert metrics.fwt_gem(R3, B3) == pytest.approx(((0.99 - 0.50) + (0.40 - 0.25)) / 2)  # 0.32


def test_fwt_subnetwork_row_means_then_mean():
  expected = ((0.99 + 0.30) / 2 + 0.40) / 2  # 0.5225
  assert metrics.fwt_subnetwork(R3) == pytest.approx(expected)
  assert metrics.fwt_subnetwork(R3, pooled=True) == pytest.approx((0.99 + 0.30 + 0.40) / 3)


def test_forward_transfer_names_what_the_upper_triangle_supports():
  gem = metrics.forward_transfer(R3, B3)
  assert gem == pytest.approx({"gem": 0.32, "subnetwork": 0.5225})
  sub = metrics.forward_transfer(R3, B3, upper_triangle="subnetwork")
  # Same arithmetic as GEM's eq. 4, but on task j-1's subnetwork and head: not called 'gem'.
  assert sub == pytest.approx({"subnetwork": 0.5225, "previous_subnetwork_minus_init": 0.32})
  assert "FWT (prev. subnet - init)" in metrics.summary_table(R3, b=B3,
                                                              upper_triangle="subnetwork")
  assert "FWT (GEM)" not in metrics.summary_table(R3, b=B3, upper_triangle="subnetwork")
  with pytest.raises(ValueError, match="upper_triangle"):
    metrics.forward_transfer(R3, B3, upper_triangle="rows")


def test_average_accuracy_curve():
  np.testing.assert_allclose(metrics.average_accuracy_curve(R3),
                             [0.90, (0.92 + 0.95) / 2, (0.70 + 0.85 + 0.90) / 3])
  assert metrics.average_accuracy_curve(R3)[-1] == pytest.approx(metrics.acc(R3))


def test_single_task_is_nan_where_undefined():
  R = np.array([[0.8]])
  assert metrics.acc(R) == pytest.approx(0.8)
  for value in (metrics.bwt(R), metrics.forgetting(R), metrics.fwt_subnetwork(R),
                metrics.fwt_gem(R, [0.1])):
    assert math.isnan(value)
  np.testing.assert_allclose(metrics.average_accuracy_curve(R), [0.8])


def test_nan_entries_are_skipped():
  R = R3.copy()
  R[0, 2] = np.nan  # Not evaluated.
  assert metrics.fwt_subnetwork(R) == pytest.approx((0.99 + 0.40) / 2)
  assert metrics.acc(R) == pytest.approx(metrics.acc(R3))


def test_bad_shapes():
  with pytest.raises(ValueError, match="square"):
    metrics.acc(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="shape"):
    metrics.fwt_gem(R3, [0.1, 0.2])


OWNERSHIP = {
    "conv": {"kernel": np.array([[0, 1], [2, 1]], np.int32)},
    "dense": {"kernel": np.array([0, 0, 0, 1, 1, 2], np.int32), "bias": np.zeros(2, np.int32)},
}


def test_capacity_per_layer():
  cap = metrics.capacity_per_layer(OWNERSHIP, 2)
  assert set(cap) == {"conv/kernel", "dense/kernel", "dense/bias"}
  assert cap["conv/kernel"] == pytest.approx({"free": 0.25, "task_1": 0.5, "task_2": 0.25})
  assert cap["dense/kernel"] == pytest.approx({"free": 0.5, "task_1": 1 / 3, "task_2": 1 / 6})
  assert cap["dense/bias"] == pytest.approx({"free": 1.0, "task_1": 0.0, "task_2": 0.0})


def test_capacity_total_weights_by_size():
  # 4 + 6 + 2 = 12 elements: free 1 + 3 + 2 = 6, task 1: 2 + 2 = 4, task 2: 1 + 1 = 2.
  total = metrics.capacity_total(OWNERSHIP, 3)
  assert total == pytest.approx({"free": 6 / 12, "task_1": 4 / 12, "task_2": 2 / 12,
                                 "task_3": 0.0})


def test_capacity_rejects_unknown_owner():
  with pytest.raises(ValueError, match="conv/kernel"):
    metrics.capacity_per_layer(OWNERSHIP, 1)


def test_model_bytes():
  params = {
      "conv": {"kernel": np.ones((3, 3, 2, 4), np.float32)},  # 72 elements.
      "dense": {"kernel": np.ones((5, 3), np.float32), "bias": np.ones(3, np.float32)},  # 15 + 3.
  }
  maskable = {"conv": {"kernel": True}, "dense": {"kernel": True, "bias": False}}
  per_task = [{"bn": {"scale": np.ones(4), "bias": np.ones(4)}, "head": np.ones((3, 2))}] * 3
  out = metrics.model_bytes(params, mask_bits=2, maskable=maskable, per_task_trees=per_task)
  assert out["weights"] == 4 * (72 + 15 + 3)  # 360.
  assert out["masks"] == 72 * 2 // 8 + math.ceil(15 * 2 / 8)  # 18 + 4 (30 bits -> 4 bytes).
  assert out["per_task"] == 4 * 3 * (4 + 4 + 6)  # 168.
  assert out["total"] == 360 + 22 + 168


def test_model_bytes_nonzero_only_and_defaults():
  params = {"w": np.array([0.0, 1.0, 0.0, 2.0], np.float32)}
  out = metrics.model_bytes(params, mask_bits=1, nonzero_only=True, dtype_bytes=2)
  assert out == {"weights": 4, "masks": 1, "per_task": 0, "total": 5}


def test_model_bytes_handles_namedtuples_and_checks_maskable():
  state = collections.namedtuple("State", ["mu", "nu"])(np.ones(8), np.ones(8))
  assert metrics.model_bytes(state, mask_bits=1)["masks"] == 2
  with pytest.raises(ValueError, match="mirror"):
    metrics.model_bytes({"a": np.ones(2)}, mask_bits=1, maskable={"b": True})


def test_summary_table_contains_the_numbers():
  table = metrics.summary_table(R3, names=["0-1", "2-3", "4-5"], b=B3)
  for text in ("0-1", "4-5", "0.9200", "0.8500", "ACC", "BWT", "Forgetting", "FWT (subnet)",
               "FWT (GEM)", f"{metrics.acc(R3):.4f}", "-0.1500", "0.1600", "0.5225", "0.3200"):
    assert text in table, text
  lines = table.splitlines()
  assert lines[1].split() == ["0-1", "0.9000", "0.9900", "0.3000"]


def test_summary_table_nan_and_default_names():
  R = np.array([[0.5, np.nan], [0.25, 0.75]])
  table = metrics.summary_table(R, precision=2)
  assert "task_1" in table and "task_2" in table
  assert table.splitlines()[1].split() == ["task_1", "0.50", "-"]
  assert "FWT (GEM)" not in table
