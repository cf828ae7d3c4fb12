"""Speed of the training step with on-device augmentation vs without (issue 11 item 1).

  .venv/bin/python benchmarks/augment_speed.py                     # small convnet, batch 128
  .venv/bin/python benchmarks/augment_speed.py --model=resnet18 --width=0.25
  .venv/bin/python benchmarks/augment_speed.py --augment=crop --epoch_loop=host

Two trainers are built on the same synthetic CIFAR-shaped data (one task of ``--images`` uint8
32x32x3 training images): one with ``config.augment='none'``, one with ``--augment`` (default
``crop_flip`` with 4-pixel padding, the papers' protocol). Each runs one epoch to compile, then
``--repeats`` epochs are timed, alternating between the two; the median training images per
second of each and their ratio are printed. The cost of the augmentation alone (the jitted
``augment.apply`` on one batch) is printed too. Results depend on the machine: say which one.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_cl_jax import augment  # noqa: E402
from sparse_cl_jax import config as config_lib  # noqa: E402
from sparse_cl_jax import data  # noqa: E402
from sparse_cl_jax import experiment  # noqa: E402

_MODEL = flags.DEFINE_string("model", "small_convnet", "A registered model name.")
_WIDTH = flags.DEFINE_float("width", 1.0, "width_multiplier of the model.")
_NORM = flags.DEFINE_string("norm", "task_batch", "Normalisation of the model.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Training batch size.")
_IMAGES = flags.DEFINE_integer("images", 2048, "Training images of the task.")
_AUGMENT = flags.DEFINE_enum("augment", "crop_flip", list(augment.AUGMENTS[1:]),
                             "The augmentation compared with 'none'.")
_PADDING = flags.DEFINE_integer("padding", 4, "augment_padding.")
_LOOP = flags.DEFINE_enum("epoch_loop", "auto", ["auto", "device", "host"], "config.epoch_loop")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed epochs of each variant.")


def make_source(n: int) -> data.Source:
  rng = np.random.default_rng(0)
  y = np.arange(n) % 10
  x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  return data.from_arrays(x, y, x[:200], y[:200], num_classes=10)


def make_config(aug: str):
  c = config_lib.base("finetune")
  c.dataset = "arrays"
  c.num_tasks = 1
  c.val_fraction = 0.0
  c.model = _MODEL.value
  c.width_multiplier = _WIDTH.value
  c.norm = _NORM.value
  c.batch_size = _BATCH.value
  c.learning_rate = 0.01
  c.augment = aug
  c.augment_padding = _PADDING.value
  c.epoch_loop = _LOOP.value
  c.progress = False
  c.checkpoint_every_epochs = 0
  return c


def main(argv):
  del argv
  source = make_source(_IMAGES.value)
  variants = {}
  for aug in ("none", _AUGMENT.value):
    trainer = experiment.build(make_config(aug), source=source)
    state = trainer.init_state()
    trainer.begin_task(0)
    t0 = time.perf_counter()
    state = trainer.train(state, 0, epochs=1)
    jax.block_until_ready(state)
    variants[aug] = {"trainer": trainer, "state": state, "first": time.perf_counter() - t0,
                     "times": []}
  for _ in range(_REPEATS.value):
    for aug, v in variants.items():
      t0 = time.perf_counter()
      v["state"] = v["trainer"].train(v["state"], 0, epochs=1)
      jax.block_until_ready(v["state"])
      v["times"].append(time.perf_counter() - t0)
  n = int(variants["none"]["trainer"].task_data(0).n)
  batch = jnp.asarray(source.x_train[:_BATCH.value])
  f = jax.jit(lambda k, x: augment.apply(_AUGMENT.value, k, x, padding=_PADDING.value))
  jax.block_until_ready(f(jax.random.key(0), batch))
  t0 = time.perf_counter()
  reps = 200
  for i in range(reps):
    out = f(jax.random.key(i), batch)
  jax.block_until_ready(out)
  alone_ms = 1000 * (time.perf_counter() - t0) / reps
  steps = -(-n // _BATCH.value)
  print(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs; model {_MODEL.value} x{_WIDTH.value:g} norm {_NORM.value}, "
        f"batch {_BATCH.value}, {n} images = {steps} steps per epoch, epoch loop "
        f"{variants['none']['trainer'].loop}")
  ips = {}
  for aug, v in variants.items():
    med = statistics.median(v["times"])
    ips[aug] = n / med
    print(f"  augment={aug:10s} {ips[aug]:9.0f} train images/s  {1000 * med / steps:7.2f} ms/step"
          f"  (first epoch with compilation {v['first']:.1f} s)")
  print(f"  ratio {_AUGMENT.value}/none: {ips[_AUGMENT.value] / ips['none']:.3f} "
        f"(throughput); augment.apply alone on one batch: {alone_ms:.3f} ms")


if __name__ == "__main__":
  app.run(main)
