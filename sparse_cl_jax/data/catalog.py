"""The catalog of named datasets: `load_source` and `SOURCE_NAMES`.

Each name is read by one of the `formats` modules (nothing downloads): ``'digits'`` from
scikit-learn, ``'fashion_mnist'`` from IDX files, ``'mnist'``/``'cifar10'``/``'cifar100'`` from
their official files or else a prepared TFDS tree, ``'tfds:<name>'`` from TFDS only, and
``'tiny_imagenet'``/``'mini_imagenet'`` from a directory you prepared.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from sparse_cl_jax.data import source as source_lib
from sparse_cl_jax.data import splits
from sparse_cl_jax.data.formats import cifar
from sparse_cl_jax.data.formats import folders
from sparse_cl_jax.data.formats import idx
from sparse_cl_jax.data.formats import tfds as tfds_format

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot')
_TFDS_NAMES = ('mnist', 'cifar10', 'cifar100')
_FOLDER_NAMES = ('tiny_imagenet', 'mini_imagenet')  # The keys of folders.FOLDER_IMAGE_SIZE.
SOURCE_NAMES = ('digits', 'fashion_mnist') + _TFDS_NAMES + _FOLDER_NAMES
_TFDS_PREFIX = 'tfds:'
# Fraction of each class used as test split when a source ships no test split of its own.
DIGITS_TEST_FRACTION = 0.2


def load_source(name: str, *, data_dir: str | os.PathLike[str] | None = None,
                seed: int = 0) -> source_lib.Source:
  """Loads a dataset by name.

  Names:
    * ``'digits'``: scikit-learn's ``load_digits`` (1797 real 8x8 digits, shipped with the
      scikit-learn wheel; the embedded default). Pixel values 0..16 are scaled to uint8 0..255
      (``round(v * 255 / 16)``). It has no official test split: a stratified split keeps, for each
      class, ``round(0.2 * n_c)`` randomly chosen images (``numpy.random.default_rng((seed,
      ...))``, ``seed=0`` by default) as test (359 test / 1438 train); both splits keep the
      original order.
    * ``'fashion_mnist'``: the four IDX files (``train-images-idx3-ubyte.gz`` ...) read directly
      from ``data_dir`` (default ``/usr/share/datasets/fashion-mnist``, Debian package
      ``dataset-fashion-mnist``); uncompressed files without ``.gz`` are accepted too.
    * ``'mnist'``, ``'cifar10'``, ``'cifar100'``: two routes, tried in this order.

      1. The official files in ``data_dir`` (no TensorFlow, no TFDS): MNIST's four IDX files
         (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
         ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``); CIFAR's python
         archive ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, its extracted folder
         ``cifar-10-batches-py/`` / ``cifar-100-python/`` inside ``data_dir``, or ``data_dir``
         being that folder or archive itself. The archive is read in place (never extracted);
         its pickles (dicts with ``b'data'`` uint8 [N, 3072] in CHW order and ``b'labels'``, or
         ``b'fine_labels'`` and ``b'coarse_labels'`` for CIFAR-100) are read by an unpickler
         that admits numpy arrays and nothing else. CIFAR-100 labels are the 100 fine labels.
      2. A TFDS tree prepared in ``array_record`` format, through ``tfds.data_source(name,
         split=..., data_dir=data_dir)`` (random access; reading needs ``tensorflow-datasets``,
         the ``tfds`` extra, but not TensorFlow; preparing it needs TensorFlow, see the README).
         ``data_dir=None`` is TFDS's default (``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).

      When neither route finds the data, ``FileNotFoundError`` names both.
      ``'tfds:<name>'`` loads any TFDS image classification dataset with ``image`` and ``label``
      features by route 2 only (e.g. ``'tfds:fashion_mnist'``). CIFAR-100 gets
      ``coarse_labels`` (its 20 superclasses) from either route.
    * ``'tiny_imagenet'``, ``'mini_imagenet'``: from a directory you prepared, ``data_dir``
      (required). Accepted layouts, tried in this order:

      1. ``train.npz`` and ``test.npz`` (or ``val.npz`` used as test when ``test.npz`` is absent),
         each with arrays ``x`` (uint8 [N, H, W, C]) and ``y`` (integer [N]) and optionally
         ``class_names`` (str [K]). `save_npz` writes this layout from any `Source`.
      2. Image folders: ``train/<class>/**/<image>`` (jpg/jpeg/png/bmp, any depth: Tiny-ImageNet's
         original ``train/<wnid>/images/*.JPEG`` fits) and, for the test split, either
         ``test/<class>/**`` or ``val/<class>/**`` with the same class folder names, or
         Tiny-ImageNet's original ``val/images/*.JPEG`` + ``val/val_annotations.txt``
         (``<file>\\t<wnid>\\t...`` per line; its unlabeled ``test/images`` is ignored). Classes
         are the sorted train folder names; images are converted to RGB and resized (bilinear) to
         64x64 (tiny_imagenet) or 84x84 (mini_imagenet) when they differ. Needs ``pillow``.
      3. mini_imagenet only: the pickles ``mini-imagenet-cache-{train,val,test}.pkl`` (dicts with
         ``image_data`` uint8 [N, 84, 84, 3] and ``class_dict`` {wnid: [indices]}). The 64/16/20
         few-shot class splits are merged into 100 classes (sorted wnids) and each class is split
         stratified, ``round(n_c / 6)`` test images per class (500 train / 100 test), from
         ``seed``. They are read by an unpickler that admits numpy arrays, dicts, lists and
         strings and nothing else.

      Reading image folders is slow (about 1-2 minutes for Tiny-ImageNet); save the result once
      with ``save_npz(source, directory)`` and load layout 1 afterwards.

  Args:
    name: one of `SOURCE_NAMES`, or ``'tfds:<tfds_name>'``.
    data_dir: where the data lives (see above); ``None`` uses the default of each source.
    seed: seed of the deterministic train/test split of sources that ship none (digits,
      mini_imagenet pickles); ignored otherwise.

  Returns:
    The `Source`.

  Raises:
    ValueError: unknown name.
    FileNotFoundError: the files of a local source are missing (for mnist / cifar10 / cifar100:
      neither the official files nor a prepared TFDS tree were found).
  """
  if name == 'digits':
    return _load_digits(seed)
  if name == 'fashion_mnist':
    return _load_fashion_mnist(data_dir)
  if name in _TFDS_NAMES:
    return _load_official_or_tfds(name, data_dir)
  if name.startswith(_TFDS_PREFIX) and len(name) > len(_TFDS_PREFIX):
    return tfds_format.load_tfds(name[len(_TFDS_PREFIX):], data_dir)
  if name in _FOLDER_NAMES:
    return folders.load_folder_dataset(name, data_dir, seed)
  raise ValueError(f'Unknown dataset {name!r}; valid names: {", ".join(SOURCE_NAMES)}, '
                   f'or {_TFDS_PREFIX}<any TFDS image classification dataset>.')


def _load_digits(seed: int) -> source_lib.Source:
  """scikit-learn's 8x8 digits, 0..16 scaled to 0..255, with a seeded stratified test split."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = np.rint(np.asarray(digits.images, np.float64) * (255.0 / 16.0)).astype(np.uint8)
  labels = np.asarray(digits.target, np.int32)
  rng = np.random.default_rng((seed, splits.SALT_SOURCE_SPLIT))
  train_idx, test_idx = splits.stratified_split(labels, DIGITS_TEST_FRACTION, rng)
  return source_lib.Source(
      name='digits', x_train=images[train_idx, :, :, None], y_train=labels[train_idx],
      x_test=images[test_idx, :, :, None], y_test=labels[test_idx], num_classes=10,
      class_names=tuple(str(c) for c in range(10)))


def _load_fashion_mnist(data_dir: str | os.PathLike[str] | None) -> source_lib.Source:
  """The four Fashion-MNIST IDX files of ``data_dir`` (default `FASHION_MNIST_DIR`)."""
  directory = pathlib.Path(FASHION_MNIST_DIR if data_dir is None else data_dir)
  files = idx.find_idx_files(directory)
  if files is None:
    raise FileNotFoundError(
        f'Fashion-MNIST IDX files (train-images-idx3-ubyte.gz ...) not found in {directory}. '
        f'Install the real data with `apt-get install -y dataset-fashion-mnist` (files go to '
        f'{FASHION_MNIST_DIR}), or pass data_dir=<directory holding the four IDX files>.')
  return idx.load_idx_source('fashion_mnist', files, FASHION_MNIST_CLASSES)


def _official_files_hint(name: str) -> str:
  """What route 1 of ``name`` (mnist, cifar10, cifar100) looks for."""
  if name == 'mnist':
    return ('the four MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
            't10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)')
  archive, folder = cifar.CIFAR_ARCHIVES[name][:2]
  return f'the official python archive {archive} (or its extracted folder {folder}/)'


def _load_official_or_tfds(name: str,
                           data_dir: str | os.PathLike[str] | None) -> source_lib.Source:
  """Route 1 (official files in ``data_dir``), else route 2 (a prepared TFDS tree)."""
  if data_dir is not None:
    directory = pathlib.Path(data_dir)
    if name == 'mnist':
      files = idx.find_idx_files(directory) if directory.is_dir() else None
      if files is not None:
        return idx.load_idx_source('mnist', files, [str(c) for c in range(10)])
    else:
      location = cifar.find_cifar(name, directory)
      if location is not None:
        return cifar.load_cifar(name, location)
  where = 'TFDS\'s default data_dir' if data_dir is None else f'data_dir={os.fspath(data_dir)}'
  both = (f'{name} not found in {where}. Either put {_official_files_hint(name)} in '
          f'config.data_dir (no TensorFlow needed), or prepare a TFDS tree: '
          f'{tfds_format.TFDS_PREPARE.format(name=name)}, and pass that DIR as data_dir (see the '
          'README, "Data").')
  try:
    import tensorflow_datasets  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise FileNotFoundError(both + ' (tensorflow-datasets is not installed, so only the '
                            'official files can be read here.)') from None
  return tfds_format.load_tfds(name, data_dir, missing_message=both)
