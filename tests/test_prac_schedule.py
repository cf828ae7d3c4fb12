"""The learning rate a PrAC search round gets (issue 23), read from the schedule, without training.

``configs/prac.py:fashion_mnist`` floors a dynamic round's full-learning-rate epochs at 3
(``prac.min_full_lr_epochs``); the as-coded rescaling (``min_full_lr_epochs=0``) puts both decays
of a 13-16% PrAC set at epoch 0.
"""

import importlib.util
import os
import types

import pytest

from sparse_cl_jax.methods import prac
from sparse_cl_jax.train import optim

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN = 54000  # Fashion-MNIST's 60k training images less the stratified 10% validation split


def _config(arg):
  path = os.path.join(_REPO, "configs", "prac.py")
  spec = importlib.util.spec_from_file_location("config_prac_schedule", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _plan(c, mode="prac", record=None):
  """The fields of :class:`prac.Plan` that :func:`prac.search_schedule` reads."""
  epochs = int(c.epochs)
  return types.SimpleNamespace(
      mode=mode, record=record, dynamic_iterations=bool(c.prac.dynamic_iterations),
      epochs=epochs, milestones=[int(round(f * epochs)) for f in c.lr_milestones],
      min_full_lr_epochs=int(c.prac.min_full_lr_epochs), rewind_epoch=c.prac.rewind_epoch)


def _lrs(c, planned, ms):
  """The learning rate of each epoch of a round, as the trainer computes it."""
  fr = prac.milestone_fractions(planned, ms)
  return [optim.lr_for_epoch(c.learning_rate, e, planned, fr, c.lr_decay) for e in range(planned)]


@pytest.mark.parametrize("n_r", [6794, 6913, 7000, 8646, 8742])  # measured PrAC sets (13-16%)
def test_fashion_mnist_round_1_trains_3_epochs_at_full_lr(n_r):
  c = _config("fashion_mnist")
  c.prac.rounds = 2
  planned, ms, stop_after = prac.search_schedule(_plan(c), 1, n_r, N_TRAIN)
  assert stop_after is None
  assert (planned, ms) == (4, [3, 3])
  assert _lrs(c, planned, ms) == pytest.approx([0.05, 0.05, 0.05, 0.0005])


def test_full_data_round_keeps_the_full_schedule():
  c = _config("fashion_mnist")
  planned, ms, _ = prac.search_schedule(_plan(c), 0, N_TRAIN, N_TRAIN)
  assert (planned, ms) == (8, [4, 6])
  assert _lrs(c, planned, ms) == pytest.approx([0.05] * 4 + [0.005] * 2 + [0.0005] * 2)


def test_as_coded_rescaling_decays_at_epoch_0():
  c = _config("fashion_mnist")
  c.prac.min_full_lr_epochs = 0
  planned, ms, _ = prac.search_schedule(_plan(c), 1, 7000, N_TRAIN)
  assert (planned, ms) == (1, [0, 0])
  assert _lrs(c, planned, ms) == pytest.approx([0.0005])


@pytest.mark.parametrize("n_r", [1, 500, 6750, 13500, 27000, 40000, 53999, 54000])
def test_every_set_size_gets_at_least_3_full_lr_epochs(n_r):
  c = _config("fashion_mnist")
  planned, ms = prac.dynamic_schedule(c.epochs, [4, 6], n_r, N_TRAIN, min_full_lr_epochs=3)
  lrs = _lrs(c, planned, ms)
  assert lrs[:3] == pytest.approx([0.05] * 3)
  assert planned <= c.epochs + 3


def test_no_milestones_floor_the_epochs():
  assert prac.dynamic_schedule(8, [], 700, 54000, min_full_lr_epochs=3) == (3, [])
  assert prac.dynamic_schedule(8, [], 54000, 54000, min_full_lr_epochs=3) == (8, [])


def test_early_bird_cannot_stop_before_the_full_lr_epochs():
  """The preset's early-bird queue needs ``queue_length`` pushes after epoch 0, so a round stops
  after epoch ``queue_length`` at the earliest: >= 3 full-lr epochs have run."""
  c = _config("fashion_mnist")
  assert c.prac.queue_length + 1 >= c.prac.min_full_lr_epochs


def test_other_presets_keep_the_as_coded_schedule():
  for arg in (None, "runlocal", "cifar10", "cifar100", "tiny_imagenet"):
    assert _config(arg).prac.min_full_lr_epochs == 0


def test_check_config_rejects_a_bad_floor():
  c = _config("fashion_mnist")
  c.prac.min_full_lr_epochs = -1
  with pytest.raises(ValueError, match="min_full_lr_epochs"):
    prac.check_config(c)
