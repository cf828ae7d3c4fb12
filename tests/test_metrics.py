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


# A 4-task matrix worked out by hand. Task 0's best accuracy is after task 1 (neither on the
# diagonal nor final); task 1's final accuracy is its best (it improved after it was trained);
# task 2 dropped. Every upper-triangle entry differs, so a metric reading the wrong entries moves.
R4 = np.array([
    [0.70, 0.10, 0.20, 0.30],
    [0.80, 0.60, 0.25, 0.35],
    [0.75, 0.50, 0.90, 0.40],
    [0.65, 0.95, 0.55, 0.85],
])
B4 = np.array([0.50, 0.20, 0.30, 0.20])


def test_forgetting_zero_when_final_accuracy_ties_the_best():
  # Task 0: best of the models 0..1 is 0.8 (after task 1), final 0.8; task 1: 0.6, final 0.6.
  R = np.array([[0.5, 0.0, 0.0],
                [0.8, 0.6, 0.0],
                [0.8, 0.6, 0.9]])
  assert metrics.forgetting(R) == 0.0
  # Not the negated BWT: BWT sees task 0 improve from its diagonal 0.5.
  assert metrics.bwt(R) == pytest.approx((0.8 - 0.5 + 0.0) / 2)


def test_forgetting_when_final_accuracy_is_the_best_is_not_clipped():
  # The max runs over the models before the last one (RWalk eq. 4-5, the docstring's j <= l < T-1):
  # a task that improves at the end has negative forgetting, 0.5 - 0.9; it is not clipped to 0 (a
  # max that also took the final row would give 0).
  R = np.array([[0.5, 0.1],
                [0.9, 0.8]])
  assert metrics.forgetting(R) == pytest.approx(-0.4)
  # Task 0: max(0.70, 0.80, 0.75) - 0.65 = 0.15; task 1: max(0.60, 0.50) - 0.95 = -0.35;
  # task 2: 0.90 - 0.55 = 0.35. Mean 0.05.
  assert metrics.forgetting(R4) == pytest.approx((0.15 - 0.35 + 0.35) / 3)


def test_all_metrics_on_a_hand_computed_four_task_matrix():
  assert metrics.acc(R4) == pytest.approx((0.65 + 0.95 + 0.55 + 0.85) / 4)  # 0.75
  # (0.65 - 0.70) + (0.95 - 0.60) + (0.55 - 0.90) = -0.05.
  assert metrics.bwt(R4) == pytest.approx(-0.05 / 3)
  # R[0, 1] - b1 + R[1, 2] - b2 + R[2, 3] - b3 = -0.10 - 0.05 + 0.20 = 0.05.
  assert metrics.fwt_gem(R4, B4) == pytest.approx(0.05 / 3)
  # Row means of the strict upper triangle: 0.2, 0.3, 0.4.
  assert metrics.fwt_subnetwork(R4) == pytest.approx(0.3)
  assert metrics.fwt_subnetwork(R4, pooled=True) == pytest.approx(
      (0.10 + 0.20 + 0.30 + 0.25 + 0.35 + 0.40) / 6)
  np.testing.assert_allclose(metrics.average_accuracy_curve(R4),
                             [0.70, 0.70, (0.75 + 0.50 + 0.90) / 3, 0.75])
