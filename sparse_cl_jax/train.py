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

    self.loop = runtime.epoch_loop(config.get("epoch_loop", "auto"))
    self._run_steps = jax.jit(self._run_steps_impl, donate_argnums=(0,))
    self._host_step = jax.jit(self._host_step_impl, donate_argnums=(0, 1))
    self._eval_counts = jax.jit(self._eval_counts_impl)
    self._permutation = jax.jit(data_lib.epoch_permutation, static_argnums=(2,))

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
    x = self.stream.normalize(x)
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
          jax.random.fold_in(jax.random.wrap_key_data(self.key), 7), step)
    if train and self.has_batch_stats:
      logits, mutated = self.model.apply(variables, x, task=task, train=True,
                                         mutable=["batch_stats"], rngs=rngs, **kwargs)
      new_stats = mutated["batch_stats"]
    else:
      logits = self.model.apply(variables, x, task=task, train=train, rngs=rngs, **kwargs)
      new_stats = batch_stats
    return logits.astype(jnp.float32), new_stats

  def _mask_logits(self, logits, head_task):
    if not self.class_il:
      return logits
    seen = self.head_mask[head_task]
    return jnp.where(seen[None, :], logits, jnp.finfo(logits.dtype).min)

  def _train_step(self, state: TrainState, x, y, w, task, lr, aux_lr):
    self.trace_counts["train_step"] += 1
    opt_state = optax.tree_utils.tree_set(state.opt_state, learning_rate=lr)
    aux_opt_state = state.aux_opt_state
    if jax.tree.leaves(state.aux):
      aux_opt_state = optax.tree_utils.tree_set(aux_opt_state, learning_rate=aux_lr)

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
    updates, opt_state = self.tx.update(grads, opt_state, state.params,
                                        **self.method.tx_args(state.method, task))
    params = optax.apply_updates(state.params, updates)
    aux = state.aux
    if jax.tree.leaves(aux):
      aux_updates, aux_opt_state = self.aux_tx.update(
          aux_grads, aux_opt_state, aux, **self.method.aux_tx_args(state.method, task))
      aux = optax.apply_updates(aux, aux_updates)
    correct = jnp.sum(jnp.where(real, (jnp.argmax(logits, -1) == y) * w, 0.0))
    new = state._replace(params=params, batch_stats=new_stats, opt_state=opt_state, aux=aux,
                         aux_opt_state=aux_opt_state, step=state.step + 1)
    return new, jnp.stack([loss * jnp.sum(w), correct, jnp.sum(w)])

  def augment_batch(self, x, aug_key, b):
    """``config.augment`` of the gathered ``uint8`` batch ``b``, keyed by ``(aug_key, b)``.

    ``aug_key`` is the epoch's augmentation key data (``uint32[2]``) that :meth:`train` derives
    from (seed, task, operation, epoch); ``None`` (a caller tracing the step alone, e.g. to count
    its FLOPs) uses the trainer's seed key. Identity when ``config.augment == 'none'``.
    """
    if self.augment == "none":
      return x
    base_key = self.key if aug_key is None else aug_key
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
    w = self._shard_batch(valid.astype(jnp.float32))
    return self._train_step(state, x, y, w, task, lr, aux_lr)

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

  def _steps(self, state: TrainState, data: TaskData, perm, first: int, count: int, task, lr,
             aux_lr, aug_key):
    """Runs ``count`` batches from ``first`` with the loop :func:`runtime.epoch_loop` chose."""
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
            hook_every: int = 0, reset_optimizer: bool = True) -> TrainState:
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

    Afterwards :attr:`last_train_stats` holds the last epoch's running means of the training loss
    and accuracy over its valid rows (in training mode, on the augmented batches; CPG's "train
    accuracy" rule reads it). It is recorded in the operation log, so a resumed run that skips
    this operation restores it.
    """
    i, skip, start = self._next_op()
    if skip:
      recorded = self._op_log.get(_train_log_key(i))
      self.last_train_stats = None if recorded is None else EpochStats(*map(float, recorded))
      return state
    self.last_train_stats = None
    c = self.config
    lr = c.learning_rate if lr is None else lr
    milestones = c.lr_milestones if lr_milestones is None else lr_milestones
    decay = c.lr_decay if lr_decay is None else lr_decay
    data = self.task_data(t) if data is None else data
    if reset_optimizer and start == 0:
      state = self.reset_optimizer(state)
    n_valid = int(data.n)
    nb = max(1, -(-n_valid // self.batch_size))
    n_max = int(data.x.shape[0])
    task = jnp.int32(t)
    bar = tqdm.tqdm(total=epochs, initial=start, disable=not c.progress, leave=False,
                    desc=f"task {t + 1}/{self.stream.num_tasks} {phase}", unit="ep")
    steps_done = start * nb
    for epoch in range(start, epochs):
      epoch_key = self.op_key(epoch, op=i)
      perm = self._permutation(epoch_key, data.n, n_max)
      aug_key = jax.random.key_data(jax.random.fold_in(epoch_key, _AUGMENT_SALT))
      lr_e = jnp.float32(lr_for_epoch(lr, epoch, epochs, milestones, decay))
      aux_e = jnp.float32(aux_lr_fn(epoch) if aux_lr_fn is not None else aux_lr)
      b = 0
      totals = np.zeros(3)
      while b < nb:
        chunk = nb - b
        if hook is not None and hook_every > 0:
          chunk = min(chunk, hook_every - steps_done % hook_every)
        state, stats = self._steps(state, data, perm, b, chunk, task, lr_e, aux_e, aug_key)
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
      bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
      bar.update(1)
      logging.log_every_n_seconds(logging.INFO, "task %d %s epoch %d/%d loss %.4f acc %.4f", 10,
                                  t + 1, phase, epoch + 1, epochs, loss, acc)
      every = int(c.checkpoint_every_epochs)
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
