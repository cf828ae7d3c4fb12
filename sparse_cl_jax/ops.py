"""Convolution and max-pooling with backward passes that XLA:CPU runs fast everywhere.

Why this module exists (measured, see ``docs/results.md`` and ``benchmarks/peer_pytorch.py``):

* JAX differentiates a convolution into two convolutions (input gradient, kernel gradient) whose
  dimension numbers are not the standard ``NHWC``/``HWIO`` layout. At the top level of a jitted
  function XLA:CPU rewrites them into a layout its fast convolution libraries take; inside a
  ``lax.fori_loop``/``lax.scan`` body it does not, and they fall back to a naive loop nest: a
  kernel gradient that costs ~20 ms at top level costs ~700 ms inside a loop (jax-ml/jax#12868).
  :func:`conv_general_dilated` has a ``jax.custom_vjp`` whose backward pass is written as
  ordinary ``NHWC``/``HWIO`` convolutions (explicit transposes and padding), so it is fast in a
  loop body too. Its values are those of ``lax.conv_general_dilated`` (tested to float rounding).
* ``nn.max_pool``'s backward pass is a ``select_and_scatter`` that XLA:CPU runs slowly.
  :func:`max_pool` takes the maximum over the window's strided slices instead: the backward pass
  is a few element-wise selects and strided pads (``_strided_max``). Forward values and
  gradients are identical, ties included: a window's gradient goes to its first maximum in
  row-major order, as ``select_and_scatter`` and PyTorch's ``max_pool2d`` give it. Windows that
  tile the input (2x2 stride 2) have their own backward pass in one element-wise pass
  (``_tiled_max``).
* A convolution of a one-channel input (a grey-scale first layer) is a sum of shifted images
  (``_shifted_sum``): XLA:CPU's convolution runs such inputs several times slower.
* The kernel gradient hands its padding to the convolution and keeps its transpose apart: XLA:CPU
  emits a transpose fused with a pad as a slow element-by-element loop.

Issue 27 measured the training step before and after them with ``benchmarks/cpu_step.py``
(``docs/results.md``).

Whether these replace the stock ops is decided in :mod:`sparse_cl_jax.runtime` (per backend: on
by default on CPU, off on GPU/TPU where cuDNN/XLA handle the stock ops well). Both functions
take the stock signatures, so ``nn.Conv(..., conv_general_dilated=ops.conv_general_dilated)``
keeps the parameter tree unchanged.

Forward-mode differentiation (``jax.jvp``) through a ``custom_vjp`` is not defined; the library
computes Hessian-vector products (GraSP) reverse-over-reverse, which works. Code that needs
``jax.jvp`` through a model can switch to the stock ops with ``runtime.use_fast_ops(False)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from sparse_cl_jax import runtime

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if ndim != 4 or dimension_numbers is None:
    return False
  try:
    want = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    got = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
  except (TypeError, ValueError):
    return False
  return want == got


def _explicit_padding(padding, in_sizes, k_sizes, strides, dilation):
  if isinstance(padding, str):
    eff = [(k - 1) * d + 1 for k, d in zip(k_sizes, dilation)]
    return tuple(lax.padtype_to_pads(in_sizes, eff, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` with a loop-friendly backward pass (see the module docstring).

  Used when :func:`runtime.fast_ops` is on and the call is a plain 2-D ``NHWC``/``HWIO``
  convolution (no input dilation, no feature/batch groups); every other call goes to
  ``lax.conv_general_dilated`` unchanged.
  """
  n_sp = lhs.ndim - 2
  lhs_dilation = tuple(lhs_dilation or (1,) * n_sp)
  rhs_dilation = tuple(rhs_dilation or (1,) * n_sp)
  window_strides = tuple(window_strides)
  plain = (runtime.fast_ops() and _is_nhwc(dimension_numbers, lhs.ndim)
           and all(d == 1 for d in lhs_dilation) and feature_group_count == 1
           and batch_group_count == 1 and preferred_element_type is None)
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[0:2], window_strides, rhs_dilation)
  return _conv(lhs, rhs, window_strides, pads, rhs_dilation, precision)


def _forward(x, w, strides, pads, dilation, precision):
  return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


def _shifted_sum(x, w, strides, pads, dilation):
  """A one-channel convolution as ``KH * KW`` shifted images times a kernel row, added up.

  XLA:CPU's convolution runs a one-channel input (a grey-scale first layer) at a small fraction
  of its speed on wider inputs (a 128 x 28 x 28 x 1 -> 32 convolution took 2.2 ms, the sum of
  nine scaled shifts 0.8 ms, in a one-off measurement of issue 27), and XLA fuses the sum with
  the bias and the ReLU that follow. The taps are added in a fixed order, so values match
  ``lax.conv_general_dilated`` to float rounding.
  """
  kh, kw, _, _ = w.shape
  xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
  oh = (xp.shape[1] - (kh - 1) * dilation[0] - 1) // strides[0] + 1
  ow = (xp.shape[2] - (kw - 1) * dilation[1] - 1) // strides[1] + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      r, c = i * dilation[0], j * dilation[1]
      part = lax.slice(xp, (0, r, c, 0), (xp.shape[0], r + (oh - 1) * strides[0] + 1,
                                          c + (ow - 1) * strides[1] + 1, 1),
                       (1, strides[0], strides[1], 1)) * w[i, j, 0][None, None, None, :]
      out = part if out is None else out + part
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, dilation, precision):
  return _forward(x, w, strides, pads, dilation, precision)


def _conv_fwd(x, w, strides, pads, dilation, precision):
  """The forward pass of a differentiated convolution. A one-channel input is a sum of shifted
  images here (:func:`_shifted_sum`), which XLA fuses with the bias and ReLU of a training step;
  without a gradient (evaluation), the convolution above is the faster one."""
  if x.shape[3] == 1 and x.dtype == w.dtype == jnp.float32:
    return _shifted_sum(x, w, strides, pads, dilation), (x, w)
  return _forward(x, w, strides, pads, dilation, precision), (x, w)


def _input_grad(dy, w, x_shape, strides, pads, dilation, precision):
  """dL/dx: the output gradient, zero-dilated by the stride, correlated with the flipped kernel.

  With ``x_pad = pad(x, pads)`` and ``y[o] = sum_k x_pad[o*s + k*d] w[k]``, the gradient is
  ``dx_pad[i] = sum_k dy_dil[i - k*d] w[k]``: a stride-1 convolution of ``dy`` dilated by ``s``
  (interior zeros) with the spatially flipped, in/out-swapped kernel, padded by ``(K-1)*d`` on
  the low side; cropping ``pads`` off ``dx_pad`` folds into the same padding.
  """
  kh, kw = w.shape[0], w.shape[1]
  cfg = [(0, 0, 0)]
  for ax, (k, s, d, (lo, _)) in enumerate(zip((kh, kw), strides, dilation, pads)):
    size_in = x_shape[1 + ax]
    size_out = dy.shape[1 + ax]
    low = (k - 1) * d - lo
    high = size_in + (k - 1) * d - ((size_out - 1) * s + 1) - low
    cfg.append((low, high, s - 1))
  cfg.append((0, 0, 0))
  dy_pad = lax.pad(dy, jnp.zeros((), dy.dtype), cfg)
  w_t = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))  # [KH, KW, C_out, C_in]
  return lax.conv_general_dilated(dy_pad, w_t, (1, 1), 'VALID', rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


def _kernel_grad(x, dy, w_shape, strides, pads, dilation, precision):
  """dL/dw[k, ci, co] = sum_{n, o} x_pad[n, o*s + k*d, ci] dy[n, o, co], as an NHWC conv.

  The input channels play the batch, the examples the input features and ``dy`` the kernel
  (dilated by the stride); the window moves by the kernel dilation.
  """
  kh, kw = w_shape[0], w_shape[1]
  x_pads = []
  for ax, (k, s, d, (lo, _)) in enumerate(zip((kh, kw), strides, dilation, pads)):
    size_out = dy.shape[1 + ax]
    needed = (k - 1) * d + (size_out - 1) * s + 1  # extent of x_pad that the output reads
    x_pads.append((lo, needed - lo - x.shape[1 + ax]))
  if any(lo < 0 or hi < 0 for lo, hi in x_pads):  # cropping: pad (and crop) explicitly
    cfg = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in x_pads] + [(0, 0, 0)]
    x, x_pads = lax.pad(x, jnp.zeros((), x.dtype), cfg), [(0, 0), (0, 0)]
  # The padding goes to the convolution and the transpose stands alone: fused with a pad (or with
  # its producer), XLA:CPU emits the transpose as a slow element-by-element loop (3.5 ms instead
  # of 0.4 ms for a 128 x 14 x 14 x 32 input).
  lhs = lax.optimization_barrier(jnp.transpose(x, (3, 1, 2, 0)))  # [C_in, H, W, N]
  rhs = jnp.transpose(dy, (1, 2, 0, 3))  # [OH, OW, N, C_out]
  out = lax.conv_general_dilated(lhs, rhs, dilation, x_pads, rhs_dilation=strides,
                                 dimension_numbers=_NHWC, precision=precision)
  return jnp.transpose(out, (1, 2, 0, 3))  # [KH, KW, C_in, C_out]


def _conv_bwd(strides, pads, dilation, precision, res, dy):
  x, w = res
  dx = _input_grad(dy, w, x.shape, strides, pads, dilation, precision)
  dw = _kernel_grad(x, dy, w.shape, strides, pads, dilation, precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def max_pool(x, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = 'VALID'):
  """``flax.linen.max_pool`` for ``[B, H, W, C]`` inputs, as a maximum over strided slices.

  Forward values equal ``nn.max_pool``'s (padding counts as ``-inf``), and so do gradients: a
  window's whole gradient goes to its first maximum in row-major order when several elements
  tie, as with ``nn.max_pool`` (``reduce_window``) and PyTorch's ``max_pool2d``. Ties are common
  (a constant image background gives equal activations). Falls back to ``nn.max_pool`` when
  :func:`runtime.fast_ops` is off or the input is not 4-D.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top  (models import this module)
  window_shape = tuple(window_shape)
  strides = tuple(strides) if strides is not None else (1,) * len(window_shape)
  if not runtime.fast_ops() or x.ndim != 4 or len(window_shape) != 2:
    return nn.max_pool(x, window_shape, strides=strides, padding=padding)
  pads = _explicit_padding(padding, x.shape[1:3], window_shape, strides, (1, 1))
  (kh, kw), (sh, sw) = window_shape, strides
  # Pad, and drop the rows and columns no window reaches (a negative high pad), so that the
  # windows end where the input does: the backward passes below then know its shape.
  h, w = x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1])
  oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
  rows = (pads[0][0], pads[0][1] - (h - (oh - 1) * sh - kh))
  cols = (pads[1][0], pads[1][1] - (w - (ow - 1) * sw - kw))
  if rows != (0, 0) or cols != (0, 0):
    x = lax.pad(x, _lowest(x.dtype), [(0, 0, 0), (*rows, 0), (*cols, 0), (0, 0, 0)])
  if (kh, kw) == (sh, sw):
    # Non-overlapping windows that tile the input: one reshape and one reduction.
    return _tiled_max(x, kh, kw)
  return _strided_max(x, kh, kw, sh, sw)


def _lowest(dtype):
  """The value that never wins a maximum: ``-inf``, or the integer type's minimum."""
  return jnp.array(-jnp.inf if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).min,
                   dtype)


def _first_index(parts, y):
  """Per window, the row-major position of its first maximum: ``parts[p]`` holds element ``p``
  of every window, ``y`` the windows' maxima. The whole gradient of a window goes there, as the
  stock ``reduce_window`` gradient and PyTorch's ``max_pool2d`` give it. A small integer array
  (``int8`` up to 127 positions), computed in the forward pass where XLA fuses it with the
  maximum, so that the backward pass reads it instead of the input."""
  index = jnp.int8 if len(parts) <= 127 else jnp.int32
  first = jnp.full(y.shape, len(parts) - 1, index)
  for p in reversed(range(len(parts) - 1)):
    first = jnp.where(parts[p] == y, index(p), first)
  return first


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _tiled_max(x, kh: int, kw: int):
  """Maximum over non-overlapping ``kh x kw`` windows that tile ``x`` [B, H, W, C].

  Without a gradient (evaluation) a ``reduce_window``, which XLA:CPU runs about twice as fast as
  the reshape below inside a whole forward pass; with one, the reshape, which XLA fuses with the
  ReLU before it. Both give the same values (a maximum is exact).
  """
  return lax.reduce_window(x, _lowest(x.dtype), lax.max, (1, kh, kw, 1), (1, kh, kw, 1),
                           'VALID')


def _tiled_max_fwd(x, kh, kw):
  """The maximum and, as the residual, :func:`_first_index`."""
  b, h, w, c = x.shape
  xr = x.reshape(b, h // kh, kh, w // kw, kw, c)
  y = jnp.max(xr, axis=(2, 4))
  return y, _first_index([xr[:, :, p // kw, :, p % kw, :] for p in range(kh * kw)], y)


def _tiled_max_bwd(kh, kw, first, dy):
  """Each window's gradient to its first maximum: one element-wise pass that does not read ``x``.

  Measured inside the training step of ``benchmarks/peer_pytorch.py`` (epoch of the small
  convnet): as fast as the automatic gradient of the reshape's ``jnp.max`` that it replaces
  (which splits ties evenly, in three passes); finding the index in the backward pass cost 3-5%
  more, and a gradient built from per-position masks inside one fusion 17 ms per step.
  """
  b, oh, ow, c = dy.shape
  zero = jnp.zeros((), dy.dtype)
  rows = [jnp.stack([jnp.where(first == i * kw + j, dy, zero) for j in range(kw)], axis=3)
          for i in range(kh)]  # each [B, H/kh, W/kw, kw, C]
  return (jnp.stack(rows, axis=2).reshape(b, oh * kh, ow * kw, c),)  # [B, H/kh, kh, W/kw, kw, C]


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


def _window_slices(x, kh: int, kw: int, sh: int, sw: int):
  """The ``kh * kw`` strided slices of ``x`` [B, H, W, C], one per window position (row-major):
  slice ``(i, j)`` holds element ``(i, j)`` of every ``kh x kw`` window taken with strides
  ``(sh, sw)``."""
  oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  return [lax.slice(x, (0, i, j, 0), (x.shape[0], i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1,
                                      x.shape[3]), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _strided_max(x, kh: int, kw: int, sh: int, sw: int):
  """Maximum over (possibly overlapping) ``kh x kw`` windows with strides ``(sh, sw)`` that end
  where ``x`` does, as an element-wise maximum of strided slices."""
  return functools.reduce(jnp.maximum, _window_slices(x, kh, kw, sh, sw))


def _strided_max_fwd(x, kh, kw, sh, sw):
  """The maximum and, as the residual, :func:`_first_index`."""
  parts = _window_slices(x, kh, kw, sh, sw)
  y = functools.reduce(jnp.maximum, parts)
  return y, _first_index(parts, y)


def _strided_max_bwd(kh, kw, sh, sw, first, dy):
  """Each window's gradient to its first maximum; the automatic gradient of the chain of
  ``jnp.maximum`` would halve it at every tie along the chain. Each window position's share is
  put back where its slice came from by a strided pad (the transpose of the slice)."""
  zero = jnp.zeros((), dy.dtype)
  dx = None
  for p in range(kh * kw):
    i, j = divmod(p, kw)
    cfg = [(0, 0, 0), (i, kh - 1 - i, sh - 1), (j, kw - 1 - j, sw - 1), (0, 0, 0)]
    part = lax.pad(jnp.where(first == p, dy, zero), zero, cfg)
    dx = part if dx is None else dx + part
  return (dx,)


_strided_max.defvjp(_strided_max_fwd, _strided_max_bwd)
