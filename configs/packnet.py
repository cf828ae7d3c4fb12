"""PackNet (Mallya & Lazebnik 2018) on 5-task Split-Digits, task-incremental.

Command:
  python experiments/main.py --config=configs/packnet.py --workdir=/tmp/packnet
  python experiments/main.py --config=configs/packnet.py:runlocal --workdir=/tmp/pn_small
  python experiments/main.py --config=configs/packnet.py:fashion_mnist --workdir=/tmp/pn_fmnist
Expected runtime: ~30 s on 2 CPU cores for digits (runlocal: a few seconds).
Expected result: BWT exactly 0 (earlier tasks' outputs are bit-identical after later tasks).
The CPG paper's PackNet baseline (as coded) prunes 60% of each task's weights per layer, one shot.
"""

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import fields


def get_config(arg: str | None = None):
  c = config_lib.base("packnet")
  c.dataset = "digits"
  c.num_tasks = 5
  c.model = "mlp"
  c.hidden = (256, 256)
  c.epochs = 10
  c.batch_size = 64
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.packnet = fields.Group()  # every field with its rule (sparse_cl_jax.fields)
  # of each layer's weights the task trained
  c.packnet.prune_fraction = fields.field(0.6, fields.Number(0, 1, hi_open=True))
  c.packnet.retrain_epochs = fields.field(5, fields.Int(0))
  # 0 = config.learning_rate * 0.1
  c.packnet.retrain_lr = fields.field(0.005, fields.Number(0))
  if arg == "runlocal":
    c.epochs = 2
    c.packnet.retrain_epochs = 1
    c.hidden = (32,)
    c.max_train_per_task = 100
  elif arg == "fashion_mnist":
    c.dataset = "fashion_mnist"
    c.model = "small_convnet"
    c.batch_size = 128
    c.epochs = 5
    c.packnet.retrain_epochs = 2
    c.learning_rate = 0.02
    c.packnet.retrain_lr = 0.002
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'runlocal', 'fashion_mnist' or nothing")
  return c
