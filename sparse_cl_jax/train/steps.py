"""The jitted step bodies: pure functions of a static :class:`StepEnv` and the run's constants.

Every function here takes ``env`` (what is static for a whole run: the model, the method, the
optimisers, the batch sizes, the mesh) and ``c`` (what is data for a run and the same shape for
every run of a sweep: the seed's key, the normalisation, the class layout), then arrays. The
trainer jits them once per phase kind (``functools.partial(fn, env)``, ``c`` passed as data), so
runs that differ only in ``c`` share every compiled program.

* :func:`train_step`: one cross-entropy step over one gathered batch (the classic step).
* :func:`multi_train_step`: one step of ``method.step_loss`` over batches of several sources.
* :func:`batch_step` / :func:`multi_batch_step`: gather (and augment) batch ``b`` on the device.
* :func:`run_steps` / :func:`run_multi`: a chunk of an epoch as one ``lax.fori_loop`` (the
  ``'device'`` epoch loop); :func:`host_step` / :func:`host_multi`: one batch per call (the
  ``'host'`` loop). :mod:`sparse_cl_jax.train.loops` chooses between them.

``env.trace_counts`` counts traces (tests assert one compile per phase kind).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sparse_cl_jax import augment as augment_lib
from sparse_cl_jax import data as data_lib
from sparse_cl_jax import protocol
from sparse_cl_jax.train import state as state_lib

TrainState = state_lib.TrainState
TaskData = state_lib.TaskData


@dataclasses.dataclass
class StepEnv:
  """What the step bodies read that is static for a run (Python values, modules, transforms)."""
  model: nn.Module
  method: protocol.Method
  tx: optax.GradientTransformation
  aux_tx: optax.GradientTransformation
  class_il: bool
  has_batch_stats: bool
  model_takes_valid: bool  # the model's __call__ takes ``valid`` (padding out of norm statistics)
  compute_dtype: Any
  augment: str
  augment_padding: int
  batch_size: int
  eval_batch_size: int
  mesh: jax.sharding.Mesh | None
  trace_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_env(config, model: nn.Module, method: protocol.Method, tx, aux_tx, class_il: bool,
             has_batch_stats: bool, mesh) -> StepEnv:
  """The :class:`StepEnv` of a run from its config and the trainer's choices."""
  augment = str(config.get("augment", "none"))
  augment_padding = config.get("augment_padding", 4)
  augment_lib.check(augment, augment_padding)
  return StepEnv(
      model=model, method=method, tx=tx, aux_tx=aux_tx, class_il=class_il,
      has_batch_stats=has_batch_stats,
      # Models of this package take ``valid`` (padding rows left out of batch statistics); a
      # user's model without that keyword is called as before.
      model_takes_valid="valid" in inspect.signature(type(model).__call__).parameters,
      compute_dtype=COMPUTE_DTYPES[config.get("compute_dtype", "float32")],
      augment=augment, augment_padding=augment_padding, batch_size=int(config.batch_size),
      eval_batch_size=int(config.eval_batch_size), mesh=mesh)


def run_constants(key, stream) -> dict:
  """The step bodies' ``c``: what differs between runs of the same shapes, as data.

  The seed's key, the split's normalisation and the class layout never enter a compiled program
  as constants: runs that differ only in these (the cells of a seed sweep) share every compiled
  step, also through the persistent compilation cache.
  """
  return {"key": key, "mean": jnp.asarray(stream.mean, jnp.float32),
          "std": jnp.asarray(stream.std, jnp.float32), "head_mask": jnp.asarray(stream.head_mask)}


def shard_batch(env: StepEnv, x):
  """``x`` constrained to be split over the mesh's ``'data'`` axis (identity on one device)."""
  if env.mesh is None:
    return x
  spec = jax.sharding.PartitionSpec("data", *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(env.mesh, spec))


# --------------------------------------------------------------------------------------------------
# The model and the loss.


def apply_model(env: StepEnv, c, fp, batch_stats, x, task, train: bool, step=None, valid=None):
  """Logits (float32) and new running statistics; ``valid`` [B]: rows that are real examples."""
  variables = {"params": fp}
  if env.has_batch_stats:
    variables["batch_stats"] = batch_stats
  x = data_lib.normalize(x, c["mean"], c["std"])
  if env.compute_dtype != jnp.float32:
    # Mixed precision: the forward and backward passes compute in compute_dtype; params, their
    # gradients (the transpose of this cast), the optimiser state, running statistics and the
    # loss stay float32.
    variables["params"] = jax.tree.map(
        lambda p: p.astype(env.compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
        fp)
    x = x.astype(env.compute_dtype)
  kwargs = {}
  if valid is not None and env.model_takes_valid:
    kwargs["valid"] = valid
  rngs = {}
  if train:  # dropout (CLNP's convnet): a key per global step, identical when replayed
    rngs["dropout"] = jax.random.fold_in(
        jax.random.fold_in(jax.random.wrap_key_data(c["key"]), 7), step)
  if train and env.has_batch_stats:
    logits, mutated = env.model.apply(variables, x, task=task, train=True,
                                      mutable=["batch_stats"], rngs=rngs, **kwargs)
    new_stats = mutated["batch_stats"]
  else:
    logits = env.model.apply(variables, x, task=task, train=train, rngs=rngs, **kwargs)
    new_stats = batch_stats
  return logits.astype(jnp.float32), new_stats


def model_logits(env: StepEnv, c, params, aux, mstate, batch_stats, x, task, current,
                 train: bool, step=None, valid=None):
  """:func:`apply_model` on the method's view of ``task`` after training ``current``."""
  fp = env.method.forward_params(params, aux, mstate, task, current)
  return apply_model(env, c, fp, batch_stats, x, task, train, step, valid)


def mask_logits(env: StepEnv, c, logits, head_task):
  """The logits a prediction reads: ``method.eval_logits``, then (class-IL) the classes seen."""
  if env.method.eval_logits is not None:
    logits = env.method.eval_logits(logits)
  if not env.class_il:
    return logits
  seen = c["head_mask"][head_task]
  return jnp.where(seen[None, :], logits, jnp.finfo(logits.dtype).min)


class Forward:
  """The trainer's model application inside a step, handed to ``Method.step_loss``.

  ``fwd(fp, batch_stats, x, valid, task, train=True) -> (logits f32 [B, K], new_batch_stats)``
  normalises the ``uint8`` images, applies the compute dtype, passes ``valid`` to the model (padding
  rows stay out of norm statistics) and draws the step's dropout key. ``fwd.features(...)`` also
  returns the penultimate features (the input of the model's ``head``, flattened to ``[B, D]``).
  """

  def __init__(self, env: StepEnv, c, step):
    self._env = env
    self._c = c
    self._step = step

  def __call__(self, fp, batch_stats, x, valid, task, *, train: bool = True):
    return apply_model(self._env, self._c, fp, batch_stats, x, task, train, self._step, valid)

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


# --------------------------------------------------------------------------------------------------
# One optimiser step.


def set_lrs(state: TrainState, lr, aux_lr):
  """The optimiser states with this epoch's learning rates (injected hyperparameters)."""
  opt_state = optax.tree_utils.tree_set(state.opt_state, learning_rate=lr)
  aux_opt_state = state.aux_opt_state
  if jax.tree.leaves(state.aux):
    aux_opt_state = optax.tree_utils.tree_set(aux_opt_state, learning_rate=aux_lr)
  return opt_state, aux_opt_state


def apply_grads(env: StepEnv, state: TrainState, grads, aux_grads, opt_state, aux_opt_state,
                task, new_stats, mstate) -> TrainState:
  """The optimiser updates of params (``env.tx``) and aux variables; the step counter + 1."""
  # The transforms read the method's state from before the step (its masks are what the
  # gradients were taken with); after_step's statistics take effect from the next step.
  updates, opt_state = env.tx.update(grads, opt_state, state.params,
                                     **env.method.tx_args(state.method, task))
  params = optax.apply_updates(state.params, updates)
  aux = state.aux
  if jax.tree.leaves(aux):
    aux_updates, aux_opt_state = env.aux_tx.update(
        aux_grads, aux_opt_state, aux, **env.method.aux_tx_args(state.method, task))
    aux = optax.apply_updates(aux, aux_updates)
  return state._replace(params=params, batch_stats=new_stats, opt_state=opt_state, aux=aux,
                        aux_opt_state=aux_opt_state, method=mstate, step=state.step + 1)


def train_step(env: StepEnv, c, state: TrainState, x, y, w, task, lr, aux_lr, ids=None):
  """One weighted cross-entropy step; returns the new state and ``(loss*n, correct, n)``."""
  env.trace_counts["train_step"] += 1
  method = env.method
  opt_state, aux_opt_state = set_lrs(state, lr, aux_lr)
  if ids is None:
    ids = jnp.full(y.shape, -1, jnp.int32)

  real = w > 0

  def loss_fn(params, aux):
    logits, new_stats = model_logits(env, c, params, aux, state.method, state.batch_stats, x,
                                     task, task, train=True, step=state.step, valid=real)
    logits = mask_logits(env, c, logits, task)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    wsum = jnp.maximum(jnp.sum(w), 1.0)
    # where, not a product: a padding row contributes an exact 0 whatever its logits hold.
    loss = jnp.sum(jnp.where(real, ce * w, 0.0)) / wsum
    if method.penalty is not None:
      loss = loss + method.penalty(params, aux, state.method, task)
    return loss, (logits, new_stats)

  (loss, (logits, new_stats)), (grads, aux_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.aux)
  hit = jnp.argmax(logits, -1) == y
  mstate = state.method
  if method.after_step is not None:
    mstate = method.after_step(mstate, {"ids": ids, "correct": hit & real, "valid": real,
                                        "y": y}, task)
  new = apply_grads(env, state, grads, aux_grads, opt_state, aux_opt_state, task, new_stats,
                    mstate)
  correct = jnp.sum(jnp.where(real, hit * w, 0.0))
  return new, jnp.stack([loss * jnp.sum(w), correct, jnp.sum(w)])


def multi_train_step(env: StepEnv, c, state: TrainState, batches, task, lr, aux_lr):
  """One step of ``method.step_loss`` over the gathered batches of several sources."""
  env.trace_counts["multi_train_step"] += 1
  method = env.method
  opt_state, aux_opt_state = set_lrs(state, lr, aux_lr)
  fwd = Forward(env, c, state.step)

  def loss_fn(params, aux):
    loss, (new_stats, stats, outputs) = method.step_loss(
        fwd, params, aux, state.method, state.batch_stats, batches, task)
    if method.penalty is not None:
      loss = loss + method.penalty(params, aux, state.method, task)
    return loss, (new_stats, stats, outputs)

  (_, (new_stats, stats, outputs)), (grads, aux_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.aux)
  mstate = state.method
  if method.after_step is not None:
    mstate = method.after_step(mstate, outputs, task)
  new = apply_grads(env, state, grads, aux_grads, opt_state, aux_opt_state, task, new_stats,
                    mstate)
  return new, jnp.asarray(stats, jnp.float32).reshape(3)


# --------------------------------------------------------------------------------------------------
# Gathering batches on the device.


def augment_batch(env: StepEnv, c, x, aug_key, b):
  """``config.augment`` of the gathered ``uint8`` batch ``b``, keyed by ``(aug_key, b)``.

  ``aug_key`` is the epoch's augmentation key data (``uint32[2]``) derived from (seed, task,
  operation, epoch); ``None`` (a caller tracing the step alone, e.g. to count its FLOPs) uses the
  run's seed key. Identity when ``config.augment == 'none'``.
  """
  if env.augment == "none":
    return x
  base_key = c["key"] if aug_key is None else aug_key
  key = jax.random.fold_in(jax.random.wrap_key_data(base_key), b)
  return shard_batch(env, augment_lib.apply(env.augment, key, x, padding=env.augment_padding))


def source_aug_key(c, aug_key, i: int):
  """The augmentation key data of source number ``i`` of a multi-source step."""
  base_key = c["key"] if aug_key is None else aug_key
  return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(base_key), 0x5eed + i))


def batch_step(env: StepEnv, c, state: TrainState, data: TaskData, perm, b, task, lr, aux_lr,
               aug_key=None):
  """Batch ``b`` of the epoch order ``perm``: gather and augment it on the device, one step."""
  idx, valid = data_lib.batch_indices(perm, b, env.batch_size, data.n)
  idx = shard_batch(env, idx)
  x = augment_batch(env, c, jnp.take(data.x, idx, axis=0), aug_key, b)
  y = jnp.take(data.y, idx, axis=0)
  ids = jnp.take(data.ids, idx, axis=0)
  w = shard_batch(env, valid.astype(jnp.float32))
  return train_step(env, c, state, x, y, w, task, lr, aux_lr, ids)


def multi_batch_step(env: StepEnv, c, state: TrainState, datas, perms, spec, b, task, lr,
                     aux_lr, aug_key=None):
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
    idx = shard_batch(env, idx)
    rows = {k: jnp.take(v, idx, axis=0) for k, v in d.items() if k != "n"}
    if aug and env.augment != "none":
      key = aug_key if order == "epoch" else source_aug_key(c, aug_key, i)
      rows["x"] = augment_batch(env, c, rows["x"], key, b)
    rows["valid"] = shard_batch(env, valid)
    batches[name] = rows
  return multi_train_step(env, c, state, batches, task, lr, aux_lr)


# --------------------------------------------------------------------------------------------------
# Chunks of an epoch: the programs the trainer jits.


def run_steps(env: StepEnv, c, state: TrainState, data: TaskData, perm, first, count, task, lr,
              aux_lr, aug_key=None):
  """Batches ``first .. first + count - 1`` of the epoch order ``perm`` (one XLA loop)."""
  env.trace_counts["run_steps"] += 1

  def body(i, carry):
    st, totals = carry
    st, stats = batch_step(env, c, st, data, perm, first + i, task, lr, aux_lr, aug_key)
    return st, totals + stats

  return jax.lax.fori_loop(0, count, body, (state, jnp.zeros(3, jnp.float32)))


def host_step(env: StepEnv, c, state: TrainState, totals, data: TaskData, perm, b, task, lr,
              aux_lr, aug_key=None):
  """One batch as its own jitted call (the ``'host'`` epoch loop); stats summed on device."""
  env.trace_counts["host_step"] += 1
  state, stats = batch_step(env, c, state, data, perm, b, task, lr, aux_lr, aug_key)
  return state, totals + stats


def run_multi(env: StepEnv, c, state: TrainState, datas, perms, first, count, task, lr, aux_lr,
              aug_key=None, *, spec):
  """Multi-source batches ``first .. first + count - 1`` (one XLA loop)."""
  env.trace_counts["run_multi_steps"] += 1

  def body(i, carry):
    st, totals = carry
    st, stats = multi_batch_step(env, c, st, datas, perms, spec, first + i, task, lr, aux_lr,
                                 aug_key)
    return st, totals + stats

  return jax.lax.fori_loop(0, count, body, (state, jnp.zeros(3, jnp.float32)))


def host_multi(env: StepEnv, c, state: TrainState, totals, datas, perms, b, task, lr, aux_lr,
               aug_key=None, *, spec):
  """One multi-source batch as its own jitted call (the ``'host'`` epoch loop)."""
  env.trace_counts["host_multi_step"] += 1
  state, stats = multi_batch_step(env, c, state, datas, perms, spec, b, task, lr, aux_lr,
                                  aug_key)
  return state, totals + stats
