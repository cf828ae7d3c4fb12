"""Padded rows never reach a statistic (issue 11 item 2), and the epoch's training statistics.

The last batch of an epoch (and of an evaluation pass) is topped up with padding or repeated rows.
Every norm layer leaves them out of its batch and running statistics, so training on N examples
gives bit-identical params and statistics whatever the padding rows hold, and evaluation does not
depend on them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import data
from sparse_cl_jax import experiment
from sparse_cl_jax import models
from sparse_cl_jax import train

_KEY = jax.random.key(0)
_NORMS = ("batch", "task_batch", "batch_stats_only")


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ------------------------------------------------------------------------------------------------
# Norm layers.


def test_batch_norm_has_flax_batch_norm_variables_and_values():
  x = _normal(0, (6, 3, 3, 5)) * 2.0 + 0.5
  ours = models.BatchNorm()
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  v = ours.init(_KEY, x, train=True)
  v_flax = flax_bn.init(_KEY, x)
  assert jax.tree.structure(v) == jax.tree.structure(v_flax)
  jax.tree.map(np.testing.assert_array_equal, v, v_flax)  # same names, shapes, initial values
  v = jax.tree.map(lambda a: a + _normal(1, a.shape) * 0.1, v)
  y, new = ours.apply(v, x, train=True, mutable=["batch_stats"])
  y_flax, new_flax = flax_bn.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, new_flax)
  eval_flax = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)
  np.testing.assert_allclose(ours.apply(v, x, train=False), eval_flax.apply(v, x), rtol=1e-5,
                             atol=1e-5)


def test_batch_moments_over_valid_rows_only():
  x = _normal(2, (5, 2, 2, 3))
  valid = jnp.array([True, False, True, True, False])
  mean, var, count = models.batch_moments(x, valid)
  rows = np.asarray(x)[np.asarray(valid)]
  np.testing.assert_allclose(mean, rows.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, rows.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  assert float(count) == 3 * 4
  # Weights: any positive weight marks a valid row.
  mean_w, var_w, _ = models.batch_moments(x, valid.astype(jnp.float32) * 0.5)
  np.testing.assert_array_equal(mean_w, mean)
  np.testing.assert_array_equal(var_w, var)
  with pytest.raises(ValueError, match=r"valid must have shape \(5,\)"):
    models.batch_moments(x, valid[:4])


@pytest.mark.parametrize("norm", _NORMS)
def test_norm_layers_in_a_model_see_only_valid_rows(norm):
  # An MLP keeps the compilation short; convolutions' spatial axes are covered by
  # test_batch_moments_over_valid_rows_only and by the trainer test below (small convnet).
  model = models.create("mlp", num_heads=2, num_classes=3, hidden=(8, 8), norm=norm)
  variables = models.init(model, _KEY, (1, 4, 4, 3))
  has_stats = "batch_stats" in variables
  x = _normal(3, (6, 4, 4, 3)) * 2.0 + 1.0
  valid = jnp.array([True, True, False, True, True, False])

  @jax.jit
  def run(x, valid):
    out = {}
    if has_stats:
      out["train"] = model.apply(variables, x, task=1, train=True, valid=valid,
                                 mutable=["batch_stats"])
    else:
      out["train"] = (model.apply(variables, x, task=1, train=True, valid=valid), {})
    out["eval"] = model.apply(variables, x, task=1, train=False, valid=valid)
    return out

  clean = run(x, valid)
  keep = np.asarray(valid)
  for fill in (0.0, 1e4, jnp.nan):
    dirty = run(x.at[~keep].set(fill), valid)
    # Valid rows' logits and the new running statistics: bit-identical.
    np.testing.assert_array_equal(dirty["train"][0][keep], clean["train"][0][keep])
    np.testing.assert_array_equal(dirty["eval"][keep], clean["eval"][keep])
    jax.tree.map(np.testing.assert_array_equal, dirty["train"][1], clean["train"][1])
  # ... and the same as a batch of the valid rows alone.
  alone = run(x[keep], jnp.ones(int(keep.sum()), bool))
  np.testing.assert_allclose(clean["train"][0][keep], alone["train"][0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(clean["eval"][keep], alone["eval"], rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               clean["train"][1], alone["train"][1])
  if has_stats:  # without valid the padding rows would change the statistics
    leaky = jax.jit(lambda x: model.apply(variables, x, task=1, train=True,
                                          mutable=["batch_stats"])[1])(x)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(leaky),
                                                     jax.tree.leaves(clean["train"][1])))


@pytest.mark.parametrize("norm", ("batch", "task_batch"))
def test_a_batch_without_valid_rows_leaves_running_statistics_unchanged(norm):
  model = models.create("mlp", num_heads=2, num_classes=3, hidden=(4,), norm=norm)
  variables = models.init(model, _KEY, (1, 2, 2, 1))
  y, new = jax.jit(lambda x: model.apply(variables, x, task=0, train=True,
                                         valid=jnp.zeros(3, bool), mutable=["batch_stats"]))(
                                             _normal(4, (3, 2, 2, 1)))
  jax.tree.map(np.testing.assert_array_equal, new["batch_stats"], variables["batch_stats"])
  assert np.all(np.isfinite(y))


# ------------------------------------------------------------------------------------------------
# The trainer: training and evaluation independent of the padding rows.


def _source(seed=0):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(4), 12)
  x = rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8)
  return data.from_arrays(x, y, x[::2], y[::2])


def _config(norm, **overrides):
  c = config_lib.base("finetune")
  c.dataset = "arrays"
  c.num_tasks = 2
  c.model = "small_convnet"
  c.width_multiplier = 0.125
  c.norm = norm
  c.batch_size = 8
  c.eval_batch_size = 8
  c.progress = False
  c.checkpoint_every_epochs = 0
  c.augment = "crop_flip"
  c.augment_padding = 2
  for k, v in overrides.items():
    c[k] = v
  return c


def _pad(d: train.TaskData, extra: int, kind: str, seed: int = 0) -> train.TaskData:
  """``d`` (no padding rows) with ``extra`` padding rows of zeros, repeated rows or noise."""
  n = int(d.n)
  x, y = np.asarray(d.x)[:n], np.asarray(d.y)[:n]
  if kind == "zeros":
    fx, fy = np.zeros((extra,) + x.shape[1:], np.uint8), np.zeros(extra, np.int32)
  elif kind == "repeated":
    fx, fy = x[:extra], y[:extra]
  else:
    rng = np.random.default_rng(seed)
    fx = rng.integers(0, 256, (extra,) + x.shape[1:], dtype=np.uint8)
    fy = rng.integers(0, 2, extra).astype(np.int32)
  ids = np.concatenate([np.asarray(d.ids)[:n], np.full(extra, -1, np.int32)])
  return train.TaskData(x=jnp.asarray(np.concatenate([x, fx])),
                        y=jnp.asarray(np.concatenate([y, fy])), ids=jnp.asarray(ids),
                        n=jnp.int32(n))


def _train(trainer, d):
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.train(state, 0, epochs=2, data=d)
  return jax.device_get((state.params, state.batch_stats))


@pytest.mark.parametrize("norm", _NORMS)
def test_training_is_bit_identical_whatever_the_padding_holds(norm):
  trainer = experiment.build(_config(norm), source=_source())
  d = trainer.task_data(0)
  n = int(d.n)
  assert n % 8 and int(d.x.shape[0]) == n  # the last batch is topped up
  runs = [_train(trainer, _pad(d, 5, kind)) for kind in ("zeros", "repeated", "noise")]
  for other in runs[1:]:
    jax.tree.map(np.testing.assert_array_equal, other, runs[0])
  assert sum(trainer.trace_counts[k] for k in ("run_steps", "host_step")) == 1

  # Evaluation: the padding of the split never changes an accuracy (batch statistics at test
  # time with 'batch_stats_only').
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.train(state, 0, epochs=1)
  test = trainer.task_data(0, "test")
  accs = {kind: trainer.accuracy(state, 0, current=0, data=_pad(test, 7, kind, seed=1))
          for kind in ("zeros", "repeated", "noise")}
  assert len(set(accs.values())) == 1, accs

  if norm != "batch_stats_only":
    # The same check would fail if the padding rows reached BatchNorm (the test can fail).
    leaky = experiment.build(_config(norm), source=_source())
    leaky.env.model_takes_valid = False
    a, b = (_train(leaky, _pad(d, 5, kind)) for kind in ("zeros", "noise"))
    assert any(not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------------------------------
# The last epoch's training statistics (read by CPG's "train accuracy > 0.95" rule).


def test_last_train_stats_are_the_last_epochs_running_means_and_survive_a_replay():
  trainer = experiment.build(_config("none", model="mlp", hidden=(16,), augment="none",
                                     learning_rate=0.1), source=_source())
  assert trainer.last_train_stats is None
  state = trainer.init_state()
  trainer.begin_task(0)
  # lr 0: the network does not change during the epoch, so the running means are the loss and
  # accuracy of the (dropout-free, norm-free, unaugmented) network over the training split.
  state = trainer.train(state, 0, epochs=1, lr=0.0)
  stats = trainer.last_train_stats
  want = trainer.accuracy(state, 0, split="train", current=0)
  assert stats.accuracy == pytest.approx(want, abs=1e-6)
  assert 0.0 < stats.loss < 10.0
  state = trainer.train(state, 0, epochs=3)
  trained = trainer.last_train_stats
  assert trained != stats
  log = dict(trainer._op_log)  # pylint: disable=protected-access
  assert log["train:1"] == [trained.loss, trained.accuracy]

  # A resumed run replays the task: the finished training operations are skipped and their
  # statistics come back from the recorded log.
  trainer.resume = train.Resume(task=0, op=2, epoch=0, op_log=log)
  trainer.begin_task(0)
  state = trainer.train(state, 0, epochs=1, lr=0.0)
  assert trainer.last_train_stats == stats
  state = trainer.train(state, 0, epochs=3)
  assert trainer.last_train_stats == trained
