"""The trainer's rooms, each against an independent computation.

* evaluation: ``Trainer.accuracy`` and ``Trainer.outputs`` equal a direct eval-mode
  ``model.apply(..., train=False)`` of a BatchNorm model on the normalised images (running
  statistics, not the batch's);
* the learning rate each epoch trains with (the epoch index the schedule reads) against the step
  decay computed by hand, read back from the optimiser's injected hyperparameter;
* the operation log: numbering, skipping and the resume position by hand; keys as an explicit
  chain of ``fold_in``;
* placement: padding of evaluation splits to one size, fill values by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import data
from sparse_cl_jax import experiment
from sparse_cl_jax import train


def _source(seed=0, n_per_class=12, classes=4):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(classes), n_per_class)
  x = rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8)
  return data.from_arrays(x, y, x[::2], y[::2])


def _config(**overrides):
  c = config_lib.base("finetune")
  c.dataset = "arrays"
  c.num_tasks = 2
  c.model = "small_convnet"
  c.width_multiplier = 0.125
  c.norm = "batch"
  c.batch_size = 8
  c.eval_batch_size = 8
  c.progress = False
  c.checkpoint_every_epochs = 0
  for k, v in overrides.items():
    c[k] = v
  return c


def _direct_logits(trainer, state, x, task):
  """Eval-mode logits by hand: normalise with the stream's statistics, apply train=False."""
  s = trainer.stream
  xf = (np.asarray(x, np.float32) / 255.0 - np.asarray(s.mean)) / np.asarray(s.std)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return np.asarray(trainer.model.apply(variables, jnp.asarray(xf, jnp.float32), task=task,
                                        train=False))


@pytest.mark.parametrize("norm", ("batch", "task_batch"))
def test_accuracy_and_outputs_equal_a_direct_eval_mode_application(norm):
  trainer = experiment.build(_config(norm=norm), source=_source())
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.train(state, 0, epochs=2)
  stats = jax.tree.leaves(state.batch_stats)
  assert stats and any(np.abs(np.asarray(a)).sum() > 0 for a in stats)
  for t in (0, 1):
    d = trainer.task_data(t, "test")
    n = int(d.n)
    want = _direct_logits(trainer, state, np.asarray(d.x)[:n], t)
    # Training-mode application (batch statistics) differs: the comparison can tell them apart.
    s = trainer.stream
    xf = (np.asarray(d.x, np.float32)[:n] / 255.0 - np.asarray(s.mean)) / np.asarray(s.std)
    train_mode, _ = trainer.model.apply({"params": state.params,
                                         "batch_stats": state.batch_stats},
                                        jnp.asarray(xf, jnp.float32), task=t, train=True,
                                        mutable=["batch_stats"])
    assert not np.allclose(np.asarray(train_mode), want, atol=1e-3)

    got = np.asarray(trainer.outputs(state, d, view_task=t)["logits"])[:n]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    labels = np.asarray(d.y)[:n]
    acc = float(np.mean(np.argmax(want, -1) == labels))
    assert trainer.accuracy(state, t, split="test", current=t) == pytest.approx(acc, abs=1e-6)


def test_each_epoch_trains_with_the_step_decay_of_its_own_index():
  # 5 epochs, milestones at 40% and 80% (epochs 2 and 4), decay 0.1: by hand.
  lr, want = 0.05, [0.05, 0.05, 0.005, 0.005, 0.0005]
  trainer = experiment.build(_config(norm="none", optimizer="sgd", momentum=0.0,
                                     learning_rate=lr, lr_milestones=(0.4, 0.8), lr_decay=0.1),
                             source=_source())
  seen, used = [], []

  def on_epoch(tr, state, *, learning_rate, **unused):
    del tr, unused
    seen.append(float(learning_rate))
    used.append(float(optax.tree_utils.tree_get(state.opt_state, "learning_rate")))

  trainer.on_epoch = on_epoch
  state = trainer.init_state()
  trainer.begin_task(0)
  trainer.train(state, 0, epochs=5)
  np.testing.assert_allclose(seen, want, rtol=1e-6)
  np.testing.assert_allclose(used, want, rtol=1e-6)  # what the optimiser really applied


def test_lr_for_epoch_by_hand():
  assert train.lr_for_epoch(1.0, 0, 10, (0.5, 0.75), 0.1) == 1.0
  assert train.lr_for_epoch(1.0, 4, 10, (0.5, 0.75), 0.1) == 1.0
  assert train.lr_for_epoch(1.0, 5, 10, (0.5, 0.75), 0.1) == pytest.approx(0.1)
  assert train.lr_for_epoch(1.0, 7, 10, (0.5, 0.75), 0.1) == pytest.approx(0.1)
  assert train.lr_for_epoch(1.0, 8, 10, (0.5, 0.75), 0.1) == pytest.approx(0.01)
  # Milestones round to the nearest epoch: 0.3 * 5 = 1.5 -> 2.
  assert train.lr_for_epoch(2.0, 1, 5, (0.3,), 0.5) == 2.0
  assert train.lr_for_epoch(2.0, 2, 5, (0.3,), 0.5) == 1.0


def test_oplog_numbers_skips_and_resumes_by_hand():
  log = train.oplog.OpLog()
  log.begin_task(0)
  assert [log.next_op() for _ in range(3)] == [(0, False, 0), (1, False, 0), (2, False, 0)]
  log.log["x"] = 1
  log.begin_task(1)
  assert log.log == {} and log.op == 0  # a new task starts a new log
  # Resume task 2 inside operation 2 at epoch 3: ops 0, 1 are skipped, op 2 starts at epoch 3,
  # later ops run from epoch 0; the saved log comes back.
  log.resume = train.Resume(task=2, op=2, epoch=3, op_log={"0": 0.5})
  log.begin_task(2)
  assert log.log == {"0": 0.5}
  assert [log.next_op() for _ in range(4)] == [(0, True, 0), (1, True, 0), (2, False, 3),
                                               (3, False, 0)]
  assert log.resume is None
  # A resume point of another task does not apply.
  log.resume = train.Resume(task=5, op=1, epoch=1, op_log={"k": 1})
  log.begin_task(4)
  assert log.next_op() == (0, False, 0) and log.resume is None and log.log == {}


def test_op_key_is_the_fold_in_chain_of_seed_task_op_epoch():
  log = train.oplog.OpLog()
  log.begin_task(3)
  log.next_op()
  seed = jax.random.key_data(jax.random.key(7))
  k = jax.random.wrap_key_data(seed)
  want = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(k, 3), 1), 4)
  np.testing.assert_array_equal(jax.random.key_data(log.key(seed, 4)),
                                jax.random.key_data(want))
  want0 = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(k, 3), 0), 2)
  np.testing.assert_array_equal(jax.random.key_data(log.key(seed, 2, op=0)),
                                jax.random.key_data(want0))


def test_evaluation_splits_are_padded_to_one_size_with_the_documented_fills():
  src = _source(n_per_class=10, classes=4)
  trainer = experiment.build(_config(norm="none", val_fraction=0.3), source=src)
  s = trainer.stream
  n_eval = max(s.x_val.shape[1], s.x_test.shape[1])
  for d, split in ((trainer.val_data, "val"), (trainer.test_data, "test")):
    assert d.x.shape[1] == n_eval and d.ids.shape[1] == n_eval
    width = getattr(s, f"x_{split}").shape[1]
    np.testing.assert_array_equal(np.asarray(d.x)[:, :width], getattr(s, f"x_{split}"))
    assert np.all(np.asarray(d.x)[:, width:] == 0)
    assert np.all(np.asarray(d.ids)[:, width:] == -1)
    np.testing.assert_array_equal(np.asarray(d.n), getattr(s, f"n_{split}"))
