"""Experiment configuration: the fields every config has, and their validation.

Config files in ``configs/`` start from :func:`base` and set their method's fields; launchers call
:func:`validate` before anything runs, so a bad value fails at once with a message that names the
field, the value and what is allowed.

Example::

  from sparse_cl_jax import config as config_lib
  c = config_lib.base(method="packnet")
  c.dataset, c.num_tasks, c.epochs = "digits", 5, 10
  config_lib.validate(c)
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from sparse_cl_jax import augment as augment_lib

DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "tiny_imagenet",
            "mini_imagenet", "arrays")
SCENARIOS = ("split", "permuted")
INCREMENTAL = ("task", "class")
OPTIMIZERS = ("sgd", "adam", "adamw")
NORMS = ("auto", "batch", "task_batch", "batch_stats_only", "none")
WANDB_MODES = ("disabled", "offline", "online")


def base(method: str) -> ml_collections.ConfigDict:
  """The shared fields with defaults that suit the embedded digits data."""
  c = ml_collections.ConfigDict()
  c.method = method
  # Data.
  c.dataset = "digits"
  c.data_dir = ""  # "" = the source's default location
  c.scenario = "split"
  c.num_tasks = 5
  c.incremental = "task"
  c.class_order = "natural"  # "natural", "seed" (permutation from seed), or "3,1,..." explicit
  c.val_fraction = 0.1
  c.max_train_per_task = 0  # 0 = all
  c.max_eval_per_task = 0  # 0 = all
  # Training augmentation on the device, inside the jitted step (never at evaluation):
  # "none", "crop_flip" (random crop with augment_padding zero pixels per side, then a horizontal
  # flip: the CIFAR protocol of the papers), "crop" or "flip". See sparse_cl_jax/augment.py.
  c.augment = "none"
  c.augment_padding = 4
  # 0 = images as read; else every image is resized to image_size x image_size (bilinear,
  # antialiased) once on the host before the stream is built (DST's miniImageNet: 32).
  c.image_size = 0
  # Model.
  c.model = "mlp"
  c.hidden = (256, 256)  # MLP only
  c.norm = "auto"  # "auto": the method's preferred norm for models that have one
  c.width_multiplier = 1.0
  c.multi_head = True  # task-IL: one head per task; class-IL always uses one shared head
  # Further dataclass fields of the model, e.g. {"fc_layers": True} for CPG's VGG16-BN; checked
  # against the model's fields when it is built.
  c.model_kwargs = ml_collections.ConfigDict()
  # Optimisation.
  c.epochs = 10
  c.batch_size = 64
  c.eval_batch_size = 500
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 0.0
  c.lr_milestones = ()  # fractions of a phase's epochs, e.g. (0.5, 0.75)
  c.lr_decay = 0.1
  c.seed = 0
  # Running.
  c.num_devices = 1  # 0 = all local devices (data parallel through jax.sharding)
  c.checkpoint_every_epochs = 5  # 0 = only after every task
  # Stop the run (DivergenceError, nothing of the epoch saved) when an epoch's mean training loss
  # is above this or not finite; 0 = stop only on NaN/inf. Not part of the run's fingerprint.
  c.divergence_threshold = 1e4
  c.progress = True
  # Execution (none of these changes results): how an epoch's batches are looped ("auto",
  # "device" = lax.fori_loop per chunk, "host" = one jitted step per batch; see runtime.py) and
  # the persistent compilation cache ("" = $SPARSE_CL_JAX_CACHE_DIR or ~/.cache/sparse_cl_jax/xla,
  # "none" = off, or a directory).
  c.epoch_loop = "auto"
  # Arithmetic of the forward/backward pass: "float32", or "bfloat16" (mixed precision: params,
  # gradients, optimiser state and running statistics stay float32). Changes results slightly.
  c.compute_dtype = "float32"
  c.compilation_cache = ""
  # Experiment trackers besides metrics.csv and TensorBoard (sparse_cl_jax/trackers.py): Weights &
  # Biases logs the run when mode is "offline" (files in WORKDIR/wandb/, no network) or "online";
  # needs the wandb extra. Not part of the run's fingerprint: a resumed run may switch it.
  c.wandb = ml_collections.ConfigDict()
  c.wandb.mode = "disabled"  # one of WANDB_MODES
  c.wandb.project = "sparse_cl_jax"
  c.wandb.entity = ""  # "" = the default entity of your W&B login
  return c


def short_split_fashion_mnist(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The shortened 5-task Split Fashion-MNIST schedule of the CPG table (``docs/results.md``).

  Small convnet, 1000 training examples per task, 4 epochs, batch 128, lr 0.02 decayed x0.1 at
  50% and 80% of each phase: what ``configs/{cpg,pae,individual,piggyback}.py:fashion_mnist`` and
  ``benchmarks/cpg_results.py`` share so that their runs fit two CPU cores. Changes ``c`` in place.
  """
  c.dataset = "fashion_mnist"
  c.model = "small_convnet"
  c.batch_size = 128
  c.max_train_per_task = 1000
  c.epochs = 4
  c.learning_rate = 0.02
  c.lr_milestones = (0.5, 0.8)
  return c


def _check_choice(c, field: str, choices) -> None:
  value = c[field]
  if value not in choices:
    raise ValueError(f"config.{field}={value!r} is not valid; choose one of {list(choices)}")


def _check_positive(c, field: str, allow_zero: bool = False) -> None:
  value = c[field]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    need = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"config.{field}={value!r} must be a number {need}")


def class_order(c) -> Any:
  """The ``class_order`` argument of ``data.make_stream`` from the config string."""
  order = c.class_order
  if order in ("natural", None, ""):
    return "natural"
  if order == "seed":
    return None
  if isinstance(order, str):
    try:
      return [int(x) for x in order.split(",")]
    except ValueError:
      raise ValueError(f"config.class_order={order!r} must be 'natural', 'seed' or a "
                       "comma-separated list of class labels") from None
  return list(order)


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the shared fields; raises ``ValueError`` naming the bad field and value."""
  for field in ("method", "dataset", "scenario", "num_tasks", "incremental", "model", "epochs",
                "batch_size", "seed", "data_dir"):
    if field not in c:
      raise ValueError(f"config has no field {field!r} (start from sparse_cl_jax.config.base)")
  _check_choice(c, "dataset", DATASETS)
  _check_choice(c, "scenario", SCENARIOS)
  _check_choice(c, "incremental", INCREMENTAL)
  _check_choice(c, "optimizer", OPTIMIZERS)
  _check_choice(c, "norm", NORMS)
  if "epoch_loop" in c:
    _check_choice(c, "epoch_loop", ("auto", "device", "host"))
  if "compute_dtype" in c:
    _check_choice(c, "compute_dtype", ("float32", "bfloat16"))
  if "augment" in c:
    augment_lib.check(c.augment, c.get("augment_padding", 4))
  if "image_size" in c:
    size = c.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
      raise ValueError(f"config.image_size={size!r} must be an integer >= 0 (0 = keep the size "
                       "the images are read at)")
  for field in ("num_tasks", "batch_size", "eval_batch_size", "learning_rate",
                "width_multiplier"):
    _check_positive(c, field)
  if isinstance(c.epochs, bool) or not isinstance(c.epochs, int) or c.epochs < 1:
    raise ValueError(f"config.epochs={c.epochs!r} must be an integer >= 1 (the training epochs of "
                     "each task)")
  for field in ("weight_decay", "momentum", "max_train_per_task", "max_eval_per_task",
                "checkpoint_every_epochs", "num_devices"):
    _check_positive(c, field, allow_zero=True)
  if not isinstance(c.seed, int):
    raise ValueError(f"config.seed={c.seed!r} must be an integer")
  if not 0.0 <= c.val_fraction < 1.0:
    raise ValueError(f"config.val_fraction={c.val_fraction!r} must be in [0, 1)")
  if any(not 0.0 < m < 1.0 for m in c.lr_milestones):
    raise ValueError(f"config.lr_milestones={tuple(c.lr_milestones)} must be fractions in (0, 1)")
  if "divergence_threshold" in c:
    _check_positive(c, "divergence_threshold", allow_zero=True)
  class_order(c)
  if "wandb" in c:
    _check_wandb(c.wandb)
  return c


def _check_wandb(w) -> None:
  mode = w.get("mode", "disabled")
  if mode not in WANDB_MODES:
    raise ValueError(f"config.wandb.mode={mode!r} is not valid; choose one of {list(WANDB_MODES)}")
  for field in ("project", "entity"):
    value = w.get(field, "")
    if not isinstance(value, str):
      raise ValueError(f"config.wandb.{field}={value!r} must be a string")
  if mode != "disabled" and not w.get("project"):
    raise ValueError("config.wandb.project is empty; name the W&B project the run logs to")


def to_dict(c: ml_collections.ConfigDict) -> dict:
  """A JSON-able plain dict of the config (tuples as lists)."""

  def plain(v):
    if isinstance(v, ml_collections.ConfigDict):
      return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
      return [plain(x) for x in v]
    return v

  return plain(c)


def sibling_module(config_file: str, name: str):
  """The config file ``<name>.py`` beside ``config_file``, loaded as a module (for a preset file
  that reuses another's settings, e.g. ``configs/pae.py`` builds on ``configs/cpg.py``)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf field of ``config`` as a dotted path, in the config's order (groups recursed)."""
  out = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      out.extend(field_paths(value, path + "."))
    else:
      out.append(path)
  return out


def closest_fields(field: str, known: list[str]) -> list[str]:
  """Up to three dotted fields of ``known`` closest to ``field`` (for "did you mean")."""
  near = (difflib.get_close_matches(field, known, n=3, cutoff=0.85) or
          difflib.get_close_matches(field, known, n=3, cutoff=0.6))
  if not near:  # a typo in the last part only: compare the last parts
    last = field.rsplit(".", 1)[-1]
    near = [k for k in known if k.rsplit(".", 1)[-1] in
            difflib.get_close_matches(last, [x.rsplit(".", 1)[-1] for x in known], n=3)]
  return near[:3]
