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
from sparse_cl_jax import fields

DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "tiny_imagenet",
            "mini_imagenet", "arrays")
SCENARIOS = ("split", "permuted")
INCREMENTAL = ("task", "class")
OPTIMIZERS = ("sgd", "adam", "adamw")
NORMS = ("auto", "batch", "task_batch", "batch_stats_only", "none")
WANDB_MODES = ("disabled", "offline", "online")
EPOCH_LOOPS = ("auto", "device", "host")
COMPUTE_DTYPES = ("float32", "bfloat16")
# config.class_order: "natural", "seed", "" (natural) or comma-separated class labels.
CLASS_ORDER_PATTERN = r"natural|seed|\s*\d+\s*(,\s*\d+\s*)*"
CLASS_ORDER_WORDS = "'natural', 'seed' or a comma-separated list of class labels"


def base(method: str) -> ml_collections.ConfigDict:
  """The shared fields with defaults that suit the embedded digits data.

  Each field is declared with its rule (:mod:`sparse_cl_jax.fields`); :func:`validate` checks them
  and those of the method's group.
  """
  f = fields.field
  Number, Int, Text = fields.Number, fields.Int, fields.Text  # pylint: disable=invalid-name
  c = fields.Group()
  c.method = f(method, Text(nonempty=True, hint="a registered method (sparse_cl_jax.methods)"))
  # Data.
  c.dataset = f("digits", fields.Choice(DATASETS))
  c.data_dir = f("", Text())  # "" = the source's default location
  c.scenario = f("split", fields.Choice(SCENARIOS))
  c.num_tasks = f(5, Int(1))
  c.incremental = f("task", fields.Choice(INCREMENTAL))
  # "natural", "seed" (permutation from seed), or "3,1,..." explicit
  c.class_order = f("natural", Text(pattern=CLASS_ORDER_PATTERN, allowed=CLASS_ORDER_WORDS))
  c.val_fraction = f(0.1, Number(0, 1, hi_open=True))
  c.max_train_per_task = f(0, Int(0))  # 0 = all
  c.max_eval_per_task = f(0, Int(0))  # 0 = all
  # Training augmentation on the device, inside the jitted step (never at evaluation):
  # "none", "crop_flip" (random crop with augment_padding zero pixels per side, then a horizontal
  # flip: the CIFAR protocol of the papers), "crop" or "flip". See sparse_cl_jax/augment.py.
  c.augment = f("none", fields.Choice(augment_lib.AUGMENTS))
  c.augment_padding = f(4, Int(0, hint="pixels of zero padding on each side before the random "
                                        "crop; 4 for 32x32 CIFAR"))
  # 0 = images as read; else every image is resized to image_size x image_size (bilinear,
  # antialiased) once on the host before the stream is built (DST's miniImageNet: 32).
  c.image_size = f(0, Int(0, hint="0 = keep the size the images are read at"))
  # Model.
  c.model = f("mlp", Text(nonempty=True, hint="a registered model (sparse_cl_jax.models)"))
  c.hidden = f((256, 256), fields.Seq(Int(1)))  # MLP only
  # "auto": the method's preferred norm for models that have one
  c.norm = f("auto", fields.Choice(NORMS))
  c.width_multiplier = f(1.0, Number(0, lo_open=True))
  # task-IL: one head per task; class-IL always uses one shared head
  c.multi_head = f(True, fields.Flag())
  # Further dataclass fields of the model, e.g. {"fc_layers": True} for CPG's VGG16-BN; checked
  # against the model's fields when it is built.
  c.model_kwargs = f(ml_collections.ConfigDict(),
                     fields.Elsewhere("experiment.check_names (the model's dataclass fields)"))
  # Optimisation.
  c.epochs = f(10, Int(1, hint="the training epochs of each task"))
  c.batch_size = f(64, Int(1))
  c.eval_batch_size = f(500, Int(1))
  c.optimizer = f("sgd", fields.Choice(OPTIMIZERS))
  c.learning_rate = f(0.05, Number(0, lo_open=True))
  c.momentum = f(0.9, Number(0, 1, hi_open=True))
  c.nesterov = f(False, fields.Flag())
  c.weight_decay = f(0.0, Number(0))
  # fractions of a phase's epochs, e.g. (0.5, 0.75)
  c.lr_milestones = f((), fields.Seq(Number(0, 1, lo_open=True, hi_open=True)))
  c.lr_decay = f(0.1, Number(0))
  c.seed = f(0, Int(0, 2**63 - 1))
  # Running.
  # 0 = all local devices (data parallel through jax.sharding)
  c.num_devices = f(1, Int(0))
  c.checkpoint_every_epochs = f(5, Int(0))  # 0 = only after every task
  # Stop the run (DivergenceError, nothing of the epoch saved) when an epoch's mean training loss
  # is above this or not finite; 0 = stop only on NaN/inf. Not part of the run's fingerprint.
  c.divergence_threshold = f(1e4, Number(0))
  c.progress = f(True, fields.Flag())
  # Execution (none of these changes results): how an epoch's batches are looped ("auto",
  # "device" = lax.fori_loop per chunk, "host" = one jitted step per batch; see runtime.py) and
  # the persistent compilation cache ("" = $SPARSE_CL_JAX_CACHE_DIR or ~/.cache/sparse_cl_jax/xla,
  # "none" = off, or a directory).
  c.epoch_loop = f("auto", fields.Choice(EPOCH_LOOPS))
  # Arithmetic of the forward/backward pass: "float32", or "bfloat16" (mixed precision: params,
  # gradients, optimiser state and running statistics stay float32). Changes results slightly.
  c.compute_dtype = f("float32", fields.Choice(COMPUTE_DTYPES))
  c.compilation_cache = f("", Text())
  # Experiment trackers besides metrics.csv and TensorBoard (sparse_cl_jax/trackers.py): Weights &
  # Biases logs the run when mode is "offline" (files in WORKDIR/wandb/, no network) or "online";
  # needs the wandb extra. Not part of the run's fingerprint: a resumed run may switch it.
  c.wandb = fields.Group()
  c.wandb.mode = f("disabled", fields.Choice(WANDB_MODES))
  c.wandb.project = f("sparse_cl_jax", Text(), Text(
      nonempty=True, when=fields.when("mode", "disabled", negate=True),
      hint="name the W&B project the run logs to"))
  c.wandb.entity = f("", Text())  # "" = the default entity of your W&B login
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
      raise ValueError(f"config.class_order={order!r} must be {CLASS_ORDER_WORDS}") from None
  return list(order)


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every declared field of ``c`` and of its groups (the shared fields of :func:`base` and
  the method's ``c.<method>`` group) against its rule (:mod:`sparse_cl_jax.fields`).

  Raises:
    ValueError: one line naming the first bad field, its value and what is allowed, e.g.
      ``config.momentum=1.5 must be in [0, 1)``.
  """
  for field in ("method", "dataset", "scenario", "num_tasks", "incremental", "model", "epochs",
                "batch_size", "seed", "data_dir"):
    if field not in c:
      raise ValueError(f"config has no field {field!r} (start from sparse_cl_jax.config.base)")
  fields.check(c)
  return c


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
