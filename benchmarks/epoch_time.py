"""Harness overhead: a whole PackNet task vs a bare hand-written JAX loop on the same arrays.

  .venv/bin/python benchmarks/epoch_time.py            # 5-task Split Fashion-MNIST (make fashion-mnist)
  .venv/bin/python benchmarks/epoch_time.py --dataset=digits --repeats=3   # no download needed

A "whole PackNet task" is what the harness does for one task: `train` epochs + one-shot prune +
`retrain` epochs, then the accuracy of every task on the test and validation splits. The bare loop
trains the same small convnet (3x3 conv 32 -> pool -> 3x3 conv 64 -> pool -> dense 256 -> heads)
with the same optimiser, batch size (128) and number of epochs on the same device arrays, and
evaluates the same examples; it has no masks, no freezing, no recorded operations and no
checkpointing. Both are timed after a warm-up task (compilation excluded), alternating, and the
median over repeats is reported as images per second (training images x epochs + evaluated
images). The issue's target: the harness costs at most 10% over the bare loop (ratio <= 1.10).
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_cl_jax import config as config_lib  # noqa: E402
from sparse_cl_jax import experiment  # noqa: E402

_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "digits or fashion_mnist")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Training epochs per task.")
_RETRAIN = flags.DEFINE_integer("retrain", 1, "PackNet retraining epochs per task.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats of each variant.")
_MAX_TRAIN = flags.DEFINE_integer("max_train_per_task", 0, "0 = all training images.")


def make_config():
  c = config_lib.base("packnet")
  c.dataset = _DATASET.value
  c.num_tasks = 5
  c.model = "small_convnet"
  c.batch_size = 128
  c.epochs = _EPOCHS.value
  c.optimizer = "sgd"
  c.learning_rate = 0.02
  c.momentum = 0.9
  c.max_train_per_task = _MAX_TRAIN.value
  c.progress = False
  c.checkpoint_every_epochs = 0
  import ml_collections  # pylint: disable=g-import-not-at-top
  c.packnet = ml_collections.ConfigDict(
      {"prune_fraction": 0.6, "retrain_epochs": _RETRAIN.value, "retrain_lr": 0.002})
  return c


def harness_task(trainer, state, t):
  trainer.begin_task(t)
  state = trainer.method.run_task(trainer, state, t)
  trainer.accuracy_row(state, t, "test")
  trainer.accuracy_row(state, t, "val")
  jax.block_until_ready(state)
  return state


def make_bare(trainer):
  """A hand-written loop: same model, optimiser and arrays; nothing else."""
  model, stream, bs = trainer.model, trainer.stream, trainer.batch_size
  tx = optax.sgd(trainer.config.learning_rate, momentum=trainer.config.momentum)

  def loss_fn(params, x, y, w, task):
    logits = model.apply({"params": params}, stream.normalize(x), task=task, train=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

  @jax.jit
  def epoch(params, opt_state, x, y, n, key, task):
    perm = jax.random.permutation(key, x.shape[0])
    perm = perm[jnp.argsort(jnp.where(perm < n, -1, perm), stable=True)]
    nb = (n + bs - 1) // bs

    def body(i, carry):
      p, s = carry
      pos = i * bs + jnp.arange(bs)
      idx = perm[jnp.minimum(pos, x.shape[0] - 1)]
      g = jax.grad(loss_fn)(p, x[idx], y[idx], (pos < n).astype(jnp.float32), task)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    return jax.lax.fori_loop(0, nb, body, (params, opt_state))

  @jax.jit
  def evaluate(params, x, y, n, task):
    eb = 500
    nb = -(-x.shape[0] // eb)

    def body(i, acc):
      pos = i * eb + jnp.arange(eb)
      idx = jnp.minimum(pos, x.shape[0] - 1)
      logits = model.apply({"params": params}, stream.normalize(x[idx]), task=task, train=False)
      return acc + jnp.sum((jnp.argmax(logits, -1) == y[idx]) * (pos < n))

    return jax.lax.fori_loop(0, nb, body, jnp.int32(0))

  def task_fn(params, t, epochs):
    d = trainer.train_data
    opt_state = tx.init(params)
    tt = jnp.int32(t)
    for e in range(epochs):
      params, opt_state = epoch(params, opt_state, d.x[t], d.y[t], d.n[t],
                                jax.random.key(1000 * t + e), tt)
    for split in (trainer.test_data, trainer.val_data):
      for j in range(stream.num_tasks):
        evaluate(params, split.x[j], split.y[j], split.n[j], jnp.int32(j))
    jax.block_until_ready(params)
    return params

  return task_fn


def main(argv):
  del argv
  print(f"devices: {jax.devices()}  backend: {jax.default_backend()}  cpus: {os.cpu_count()}")
  config = make_config()
  trainer = experiment.build(config)
  stream = trainer.stream
  epochs_total = config.epochs + config.packnet.retrain_epochs
  bare = make_bare(trainer)
  n_eval = int(stream.n_test.sum() + stream.n_val.sum())

  state = harness_task(trainer, trainer.init_state(), 0)  # warm-up: compiles everything
  params = bare(jax.tree.map(jnp.copy, trainer.ctx.params), 0, epochs_total)
  times = {"harness": [], "bare": []}
  images = {}
  for r in range(_REPEATS.value):
    t = 1 + r % (stream.num_tasks - 1)
    n_img = int(stream.n_train[t]) * epochs_total + n_eval
    images[t] = n_img
    for name in (("harness", "bare") if r % 2 == 0 else ("bare", "harness")):
      start = time.perf_counter()
      if name == "harness":
        state = harness_task(trainer, state, t)
      else:
        params = bare(params, t, epochs_total)
      times[name].append(n_img / (time.perf_counter() - start))
  h, b = statistics.median(times["harness"]), statistics.median(times["bare"])
  print(f"5-task Split {config.dataset}, small convnet, batch {config.batch_size}, "
        f"{config.epochs} train + {config.packnet.retrain_epochs} retrain epochs per task, "
        f"{_REPEATS.value} repeats (medians)")
  print(f"  harness (whole PackNet task): {h:10.0f} images/s   {times['harness']}")
  print(f"  bare JAX loop               : {b:10.0f} images/s   {times['bare']}")
  print(f"  harness time / bare time    : {b / h:10.3f}   (target <= 1.10)")
  print(f"  trace counts: {dict(trainer.trace_counts)}")


if __name__ == "__main__":
  app.run(main)
