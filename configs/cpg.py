"""CPG — Compacting, Picking and Growing (Hung et al., NeurIPS 2019), task-incremental.

Commands:
  python experiments/main.py --config=configs/cpg.py --workdir=/tmp/cpg
  python experiments/main.py --config=configs/cpg.py:runlocal --workdir=/tmp/cpg_small
  python experiments/main.py --config=configs/cpg.py:fashion_mnist --workdir=/tmp/cpg_fmnist
  python experiments/main.py --config=configs/cpg.py:cifar100 --workdir=/tmp/cpg_c100 \
      --config.data_dir=DIR  # DIR holds cifar-100-python.tar.gz or a TFDS tree (README, "Data")
Presets:
  (none)         5-task Split-Digits, MLP 256-256: ~1-2 min on 2 CPU cores.
  runlocal       a few seconds (conformance test).
  fashion_mnist  5-task Split Fashion-MNIST, small convnet, schedule shortened for 2 CPU cores
                 (1000 examples per task, 4 epochs; see docs/results.md and
                 benchmarks/cpg_results.py for the measured table).
  cifar100       the paper's 20-task CIFAR-100 (5 classes per superclass, CPG's order), VGG16-BN
                 with CPG's two FC-4096 layers (``model_kwargs.fc_layers``), as-coded schedule:
                 100 epochs SGD-nesterov lr 1e-2 (x0.1 at 50, 80), mask Adam 5e-4, stages
                 0.1..0.95 x 20 epochs, retrain 30, weight decay 4e-5 on the current task's
                 conv/FC weights only, per-task biases, each task's BN row starting from the
                 previous task's, training images randomly cropped (4-pixel zero padding) and
                 flipped as coded; days on one GPU. Goal: the as-coded individual-model accuracy;
                 --config.cpg.goal=fine_avg (or fine_max) gives the paper's Table 2 goals
                 (5 fine-tuning sequences at lr 5e-3, computed before task 1: 5x the cost of the
                 individual models). docs/fidelity.md lists what still differs.
Expected result: BWT exactly 0; expansion <= 1.5x; ACC at least PackNet's (paper, CIFAR-100:
CPG 80.9, PAE 77.1, PackNet 67.5).

``width_multiplier`` is the *maximum* width: sqrt(1.5) channels = 1.5x parameters, as coded. The
network starts allocated at 1x and grows to it when a task misses its accuracy goal.
"""

import math

from sparse_cl_jax import config as config_lib
from sparse_cl_jax.methods import cpg

# CIFAR-100 fine label -> superclass (the dataset's own coarse labels).
CIFAR100_COARSE = (4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10,
                   7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13,
                   14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1,
                   9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18,
                   1, 2, 15, 6, 0, 17, 8, 14, 13)


def superclass_order() -> str:
  """CIFAR-100 classes grouped by superclass 0..19 (CPG's 20 tasks), as a class_order string."""
  order = [c for s in range(20) for c in range(100) if CIFAR100_COARSE[c] == s]
  return ",".join(str(c) for c in order)


def apply_preset(c, arg):
  """Shared presets of cpg and pae; the maximum width follows ``c.cpg.levels``."""
  top = max(c.cpg.levels)
  c.width_multiplier = math.sqrt(top)
  if arg in (None, ""):
    pass
  elif arg == "runlocal":
    c.epochs = 2
    c.hidden = (32,)
    c.max_train_per_task = 100
    c.cpg.goal_epochs = 2
    c.cpg.stages = (0.5, 0.8)
    c.cpg.stage_epochs = 1
    c.cpg.ramp_epochs = 0.5
    c.cpg.prune_every = 1
    c.cpg.retrain_epochs = 1
  elif arg == "fashion_mnist":
    # Shortened to fit 2 shared CPU cores (benchmarks/cpg_results.py, docs/results.md):
    # 1000 training examples per task, 4 epochs, one epoch per compaction stage (ramp over its
    # first half), a coarser stage grid than as coded, 3 retraining epochs.
    config_lib.short_split_fashion_mnist(c)
    c.cpg.goal = "individual"
    c.cpg.goal_tolerance = 0.005  # ~6 of the 1200 validation examples (as coded 0.0)
    c.cpg.stages = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95)
    c.cpg.stage_epochs = 1
    c.cpg.ramp_epochs = 0.5
    c.cpg.prune_every = 1
    c.cpg.prune_lr = 0.002
    c.cpg.retrain_epochs = 3
    c.cpg.retrain_patience = 2
    # Three epochs at the retraining mask lr cannot re-learn a re-initialised picking mask (as
    # coded: 30 epochs), so the learned picks are kept and trained on instead.
    c.cpg.retrain_reinit_mask = False
  elif arg == "cifar100":
    c.dataset = "cifar100"
    c.num_tasks = 20
    c.class_order = superclass_order()
    c.model = "vgg16_bn"
    c.model_kwargs.fc_layers = True  # as coded: two FC-4096 layers before the heads
    c.batch_size = 32
    c.epochs = 100
    c.optimizer = "sgd"
    c.learning_rate = 1e-2
    c.momentum = 0.9
    c.nesterov = True
    # As coded: decay only the current task's conv/FC weights (not heads, BN rows, biases).
    c.weight_decay = 0.0
    c.cpg.weight_decay = 4e-5
    c.lr_milestones = (0.5, 0.8)
    # As coded (utils/cifar100_dataset.py): RandomCrop(32, padding=4) + RandomHorizontalFlip on
    # the training images, none on validation/test.
    c.augment = "crop_flip"
    c.augment_padding = 4
    c.cpg.min_train_acc = 0.95
    c.cpg.stop_at_first_miss = False
    c.cpg.per_task_biases = True
    c.cpg.norm_from_previous = True
    c.cpg.goal_finetune_lr = 5e-3  # experiment1/finetune_cifar100.sh (goal=fine_avg/fine_max)
    # The as-coded compaction and retraining schedule (get_config shortened it for digits):
    # stages of 20 epochs at lr 1e-3, cubic ramp over 4 epochs, mask update every 10 batches;
    # retraining up to 30 epochs at 1e-3 (mask 1e-4), patience 5.
    coded = cpg.default_config(c.method)
    for field in ("stage_epochs", "ramp_epochs", "prune_every", "prune_lr", "retrain_epochs",
                  "retrain_lr", "retrain_mask_lr", "retrain_patience"):
      c.cpg[field] = coded[field]
  else:
    raise ValueError(f"unknown config argument {arg!r}; use 'runlocal', 'fashion_mnist', "
                     "'cifar100' or nothing")
  return c


def get_config(arg: str | None = None):
  c = config_lib.base("cpg")
  c.dataset = "digits"
  c.num_tasks = 5
  c.model = "mlp"
  c.hidden = (256, 256)
  c.epochs = 10
  c.batch_size = 64
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.cpg = cpg.default_config("cpg")
  c.cpg.stage_epochs = 2
  c.cpg.ramp_epochs = 1.0
  c.cpg.prune_lr = 0.005
  c.cpg.retrain_epochs = 5
  c.cpg.retrain_patience = 2
  return apply_preset(c, arg)
