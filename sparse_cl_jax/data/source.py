"""The `Source` type (a whole labelled image dataset as host arrays) and building one from arrays.

`from_arrays` converts and checks user arrays (`to_uint8_images`, `to_labels`); `resize_source`
resizes every image once on the host; `class_to_coarse` derives the superclass of each class
from per-example coarse labels (CIFAR-100's 20 superclasses, from either of its routes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  """A labelled image dataset as host numpy arrays.

  Attributes:
    name: dataset name (e.g. ``'digits'``).
    x_train: uint8 [N, H, W, C] training images.
    y_train: int32 [N] training labels in ``[0, num_classes)``.
    x_test: uint8 [M, H, W, C] test images (never used for model selection).
    y_test: int32 [M] test labels.
    num_classes: number of classes of the dataset.
    class_names: optional human-readable name of each class.
    coarse_labels: optional int32 [num_classes], the superclass of each class (CIFAR-100's 20
      superclasses; used by ``make_stream(..., class_order='coarse')`` for CPG's split).
  """

  name: str
  x_train: np.ndarray = dataclasses.field(repr=False)
  y_train: np.ndarray = dataclasses.field(repr=False)
  x_test: np.ndarray = dataclasses.field(repr=False)
  y_test: np.ndarray = dataclasses.field(repr=False)
  num_classes: int
  class_names: tuple[str, ...] | None = dataclasses.field(default=None, repr=False)
  coarse_labels: np.ndarray | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    for split in ('train', 'test'):
      x, y = getattr(self, f'x_{split}'), getattr(self, f'y_{split}')
      if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f'{self.name}: x_{split} must be a uint8 numpy array [N, H, W, C], got '
                         f'{getattr(x, "dtype", type(x))} {getattr(x, "shape", "")}.')
      if not isinstance(y, np.ndarray) or y.dtype != np.int32 or y.shape != x.shape[:1]:
        raise ValueError(f'{self.name}: y_{split} must be an int32 numpy array of shape '
                         f'{x.shape[:1]}, got {getattr(y, "dtype", type(y))} '
                         f'{getattr(y, "shape", "")}.')
      if y.size and (y.min() < 0 or y.max() >= self.num_classes):
        raise ValueError(f'{self.name}: y_{split} has labels outside [0, {self.num_classes}).')
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ValueError(f'{self.name}: train images {self.x_train.shape[1:]} and test images '
                       f'{self.x_test.shape[1:]} differ in shape.')
    if self.class_names is not None and len(self.class_names) != self.num_classes:
      raise ValueError(f'{self.name}: {len(self.class_names)} class names for '
                       f'{self.num_classes} classes.')
    if self.coarse_labels is not None and np.shape(self.coarse_labels) != (self.num_classes,):
      raise ValueError(f'{self.name}: coarse_labels must have shape ({self.num_classes},).')

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(int(d) for d in self.x_train.shape[1:])


def from_arrays(x_train: Any, y_train: Any, x_test: Any, y_test: Any, *, name: str = 'arrays',
                num_classes: int | None = None, class_names: Sequence[str] | None = None,
                coarse_labels: Any = None) -> Source:
  """Builds a `Source` from plain arrays.

  Args:
    x_train: images [N, H, W, C] or [N, H, W] (C=1 is added): uint8, integers in 0..255, or
      floats in [0, 1] (converted with ``round(x * 255)``).
    y_train: integer labels [N], non-negative.
    x_test: test images, same conventions and image shape.
    y_test: test labels.
    name: name of the source.
    num_classes: number of classes; ``None`` uses ``max(label) + 1`` over both splits.
    class_names: optional name per class.
    coarse_labels: optional superclass per class ([num_classes] integers).

  Returns:
    The `Source`.

  Raises:
    ValueError: bad dtypes, ranges or shapes.
  """
  xs = [to_uint8_images(x, f'{name}: x_{s}') for x, s in ((x_train, 'train'), (x_test, 'test'))]
  ys = [to_labels(y, f'{name}: y_{s}') for y, s in ((y_train, 'train'), (y_test, 'test'))]
  if num_classes is None:
    num_classes = int(max((int(y.max()) + 1 for y in ys if y.size), default=0))
  if coarse_labels is not None:
    coarse_labels = np.asarray(coarse_labels, np.int32)
  return Source(name=name, x_train=xs[0], y_train=ys[0], x_test=xs[1], y_test=ys[1],
                num_classes=int(num_classes),
                class_names=None if class_names is None else tuple(str(c) for c in class_names),
                coarse_labels=coarse_labels)


def resize_source(source: Source, size: int, *, chunk: int = 1000) -> Source:
  """The source with every image resized to ``size x size`` (bilinear, antialiased), on the host.

  What ``transforms.Resize(size)`` does to the square images of the DST-for-CL authors'
  miniImageNet pipeline (84x84 -> 32x32), applied once to both splits before the stream is built
  (``config.image_size``). A source already at that size is returned unchanged.

  Args:
    source: the `Source`.
    size: output side in pixels (> 0).
    chunk: images resized per call (bounds the float32 working memory).

  Returns:
    A new `Source` with ``uint8 [N, size, size, C]`` images (rounded and clipped to 0..255).

  Raises:
    ValueError: ``size`` not a positive integer.
  """
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f'config.image_size={size!r} must be a positive integer (0 = keep the '
                     'size the images are read at)')
  h, w, c = source.input_shape
  if (h, w) == (size, size):
    return source
  resize = jax.jit(lambda x: jax.image.resize(x.astype(jnp.float32), (x.shape[0], size, size, c),
                                              method='linear', antialias=True))

  def convert(x: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], size, size, c), np.uint8)
    for i in range(0, x.shape[0], chunk):
      part = np.asarray(resize(jnp.asarray(x[i:i + chunk])))
      out[i:i + chunk] = np.clip(np.round(part), 0, 255).astype(np.uint8)
    return out

  return dataclasses.replace(source, x_train=convert(source.x_train),
                             x_test=convert(source.x_test))


def to_uint8_images(x: Any, what: str) -> np.ndarray:
  """Images as uint8 [N, H, W, C]: uint8 kept, integers 0..255 cast, floats in [0, 1] rounded.

  Args:
    x: images [N, H, W, C] or [N, H, W] (C=1 is added).
    what: names the array in error messages.

  Returns:
    uint8 [N, H, W, C].

  Raises:
    ValueError: bad shape, dtype or value range.
  """
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f'{what}: expected images [N, H, W, C] or [N, H, W], got shape {x.shape}.')
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.floating):
    if x.size and (np.nanmin(x) < 0.0 or np.nanmax(x) > 1.0 or np.isnan(x).any()):
      raise ValueError(f'{what}: float images must lie in [0, 1].')
    return np.rint(x * 255.0).astype(np.uint8)
  if np.issubdtype(x.dtype, np.integer):
    if x.size and (x.min() < 0 or x.max() > 255):
      raise ValueError(f'{what}: integer images must lie in 0..255.')
    return x.astype(np.uint8)
  raise ValueError(f'{what}: unsupported image dtype {x.dtype}.')


def to_labels(y: Any, what: str) -> np.ndarray:
  """Non-negative integer labels [N] as int32 (``what`` names them in error messages)."""
  y = np.asarray(y)
  if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
    raise ValueError(f'{what}: expected integer labels [N], got {y.dtype} {y.shape}.')
  if y.size and y.min() < 0:
    raise ValueError(f'{what}: labels must be non-negative.')
  return y.astype(np.int32)


def class_to_coarse(fine: np.ndarray, coarse: np.ndarray, num_classes: int) -> np.ndarray:
  """The most frequent coarse label of each fine class (0 for classes without examples)."""
  table = np.zeros((num_classes, int(coarse.max(initial=0)) + 1), np.int64)
  np.add.at(table, (fine, coarse), 1)
  return np.argmax(table, axis=1).astype(np.int32)
