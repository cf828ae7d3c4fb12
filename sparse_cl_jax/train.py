"""The jitted continual-learning loop: train/eval steps, recorded phase operations, resumption.

Layer 5 of the design. One :class:`Trainer` serves a whole task stream:

* The stream's arrays live on the device(s) once; a task's data is selected with a traced index.
* ``run_steps`` (a chunk of an epoch: a ``lax.fori_loop`` over batches) and ``eval_counts`` are
  jitted once: the task id, step, learning rates and every element-wise mask are traced values, so
  all tasks and phases of the same kind share one compilation. ``trace_counts`` counts traces so
  tests can assert it.
* A method drives its phases through three *recorded* operations: :meth:`Trainer.train`,
  :meth:`Trainer.apply` and :meth:`Trainer.evaluate`. Each gets a sequence number within the task;
  checkpoints store the state with the (operation, epoch) reached and the results of evaluations.
  On resume the method's ``run_task`` is replayed: finished operations are skipped (evaluations
  return their recorded values), and the interrupted training operation continues at its epoch.
  Randomness is derived from (seed, task, operation, epoch), so a resumed run ends with the same
  results as one that was never interrupted.
* Training augmentation (``config.augment``, :mod:`sparse_cl_jax.augment`) runs inside the jitted
  step on the gathered ``uint8`` batch, keyed by (seed, task, operation, epoch, batch); evaluation
  never augments.
* Padding never reaches a statistic: the rows that top up the last batch of an epoch (or of an
  evaluation pass) are passed to the model as ``valid=False`` (every norm layer of
  :mod:`sparse_cl_jax.models` leaves them out of its batch and running statistics) and weigh 0 in
  the loss and the accuracy.
* :meth:`Trainer.train` leaves the last epoch's running training (loss, accuracy) in
  :attr:`Trainer.last_train_stats` (also when a resumed run skips the operation).
* With more than one device (``config.num_devices``), batches are sharded over a ``jax.sharding``
  mesh axis ``'data'`` and the state is replicated: plain data parallelism by GSPMD.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
from typing import Any, Callable, NamedTuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from sparse_cl_jax import augment as augment_lib
from sparse_cl_jax import data as data_lib
from sparse_cl_jax import reliability
from sparse_cl_jax import runtime
from sparse_cl_jax import types
from sparse_cl_jax.methods import base


class TrainState(NamedTuple):
  """Everything that changes during a run (a pytree; checkpointed whole)."""
  params: Any
  batch_stats: Any  # {} when the model has no running statistics
  opt_state: Any
  aux: Any  # method-trained variables other than params ({} if none)
  aux_opt_state: Any
  method: Any  # the method's non-trainable state
  step: jax.Array  # int32, global step counter


class DeviceData(NamedTuple):
  """One split of the stream on the device: [T, N_max, ...] arrays and valid counts [T]."""
  x: jax.Array
  y: jax.Array
  ids: jax.Array
  n: jax.Array


class EpochStats(NamedTuple):
  """Running means over one training epoch's valid rows (what the progress bar shows)."""
  loss: float
  accuracy: float


class TaskData(NamedTuple):
  """One task's padded arrays (or any same-shaped replacement: exemplars, data subsets)."""
  x: jax.Array  # uint8 [N_max, H, W, C]
  y: jax.Array  # int32 [N_max]
  ids: jax.Array  # int32 [N_max]
  n: jax.Array  # int32 scalar: valid rows


SOURCE_ORDERS = ("epoch", "cycle")


class Source(NamedTuple):
  """One on-device source of the multi-source step (``Trainer.train(..., sources=...)``).

  Attributes:
    data: a dict of arrays with a common leading row axis (padded to a fixed capacity, so shapes
      never change between tasks or rounds) and the key ``'n'`` (int32 scalar: valid rows; rows
      ``>= n`` are never drawn). ``'x'`` holds ``uint8`` images when ``augment`` is on; every other
      key (``'y'``, ``'ids'``, stored logits ...) is gathered alongside.
    batch_size: rows per step (static: another size is another compiled step kind).
    order: ``'epoch'`` (exactly one source: an epoch is one pass over its valid rows in a fresh
      random order; the last batch is topped up with ``valid=False`` rows) or ``'cycle'`` (a fresh
      random order of its own each epoch, restarted from its start when exhausted; every row is
      valid unless ``n == 0``).
    augment: apply ``config.augment`` to the gathered ``'x'``.
  """
  data: dict
  batch_size: int
  order: str = "cycle"
  augment: bool = True


class Forward:
  """The trainer's model application inside a step, handed to ``Method.step_loss``.

  ``fwd(fp, batch_stats, x, valid, task, train=True) -> (logits f32 [B, K], new_batch_stats)``
  normalises the ``uint8`` images, applies the compute dtype, passes ``valid`` to the model (padding
  rows stay out of norm statistics) and draws the step's dropout key. ``fwd.features(...)`` also
  returns the penultimate features (the input of the model's ``head``, flattened to ``[B, D]``).
  """

  def __init__(self, trainer: "Trainer", step):
    self._trainer = trainer
    self._step = step

  def __call__(self, fp, batch_stats, x, valid, task, *, train: bool = True):
    return self._trainer._apply_model(fp, batch_stats, x, task, train, self._step, valid)

  def features(self, fp, batch_stats, x, valid, task, *, train: bool = True):
    captured = []

    def grab(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and context.module.name == "head" and not captured:
        captured.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      logits, stats = self(fp, batch_stats, x, valid, task, train=train)
    if not captured:
      raise ValueError("the model has no top-level module named 'head' whose input could be read "
                       "as the penultimate features; every model of sparse_cl_jax.models has one")
    feats = captured[0].astype(jnp.float32)
    return feats.reshape(feats.shape[0], -1), logits, stats


def _as_dict(data) -> dict:
  """A source's data as a plain dict (a NamedTuple such as :class:`TaskData` is accepted)."""
  return dict(data._asdict()) if hasattr(data, "_asdict") else dict(data)


def _check_sources(sources: dict) -> tuple:
  """The static description ``((name, batch_size, order, augment), ...)`` of ``sources``."""
  if not sources:
    raise ValueError("sources must name at least one train.Source")
  spec = []
  for name in sorted(sources):
    src = sources[name]
    if not isinstance(src, Source):
      raise ValueError(f"sources[{name!r}] is a {type(src).__name__}; pass a train.Source")
    if src.order not in SOURCE_ORDERS:
      raise ValueError(f"sources[{name!r}].order={src.order!r}; choose one of {SOURCE_ORDERS}")
    if isinstance(src.batch_size, bool) or not isinstance(src.batch_size, int) or \
        src.batch_size < 1:
      raise ValueError(f"sources[{name!r}].batch_size={src.batch_size!r} must be an int >= 1")
    if "n" not in _as_dict(src.data):
      raise ValueError(f"sources[{name!r}].data has no 'n' (the number of valid rows)")
    if src.augment and "x" not in _as_dict(src.data):
      raise ValueError(f"sources[{name!r}] asks for augmentation but its data has no 'x'")
    spec.append((name, src.batch_size, src.order, bool(src.augment)))
  epochs = [s[0] for s in spec if s[2] == "epoch"]
  if len(epochs) != 1:
    raise ValueError(f"exactly one source must have order='epoch' (it defines the epoch); got "
                     f"{epochs or 'none'}")
  return tuple(spec)


def make_base_tx(config) -> optax.GradientTransformation:
  """The base optimiser from the config, with the learning rate injected as a traced value."""

  def build(learning_rate):
    if config.optimizer == "sgd":
      parts = []
      if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay))
      parts.append(optax.sgd(learning_rate, momentum=config.momentum or None,
                             nesterov=bool(config.nesterov)))
      return optax.chain(*parts)
    if config.optimizer == "adam":
      parts = []
      if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay))
      parts.append(optax.adam(learning_rate))
      return optax.chain(*parts)
    return optax.adamw(learning_rate, weight_decay=config.weight_decay)

  return optax.inject_hyperparams(build)(learning_rate=config.learning_rate)


def lr_for_epoch(base_lr: float, epoch: int, epochs: int, milestones, decay: float) -> float:
  """Step decay: multiply by ``decay`` at each milestone (fractions of the phase's epochs)."""
  passed = sum(1 for m in milestones if epoch >= int(round(m * epochs)))
  return float(base_lr * decay ** passed)


# Salt folded into an epoch's key to derive the augmentation keys (the permutation uses the key).
_AUGMENT_SALT = 0x617567


def _train_log_key(op: int) -> str:
  """The op-log entry of training operation ``op``: its last epoch's ``[loss, accuracy]``."""
  return f"train:{op}"


def _steps_log_key(op: int) -> str:
  """The op-log entry of training operation ``op``: ``[epochs run, optimiser steps run]``."""
  return f"steps:{op}"


@dataclasses.dataclass
class Resume:
  """Where an interrupted run stopped: task, operation number, epochs done, recorded results."""
  task: int
  op: int
  epoch: int
  op_log: dict


class Trainer:
  """Runs a method's phases on one task stream with jitted steps (see the module docstring)."""

  # Called after every training epoch (after the divergence check, before the epoch's checkpoint)
  # as on_epoch(trainer, state, task=, phase=, op=, epoch=, epochs=, loss=, accuracy=,
  # learning_rate=, bar=): the harness's per-epoch log. ``state`` is read, never changed.
  on_epoch: Callable[..., None] | None = None

  def __init__(self, *, config, model, stream, method: base.Method, ctx: base.Context,
               save_fn: Callable[[TrainState, dict], None] | None = None):
    self.config = config
    self.model = model
    self.stream = stream
    self.method = method
    self.ctx = ctx
    self.save_fn = save_fn
    self.trace_counts: collections.Counter = collections.Counter()
    self.has_batch_stats = "batch_stats" in ctx.variables
    self.class_il = stream.incremental == "class"
    self.tx = method.wrap_tx(make_base_tx(config))
    self.aux_tx = method.aux_tx or optax.identity()
    self.batch_size = int(config.batch_size)
    self.compute_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[
        config.get("compute_dtype", "float32")]
    self.eval_batch_size = int(config.eval_batch_size)
    self.key = jax.random.key_data(jax.random.key(config.seed))
    self.run_meta: dict = {}
    self.resume: Resume | None = None
    self._task = -1
    self._op = 0
    self._op_log: dict = {}
    self._initial_params = None
    # The last epoch's (loss, accuracy) of the latest train() call; None before any epoch ran.
    self.last_train_stats: EpochStats | None = None
    # Epochs and optimiser steps the latest train() call ran (replayed on resume).
    self.last_train_epochs = 0
    self.last_train_steps = 0
    self.augment = str(config.get("augment", "none"))
    self.augment_padding = config.get("augment_padding", 4)
    augment_lib.check(self.augment, self.augment_padding)
    # Models of this package take ``valid`` (padding rows left out of batch statistics); a user's
    # model without that keyword is called as before.
    self._model_takes_valid = "valid" in inspect.signature(type(model).__call__).parameters

    n_dev = int(config.num_devices) or jax.local_device_count()
    if n_dev > jax.local_device_count():
      raise ValueError(f"config.num_devices={n_dev} but only {jax.local_device_count()} local "
                       "devices exist")
    self.mesh = None
    if n_dev > 1:
      if self.batch_size % n_dev or self.eval_batch_size % n_dev:
        raise ValueError(f"config.batch_size={self.batch_size} and eval_batch_size="
                         f"{self.eval_batch_size} must be divisible by the {n_dev} devices")
      self.mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:n_dev]), ("data",))
    self.replicated = (jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
                       if self.mesh is not None else None)

    self.train_data = self._to_device("train")
    # Validation and test are padded to one size so that evaluation compiles once for both.
    n_eval = max(stream.x_val.shape[1], stream.x_test.shape[1])
    self.val_data = self._to_device("val", pad_to=n_eval)
    self.test_data = self._to_device("test", pad_to=n_eval)
    self.head_mask = self.put(jnp.asarray(stream.head_mask))
    # What differs between runs of the same shapes (the seed's key, the split's normalisation,
    # the class layout) reaches the jitted functions as data, never as constants: runs that
    # differ only in these (the cells of a seed sweep) share every compiled step, also through
    # the persistent compilation cache. ``self._c`` is what the step bodies read: these device
    # arrays, or their tracers while a jitted function is traced.
    self._consts = self.put({
        "key": self.key, "mean": jnp.asarray(stream.mean, jnp.float32),
        "std": jnp.asarray(stream.std, jnp.float32), "head_mask": jnp.asarray(stream.head_mask)})
    self._c = self._consts

    self.loop = runtime.epoch_loop(config.get("epoch_loop", "auto"))
    self._run_steps = self._jit(self._run_steps_impl, donate_argnums=(0,))
    self._host_step = self._jit(self._host_step_impl, donate_argnums=(0, 1))
    self._run_multi = self._jit(self._run_multi_impl, donate_argnums=(0,),
                                static_argnames=("spec",))
    self._host_multi = self._jit(self._host_multi_impl, donate_argnums=(0, 1),
                                 static_argnames=("spec",))
    self._outputs = self._jit(self._outputs_impl, static_argnames=("features",))
    self._eval_counts = self._jit(self._eval_counts_impl)
    self._permutation = jax.jit(data_lib.epoch_permutation, static_argnums=(2,))

  def _jit(self, impl, **jit_kwargs):
    """``jax.jit(impl)`` that also takes the run's constants (``self._consts``) as data."""

    def with_consts(consts, *args, **kwargs):
      self._c = consts
      try:
        return impl(*args, **kwargs)
      finally:
        self._c = self._consts

    if "donate_argnums" in jit_kwargs:
      jit_kwargs["donate_argnums"] = tuple(i + 1 for i in jit_kwargs["donate_argnums"])
    jitted = jax.jit(with_consts, **jit_kwargs)
    return lambda *args, **kwargs: jitted(self._consts, *args, **kwargs)

  # ------------------------------------------------------------------------------------------------
  # Placement.

  def put(self, x):
    """``x`` (any pytree) placed on the trainer's device(s): replicated over the mesh if any."""
    if self.replicated is None:
      return jax.device_put(x)
    return jax.device_put(x, self.replicated)

  def initial_params(self) -> types.Params:
    """The network's initial params on the trainer's device(s), placed once and cached.

    Methods that re-initialise weights (growth, individual models, reference models) pass them
    to their jitted functions as data, so the values are not baked into the compiled code. The
    cached arrays are never donated: treat them as read-only.
    """
    if self._initial_params is None:
      self._initial_params = self.put(self.ctx.params)
    return self._initial_params

  def _to_device(self, split: str, pad_to: int | None = None) -> DeviceData:
    s = self.stream
    arrays = [np.asarray(getattr(s, f"{p}_{split}")) for p in ("x", "y", "ids", "n")]
    if pad_to is not None and pad_to > arrays[0].shape[1]:
      extra = pad_to - arrays[0].shape[1]
      for i, fill in ((0, 0), (1, 0), (2, -1)):
        widths = [(0, 0), (0, extra)] + [(0, 0)] * (arrays[i].ndim - 2)
        arrays[i] = np.pad(arrays[i], widths, constant_values=fill)
    return DeviceData(*(self.put(a) for a in arrays))

  def _shard_batch(self, x):
    if self.mesh is None:
      return x
    spec = jax.sharding.PartitionSpec("data", *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))

  def task_data(self, t: int, split: str = "train") -> TaskData:
    """Task ``t``'s padded arrays of a split, on the device."""
    d = {"train": self.train_data, "val": self.val_data, "test": self.test_data}[split]
    return TaskData(d.x[t], d.y[t], d.ids[t], d.n[t])

  def init_state(self) -> TrainState:
    """The initial state: fresh params, optimiser states, the method's state."""
    # Copies: the step donates the state, and the context's initial variables must survive it.
    v = jax.tree.map(jnp.copy, self.ctx.variables)
    aux = self.method.init_aux(self.ctx)
    state = TrainState(
        params=v["params"], batch_stats=v.get("batch_stats", {}),
        opt_state=self.tx.init(v["params"]), aux=aux, aux_opt_state=self.aux_tx.init(aux),
        method=self.method.init_state(self.ctx), step=jnp.zeros((), jnp.int32))
    return self.put(state)

  def reset_optimizer(self, state: TrainState) -> TrainState:
    """Fresh optimiser moments (same shapes: no recompilation)."""
    return state._replace(opt_state=self.put(self.tx.init(state.params)),
                          aux_opt_state=self.put(self.aux_tx.init(state.aux)))

  # ------------------------------------------------------------------------------------------------
  # Jitted bodies.

  def _logits(self, params, aux, mstate, batch_stats, x, task, current, train: bool, step=None,
              valid=None):
    fp = self.method.forward_params(params, aux, mstate, task, current)
    return self._apply_model(fp, batch_stats, x, task, train, step, valid)

  def _apply_model(self, fp, batch_stats, x, task, train: bool, step=None, valid=None):
    """Logits (float32) and new running statistics; ``valid`` [B]: rows that are real examples."""
    variables = {"params": fp}
    if self.has_batch_stats:
      variables["batch_stats"] = batch_stats
    x = data_lib.normalize(x, self._c["mean"], self._c["std"])
    if self.compute_dtype != jnp.float32:
      # Mixed precision: the forward and backward passes compute in compute_dtype; params, their
      # gradients (the transpose of this cast), the optimiser state, running statistics and the
      # loss stay float32.
      variables["params"] = jax.tree.map(
          lambda p: p.astype(self.compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
          fp)
      x = x.astype(self.compute_dtype)
    kwargs = {}
    if valid is not None and self._model_takes_valid:
      kwargs["valid"] = valid
    rngs = {}
    if train:  # dropout (CLNP's convnet): a key per global step, identical when replayed
      rngs["dropout"] = jax.random.fold_in(
          jax.random.fold_in(jax.random.wrap_key_data(self._c["key"]), 7), step)
    if train and self.has_batch_stats:
      logits, mutated = self.model.apply(variables, x, task=task, train=True,
                                         mutable=["batch_stats"], rngs=rngs, **kwargs)
      new_stats = mutated["batch_stats"]
    else:
      logits = self.model.apply(variables, x, task=task, train=train, rngs=rngs, **kwargs)
      new_stats = batch_stats
    return logits.astype(jnp.float32), new_stats

  def _mask_logits(self, logits, head_task):
    if self.method.eval_logits is not None:
      logits = self.method.eval_logits(logits)
    if not self.class_il:
      return logits
    seen = self._c["head_mask"][head_task]
    return jnp.where(seen[None, :], logits, jnp.finfo(logits.dtype).min)

  def _train_step(self, state: TrainState, x, y, w, task, lr, aux_lr, ids=None):
    self.trace_counts["train_step"] += 1
    opt_state, aux_opt_state = self._set_lrs(state, lr, aux_lr)
    if ids is None:
      ids = jnp.full(y.shape, -1, jnp.int32)

    real = w > 0

    def loss_fn(params, aux):
      logits, new_stats = self._logits(params, aux, state.method, state.batch_stats, x, task,
                                       task, train=True, step=state.step, valid=real)
      logits = self._mask_logits(logits, task)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      wsum = jnp.maximum(jnp.sum(w), 1.0)
      # where, not a product: a padding row contributes an exact 0 whatever its logits hold.
      loss = jnp.sum(jnp.where(real, ce * w, 0.0)) / wsum
      if self.method.penalty is not None:
        loss = loss + self.method.penalty(params, aux, state.method, task)
      return loss, (logits, new_stats)

    (loss, (logits, new_stats)), (grads, aux_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.aux)
    hit = jnp.argmax(logits, -1) == y
    mstate = state.method
    if self.method.after_step is not None:
      mstate = self.method.after_step(mstate, {"ids": ids, "correct": hit & real, "valid": real,
                                               "y": y}, task)
    new = self._apply_grads(state, grads, aux_grads, opt_state, aux_opt_state, task, new_stats,
                            mstate)
    correct = jnp.sum(jnp.where(real, hit * w, 0.0))
    return new, jnp.stack([loss * jnp.sum(w), correct, jnp.sum(w)])

  def _apply_grads(self, state: TrainState, grads, aux_grads, opt_state, aux_opt_state, task,
                   new_stats, mstate) -> TrainState:
    """The optimiser updates of params (``self.tx``) and aux variables; the step counter + 1."""
    # The transforms read the method's state from before the step (its masks are what the
    # gradients were taken with); after_step's statistics take effect from the next step.
    updates, opt_state = self.tx.update(grads, opt_state, state.params,
                                        **self.method.tx_args(state.method, task))
    params = optax.apply_updates(state.params, updates)
    aux = state.aux
    if jax.tree.leaves(aux):
      aux_updates, aux_opt_state = self.aux_tx.update(
          aux_grads, aux_opt_state, aux, **self.method.aux_tx_args(state.method, task))
      aux = optax.apply_updates(aux, aux_updates)
    return state._replace(params=params, batch_stats=new_stats, opt_state=opt_state, aux=aux,
                          aux_opt_state=aux_opt_state, method=mstate, step=state.step + 1)

  def _set_lrs(self, state: TrainState, lr, aux_lr):
    opt_state = optax.tree_utils.tree_set(state.opt_state, learning_rate=lr)
    aux_opt_state = state.aux_opt_state
    if jax.tree.leaves(state.aux):
      aux_opt_state = optax.tree_utils.tree_set(aux_opt_state, learning_rate=aux_lr)
    return opt_state, aux_opt_state

  def _multi_train_step(self, state: TrainState, batches, task, lr, aux_lr):
    """One step of ``method.step_loss`` over the gathered batches of several sources."""
    self.trace_counts["multi_train_step"] += 1
    opt_state, aux_opt_state = self._set_lrs(state, lr, aux_lr)
    fwd = Forward(self, state.step)

    def loss_fn(params, aux):
      loss, (new_stats, stats, outputs) = self.method.step_loss(
          fwd, params, aux, state.method, state.batch_stats, batches, task)
      if self.method.penalty is not None:
        loss = loss + self.method.penalty(params, aux, state.method, task)
      return loss, (new_stats, stats, outputs)

    (_, (new_stats, stats, outputs)), (grads, aux_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.aux)
    mstate = state.method
    if self.method.after_step is not None:
      mstate = self.method.after_step(mstate, outputs, task)
    new = self._apply_grads(state, grads, aux_grads, opt_state, aux_opt_state, task, new_stats,
                            mstate)
    return new, jnp.asarray(stats, jnp.float32).reshape(3)

  def augment_batch(self, x, aug_key, b):
    """``config.augment`` of the gathered ``uint8`` batch ``b``, keyed by ``(aug_key, b)``.

    ``aug_key`` is the epoch's augmentation key data (``uint32[2]``) that :meth:`train` derives
    from (seed, task, operation, epoch); ``None`` (a caller tracing the step alone, e.g. to count
    its FLOPs) uses the trainer's seed key. Identity when ``config.augment == 'none'``.
    """
    if self.augment == "none":
      return x
    base_key = self._c["key"] if aug_key is None else aug_key
    key = jax.random.fold_in(jax.random.wrap_key_data(base_key), b)
    return self._shard_batch(augment_lib.apply(self.augment, key, x,
                                               padding=self.augment_padding))

  def _batch_step(self, state: TrainState, data: TaskData, perm, b, task, lr, aux_lr,
                  aug_key=None):
    """Batch ``b`` of the epoch order ``perm``: gather and augment it on the device, one step."""
    idx, valid = data_lib.batch_indices(perm, b, self.batch_size, data.n)
    idx = self._shard_batch(idx)
    x = self.augment_batch(jnp.take(data.x, idx, axis=0), aug_key, b)
    y = jnp.take(data.y, idx, axis=0)
    ids = jnp.take(data.ids, idx, axis=0)
    w = self._shard_batch(valid.astype(jnp.float32))
    return self._train_step(state, x, y, w, task, lr, aux_lr, ids)

  def _source_aug_key(self, aug_key, i: int):
    """The augmentation key data of source number ``i`` of a multi-source step."""
    base_key = self._c["key"] if aug_key is None else aug_key
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(base_key), 0x5eed + i))

  def _multi_batch_step(self, state: TrainState, datas, perms, spec, b, task, lr, aux_lr,
                        aug_key=None):
    """Batch ``b`` of every source of ``spec`` gathered (and augmented) on the device; one step."""
    batches = {}
    for i, (name, bs, order, aug) in enumerate(spec):
      d, perm = datas[name], perms[name]
      n = jnp.asarray(d["n"], jnp.int32)
      if order == "epoch":
        idx, valid = data_lib.batch_indices(perm, b, bs, n)
      else:  # "cycle": this epoch's order of the source, from its start again when exhausted
        pos = (b * bs + jnp.arange(bs, dtype=jnp.int32)) % jnp.maximum(n, 1)
        idx = jnp.take(perm, pos)
        valid = jnp.broadcast_to(n > 0, (bs,))
      idx = self._shard_batch(idx)
      rows = {k: jnp.take(v, idx, axis=0) for k, v in d.items() if k != "n"}
      if aug and self.augment != "none":
        key = aug_key if order == "epoch" else self._source_aug_key(aug_key, i)
        rows["x"] = self.augment_batch(rows["x"], key, b)
      rows["valid"] = self._shard_batch(valid)
      batches[name] = rows
    return self._multi_train_step(state, batches, task, lr, aux_lr)

  def _run_multi_impl(self, state: TrainState, datas, perms, first, count, task, lr, aux_lr,
                      aug_key=None, *, spec):
    """Multi-source batches ``first .. first + count - 1`` (one XLA loop)."""
    self.trace_counts["run_multi_steps"] += 1

    def body(i, carry):
      st, totals = carry
      st, stats = self._multi_batch_step(st, datas, perms, spec, first + i, task, lr, aux_lr,
                                         aug_key)
      return st, totals + stats

    return jax.lax.fori_loop(0, count, body, (state, jnp.zeros(3, jnp.float32)))

  def _host_multi_impl(self, state: TrainState, totals, datas, perms, b, task, lr, aux_lr,
                       aug_key=None, *, spec):
    self.trace_counts["host_multi_step"] += 1
    state, stats = self._multi_batch_step(state, datas, perms, spec, b, task, lr, aux_lr, aug_key)
    return state, totals + stats

  def _run_steps_impl(self, state: TrainState, data: TaskData, perm, first, count, task, lr,
                      aux_lr, aug_key=None):
    """Batches ``first .. first + count - 1`` of the epoch order ``perm`` (one XLA loop)."""
    self.trace_counts["run_steps"] += 1

    def body(i, carry):
      st, totals = carry
      st, stats = self._batch_step(st, data, perm, first + i, task, lr, aux_lr, aug_key)
      return st, totals + stats

    return jax.lax.fori_loop(0, count, body, (state, jnp.zeros(3, jnp.float32)))

  def _host_step_impl(self, state: TrainState, totals, data: TaskData, perm, b, task, lr,
                      aux_lr, aug_key=None):
    """One batch as its own jitted call (the ``'host'`` epoch loop); stats summed on device."""
    self.trace_counts["host_step"] += 1
    state, stats = self._batch_step(state, data, perm, b, task, lr, aux_lr, aug_key)
    return state, totals + stats

  def _steps(self, state: TrainState, data, perm, first: int, count: int, task, lr,
             aux_lr, aug_key, spec=None):
    """Runs ``count`` batches from ``first`` with the loop :func:`runtime.epoch_loop` chose.

    With ``spec`` (multi-source), ``data`` and ``perm`` are dicts keyed by source name.
    """
    if spec is not None:
      if self.loop == "device":
        return self._run_multi(state, data, perm, jnp.int32(first), jnp.int32(count), task, lr,
                               aux_lr, aug_key, spec=spec)
      totals = jnp.zeros(3, jnp.float32)
      for b in range(first, first + count):
        state, totals = self._host_multi(state, totals, data, perm, jnp.int32(b), task, lr,
                                         aux_lr, aug_key, spec=spec)
      return state, totals
    if self.loop == "device":
      return self._run_steps(state, data, perm, jnp.int32(first), jnp.int32(count), task, lr,
                             aux_lr, aug_key)
    totals = jnp.zeros(3, jnp.float32)
    for b in range(first, first + count):
      state, totals = self._host_step(state, totals, data, perm, jnp.int32(b), task, lr, aux_lr,
                                      aug_key)
    return state, totals

  def _eval_counts_impl(self, state: TrainState, data: TaskData, view_task, current, head_task):
    """(correct, total) over the valid rows of ``data`` with the method's view of ``view_task``."""
    self.trace_counts["eval"] += 1
    eb = self.eval_batch_size
    n_max = data.x.shape[0]
    nb = -(-n_max // eb)
    # The method's view is computed once, outside the batch loop.
    fp = self.method.forward_params(state.params, state.aux, state.method, view_task, current)

    def body(i, acc):
      pos = i * eb + jnp.arange(eb, dtype=jnp.int32)
      idx = self._shard_batch(jnp.minimum(pos, n_max - 1))
      valid = (pos < data.n).astype(jnp.float32)
      x = jnp.take(data.x, idx, axis=0)
      y = jnp.take(data.y, idx, axis=0)
      logits, _ = self._apply_model(fp, state.batch_stats, x, view_task, train=False,
                                    valid=self._shard_batch(pos < data.n))
      logits = self._mask_logits(logits, head_task)
      hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
      return acc + jnp.stack([jnp.sum(hit * valid), jnp.sum(valid)])

    return jax.lax.fori_loop(0, nb, body, jnp.zeros(2, jnp.float32))

  def _outputs_impl(self, state: TrainState, x, n, view_task, current, *, features: bool):
    self.trace_counts["outputs"] += 1
    eb = self.eval_batch_size
    n_max = x.shape[0]
    nb = -(-n_max // eb)
    fp = self.method.forward_params(state.params, state.aux, state.method, view_task, current)
    fwd = Forward(self, None)

    def one(i):
      pos = i * eb + jnp.arange(eb, dtype=jnp.int32)
      idx = self._shard_batch(jnp.minimum(pos, n_max - 1))
      valid = self._shard_batch(pos < n)
      xb = jnp.take(x, idx, axis=0)
      if features:
        f, logits, _ = fwd.features(fp, state.batch_stats, xb, valid, view_task, train=False)
        return {"logits": logits, "features": f}
      logits, _ = fwd(fp, state.batch_stats, xb, valid, view_task, train=False)
      return {"logits": logits}

    out = jax.lax.map(one, jnp.arange(nb, dtype=jnp.int32))
    return jax.tree.map(lambda a: a.reshape((nb * eb,) + a.shape[2:])[:n_max], out)

  def outputs(self, state: TrainState, data, *, view_task: int, current: int | None = None,
              features: bool = False) -> dict:
    """Evaluation-mode outputs over every row of ``data``, on the device, in eval batches.

    Args:
      state: the train state (read, not donated).
      data: anything with ``x`` (``uint8`` [N, ...]) and ``n`` as attributes or dict keys
        (:class:`TaskData`, an ``ExemplarMemory``, a source's data dict).
      view_task / current: passed to ``method.forward_params`` (``current`` defaults to
        ``view_task``) and ``view_task`` to the model (head and per-task norm).
      features: also return the penultimate features (the input of the model's ``head``).

    Returns:
      ``{"logits": f32 [N, K_out]}`` (the raw outputs: no ``eval_logits``, no class masking) and,
      with ``features``, ``"features": f32 [N, D]``. Rows ``>= n`` hold outputs of repeated rows:
      ignore them.
    """
    get = (lambda k: data[k]) if isinstance(data, dict) else (lambda k: getattr(data, k))
    current = view_task if current is None else current
    return self._outputs(state, self.put(jnp.asarray(get("x"))), jnp.asarray(get("n"), jnp.int32),
                         jnp.int32(view_task), jnp.int32(current), features=bool(features))

  # ------------------------------------------------------------------------------------------------
  # Recorded operations (the only way a method's run_task touches the state).

  def begin_task(self, t: int) -> None:
    """Starts the operation counter of task ``t`` (called by the experiment loop)."""
    self._task = t
    self._op = 0
    if self.resume is not None and self.resume.task == t:
      self._op_log = dict(self.resume.op_log)
    else:
      self._op_log = {}
      self.resume = None

  def _next_op(self) -> tuple[int, bool, int]:
    """(operation number, skip it?, epoch to start from)."""
    i = self._op
    self._op += 1
    r = self.resume
    if r is None or r.task != self._task:
      return i, False, 0
    if i < r.op:
      return i, True, 0
    start = r.epoch if i == r.op else 0
    if i >= r.op:
      self.resume = None
    return i, False, start

  def op_key(self, epoch: int = 0, *, op: int | None = None) -> jax.Array:
    """A key derived from (seed, task, operation, epoch): identical when a run is replayed.

    ``op`` defaults to the operation about to be recorded next.
    """
    k = jax.random.wrap_key_data(self.key)
    op = self._op if op is None else op
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(k, self._task), op), epoch)

  def train(self, state: TrainState, t: int, *, epochs: int, phase: str = "train",
            lr: float | None = None, lr_milestones=None, lr_decay: float | None = None,
            aux_lr: float = 0.0, aux_lr_fn: Callable[[int], float] | None = None,
            data: TaskData | None = None, hook: Callable[[TrainState, int], TrainState] | None = None,
            hook_every: int = 0, reset_optimizer: bool = True,
            sources: dict[str, Source] | None = None,
            epoch_end: Callable[[TrainState, int], tuple[TrainState, bool]] | None = None
            ) -> TrainState:
    """Trains task ``t`` for ``epochs`` epochs (a recorded operation). Donates ``state``.

    Args:
      state: the train state (donated: do not use it afterwards).
      t: task index (selects the head, per-task norm and, by default, the data).
      epochs: number of epochs.
      phase: a label for logs and the progress bar.
      lr: base learning rate (default ``config.learning_rate``), step-decayed by ``lr_decay`` at
        ``lr_milestones`` (fractions of ``epochs``; default the config's).
      aux_lr / aux_lr_fn: learning rate of the method's aux variables (constant / per epoch).
      data: replacement training arrays of the same padded shape (exemplars, a data subset).
      hook: ``hook(state, steps_done) -> state`` run every ``hook_every`` steps of this operation
        (e.g. a topology update); it runs between jitted chunks, so the step itself stays plain.
      reset_optimizer: start from fresh optimiser moments.
      sources: the multi-source step: a dict of :class:`Source` (exactly one with
        ``order='epoch'``, which sets the epoch's length); every step gathers a batch of each and
        calls ``method.step_loss``. ``data`` must then be None. Randomness (orders, augmentation)
        derives from (seed, task, operation, epoch, source), so a resumed run replays exactly.
      epoch_end: ``epoch_end(state, epoch) -> (state, stop)`` runs on the host after every epoch
        (after the divergence check, before the epoch's checkpoint); ``stop`` ends the operation
        early (e.g. early-bird stopping). Keep whatever it decides on in ``state`` so that a
        resumed run decides the same.

    Afterwards :attr:`last_train_stats` holds the last epoch's running means of the training loss
    and accuracy over its valid rows (in training mode, on the augmented batches; CPG's "train
    accuracy" rule reads it). It is recorded in the operation log, so a resumed run that skips
    this operation restores it; so are :attr:`last_train_epochs` and :attr:`last_train_steps`
    (the epochs and optimiser steps the operation ran, all of them, before and after a resume).
    """
    i, skip, start = self._next_op()
    if skip:
      recorded = self._op_log.get(_train_log_key(i))
      self.last_train_stats = None if recorded is None else EpochStats(*map(float, recorded))
      self.last_train_epochs, self.last_train_steps = map(
          int, self._op_log.get(_steps_log_key(i), (0, 0)))
      return state
    self.last_train_stats = None
    self.last_train_epochs = self.last_train_steps = 0
    c = self.config
    lr = c.learning_rate if lr is None else lr
    milestones = c.lr_milestones if lr_milestones is None else lr_milestones
    decay = c.lr_decay if lr_decay is None else lr_decay
    spec = None
    if sources is not None:
      if data is not None:
        raise ValueError("train(): pass either data= or sources=, not both")
      spec = _check_sources(sources)
      # Copies of device arrays: a source may hold arrays of the state (e.g. a method's exemplar
      # memory), and the state's buffers are donated to every step.
      data = self.put(jax.tree.map(
          lambda a: jnp.copy(a) if isinstance(a, jax.Array) else a,
          {name: _as_dict(src.data) for name, src in sources.items()}))
      primary = next(s for s in spec if s[2] == "epoch")
      n_valid = int(data[primary[0]]["n"])
      nb = max(1, -(-n_valid // primary[1]))
      n_rows = {name: int(next(v for k, v in d.items() if k != "n").shape[0])
                for name, d in data.items()}
    else:
      data = self.task_data(t) if data is None else data
      n_valid = int(data.n)
      nb = max(1, -(-n_valid // self.batch_size))
      n_max = int(data.x.shape[0])
    if reset_optimizer and start == 0:
      state = self.reset_optimizer(state)
    task = jnp.int32(t)
    bar = tqdm.tqdm(total=epochs, initial=start, disable=not c.progress, leave=False,
                    desc=f"task {t + 1}/{self.stream.num_tasks} {phase}", unit="ep")
    steps_done = start * nb
    for epoch in range(start, epochs):
      epoch_key = self.op_key(epoch, op=i)
      if spec is None:
        perm = self._permutation(epoch_key, data.n, n_max)
      else:
        # The 'epoch' source is ordered exactly as data= would be; each other source by its own
        # key.
        perm = {name: self._permutation(
            epoch_key if order == "epoch" else jax.random.fold_in(epoch_key, 0x5eed + k),
            data[name]["n"], n_rows[name]) for k, (name, _, order, _) in enumerate(spec)}
      aug_key = jax.random.key_data(jax.random.fold_in(epoch_key, _AUGMENT_SALT))
      lr_e = jnp.float32(lr_for_epoch(lr, epoch, epochs, milestones, decay))
      aux_e = jnp.float32(aux_lr_fn(epoch) if aux_lr_fn is not None else aux_lr)
      b = 0
      totals = np.zeros(3)
      while b < nb:
        chunk = nb - b
        if hook is not None and hook_every > 0:
          chunk = min(chunk, hook_every - steps_done % hook_every)
        state, stats = self._steps(state, data, perm, b, chunk, task, lr_e, aux_e, aug_key,
                                   spec)
        totals += np.asarray(stats)
        b += chunk
        steps_done += chunk
        if hook is not None and hook_every > 0 and steps_done % hook_every == 0:
          state = hook(state, steps_done)
      loss, acc = totals[0] / max(totals[2], 1), totals[1] / max(totals[2], 1)
      reliability.check_loss(loss, c, task=t, phase=phase, epoch=epoch, epochs=epochs)
      if self.on_epoch is not None:  # the harness's per-epoch log (experiment.EpochLogger)
        self.on_epoch(self, state, task=t, phase=phase, op=i, epoch=epoch, epochs=epochs,
                      loss=loss, accuracy=acc, learning_rate=lr_e, bar=bar)
      self.last_train_stats = EpochStats(float(loss), float(acc))
      self._op_log[_train_log_key(i)] = [float(loss), float(acc)]
      stop = False
      if epoch_end is not None:
        state, stop = epoch_end(state, epoch)
        stop = bool(stop)
      self.last_train_epochs, self.last_train_steps = epoch + 1, (epoch + 1) * nb
      self._op_log[_steps_log_key(i)] = [self.last_train_epochs, self.last_train_steps]
      bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
      bar.update(1)
      logging.log_every_n_seconds(logging.INFO, "task %d %s epoch %d/%d loss %.4f acc %.4f", 10,
                                  t + 1, phase, epoch + 1, epochs, loss, acc)
      every = int(c.checkpoint_every_epochs)
      if stop:
        break
      if (self.save_fn is not None and self.method.resumable_within_task and every
          and (epoch + 1) % every == 0 and epoch + 1 < epochs):
        self.save_fn(state, {"task": t, "op": i, "epoch": epoch + 1,
                             "op_log": dict(self._op_log)})
    bar.close()
    return state

  def apply(self, state: TrainState, fn: Callable[[TrainState], TrainState]) -> TrainState:
    """Applies ``fn`` (a pruning / freezing / release step) as a recorded operation."""
    _, skip, _ = self._next_op()
    if skip:
      return state
    return fn(state)

  def record(self, state: TrainState, fn: Callable[[TrainState], Any]) -> Any:
    """``fn(state)`` (a JSON-able host value) as a recorded operation: replayed from the log.

    For decisions a method takes on the host from the state (a count, a threshold test): on
    resume the finished operations are skipped and hand back the *restored* (later) state, so
    reading the state again would decide from the wrong weights; the recorded value is the one
    the interrupted run computed.
    """
    i, skip, _ = self._next_op()
    key = f"value:{i}"
    if skip and key in self._op_log:
      return self._op_log[key]
    value = fn(state)
    self._op_log[key] = value
    return value

  def evaluate(self, state: TrainState, t: int, *, split: str = "val",
               current: int | None = None, data: TaskData | None = None) -> float:
    """Accuracy on task ``t`` (a recorded operation: replayed from the log on resume).

    ``current`` is the last task trained (default ``t``): with task-IL, the view and head of task
    ``t``; with class-IL, the view of ``current`` and logits over the classes seen up to it.
    """
    i, skip, _ = self._next_op()
    if skip and str(i) in self._op_log:
      return float(self._op_log[str(i)])
    value = self.accuracy(state, t, split=split, current=t if current is None else current,
                          data=data)
    self._op_log[str(i)] = value
    return value

  def accuracy(self, state: TrainState, t: int, *, split: str = "test", current: int,
               data: TaskData | None = None) -> float:
    """Accuracy on task ``t`` after training ``current`` (not recorded; used for the matrix)."""
    data = self.task_data(t, split) if data is None else data
    view = current if self.class_il else t
    head = current if self.class_il else t
    correct, total = self._eval_counts(state, data, jnp.int32(view), jnp.int32(current),
                                       jnp.int32(head))
    total = float(total)
    return float(correct) / total if total else float("nan")

  def accuracy_row(self, state: TrainState, current: int, split: str = "test") -> list[float]:
    """Accuracy on every task after training ``current`` (one row of the accuracy matrix)."""
    return [self.accuracy(state, j, split=split, current=current)
            for j in range(self.stream.num_tasks)]
