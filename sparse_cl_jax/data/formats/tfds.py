"""A TFDS tree prepared in ``array_record`` format, read through ``tfds.data_source``.

Random access, no TensorFlow; ``tensorflow_datasets`` (the ``tfds`` extra) is imported only when
`load_tfds` is called.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sparse_cl_jax.data import source as source_lib

TFDS_PREPARE = ('pip install "sparse_cl_jax[tfds]" tensorflow, then '
                '`tfds build {name} --data_dir=DIR --file_format=array_record`')


def load_tfds(tfds_name: str, data_dir: str | os.PathLike[str] | None, *,
              missing_message: str | None = None) -> source_lib.Source:
  """The train and test splits of a TFDS image classification dataset (features image, label).

  Args:
    tfds_name: the TFDS name.
    data_dir: the TFDS data_dir (``None``: TFDS's default).
    missing_message: when given, the message of the ``FileNotFoundError`` raised if the dataset
      cannot be opened (TFDS's own error is appended).

  Returns:
    The `Source` (``coarse_labels`` from a ``coarse_label`` feature when there is one).

  Raises:
    ImportError: tensorflow-datasets is not installed.
    FileNotFoundError: the dataset is not prepared in ``data_dir``.
    ValueError: images of varying size.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f'Reading the TFDS dataset {tfds_name!r} needs tensorflow-datasets: '
        'pip install "sparse_cl_jax[tfds]".') from None

  splits = {}
  info = None
  for split in ('train', 'test'):
    ds = _open_split(tfds, tfds_name, split, data_dir, missing_message)
    info = ds.dataset_info
    splits[split] = _read_split(ds, info, tfds_name)
  label_feature = info.features['label']
  num_classes = int(label_feature.num_classes)
  names = getattr(label_feature, 'names', None)
  coarse_labels = None
  if splits['train'][2] is not None:
    coarse_labels = source_lib.class_to_coarse(splits['train'][1], splits['train'][2], num_classes)
  return source_lib.from_arrays(
      splits['train'][0], splits['train'][1], splits['test'][0], splits['test'][1],
      name=tfds_name, num_classes=num_classes,
      class_names=names if names and len(names) == num_classes else None,
      coarse_labels=coarse_labels)


def _open_split(tfds: Any, tfds_name: str, split: str, data_dir: str | os.PathLike[str] | None,
                missing_message: str | None) -> Any:
  """``tfds.data_source`` of one split; a ``FileNotFoundError`` that says how to prepare it."""
  try:
    return tfds.data_source(tfds_name, split=split,
                            data_dir=None if data_dir is None else os.fspath(data_dir))
  except Exception as e:  # TFDS raises many types; add the actionable part and keep the cause.
    if missing_message is not None:
      raise FileNotFoundError(f'{missing_message} TFDS said: {type(e).__name__}: {e}') from e
    raise FileNotFoundError(
        f'Could not open TFDS dataset {tfds_name!r} split {split!r} (data_dir={data_dir}). '
        'tfds.data_source needs the dataset prepared in array_record format: '
        f'{TFDS_PREPARE.format(name=tfds_name)}, then pass that DIR as data_dir. '
        f'Cause: {type(e).__name__}: {e}') from e


def _read_split(ds: Any, info: Any, tfds_name: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(uint8 images, int64 labels, int64 coarse labels or None) of every example of ``ds``."""
  n = len(ds)
  first = ds[0] if n else None
  shape = tuple(info.features['image'].shape) if first is None else np.shape(first['image'])
  if any(d is None for d in shape):
    raise ValueError(f'TFDS {tfds_name}: images of varying size {shape} are not supported.')
  x = np.zeros((n,) + tuple(shape), np.uint8)
  y = np.zeros((n,), np.int64)
  coarse = np.zeros((n,), np.int64) if 'coarse_label' in info.features else None
  for i in range(n):
    example = first if i == 0 else ds[i]
    x[i] = example['image']
    y[i] = example['label']
    if coarse is not None:
      coarse[i] = example['coarse_label']
  return x, y, coarse
