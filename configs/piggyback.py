"""Piggyback (Mallya et al., ECCV 2018): per-task binary masks over a backbone frozen after task 1.

Task 1 trains the backbone; every later task learns a real-valued mask (init 0.01, binarised at
> 5e-3 with a straight-through gradient, Adam lr 1e-4 as coded) plus its own head and BN row.

Commands:
  python experiments/main.py --config=configs/piggyback.py --workdir=/tmp/piggyback
  python experiments/main.py --config=configs/piggyback.py:runlocal --workdir=/tmp/pb_small
  python experiments/main.py --config=configs/piggyback.py:fashion_mnist --workdir=/tmp/pb_fm
  python experiments/main.py --config=configs/piggyback.py:cifar100 --workdir=/tmp/pb_c100 \
      --config.data_dir=DIR  # DIR holds cifar-100-python.tar.gz or a TFDS tree (README, "Data")
Presets:
  (none)         5-task Split-Digits, MLP 256-256: ~30 s on 2 CPU cores.
  runlocal       a few seconds (conformance test).
  fashion_mnist  5-task Split Fashion-MNIST, the shortened schedule of configs/cpg.py.
  cifar100       Piggyback as a baseline in CPG's CIFAR-100 setting (as the CPG authors compare
                 against it; no such run is reported by either paper): CPG's 20 superclass tasks
                 and VGG16-BN with two FC-4096 layers at 1x width, the backbone trained on task 1
                 with CPG's schedule (100 epochs SGD-nesterov lr 1e-2, x0.1 at 50 and 80, batch
                 32), then per task a mask with Piggyback's as-coded settings (init 0.01,
                 threshold 5e-3, Adam 1e-4, x0.1 after 15 of 30 epochs); per-task heads and BN
                 rows at lr 1e-2; training images randomly cropped (4-pixel zero padding) and
                 flipped. 100 + 19 x 30 epochs of 2,250 training images; its runtime has
                 not been measured (no CIFAR-100 files here).
Expected result: BWT exactly 0; later tasks limited by the task-1 backbone.
"""

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import fields


def _cpg_config_module():
  return config_lib.sibling_module(__file__, "cpg")


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
  f, Number = fields.field, fields.Number
  c.piggyback = fields.Group()  # every field with its rule (sparse_cl_jax.fields)
  c.piggyback.mask_init = f(1e-2, Number())
  c.piggyback.threshold = f(5e-3, Number())
  c.piggyback.mask_lr = f(1e-4, Number(0, lo_open=True))
  # fractions of the mask epochs
  c.piggyback.mask_lr_milestones = f((), fields.Seq(Number(0, 1, lo_open=True, hi_open=True)))
  c.piggyback.mask_lr_decay = f(0.1, Number(0))
  c.piggyback.epochs = f(0, fields.Int(0))  # epochs of tasks 2..T; 0 = config.epochs
  # head / BN learning rate of tasks 2..T; 0 = config.learning_rate
  c.piggyback.lr = f(0.0, Number(0))
  if arg == "runlocal":
    c.epochs = 2
    c.hidden = (32,)
    c.max_train_per_task = 100
    c.piggyback.mask_lr = 1e-3
  elif arg == "fashion_mnist":
    config_lib.short_split_fashion_mnist(c)
  elif arg == "cifar100":
    c.dataset = "cifar100"
    c.num_tasks = 20
    c.class_order = _cpg_config_module().superclass_order()
    c.model = "vgg16_bn"
    c.model_kwargs.fc_layers = True
    c.batch_size = 32
    c.epochs = 100  # the task-1 backbone
    c.learning_rate = 1e-2
    c.momentum = 0.9
    c.nesterov = True
    c.lr_milestones = (0.5, 0.8)
    c.augment = "crop_flip"
    c.augment_padding = 4
    c.piggyback.epochs = 30
    c.piggyback.mask_lr = 1e-4
    c.piggyback.mask_lr_milestones = (0.5,)  # as coded: x0.1 every 15 of the 30 epochs
    c.piggyback.mask_lr_decay = 0.1
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'runlocal', 'fashion_mnist', "
                     "'cifar100' or nothing")
  return c
