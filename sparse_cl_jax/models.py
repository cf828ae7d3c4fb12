"""Flax Linen models for sparse continual learning, with pre-allocated multi-task heads.

Every model here is called the same way::

  logits = model.apply(variables, x, task=task_id, train=False)
  logits, state = model.apply(variables, x, task=task_id, train=True,
                              mutable=['batch_stats', 'intermediates'])

* ``x`` is float32 NHWC images ``[B, H, W, C]`` (MLPs flatten it).
* ``task`` is an int32 scalar that may be traced: one jitted step serves every task. It selects the
  head (when ``num_heads > 1``) and the row of per-task BatchNorm (``norm='task_batch'``). It is
  never used in Python control flow.
* ``train`` is a Python bool (static): batch statistics and dropout in training mode.
* ``valid`` (optional, ``[B]`` bool or weights): which rows of the batch are real examples. Rows
  with ``valid`` false / 0 (the padding that tops up the last batch of an epoch or of an
  evaluation pass) never enter a batch statistic: every norm layer computes its mean and variance,
  and updates its running statistics, over the valid rows only, so the outputs of the valid rows
  and the new statistics are bit-identical whatever the padding rows hold. ``None`` (the default):
  every row is valid. A batch without any valid row leaves the running statistics unchanged.
* The output is ``[B, num_classes]`` logits of the head selected by ``task`` (row 0 when
  ``num_heads == 1``).

Parameter layout conventions (so that mask trees and path filters are predictable):

* Hidden Dense layers are ``dense_0, dense_1, ...``; convolutions ``conv_0, conv_1, ...``; their
  norms ``norm_0, norm_1, ...`` (same index as the layer they follow). ResNets nest blocks as
  ``block_<i>/{conv_0, norm_0, conv_1, norm_1, shortcut, norm_shortcut}`` and have a ``stem`` conv.
* The classifier is always the top-level module ``head`` (:class:`MultiHead`) holding all heads:
  ``kernel [num_heads, D, num_classes]`` and ``bias [num_heads, num_classes]``.
* Body convolutions followed by a normalisation layer have no bias (it would be cancelled);
  ResNet/VGG convolutions never have one, as in the reference code.

Normalisation (``norm`` field, on every model):

* ``'batch'``: :class:`BatchNorm`, the variables of ``nn.BatchNorm`` (params ``scale``/``bias``
  ``[C]``, ``batch_stats`` ``mean``/``var`` ``[C]``; running statistics, momentum 0.9, epsilon
  1e-5; ``batch_stats`` must be mutable when ``train=True``) with ``valid`` rows only.
* ``'task_batch'``: :class:`TaskBatchNorm`, one row of affine parameters and running statistics per
  task (CPG: "BN params and running stats are stored per task").
* ``'batch_stats_only'``: :class:`BatchStatsNorm`, no affine parameters and no running statistics;
  batch statistics are used in training *and* evaluation (as coded by the DST-for-CL authors).
* ``'none'``: no normalisation.

Hidden activations (CLNP neuron pruning): after every hidden ReLU the post-ReLU activation is
sown into the ``intermediates`` collection *under the module that produced it*, at
``intermediates/<module path>/activation`` (e.g. ``intermediates['dense_0']['activation']`` or
``intermediates['block_3']['conv_1']['activation']``), so the intermediates tree mirrors the
``params`` tree. (Flax does not allow a module to sow a variable with the same name as one of its
submodules, hence the extra ``activation`` level.) :func:`hidden_activations` turns the mutated
state into the flat ``{'<module path>': activation}`` dict that ``criteria.activation`` takes, and
:func:`hidden_layer_names` lists these paths in forward order. The unit axis is the last axis, and
the layer's kernel is ``params[<module path>]['kernel']`` with the same output axis.

Width (``width_multiplier``, on every model): all hidden widths / channel counts are scaled by it
(``max(1, round(w * m))``); the parameter tree keeps its structure, only shapes grow. Heads keep
``num_classes`` outputs.

Example::

  model = models.create('resnet18', num_heads=10, num_classes=10, norm='task_batch')
  variables = models.init(model, jax.random.key(0), (1, 32, 32, 3))
  logits = model.apply(variables, images, task=jnp.int32(3), train=False)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from sparse_cl_jax import ops

Array = jax.Array
Variables = dict[str, Any]
NormFn = Callable[[Array], Array]

NORMS = ('batch', 'task_batch', 'batch_stats_only', 'none')
ACTIVATION_KEY = 'activation'

_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5

# torchvision/CPG conv init (kaiming normal, fan_out, ReLU gain).
_he_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# akamaster / PrAC-LTH ResNet-s conv init (kaiming normal, fan_in).
_he_fan_in = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class Conv(nn.Conv):
  """``nn.Conv`` whose convolution is :func:`ops.conv_general_dilated` (same params, same values).

  On CPU its backward pass stays fast inside ``lax.fori_loop`` bodies; elsewhere it is the stock
  ``lax.conv_general_dilated`` (:mod:`sparse_cl_jax.runtime` decides).
  """
  conv_general_dilated: Callable[..., Array] | None = ops.conv_general_dilated


def scaled_width(width: int, multiplier: float) -> int:
  """Hidden width scaled by ``multiplier``, rounded, at least 1."""
  return max(1, round(width * multiplier))


def _task_index(task: Any, num_rows: int) -> Array:
  """The int32 row selected by ``task``; the constant 0 when there is a single row.

  A concrete Python ``int`` out of range raises; a traced index cannot be checked (JAX clamps it).
  """
  if num_rows == 1:
    return jnp.zeros((), jnp.int32)
  if isinstance(task, int) and not 0 <= task < num_rows:
    raise ValueError(f'task {task} out of range for {num_rows} heads / BatchNorm rows.')
  return jnp.asarray(task, jnp.int32)


def _bcast(v: Array, ndim: int) -> Array:
  """Reshapes a per-channel vector [C] to [1, ..., 1, C] (no implicit rank promotion)."""
  return v.reshape((1,) * (ndim - 1) + (v.shape[-1],))


def _check_norm(norm: str, num_heads: int, num_tasks: int | None) -> int:
  """Validates ``norm`` and returns the number of per-task BatchNorm rows."""
  if norm not in NORMS:
    raise ValueError(f'Unknown norm {norm!r}; valid: {", ".join(NORMS)}.')
  rows = num_heads if num_tasks is None else num_tasks
  if norm == 'task_batch' and num_tasks is None and num_heads == 1:
    raise ValueError("norm='task_batch' with a single head needs num_tasks (rows of per-task BN).")
  return rows


# ------------------------------------------------------------------------------------------------
# Normalisation layers.


def _row_mask(valid: Any, x: Array) -> Array | None:
  """``valid`` ([B] bool or weights) as a bool ``[B, 1, ..., 1]`` for ``x``; None if ``valid`` is."""
  if valid is None:
    return None
  v = jnp.asarray(valid)
  if v.shape != x.shape[:1]:
    raise ValueError(f'valid must have shape {x.shape[:1]} (one entry per row of the batch), '
                     f'got {v.shape}.')
  v = v if v.dtype == jnp.bool_ else v > 0
  return v.reshape(x.shape[:1] + (1,) * (x.ndim - 1))


def batch_moments(x: Array, valid: Any = None) -> tuple[Array, Array, Array]:
  """Per-channel mean and (biased) variance of ``x`` over every axis but the last, valid rows only.

  Args:
    x: ``[B, ..., C]`` activations (any float dtype; the statistics are float32).
    valid: ``None`` (every row) or ``[B]`` bool / weights (rows with false / 0 are left out).

  Returns:
    ``(mean [C], var [C], count)``: the statistics and the float32 number of values they average
    (0 when no row is valid; the statistics are then 0). Rows left out contribute exact zeros
    whatever they hold (NaN and inf included), so the result is bit-identical for any content of
    the padding rows.
  """
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mask = _row_mask(valid, x)
  if mask is None:
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - _bcast(mean, x.ndim)), axis=axes)
    return mean, var, jnp.float32(math.prod(x.shape[:-1]))
  per_row = math.prod(x.shape[1:-1])
  count = jnp.sum(mask.astype(jnp.float32)) * jnp.float32(per_row)
  denom = jnp.maximum(count, 1.0)
  mean = jnp.sum(jnp.where(mask, xf, 0.0), axis=axes) / denom
  centred = jnp.where(mask, xf - _bcast(mean, x.ndim), 0.0)
  var = jnp.sum(jnp.square(centred), axis=axes) / denom
  return mean, var, count


class BatchNorm(nn.Module):
  """BatchNorm over the valid rows of a batch, with ``nn.BatchNorm``'s variables.

  Params ``scale [C]`` (ones) and ``bias [C]`` (zeros); collection ``batch_stats`` holds
  ``mean [C]`` (zeros) and ``var [C]`` (ones): the names, shapes and initial values of
  ``flax.linen.BatchNorm``, so checkpoints, masks and path filters written for it keep working. In
  training mode the batch statistics of the valid rows (:func:`batch_moments`; the two-pass
  biased variance) normalise ``x`` and update the running statistics
  (``m * old + (1 - m) * batch``); nothing is updated while initialising or when no row is valid.
  In evaluation the running statistics are used.

  Attributes:
    momentum: running-average decay (0.9, i.e. PyTorch's momentum 0.1).
    epsilon: added to the variance.
  """
  momentum: float = _BN_MOMENTUM
  epsilon: float = _BN_EPSILON

  @nn.compact
  def __call__(self, x: Array, train: bool = False, valid: Any = None) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    if train:
      mean, var, count = batch_moments(x, valid)
      if not self.is_initializing():
        m = self.momentum
        seen = count > 0
        ra_mean.value = jnp.where(seen, m * ra_mean.value + (1.0 - m) * mean, ra_mean.value)
        ra_var.value = jnp.where(seen, m * ra_var.value + (1.0 - m) * var, ra_var.value)
    else:
      mean, var = ra_mean.value, ra_var.value
    return _normalise(x, mean, var, scale, bias, self.epsilon)


def _normalise(x: Array, mean: Array, var: Array, scale: Array | None, bias: Array | None,
               epsilon: float) -> Array:
  """``(x - mean) / sqrt(var + eps) * scale + bias`` per channel, in float32, in ``x``'s dtype."""
  mul = jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    mul = mul * scale
  y = (x.astype(jnp.float32) - _bcast(mean, x.ndim)) * _bcast(mul, x.ndim)
  if bias is not None:
    y = y + _bcast(bias, x.ndim)
  return y.astype(x.dtype)


class TaskBatchNorm(nn.Module):
  """BatchNorm with one row of affine parameters and running statistics per task.

  Used by CPG/PackNet/Piggyback (Hung et al., NeurIPS 2019: BN parameters and running statistics
  stored per task). Params ``scale [T, C]``, ``bias [T, C]``; collection ``batch_stats`` holds
  ``mean [T, C]`` and ``var [T, C]``. Row ``task`` is selected with a (possibly traced) index. In
  training mode the batch statistics of the valid rows (:func:`batch_moments`) normalise ``x`` and
  only row ``task`` of the running statistics is updated (``.at[task].set``, so the other rows
  stay bit-identical); nothing is updated while initialising or when no row is valid. In
  evaluation the running statistics of row ``task`` are used.

  Attributes:
    num_tasks: number of rows T.
    momentum: running-average decay (0.9, i.e. PyTorch's momentum 0.1).
    epsilon: added to the variance.
  """
  num_tasks: int
  momentum: float = _BN_MOMENTUM
  epsilon: float = _BN_EPSILON

  @nn.compact
  def __call__(self, x: Array, task: Any = 0, train: bool = False, valid: Any = None) -> Array:
    c = x.shape[-1]
    t = _task_index(task, self.num_tasks)
    scale = self.param('scale', nn.initializers.ones, (self.num_tasks, c), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.num_tasks, c), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (self.num_tasks, c), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (self.num_tasks, c), jnp.float32)
    if train:
      mean, var, count = batch_moments(x, valid)
      if not self.is_initializing():
        m = self.momentum
        seen = count > 0
        old_mean, old_var = ra_mean.value[t], ra_var.value[t]
        ra_mean.value = ra_mean.value.at[t].set(
            jnp.where(seen, m * old_mean + (1.0 - m) * mean, old_mean))
        ra_var.value = ra_var.value.at[t].set(
            jnp.where(seen, m * old_var + (1.0 - m) * var, old_var))
    else:
      mean = ra_mean.value[t]
      var = ra_var.value[t]
    return _normalise(x, mean, var, scale[t], bias[t], self.epsilon)


class BatchStatsNorm(nn.Module):
  """Normalisation by the current batch statistics only: no affine parameters, no running stats.

  As coded by the DST-for-CL authors (Yildirim et al., CPAL 2024; BatchNorm with
  ``affine=False, track_running_stats=False``): batch statistics are used at test time too, so an
  example's output depends on the rest of its batch -- but only on its *valid* rows
  (:func:`batch_moments`): the padding of an evaluation pass never changes a result. Has no
  variables at all.

  Attributes:
    epsilon: added to the variance.
  """
  epsilon: float = _BN_EPSILON

  @nn.compact
  def __call__(self, x: Array, valid: Any = None) -> Array:
    mean, var, _ = batch_moments(x, valid)
    return _normalise(x, mean, var, None, None, self.epsilon)


def _norm_layer(kind: str, *, name: str, num_tasks: int, task: Any, train: bool,
                valid: Any = None) -> NormFn:
  """Creates the norm submodule ``name`` of the current compact module; returns x -> norm(x)."""
  if kind == 'none':
    return lambda x: x
  if kind == 'batch':
    return functools.partial(BatchNorm(name=name), train=train, valid=valid)
  if kind == 'task_batch':
    tbn = TaskBatchNorm(num_tasks=num_tasks, name=name)
    return functools.partial(tbn, task=task, train=train, valid=valid)
  if kind == 'batch_stats_only':
    return functools.partial(BatchStatsNorm(name=name), valid=valid)
  raise ValueError(f'Unknown norm {kind!r}; valid: {", ".join(NORMS)}.')


def _relu_and_sow(layer: nn.Module, x: Array) -> Array:
  """ReLU, then sow the activation under ``layer`` (``intermediates/<layer path>/activation``)."""
  y = nn.relu(x)
  layer.sow('intermediates', ACTIVATION_KEY, y)
  return y


# ------------------------------------------------------------------------------------------------
# Heads.


class MultiHead(nn.Module):
  """All task heads, pre-allocated; the forward pass uses row ``task`` (row 0 if single-head).

  Params: ``kernel [num_heads, D, num_classes]`` and ``bias [num_heads, num_classes]`` (no bias
  with ``use_bias=False``, e.g. the DST-for-CL authors' ResNet-18 classifier). For a
  dense head ``D`` is the feature size. With ``kernel_size`` set, each head is a 'VALID'
  convolution followed by global average pooling (the output layer of the CLNP wide FCN, Table 3
  of Golkar et al. 2019); then ``D = prod(kernel_size) * C_in`` and ``kernel[h]`` reshapes to
  ``[*kernel_size, C_in, num_classes]`` (input channel ``c`` sits at ``D`` positions
  ``c, c + C_in, c + 2 C_in, ...``).

  Attributes:
    num_heads: number of heads (tasks) allocated.
    num_classes: outputs per head.
    kernel_size: ``None`` for a dense head, else the conv head's spatial kernel size.
    use_bias: whether the heads have a bias.
  """
  num_heads: int
  num_classes: int
  kernel_size: tuple[int, ...] | None = None
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array, task: Any = 0) -> Array:
    cin = x.shape[-1]
    d = cin if self.kernel_size is None else math.prod(self.kernel_size) * cin
    kernel = self.param('kernel',
                        nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
                        (self.num_heads, d, self.num_classes), jnp.float32)
    t = _task_index(task, self.num_heads)
    k = kernel[t]
    b = jnp.zeros((1, self.num_classes), jnp.float32)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.num_heads, self.num_classes),
                        jnp.float32)
      b = bias[t][None, :]
    if self.kernel_size is None:
      return x @ k + b
    k = k.reshape(tuple(self.kernel_size) + (cin, self.num_classes))
    y = jax.lax.conv_general_dilated(
        x, k, window_strides=(1,) * len(self.kernel_size), padding='VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.mean(y, axis=tuple(range(1, y.ndim - 1))) + b


# ------------------------------------------------------------------------------------------------
# Small models.


class MLP(nn.Module):
  """Multi-layer perceptron with ReLU (CLNP's permuted-MNIST net is ``hidden=(2000, 2000)``).

  Golkar et al. 2019, Sec. 3.1. Flattens the input. Layout: ``dense_0 .. dense_{L-1}``, optional
  ``norm_i`` after ``dense_i`` (before the ReLU), ``head``. Dense layers have biases unless
  followed by a norm. Sows ``dense_i``.

  Attributes:
    hidden: hidden widths (before ``width_multiplier``).
    num_heads: number of pre-allocated heads (1 = single-head).
    num_classes: outputs per head.
    norm: one of :data:`NORMS` (default ``'none'``).
    width_multiplier: scales every hidden width.
    num_tasks: rows of ``'task_batch'`` norm; defaults to ``num_heads``.
  """
  hidden: Sequence[int] = (256, 256)
  num_heads: int = 1
  num_classes: int = 10
  norm: str = 'none'
  width_multiplier: float = 1.0
  num_tasks: int | None = None

  @nn.compact
  def __call__(self, x: Array, task: Any = 0, train: bool = False,
               valid: Any = None) -> Array:
    rows = _check_norm(self.norm, self.num_heads, self.num_tasks)
    x = x.reshape((x.shape[0], -1))
    for i, w in enumerate(self.hidden):
      dense = nn.Dense(scaled_width(w, self.width_multiplier), use_bias=self.norm == 'none',
                       name=f'dense_{i}')
      x = dense(x)
      x = _norm_layer(self.norm, name=f'norm_{i}', num_tasks=rows, task=task, train=train,
                      valid=valid)(x)
      x = _relu_and_sow(dense, x)
    return MultiHead(self.num_heads, self.num_classes, name='head')(x, task)


class SmallConvNet(nn.Module):
  """Two-conv network for fast tests and small images.

  conv 3x3 32 -> [norm] -> ReLU -> max-pool 2x2 -> conv 3x3 64 -> [norm] -> ReLU -> max-pool 2x2
  -> dense 256 -> ReLU -> heads ('SAME' convs). Layout: ``conv_0, norm_0, conv_1, norm_1,
  dense_0, head``. Convs have biases unless followed by a norm. Sows ``conv_0, conv_1, dense_0``.

  Attributes:
    num_heads: number of pre-allocated heads.
    num_classes: outputs per head.
    norm: one of :data:`NORMS` (default ``'none'``), applied after each conv.
    width_multiplier: scales 32/64/256.
    num_tasks: rows of ``'task_batch'`` norm; defaults to ``num_heads``.
  """
  num_heads: int = 1
  num_classes: int = 10
  norm: str = 'none'
  width_multiplier: float = 1.0
  num_tasks: int | None = None

  @nn.compact
  def __call__(self, x: Array, task: Any = 0, train: bool = False,
               valid: Any = None) -> Array:
    rows = _check_norm(self.norm, self.num_heads, self.num_tasks)
    for i, w in enumerate((32, 64)):
      conv = Conv(scaled_width(w, self.width_multiplier), (3, 3), padding=((1, 1), (1, 1)),
                     use_bias=self.norm == 'none', name=f'conv_{i}')
      x = conv(x)
      x = _norm_layer(self.norm, name=f'norm_{i}', num_tasks=rows, task=task, train=train,
                      valid=valid)(x)
      x = _relu_and_sow(conv, x)
      x = ops.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    dense = nn.Dense(scaled_width(256, self.width_multiplier), name='dense_0')
    x = _relu_and_sow(dense, dense(x))
    return MultiHead(self.num_heads, self.num_classes, name='head')(x, task)


class CLNPConvNet(nn.Module):
  """Narrow multi-head convnet of CLNP (Golkar et al. 2019, Table 2; the net of Zenke et al.).

  conv 32, conv 32, max-pool 3x3/2 pad 1, dropout 0.25, conv 64, conv 64, max-pool 3x3/2 pad 1,
  dropout 0.25, dense 512, dropout 0.5, one 10-way dense head per task. Convs are 3x3, stride 1,
  pad 1; convs and dense 1 are followed by ReLU. Layout: ``conv_0 .. conv_3, dense_0, head``
  (plus ``norm_i`` after ``conv_i`` if ``norm != 'none'``; the paper has none). Sows
  ``conv_0 .. conv_3`` (post-ReLU, before pooling/dropout) and ``dense_0`` (before dropout).

  Assumptions: the table gives the pool sizes/strides/padding but not the pooling type's padding
  value; we pad max-pools with -inf (PyTorch semantics). Dropout follows each pool and dense 1 as
  listed. Dropout is active only when ``train=True`` and needs ``rngs={'dropout': key}`` in
  ``apply``; set ``dropout=(0., 0., 0.)`` to train without it (no RNG needed then).

  Attributes:
    num_heads: number of pre-allocated heads (the paper uses 6).
    num_classes: outputs per head (10).
    norm: one of :data:`NORMS` (default ``'none'``, as in the paper).
    width_multiplier: scales 32/32/64/64/512.
    dropout: rates after pool 1, pool 2 and dense 1.
    num_tasks: rows of ``'task_batch'`` norm; defaults to ``num_heads``.
  """
  num_heads: int = 6
  num_classes: int = 10
  norm: str = 'none'
  width_multiplier: float = 1.0
  dropout: tuple[float, float, float] = (0.25, 0.25, 0.5)
  num_tasks: int | None = None

  @nn.compact
  def __call__(self, x: Array, task: Any = 0, train: bool = False,
               valid: Any = None) -> Array:
    rows = _check_norm(self.norm, self.num_heads, self.num_tasks)
    for i, w in enumerate((32, 32, 64, 64)):
      conv = Conv(scaled_width(w, self.width_multiplier), (3, 3), padding=((1, 1), (1, 1)),
                     use_bias=self.norm == 'none', name=f'conv_{i}')
      x = conv(x)
      x = _norm_layer(self.norm, name=f'norm_{i}', num_tasks=rows, task=task, train=train,
                      valid=valid)(x)
      x = _relu_and_sow(conv, x)
      if i % 2 == 1:
        x = ops.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = nn.Dropout(self.dropout[i // 2], deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    dense = nn.Dense(scaled_width(512, self.width_multiplier), name='dense_0')
    x = _relu_and_sow(dense, dense(x))
    x = nn.Dropout(self.dropout[2], deterministic=not train)(x)
    return MultiHead(self.num_heads, self.num_classes, name='head')(x, task)


class CLNPWideFCN(nn.Module):
  """Wide single-head fully-convolutional net of CLNP (Golkar et al. 2019, Table 3).

  ===========  =====  =====  ======  ====
  layer        chan.  ker.   stride  pad
  ===========  =====  =====  ======  ====
  conv_0       128    3x3    1       1
  conv_1       256    3x3    2       0
  conv_2       512    3x3    1       0
  conv_3       1024   3x3    2       1
  conv_4       2048   3x3    1       0
  head         10     3x3    1       0    then global average pool
  ===========  =====  =====  ======  ====

  Convs 1-5 (``conv_0 .. conv_4``) are followed by BatchNorm (``norm_i``) then ReLU; on 32x32
  inputs the spatial sizes are 32, 15, 13, 7, 5 and the output conv gives 3x3 before pooling.
  The output conv ("Conv 6") is the ``head`` (:class:`MultiHead` with ``kernel_size=(3, 3)``):
  ``kernel [num_heads, 9 * C5, num_classes]``, reshaped to ``[3, 3, C5, num_classes]`` in the
  forward pass. Sows ``conv_0 .. conv_4``.

  Assumptions: the table does not say whether convs have biases; we drop them when a norm follows
  (they are cancelled by it) and keep them with ``norm='none'``. The output conv has a bias.
  ``num_heads=1`` is the paper's single-head setting (the CLNP method masks the final hidden
  channels of other tasks); ``num_heads > 1`` gives one output conv per task. With
  ``norm='task_batch'`` and a single head set ``num_tasks``.

  Attributes:
    num_heads: number of pre-allocated output convs (1 in the paper).
    num_classes: outputs (10).
    norm: one of :data:`NORMS` (default ``'batch'``, as in the paper).
    width_multiplier: scales 128 .. 2048.
    num_tasks: rows of ``'task_batch'`` norm; defaults to ``num_heads``.
  """
  num_heads: int = 1
  num_classes: int = 10
  norm: str = 'batch'
  width_multiplier: float = 1.0
  num_tasks: int | None = None

  @nn.compact
  def __call__(self, x: Array, task: Any = 0, train: bool = False,
               valid: Any = None) -> Array:
    rows = _check_norm(self.norm, self.num_heads, self.num_tasks)
    spec = ((128, 1, 1), (256, 2, 0), (512, 1, 0), (1024, 2, 1), (2048, 1, 0))
    for i, (w, stride, pad) in enumerate(spec):
      conv = Conv(scaled_width(w, self.width_multiplier), (3, 3), strides=(stride, stride),
                     padding=((pad, pad), (pad, pad)), use_bias=self.norm == 'none',
                     name=f'conv_{i}')
      x = conv(x)
      x = _norm_layer(self.norm, name=f'norm_{i}', num_tasks=rows, task=task, train=train,
                      valid=valid)(x)
      x = _relu_and_sow(conv, x)
    return MultiHead(self.num_heads, self.num_classes, kernel_size=(3, 3), name='head')(x, task)


# ------------------------------------------------------------------------------------------------
# ResNets.


def option_a_shortcut(x: Array, features: int, stride: int) -> Array:
  """Parameter-free ResNet shortcut, option A (He et al. 2016, Sec. 4.2, CIFAR ResNets).

  Subsamples spatially with ``x[:, ::stride, ::stride, :]`` and zero-pads the channels to
  ``features``, half before and half after (``planes // 4`` each side when channels double, as in
  akamaster's / PrAC-LTH's ``LambdaLayer``).

  Args:
    x: ``[B, H, W, C]``.
    features: output channels (``>= C``).
    stride: spatial subsampling.

  Returns:
    ``[B, ceil(H / stride), ceil(W / stride), features]``.
  """
  x = x[:, ::stride, ::stride, :]
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(f'option-A shortcut cannot shrink {x.shape[-1]} to {features} channels.')
  before = extra // 2
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (before, extra - before)))


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convs), post-activation or pre-activation.

  Layout: ``conv_0`` (3x3, stride), ``norm_0``, ``conv_1`` (3x3), ``norm_1`` and, when the shape
  changes and ``shortcut='conv'``, ``shortcut`` (1x1 conv, stride) with ``norm_shortcut``
  (post-activation only). No conv has a bias.

  Post-activation (He et al. 2016a; kuangliu / akamaster CIFAR code)::

    h = relu(norm_0(conv_0(x)))                   # sown at conv_0
    y = relu(norm_1(conv_1(h)) + shortcut(x))     # sown at conv_1

  Pre-activation (He et al. 2016b, as coded in VITA-Group/Lifelong-Learning-LTH)::

    a = relu(norm_0(x))
    s = shortcut(a) if the shape changes else x   # 1x1 conv on a, no norm
    h = relu(norm_1(conv_0(a)))                   # sown at conv_0
    y = conv_1(h) + s                             # no ReLU, nothing sown

  Attributes:
    features: output channels.
    strides: stride of ``conv_0`` (and of the shortcut).
    norm: one of :data:`NORMS`.
    num_tasks: rows of ``'task_batch'`` norm.
    preact: pre-activation ordering.
    shortcut: ``'conv'`` (1x1 projection, option B) or ``'a'`` (option A, no params).
    kernel_init: conv initializer.
  """
  features: int
  strides: int = 1
  norm: str = 'batch'
  num_tasks: int = 1
  preact: bool = False
  shortcut: str = 'conv'
  kernel_init: Callable[..., Array] = _he_fan_out

  @nn.compact
  def __call__(self, x: Array, task: Any = 0, train: bool = False,
               valid: Any = None) -> Array:
    norm = functools.partial(_norm_layer, self.norm, num_tasks=self.num_tasks, task=task,
                             train=train, valid=valid)
    conv = functools.partial(Conv, self.features, use_bias=False, kernel_init=self.kernel_init)
    s = self.strides
    project = s != 1 or x.shape[-1] != self.features
    conv_0 = conv((3, 3), strides=(s, s), padding=((1, 1), (1, 1)), name='conv_0')
    conv_1 = conv((3, 3), padding=((1, 1), (1, 1)), name='conv_1')

    if self.preact:
      a = nn.relu(norm(name='norm_0')(x))
      if not project:
        residual = x
      elif self.shortcut == 'a':
        residual = option_a_shortcut(a, self.features, s)
      else:
        residual = conv((1, 1), strides=(s, s), padding='VALID', name='shortcut')(a)
      h = _relu_and_sow(conv_0, norm(name='norm_1')(conv_0(a)))
      return conv_1(h) + residual

    if not project:
      residual = x
    elif self.shortcut == 'a':
      residual = option_a_shortcut(x, self.features, s)
    else:
      residual = conv((1, 1), strides=(s, s), padding='VALID', name='shortcut')(x)
      residual = norm(name='norm_shortcut')(residual)
    h = _relu_and_sow(conv_0, norm(name='norm_0')(conv_0(x)))
    y = norm(name='norm_1')(conv_1(h))
    return _relu_and_sow(conv_1, y + residual)


RESNET18_STEMS = ('cifar3x3', 'imagenet7x7_nopool')


class ResNet18(nn.Module):
  """ResNet-18 (He et al. 2016) with a choice of stem, optionally pre-activation.

  BasicBlocks [2, 2, 2, 2], widths 64/128/256/512 (first block of stages 2-4 has stride 2 and a 1x1
  conv shortcut), global average pool, heads (D = 512). Stems (``stem``):

  * ``'cifar3x3'`` (default): 3x3 stride-1 conv, no max-pool (kuangliu/pytorch-cifar; used by
    PrAC, Zhang et al. 2021). With ``preact=True`` this is the PreAct-ResNet18 of Lifelong Lottery
    Tickets (Chen et al., ICLR 2021) as coded: no norm after the stem and no final norm/ReLU
    before pooling.
  * ``'imagenet7x7_nopool'``: 7x7 stride-2 conv (padding 3), norm, ReLU and *no* max-pool: the
    ResNet-18 of the DST-for-CL authors' code (Yildirim et al., CPAL 2024,
    ``muratonuryildirim/CL-with-DST`` ``models.py``: ``conv1 = Conv2d(3, 64, kernel_size=7,
    stride=2, padding=3, bias=False)``, no max-pool), which also has a bias-free classifier
    (``head_bias=False``). A 32x32 input reaches the blocks at 16x16.

  Layout: ``stem`` (conv, no bias), ``norm_stem`` (post-activation only), ``block_0 .. block_7``
  (:class:`BasicBlock`: ``conv_0, norm_0, conv_1, norm_1`` and in ``block_2, block_4, block_6``
  also ``shortcut`` (+ ``norm_shortcut`` if post-activation)), ``head`` (``kernel`` and, with
  ``head_bias``, ``bias``). Sows ``stem`` (post-activation only), ``block_i/conv_0`` and
  (post-activation) ``block_i/conv_1``.

  Attributes:
    num_heads: number of pre-allocated heads.
    num_classes: outputs per head.
    norm: one of :data:`NORMS` (default ``'batch'``).
    width_multiplier: scales 64 .. 512.
    preact: pre-activation blocks.
    num_tasks: rows of ``'task_batch'`` norm; defaults to ``num_heads``.
    stem: one of :data:`RESNET18_STEMS`.
    head_bias: whether the heads have a bias.
  """
  num_heads: int = 1
  num_classes: int = 10
  norm: str = 'batch'
  width_multiplier: float = 1.0
  preact: bool = False
  num_tasks: int | None = None
  stem: str = 'cifar3x3'
  head_bias: bool = True

  @nn.compact
  def __call__(self, x: Array, task: Any = 0, train: bool = False,
               valid: Any = None) -> Array:
    rows = _check_norm(self.norm, self.num_heads, self.num_tasks)
    if self.stem not in RESNET18_STEMS:
      raise ValueError(f'Unknown ResNet18 stem {self.stem!r}; valid: {", ".join(RESNET18_STEMS)}.')
    width = functools.partial(scaled_width, multiplier=self.width_multiplier)
    if self.stem == 'cifar3x3':
      stem = Conv(width(64), (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=_he_fan_out, name='stem')
    else:
      stem = Conv(width(64), (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                  kernel_init=_he_fan_out, name='stem')
    x = stem(x)
    if not self.preact:
      x = _norm_layer(self.norm, name='norm_stem', num_tasks=rows, task=task, train=train,
                      valid=valid)(x)
      x = _relu_and_sow(stem, x)
    i = 0
    for stage, w in enumerate((64, 128, 256, 512)):
      for j in range(2):
        strides = 2 if stage > 0 and j == 0 else 1
        block = BasicBlock(width(w), strides=strides, norm=self.norm, num_tasks=rows,
                           preact=self.preact, name=f'block_{i}')
        x = block(x, task=task, train=train, valid=valid)
        i += 1
    x = jnp.mean(x, axis=(1, 2))
    return MultiHead(self.num_heads, self.num_classes, use_bias=self.head_bias,
                     name='head')(x, task)


class ResNetCifar(nn.Module):
  """CIFAR ResNet-(6n+2) with option-A shortcuts (He et al. 2016, Sec. 4.2).

  As coded by akamaster / VITA-Group PrAC-LTH (``resnets.py``): 3x3 stem conv 16 + norm + ReLU,
  three stages of n BasicBlocks with widths 16/32/64 (stride 2 at the first block of stages 2 and
  3), parameter-free option-A shortcuts (:func:`option_a_shortcut`), global average pool, heads
  (D = 64). ResNet-20: n = 3 (0.27M params), ResNet-56: n = 9 (0.85M). The input normalisation
  layer of PrAC-LTH is left to the data pipeline.

  Layout: ``stem``, ``norm_stem``, ``block_0 .. block_{3n-1}`` (each ``conv_0, norm_0, conv_1,
  norm_1``, never a shortcut), ``head``. Sows ``stem``, ``block_i/conv_0``, ``block_i/conv_1``.

  Attributes:
    depth: 6n + 2 (20, 32, 44, 56, 110, ...).
    num_heads: number of pre-allocated heads.
    num_classes: outputs per head.
    norm: one of :data:`NORMS` (default ``'batch'``).
    width_multiplier: scales 16/32/64.
    num_tasks: rows of ``'task_batch'`` norm; defaults to ``num_heads``.
  """
  depth: int = 20
  num_heads: int = 1
  num_classes: int = 10
  norm: str = 'batch'
  width_multiplier: float = 1.0
  num_tasks: int | None = None

  @nn.compact
  def __call__(self, x: Array, task: Any = 0, train: bool = False,
               valid: Any = None) -> Array:
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f'ResNetCifar depth must be 6n + 2 (e.g. 20, 56), got {self.depth}.')
    n = (self.depth - 2) // 6
    rows = _check_norm(self.norm, self.num_heads, self.num_tasks)
    width = functools.partial(scaled_width, multiplier=self.width_multiplier)
    stem = Conv(width(16), (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                   kernel_init=_he_fan_in, name='stem')
    x = stem(x)
    x = _norm_layer(self.norm, name='norm_stem', num_tasks=rows, task=task, train=train,
                      valid=valid)(x)
    x = _relu_and_sow(stem, x)
    i = 0
    for stage, w in enumerate((16, 32, 64)):
      for j in range(n):
        strides = 2 if stage > 0 and j == 0 else 1
        block = BasicBlock(width(w), strides=strides, norm=self.norm, num_tasks=rows,
                           shortcut='a', kernel_init=_he_fan_in, name=f'block_{i}')
        x = block(x, task=task, train=train, valid=valid)
        i += 1
    x = jnp.mean(x, axis=(1, 2))
    return MultiHead(self.num_heads, self.num_classes, name='head')(x, task)


# ------------------------------------------------------------------------------------------------
# VGG.

_VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512,
              'M')


class VGG16BN(nn.Module):
  """CIFAR VGG-16 with BatchNorm (configuration D), optionally with two FC-4096 layers (CPG).

  13 convs 3x3 pad 1 (no bias) each followed by norm and ReLU, max-pool 2x2 after convs 2, 4, 7,
  10 and 13. ``fc_layers=False`` follows PrAC-LTH's ``vgg16_bn``: no pool after the last conv, a
  global average pool, heads (D = 512). ``fc_layers=True`` follows CPG's
  ``custom_vgg_cifar100`` (Hung et al. 2019): the fifth max-pool, flatten (1x1 on 32x32 inputs; we
  take a global average pool, identical there and defined for other sizes), dense 4096 -> ReLU ->
  dense 4096 -> ReLU (biases, no dropout), heads (D = 4096).

  Layout: ``conv_0 .. conv_12``, ``norm_0 .. norm_12``, [``dense_0, dense_1``], ``head``. Sows
  every ``conv_i`` and ``dense_i``.

  Attributes:
    num_heads: number of pre-allocated heads.
    num_classes: outputs per head.
    norm: one of :data:`NORMS` (default ``'batch'``).
    width_multiplier: scales all conv and FC widths.
    fc_layers: add the two FC-4096 layers of CPG.
    num_tasks: rows of ``'task_batch'`` norm; defaults to ``num_heads``.
  """
  num_heads: int = 1
  num_classes: int = 10
  norm: str = 'batch'
  width_multiplier: float = 1.0
  fc_layers: bool = False
  num_tasks: int | None = None

  @nn.compact
  def __call__(self, x: Array, task: Any = 0, train: bool = False,
               valid: Any = None) -> Array:
    rows = _check_norm(self.norm, self.num_heads, self.num_tasks)
    cfg = _VGG16_CFG if self.fc_layers else _VGG16_CFG[:-1]
    i = 0
    for v in cfg:
      if v == 'M':
        x = ops.max_pool(x, (2, 2), strides=(2, 2))
        continue
      conv = Conv(scaled_width(v, self.width_multiplier), (3, 3), padding=((1, 1), (1, 1)),
                     use_bias=False, kernel_init=_he_fan_out, name=f'conv_{i}')
      x = conv(x)
      x = _norm_layer(self.norm, name=f'norm_{i}', num_tasks=rows, task=task, train=train,
                      valid=valid)(x)
      x = _relu_and_sow(conv, x)
      i += 1
    x = jnp.mean(x, axis=(1, 2))
    if self.fc_layers:
      for j in range(2):
        dense = nn.Dense(scaled_width(4096, self.width_multiplier),
                         kernel_init=nn.initializers.normal(0.01), name=f'dense_{j}')
        x = _relu_and_sow(dense, dense(x))
    return MultiHead(self.num_heads, self.num_classes, name='head')(x, task)


# ------------------------------------------------------------------------------------------------
# Registry and helpers.

_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    'mlp': (MLP, {}),
    'small_convnet': (SmallConvNet, {}),
    'clnp_convnet': (CLNPConvNet, {}),
    'clnp_wide_fcn': (CLNPWideFCN, {}),
    'resnet18': (ResNet18, {'preact': False}),
    'preact_resnet18': (ResNet18, {'preact': True}),
    'resnet20': (ResNetCifar, {'depth': 20}),
    'resnet56': (ResNetCifar, {'depth': 56}),
    'vgg16_bn': (VGG16BN, {}),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _lookup(name: str):
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)}.')
  return _REGISTRY[name]


def create(name: str, *, num_heads: int, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of :data:`MODEL_NAMES` ('mlp', 'small_convnet', 'clnp_convnet', 'clnp_wide_fcn',
      'resnet18', 'preact_resnet18', 'resnet20', 'resnet56', 'vgg16_bn').
    num_heads: heads to pre-allocate (1 = single shared head).
    num_classes: outputs per head.
    **kwargs: further dataclass fields of the model (``norm``, ``width_multiplier``,
      ``hidden``, ``fc_layers``, ``num_tasks``, ...); they override the registry's presets.

  Returns:
    The (unbound) Flax module.

  Raises:
    ValueError: for an unknown name.

  Example::

    model = create('vgg16_bn', num_heads=20, num_classes=5, fc_layers=True, norm='task_batch')
  """
  cls, preset = _lookup(name)
  return cls(num_heads=num_heads, num_classes=num_classes, **{**preset, **kwargs})


def model_fields(name: str) -> frozenset[str]:
  """The dataclass fields a registered model accepts (what ``create``'s ``**kwargs`` may set)."""
  cls, _ = _lookup(name)
  return frozenset(f.name for f in dataclasses.fields(cls) if f.init and f.name not in
                   ('parent', 'name'))


def init(model: nn.Module, key: Array, input_shape: Sequence[int]) -> Variables:
  """Initialises ``model`` on zeros of ``input_shape`` with ``task=0, train=False`` (jitted).

  Args:
    model: a model of this module.
    key: PRNG key for the ``params`` initialisers.
    input_shape: e.g. ``(1, 32, 32, 3)``.

  Returns:
    ``{'params': ...}`` plus ``'batch_stats'`` when the model has running statistics.
  """
  shape = tuple(input_shape)
  try:
    hash(model)
  except TypeError:  # a model with unhashable fields: a trace of its own
    variables = jax.jit(functools.partial(_init_variables, model, shape=shape))(key)
  else:  # equal models share one trace (the cells of a sweep)
    variables = _init_shared(model, key, shape)
  return {c: variables[c] for c in ('params', 'batch_stats') if c in variables}


def _init_variables(model: nn.Module, key: Array, shape: tuple[int, ...]) -> Variables:
  return model.init(key, jnp.zeros(shape, jnp.float32), task=0, train=False)


_init_shared = jax.jit(_init_variables, static_argnums=(0, 2))


def hidden_activations(state: Mapping[str, Any]) -> dict[str, Array]:
  """Flat ``{'<module path>': post-ReLU activation}`` from a mutated ``intermediates`` state.

  Args:
    state: the second output of ``apply(..., mutable=['intermediates', ...])`` or its
      ``'intermediates'`` entry.

  Returns:
    Module paths (``'/'``-joined, e.g. ``'block_0/conv_1'``) to the last sown activation; the
    input of ``criteria.activation``. Key order follows the state's dicts (sorted once the state
    has passed through ``jit``); :func:`hidden_layer_names` gives the forward order.
  """
  inter = state.get('intermediates', state)
  flat = traverse_util.flatten_dict(inter)
  out = {}
  for path, value in flat.items():
    if path[-1] == ACTIVATION_KEY:
      out['/'.join(path[:-1])] = value[-1] if isinstance(value, tuple) else value
  return out


def hidden_layer_names(model: nn.Module, input_shape: Sequence[int]) -> tuple[str, ...]:
  """Module paths of all sown hidden activations, in forward order (abstract, no compute).

  Args:
    model: a model of this module.
    input_shape: e.g. ``(1, 32, 32, 3)``.

  Returns:
    e.g. ``('conv_0', 'conv_1', 'dense_0')`` or ``('stem', 'block_0/conv_0', ...)``.
  """
  names: list[str] = []

  def f(key):
    _, state = model.init_with_output(key, jnp.zeros(tuple(input_shape), jnp.float32), task=0,
                                      train=False, mutable=True)
    names.extend(hidden_activations(state))
    return state

  jax.eval_shape(f, jax.random.key(0))
  return tuple(names)
