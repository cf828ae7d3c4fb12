"""Fine-tuning (lower bound) on 5-task Split-Digits, task-incremental.

Command:
  python experiments/main.py --config=configs/finetune.py --workdir=/tmp/finetune
  python experiments/main.py --config=configs/finetune.py:runlocal --workdir=/tmp/ft_small
Expected runtime: ~20 s on 2 CPU cores (runlocal: a few seconds).
Expected result: high accuracy on the last task, earlier tasks forgotten in part (BWT < 0).
Other data: --config.dataset=fashion_mnist (after `make fashion-mnist`).
"""

from sparse_cl_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base("finetune")
  c.dataset = "digits"
  c.num_tasks = 5
  c.model = "mlp"
  c.hidden = (256, 256)
  c.epochs = 10
  c.batch_size = 64
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.momentum = 0.9
  if arg == "runlocal":
    c.epochs = 2
    c.hidden = (32,)
    c.max_train_per_task = 100
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'runlocal' or nothing")
  return c
