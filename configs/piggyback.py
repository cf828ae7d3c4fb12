"""Piggyback (Mallya et al., ECCV 2018): per-task binary masks over a backbone frozen after task 1.

Task 1 trains the backbone; every later task learns a real-valued mask (init 0.01, binarised at
> 5e-3 with a straight-through gradient, Adam lr 1e-4 as coded) plus its own head and BN row.

Commands:
  python experiments/main.py --config=configs/piggyback.py --workdir=/tmp/piggyback
  python experiments/main.py --config=configs/piggyback.py:runlocal --workdir=/tmp/pb_small
  python experiments/main.py --config=configs/piggyback.py:fashion_mnist --workdir=/tmp/pb_fm
Expected runtime: ~30 s on 2 CPU cores for digits (runlocal: a few seconds).
Expected result: BWT exactly 0; later tasks limited by the task-1 backbone.
"""

import ml_collections

from sparse_cl_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base("piggyback")
  c.dataset = "digits"
  c.num_tasks = 5
  c.model = "mlp"
  c.hidden = (256, 256)
  c.epochs = 10
  c.batch_size = 64
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.piggyback = ml_collections.ConfigDict()
  c.piggyback.mask_init = 1e-2
  c.piggyback.threshold = 5e-3
  c.piggyback.mask_lr = 1e-4
  c.piggyback.mask_lr_milestones = ()  # fractions of the mask epochs
  c.piggyback.mask_lr_decay = 0.1
  c.piggyback.epochs = 0  # epochs of tasks 2..T; 0 = config.epochs
  c.piggyback.lr = 0.0  # head / BN learning rate of tasks 2..T; 0 = config.learning_rate
  if arg == "runlocal":
    c.epochs = 2
    c.hidden = (32,)
    c.max_train_per_task = 100
    c.piggyback.mask_lr = 1e-3
  elif arg == "fashion_mnist":
    config_lib.short_split_fashion_mnist(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'runlocal', 'fashion_mnist' or nothing")
  return c
