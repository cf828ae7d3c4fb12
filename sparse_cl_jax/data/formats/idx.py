"""IDX files, the format of MNIST and Fashion-MNIST (``.gz`` or uncompressed)."""

from __future__ import annotations

import gzip
import os
import pathlib
import struct
from collections.abc import Sequence

import numpy as np

from sparse_cl_jax.data import source as source_lib

# The four IDX files of MNIST and Fashion-MNIST (same names; ``.gz`` or uncompressed).
IDX_FILES = {
    'x_train': 'train-images-idx3-ubyte',
    'y_train': 'train-labels-idx1-ubyte',
    'x_test': 't10k-images-idx3-ubyte',
    'y_test': 't10k-labels-idx1-ubyte',
}
# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads one IDX file (the MNIST/Fashion-MNIST format), gzip-compressed if it ends in ``.gz``.

  Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
  0x0E float64), the number of dimensions, each dimension as a big-endian uint32, then the data in
  big-endian row-major order.

  Args:
    path: the file.

  Returns:
    The array, in native byte order.

  Raises:
    ValueError: bad magic number or truncated/oversized data.
  """
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f'{path}: not an IDX file (magic bytes {raw[:4]!r}).')
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f'{path}: truncated IDX header.')
  dims = struct.unpack(f'>{ndim}I', raw[4:header])
  count = int(np.prod(dims, dtype=np.int64))
  if len(raw) - header != count * dtype.itemsize:
    raise ValueError(f'{path}: IDX header says {dims} ({count * dtype.itemsize} bytes of data) '
                     f'but the file holds {len(raw) - header}.')
  array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
  return array.astype(dtype.newbyteorder('='))


def find_idx_files(directory: pathlib.Path) -> dict[str, pathlib.Path] | None:
  """The four IDX files in ``directory`` (``.gz`` preferred), or None if any is missing."""
  found = {}
  for key, stem in IDX_FILES.items():
    path = next((p for p in (directory / f'{stem}.gz', directory / stem) if p.is_file()), None)
    if path is None:
      return None
    found[key] = path
  return found


def load_idx_source(name: str, files: dict[str, pathlib.Path],
                    class_names: Sequence[str] | None) -> source_lib.Source:
  """The `Source` of four IDX files (as found by `find_idx_files`) of 10-class images."""
  arrays = {key: read_idx(path) for key, path in files.items()}
  for split in ('train', 'test'):
    x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
      raise ValueError(f'{name} {split}: images {x.shape} and labels {y.shape} do not match '
                       '(expected [N, 28, 28] and [N]).')
  return source_lib.from_arrays(arrays['x_train'], arrays['y_train'], arrays['x_test'],
                                arrays['y_test'], name=name, num_classes=10,
                                class_names=class_names)
