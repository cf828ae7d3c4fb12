"""Individual models: one freshly initialised network per task (CPG's accuracy-goal reference).

Commands:
  python experiments/main.py --config=configs/individual.py --workdir=/tmp/individual
  python experiments/main.py --config=configs/individual.py:runlocal --workdir=/tmp/ind_small
  python experiments/main.py --config=configs/individual.py:fashion_mnist --workdir=/tmp/ind_fm
Expected runtime: as fine-tuning (runlocal: a few seconds).
Expected result: BWT exactly 0 (every task keeps its own network), T x the model's size. Its
validation accuracies (results.json ``val_accuracy_matrix`` diagonal) are the "individual"
accuracy goals of CPG / PAE (``--config.cpg.goal=fixed --config.cpg.goal_values=...``).
"""

from sparse_cl_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base("individual")
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
  elif arg == "fashion_mnist":
    config_lib.short_split_fashion_mnist(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'runlocal', 'fashion_mnist' or nothing")
  return c
