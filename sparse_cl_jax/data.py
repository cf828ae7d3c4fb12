"""Datasets, continual-learning task streams, exemplar memory and jit-friendly batching.

Three layers, each usable alone:

1. **Sources** (`load_source`, `from_arrays`): a whole labelled image dataset as host numpy arrays,
   ``uint8`` NHWC images and ``int32`` labels, with a train and a test split. Nothing here ever
   downloads anything. CIFAR-10/100 are read from the official python archives and MNIST /
   Fashion-MNIST from their IDX files without TensorFlow or TFDS; a prepared TFDS tree is the
   other route (``tensorflow-datasets`` is imported only when that route is used).
2. **Task streams** (`make_stream`): Split-X (disjoint class groups) or Permuted-X (all classes,
   one fixed pixel permutation per task), task- or class-incremental labels, a stratified validation
   split held out from the training data (the test split is never used for selection), and every
   task padded to the same shape and stacked, so one jitted step compiles once for all tasks.
3. **Exemplar memory** (`select_exemplars`, `ExemplarMemory`) for class-incremental methods with
   rehearsal (iCaRL herding, Rebuffi et al. 2017, Alg. 4; used by Lifelong Lottery Tickets), and
   two tiny jit-compatible batching helpers (`epoch_permutation`, `num_batches`, `batch_indices`).

Example::

  from sparse_cl_jax import data

  source = data.load_source('digits')
  stream = data.make_stream(source, scenario='split', num_tasks=5, incremental='task')
  x = jnp.asarray(stream.x_train)          # uint8 [T, N_max, 8, 8, 1], on device once
  perm = data.epoch_permutation(key, stream.n_train[t], stream.x_train.shape[1])
  idx, valid = data.batch_indices(perm, step, batch_size, stream.n_train[t])
  images = stream.normalize(x[t][idx])     # float32, inside jit
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pathlib
import pickle
import struct
import tarfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_cl_jax import types

# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot')
# The four IDX files of MNIST and Fashion-MNIST (same names; ``.gz`` or uncompressed).
_IDX_FILES = {
    'x_train': 'train-images-idx3-ubyte',
    'y_train': 'train-labels-idx1-ubyte',
    'x_test': 't10k-images-idx3-ubyte',
    'y_test': 't10k-labels-idx1-ubyte',
}
# Official CIFAR python archives: (archive file, folder it extracts to, train members, test
# members, meta member, label key, class-name key).
CIFAR_ARCHIVES = {
    'cifar10': ('cifar-10-python.tar.gz', 'cifar-10-batches-py',
                tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',), 'batches.meta',
                b'labels', b'label_names'),
    'cifar100': ('cifar-100-python.tar.gz', 'cifar-100-python', ('train',), ('test',), 'meta',
                 b'fine_labels', b'fine_label_names'),
}
_TFDS_NAMES = ('mnist', 'cifar10', 'cifar100')
TFDS_PREPARE = ('pip install "sparse_cl_jax[tfds]" tensorflow, then '
                '`tfds build {name} --data_dir=DIR --file_format=array_record`')
_FOLDER_NAMES = ('tiny_imagenet', 'mini_imagenet')
SOURCE_NAMES = ('digits', 'fashion_mnist') + _TFDS_NAMES + _FOLDER_NAMES
_TFDS_PREFIX = 'tfds:'
# Image side used when reading image folders (images of another size are resized, bilinear).
_FOLDER_IMAGE_SIZE = {'tiny_imagenet': 64, 'mini_imagenet': 84}
_IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png', '.bmp')
# Fraction of each class used as test split when a source ships no test split of its own.
DIGITS_TEST_FRACTION = 0.2
MINI_IMAGENET_TEST_FRACTION = 1.0 / 6.0  # 600 images per class -> 500 train / 100 test.


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


def load_source(name: str, *, data_dir: str | os.PathLike[str] | None = None,
                seed: int = 0) -> Source:
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
         ``seed``. Only load pickles you trust.

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
    return _load_tfds(name[len(_TFDS_PREFIX):], data_dir)
  if name in _FOLDER_NAMES:
    return _load_folder_dataset(name, data_dir, seed)
  raise ValueError(f'Unknown dataset {name!r}; valid names: {", ".join(SOURCE_NAMES)}, '
                   f'or {_TFDS_PREFIX}<any TFDS image classification dataset>.')


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
  xs = [_to_uint8_images(x, f'{name}: x_{s}') for x, s in ((x_train, 'train'), (x_test, 'test'))]
  ys = [_to_labels(y, f'{name}: y_{s}') for y, s in ((y_train, 'train'), (y_test, 'test'))]
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


def save_npz(source: Source, directory: str | os.PathLike[str]) -> None:
  """Writes ``train.npz`` and ``test.npz`` (arrays ``x``, ``y``, maybe ``class_names``).

  This is layout 1 of ``load_source('tiny_imagenet' | 'mini_imagenet', data_dir=directory)``.

  Args:
    source: the source to write.
    directory: created if missing.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  extra = {}
  if source.class_names is not None:
    extra['class_names'] = np.asarray(source.class_names, dtype=str)
  np.savez(directory / 'train.npz', x=source.x_train, y=source.y_train, **extra)
  np.savez(directory / 'test.npz', x=source.x_test, y=source.y_test, **extra)


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


_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def _load_digits(seed: int) -> Source:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = np.rint(np.asarray(digits.images, np.float64) * (255.0 / 16.0)).astype(np.uint8)
  labels = np.asarray(digits.target, np.int32)
  rng = np.random.default_rng((seed, _SALT_SOURCE_SPLIT))
  train_idx, test_idx = _stratified_split(labels, DIGITS_TEST_FRACTION, rng)
  return Source(name='digits', x_train=images[train_idx, :, :, None], y_train=labels[train_idx],
                x_test=images[test_idx, :, :, None], y_test=labels[test_idx], num_classes=10,
                class_names=tuple(str(c) for c in range(10)))


def _find_idx_files(directory: pathlib.Path) -> dict[str, pathlib.Path] | None:
  """The four IDX files in ``directory`` (``.gz`` preferred), or None if any is missing."""
  found = {}
  for key, stem in _IDX_FILES.items():
    path = next((p for p in (directory / f'{stem}.gz', directory / stem) if p.is_file()), None)
    if path is None:
      return None
    found[key] = path
  return found


def _load_idx_source(name: str, files: dict[str, pathlib.Path],
                     class_names: Sequence[str] | None) -> Source:
  arrays = {key: read_idx(path) for key, path in files.items()}
  for split in ('train', 'test'):
    x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
      raise ValueError(f'{name} {split}: images {x.shape} and labels {y.shape} do not match '
                       '(expected [N, 28, 28] and [N]).')
  return from_arrays(arrays['x_train'], arrays['y_train'], arrays['x_test'], arrays['y_test'],
                     name=name, num_classes=10, class_names=class_names)


def _load_fashion_mnist(data_dir: str | os.PathLike[str] | None) -> Source:
  directory = pathlib.Path(FASHION_MNIST_DIR if data_dir is None else data_dir)
  files = _find_idx_files(directory)
  if files is None:
    raise FileNotFoundError(
        f'Fashion-MNIST IDX files (train-images-idx3-ubyte.gz ...) not found in {directory}. '
        f'Install the real data with `apt-get install -y dataset-fashion-mnist` (files go to '
        f'{FASHION_MNIST_DIR}), or pass data_dir=<directory holding the four IDX files>.')
  return _load_idx_source('fashion_mnist', files, FASHION_MNIST_CLASSES)


class _ArrayUnpickler(pickle.Unpickler):
  """An unpickler that rebuilds dicts, lists, strings and numpy arrays and nothing else.

  The official CIFAR python archives hold pickled dicts of numpy arrays and lists; any other
  global (a class or function a crafted pickle could call) is refused.
  """

  _ALLOWED = frozenset({
      ('numpy', 'ndarray'), ('numpy', 'dtype'),
      ('numpy.core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
      ('numpy._core.multiarray', '_reconstruct'), ('numpy._core.multiarray', 'scalar'),
      ('_codecs', 'encode'),  # how protocol-2 pickles written by Python 3 store bytes
  })

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
          f'refusing to load {module}.{name} from a CIFAR archive: the official files hold only '
          'numpy arrays, lists and strings.')
    if module == 'numpy.core.multiarray' and hasattr(np, '_core'):
      module = 'numpy._core.multiarray'  # NumPy 2 (the old path only warns)
    return super().find_class(module, name)


def _unpickle_arrays(raw: bytes, what: str) -> dict:
  try:
    content = _ArrayUnpickler(io.BytesIO(raw), encoding='bytes').load()
  except (pickle.UnpicklingError, EOFError, ValueError) as e:
    raise ValueError(f'{what}: not a CIFAR python pickle ({e}).') from e
  if not isinstance(content, dict):  # Bad file content (not a bad argument): a ValueError.
    kind = type(content).__name__
    raise ValueError(f'{what}: expected a pickled dict, got {kind}.')  # noqa: TRY004
  return content


def _find_cifar(name: str, directory: pathlib.Path) -> pathlib.Path | None:
  """The archive or extracted folder of ``name`` at or inside ``directory``, if any."""
  archive, folder, train_files, _, _, _, _ = CIFAR_ARCHIVES[name]
  if directory.is_file() and tarfile.is_tarfile(directory):
    return directory
  for candidate in (directory / folder, directory):
    if candidate.is_dir() and all((candidate / f).is_file() for f in train_files):
      return candidate
  if (directory / archive).is_file():
    return directory / archive
  return None


def _read_cifar_members(location: pathlib.Path, members: Sequence[str]) -> dict[str, bytes]:
  """Raw bytes of the named files of an extracted CIFAR folder or a CIFAR tar archive."""
  if location.is_dir():
    missing = [m for m in members if not (location / m).is_file()]
    if missing:
      raise FileNotFoundError(f'{location}: missing {", ".join(missing)} of the CIFAR archive.')
    return {m: (location / m).read_bytes() for m in members}
  out = {}
  with tarfile.open(location, 'r:*') as tar:
    for info in tar:
      base = info.name.rsplit('/', 1)[-1]
      if info.isfile() and base in members and base not in out:
        f = tar.extractfile(info)
        out[base] = f.read()
  missing = [m for m in members if m not in out]
  if missing:
    raise FileNotFoundError(f'{location}: the archive has no {", ".join(missing)}; expected the '
                            'official CIFAR python archive.')
  return out


def _load_cifar(name: str, location: pathlib.Path) -> Source:
  """CIFAR-10 or CIFAR-100 from the official python archive or its extracted folder."""
  _, _, train_files, test_files, meta_file, label_key, names_key = CIFAR_ARCHIVES[name]
  raw = _read_cifar_members(location, list(train_files) + list(test_files) + [meta_file])
  splits = {}
  for split, files in (('train', train_files), ('test', test_files)):
    xs, ys, coarse = [], [], []
    for f in files:
      d = _unpickle_arrays(raw[f], f'{location}/{f}')
      if b'data' not in d or label_key not in d:
        raise ValueError(f'{location}/{f}: expected keys b"data" and {label_key!r}, found '
                         f'{sorted(d)}.')
      x = np.asarray(d[b'data'])
      if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(f'{location}/{f}: b"data" must be uint8 [N, 3072], got {x.dtype} '
                         f'{x.shape}.')
      # Rows are 1024 red, 1024 green, 1024 blue values of a 32x32 image (row-major): CHW.
      xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
      ys.append(np.asarray(d[label_key], np.int64))
      if name == 'cifar100':
        if b'coarse_labels' not in d:
          raise ValueError(f'{location}/{f}: CIFAR-100 pickles need b"coarse_labels".')
        coarse.append(np.asarray(d[b'coarse_labels'], np.int64))
    splits[split] = (np.concatenate(xs), np.concatenate(ys),
                     np.concatenate(coarse) if coarse else None)
  meta = _unpickle_arrays(raw[meta_file], f'{location}/{meta_file}')
  num_classes = 100 if name == 'cifar100' else 10
  names = meta.get(names_key)
  class_names = None
  if names is not None and len(names) == num_classes:
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
  coarse_labels = None
  if name == 'cifar100':
    coarse_labels = _class_to_coarse(splits['train'][1], splits['train'][2], num_classes)
  return from_arrays(splits['train'][0], splits['train'][1], splits['test'][0],
                     splits['test'][1], name=name, num_classes=num_classes,
                     class_names=class_names, coarse_labels=coarse_labels)


def _official_files_hint(name: str) -> str:
  if name == 'mnist':
    return ('the four MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
            't10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)')
  archive, folder = CIFAR_ARCHIVES[name][:2]
  return f'the official python archive {archive} (or its extracted folder {folder}/)'


def _load_official_or_tfds(name: str, data_dir: str | os.PathLike[str] | None) -> Source:
  """Route 1 (official files in ``data_dir``), else route 2 (a prepared TFDS tree)."""
  if data_dir is not None:
    directory = pathlib.Path(data_dir)
    if name == 'mnist':
      files = _find_idx_files(directory) if directory.is_dir() else None
      if files is not None:
        return _load_idx_source('mnist', files, [str(c) for c in range(10)])
    else:
      location = _find_cifar(name, directory)
      if location is not None:
        return _load_cifar(name, location)
  where = 'TFDS\'s default data_dir' if data_dir is None else f'data_dir={os.fspath(data_dir)}'
  both = (f'{name} not found in {where}. Either put {_official_files_hint(name)} in '
          f'config.data_dir (no TensorFlow needed), or prepare a TFDS tree: '
          f'{TFDS_PREPARE.format(name=name)}, and pass that DIR as data_dir (see the README, '
          '"Data").')
  try:
    import tensorflow_datasets  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise FileNotFoundError(both + ' (tensorflow-datasets is not installed, so only the '
                            'official files can be read here.)') from None
  return _load_tfds(name, data_dir, missing_message=both)


def _load_tfds(tfds_name: str, data_dir: str | os.PathLike[str] | None, *,
               missing_message: str | None = None) -> Source:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f'Reading the TFDS dataset {tfds_name!r} needs tensorflow-datasets: '
        'pip install "sparse_cl_jax[tfds]".') from None

  splits = {}
  info = None
  for split in ('train', 'test'):
    try:
      ds = tfds.data_source(tfds_name, split=split,
                            data_dir=None if data_dir is None else os.fspath(data_dir))
    except Exception as e:  # TFDS raises many types; add the actionable part and keep the cause.
      if missing_message is not None:
        raise FileNotFoundError(f'{missing_message} TFDS said: {type(e).__name__}: {e}') from e
      raise FileNotFoundError(
          f'Could not open TFDS dataset {tfds_name!r} split {split!r} (data_dir={data_dir}). '
          'tfds.data_source needs the dataset prepared in array_record format: '
          f'{TFDS_PREPARE.format(name=tfds_name)}, then pass that DIR as data_dir. '
          f'Cause: {type(e).__name__}: {e}') from e
    info = ds.dataset_info
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
    splits[split] = (x, y, coarse)
  label_feature = info.features['label']
  num_classes = int(label_feature.num_classes)
  names = getattr(label_feature, 'names', None)
  coarse_labels = None
  if splits['train'][2] is not None:
    coarse_labels = _class_to_coarse(splits['train'][1], splits['train'][2], num_classes)
  return from_arrays(splits['train'][0], splits['train'][1], splits['test'][0], splits['test'][1],
                     name=tfds_name, num_classes=num_classes,
                     class_names=names if names and len(names) == num_classes else None,
                     coarse_labels=coarse_labels)


def _class_to_coarse(fine: np.ndarray, coarse: np.ndarray, num_classes: int) -> np.ndarray:
  """The most frequent coarse label of each fine class (0 for classes without examples)."""
  table = np.zeros((num_classes, int(coarse.max(initial=0)) + 1), np.int64)
  np.add.at(table, (fine, coarse), 1)
  return np.argmax(table, axis=1).astype(np.int32)


def _load_folder_dataset(name: str, data_dir: str | os.PathLike[str] | None,
                         seed: int) -> Source:
  if data_dir is None:
    raise FileNotFoundError(
        f'{name} cannot be downloaded here: prepare it yourself and pass data_dir. Accepted '
        'layouts: train.npz + test.npz (arrays x uint8 NHWC, y int); image folders '
        'train/<class>/**/*.JPEG with test/<class>/ or val/<class>/ or Tiny-ImageNet\'s '
        'val/images + val/val_annotations.txt; for mini_imagenet also '
        'mini-imagenet-cache-{train,val,test}.pkl. See load_source\'s docstring.')
  root = pathlib.Path(data_dir)
  if not root.is_dir():
    raise FileNotFoundError(f'{name}: data_dir {root} is not a directory.')
  test_npz = next((root / f for f in ('test.npz', 'val.npz') if (root / f).is_file()), None)
  if (root / 'train.npz').is_file() and test_npz is not None:
    return _load_npz_pair(name, root / 'train.npz', test_npz)
  if (root / 'train').is_dir():
    return _load_image_folders(name, root, _FOLDER_IMAGE_SIZE[name])
  pickles = [root / f'mini-imagenet-cache-{s}.pkl' for s in ('train', 'val', 'test')]
  if name == 'mini_imagenet' and any(p.is_file() for p in pickles):
    return _load_mini_imagenet_pickles([p for p in pickles if p.is_file()], seed)
  raise FileNotFoundError(
      f'{name}: no accepted layout in {root} (looked for train.npz + test.npz, a train/ image '
      'folder' + (', mini-imagenet-cache-*.pkl' if name == 'mini_imagenet' else '') +
      '). See load_source\'s docstring.')


def _load_npz_pair(name: str, train_path: pathlib.Path, test_path: pathlib.Path) -> Source:
  loaded = []
  for path in (train_path, test_path):
    with np.load(path, allow_pickle=False) as f:
      if 'x' not in f or 'y' not in f:
        raise ValueError(f'{path}: expected arrays "x" and "y", found {sorted(f.files)}.')
      loaded.append((f['x'], f['y'], f.get('class_names')))
  class_names = loaded[0][2]
  return from_arrays(loaded[0][0], loaded[0][1], loaded[1][0], loaded[1][1], name=name,
                     num_classes=None if class_names is None else len(class_names),
                     class_names=None if class_names is None else [str(c) for c in class_names])


def _list_images(directory: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in directory.rglob('*')
                if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _read_images(paths: Sequence[pathlib.Path], size: int) -> np.ndarray:
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading image folders needs pillow: pip install pillow (or use the '
                      'train.npz/test.npz layout).') from e
  out = np.zeros((len(paths), size, size, 3), np.uint8)
  for i, path in enumerate(paths):
    with Image.open(path) as image:
      image = image.convert('RGB')
      if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
      out[i] = np.asarray(image, np.uint8)
  return out


def _load_image_folders(name: str, root: pathlib.Path, size: int) -> Source:
  class_names = sorted(p.name for p in (root / 'train').iterdir() if p.is_dir())
  if not class_names:
    raise FileNotFoundError(f'{name}: {root / "train"} has no class folders.')
  index = {c: i for i, c in enumerate(class_names)}
  train_paths, train_labels = [], []
  for c in class_names:
    paths = _list_images(root / 'train' / c)
    train_paths += paths
    train_labels += [index[c]] * len(paths)
  test_paths, test_labels = [], []
  for split in ('test', 'val'):
    folder = root / split
    subdirs = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if subdirs and set(subdirs) <= set(class_names):
      for c in sorted(subdirs):
        paths = _list_images(folder / c)
        test_paths += paths
        test_labels += [index[c]] * len(paths)
      break
  else:
    annotations = root / 'val' / 'val_annotations.txt'
    if not annotations.is_file():
      raise FileNotFoundError(f'{name}: no labelled test split in {root} (test/<class>/, '
                              'val/<class>/ or val/images + val/val_annotations.txt).')
    for line in annotations.read_text().splitlines():
      fields = line.split('\t')
      if len(fields) < 2:
        continue
      if fields[1] not in index:
        raise ValueError(f'{annotations}: class {fields[1]!r} has no train folder.')
      test_paths.append(root / 'val' / 'images' / fields[0])
      test_labels.append(index[fields[1]])
  return from_arrays(_read_images(train_paths, size), np.asarray(train_labels, np.int32),
                     _read_images(test_paths, size), np.asarray(test_labels, np.int32),
                     name=name, num_classes=len(class_names), class_names=class_names)


def _load_mini_imagenet_pickles(paths: Sequence[pathlib.Path], seed: int) -> Source:
  images, labels_by_wnid = [], {}
  offset = 0
  for path in paths:
    with open(path, 'rb') as f:
      content = pickle.load(f, encoding='latin1')  # User-prepared files (see docstring).
    x = np.asarray(content['image_data'])
    images.append(x)
    for wnid, idx in content['class_dict'].items():
      labels_by_wnid.setdefault(str(wnid), []).extend(offset + int(i) for i in idx)
    offset += x.shape[0]
  x_all = np.concatenate(images)
  class_names = sorted(labels_by_wnid)
  y_all = np.full((x_all.shape[0],), -1, np.int32)
  for label, wnid in enumerate(class_names):
    y_all[labels_by_wnid[wnid]] = label
  keep = np.flatnonzero(y_all >= 0)
  x_all, y_all = x_all[keep], y_all[keep]
  rng = np.random.default_rng((seed, _SALT_SOURCE_SPLIT))
  train_idx, test_idx = _stratified_split(y_all, MINI_IMAGENET_TEST_FRACTION, rng)
  return from_arrays(x_all[train_idx], y_all[train_idx], x_all[test_idx], y_all[test_idx],
                     name='mini_imagenet', num_classes=len(class_names), class_names=class_names)


def _to_uint8_images(x: Any, what: str) -> np.ndarray:
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


def _to_labels(y: Any, what: str) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
    raise ValueError(f'{what}: expected integer labels [N], got {y.dtype} {y.shape}.')
  if y.size and y.min() < 0:
    raise ValueError(f'{what}: labels must be non-negative.')
  return y.astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Splits and subsampling (host side, deterministic)
# ------------------------------------------------------------------------------------------------

# Independent random streams derived from one seed: np.random.default_rng((seed, salt, ...)).
_SALT_SOURCE_SPLIT = 1
_SALT_CLASS_ORDER = 2
_SALT_VAL_SPLIT = 3
_SALT_PERMUTATION = 4
_SALT_SUBSAMPLE = 5


def _stratified_split(labels: np.ndarray, fraction: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices per class: ``round(fraction * n_c)`` held out, at least 1 and at most n_c - 1.

  Args:
    labels: int [N].
    fraction: fraction held out per class; 0 holds out nothing.
    rng: numpy generator (classes are processed in increasing label order).

  Returns:
    (kept, held_out) sorted index arrays, a partition of ``range(N)``.
  """
  held = []
  if fraction > 0:
    for c in np.unique(labels):
      idx = np.flatnonzero(labels == c)
      n_held = int(np.clip(round(fraction * idx.size), 1, max(idx.size - 1, 0)))
      held.append(rng.permutation(idx)[:n_held])
  held = np.sort(np.concatenate(held)) if held else np.zeros((0,), np.int64)
  kept = np.setdiff1d(np.arange(labels.shape[0]), held, assume_unique=True)
  return kept, held


def _stratified_subsample(indices: np.ndarray, labels: np.ndarray, max_count: int | None,
                          rng: np.random.Generator) -> np.ndarray:
  """At most ``max_count`` of ``indices``, class proportions kept (sorted result)."""
  if max_count is None or indices.size <= max_count:
    return indices
  # Rank each example within its class at random, then take the lowest relative ranks.
  key = np.empty(indices.size, np.float64)
  sub_labels = labels[indices]
  for c in np.unique(sub_labels):
    pos = np.flatnonzero(sub_labels == c)
    key[pos] = (rng.permutation(pos.size) + rng.random(pos.size)) / pos.size
  return np.sort(indices[np.argsort(key, kind='stable')[:max_count]])


# ------------------------------------------------------------------------------------------------
# Task streams
# ------------------------------------------------------------------------------------------------

SCENARIOS = ('split', 'permuted')
INCREMENTAL = ('task', 'class')


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """Host-side numpy view of one task's valid rows (no padding). See `TaskStream.task`."""

  index: int
  classes: list[int]
  x_train: np.ndarray
  y_train: np.ndarray
  y_train_global: np.ndarray
  ids_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  y_val_global: np.ndarray
  ids_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  y_test_global: np.ndarray
  ids_test: np.ndarray
  permutation: np.ndarray | None

  def __repr__(self) -> str:
    return (f'Task({self.index}, classes={self.classes}, train={len(self.y_train)}, '
            f'val={len(self.y_val)}, test={len(self.y_test)})')


@dataclasses.dataclass(frozen=True, eq=False)
class TaskStream:
  """A sequence of tasks, padded and stacked so that a jitted loop compiles once.

  Every per-task array has a leading task axis T and a row axis padded to the largest task of that
  split (``N_max``). Padding rows hold zeros, label 0 and id -1; ``n_*[t]`` says how many leading
  rows of task t are valid, so padding is never counted.

  Labels: ``y_*`` is what the loss uses. Task-IL: the index of the class within its task's
  ``classes[t]`` (0..C_t-1; use a head with ``classes_per_task`` outputs per task). Class-IL: the
  global index in the stream's class order (task 0's classes are 0..C_0-1, task 1's
  C_0..C_0+C_1-1, ...; one head with ``num_classes_total`` outputs). In a permuted stream every
  task has all classes, so class-IL gives task t the indices t*C..(t+1)*C-1. ``y_*_global`` keeps
  the original dataset label.

  Ids: unique across the whole stream: train ids are ``0..sum(n_train)-1`` task after task (an
  array of per-example statistics of size ``num_train_ids`` can be indexed by them), then the
  validation ids, then the test ids.

  Attributes:
    name: source name.
    scenario: ``'split'`` or ``'permuted'``.
    incremental: ``'task'`` or ``'class'``.
    classes: original labels of each task (list of lists).
    num_tasks: T.
    classes_per_task: max over tasks of the number of classes.
    num_classes_total: sum over tasks of the number of classes (= number of class-IL labels).
    input_shape: (H, W, C).
    mean: float32 [C] per-channel mean of the valid training images, in [0, 1] units.
    std: float32 [C] per-channel std (at least 1e-6).
    x_train: uint8 [T, N_max, H, W, C]; likewise ``x_val``, ``x_test``.
    y_train: int32 [T, N_max] loss labels; likewise ``y_val``, ``y_test``.
    y_train_global: int32 [T, N_max] original labels; likewise for val and test.
    ids_train: int32 [T, N_max] stream-unique ids, -1 on padding; likewise for val and test.
    n_train: int32 [T] valid rows per task; likewise ``n_val``, ``n_test``.
    head_mask: bool [T, num_outputs]: the outputs usable at task t (class-IL: every class seen up
      to t, for masking logits; task-IL: the task's own C_t outputs).
    task_mask: bool [T, num_outputs]: the outputs of task t only (class-IL: its global indices,
      for task-aware evaluation of a class-IL model; task-IL: same as ``head_mask``).
    permutations: int32 [T, H*W] pixel permutation of each task (permuted scenario; identity
      rows where unpermuted), ``None`` for split streams. Pixel j of a permuted image is pixel
      ``permutations[t, j]`` of the original (channels move together).
    seed: the seed the stream was built from.
  """

  name: str
  scenario: str
  incremental: str
  classes: list[list[int]]
  num_tasks: int
  classes_per_task: int
  num_classes_total: int
  input_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray
  x_train: np.ndarray
  y_train: np.ndarray
  y_train_global: np.ndarray
  ids_train: np.ndarray
  n_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  y_val_global: np.ndarray
  ids_val: np.ndarray
  n_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  y_test_global: np.ndarray
  ids_test: np.ndarray
  n_test: np.ndarray
  head_mask: np.ndarray
  task_mask: np.ndarray
  permutations: np.ndarray | None
  seed: int

  def __repr__(self) -> str:
    return (f'TaskStream({self.name}, scenario={self.scenario!r}, '
            f'incremental={self.incremental!r}, num_tasks={self.num_tasks}, '
            f'classes={self.classes}, input_shape={self.input_shape}, '
            f'n_train={self.n_train.tolist()}, n_val={self.n_val.tolist()}, '
            f'n_test={self.n_test.tolist()})')

  @property
  def num_outputs(self) -> int:
    """Logits per head: ``classes_per_task`` (task-IL) or ``num_classes_total`` (class-IL)."""
    return self.classes_per_task if self.incremental == 'task' else self.num_classes_total

  @property
  def num_train_ids(self) -> int:
    """Number of training examples in the whole stream (train ids are ``0..num_train_ids-1``)."""
    return int(self.n_train.sum())

  @property
  def num_ids(self) -> int:
    """Number of ids over train, val and test (all ids are in ``0..num_ids-1``)."""
    return int(self.n_train.sum() + self.n_val.sum() + self.n_test.sum())

  def normalize(self, x: types.Array) -> jax.Array:
    """``(x / 255 - mean) / std`` per channel as float32; jit-compatible.

    Args:
      x: uint8 images [..., H, W, C] (any number of leading axes, at least one).

    Returns:
      float32 array of the same shape.
    """
    return normalize(x, self.mean, self.std)

  def task(self, t: int) -> Task:
    """Numpy views of task t's valid rows (no copies)."""
    t = int(t)
    if not 0 <= t < self.num_tasks:
      raise IndexError(f'task {t} out of range for {self.num_tasks} tasks.')
    fields = {}
    for split in ('train', 'val', 'test'):
      n = int(getattr(self, f'n_{split}')[t])
      for prefix in ('x', 'y', 'ids'):
        fields[f'{prefix}_{split}'] = getattr(self, f'{prefix}_{split}')[t, :n]
      fields[f'y_{split}_global'] = getattr(self, f'y_{split}_global')[t, :n]
    return Task(index=t, classes=list(self.classes[t]),
                permutation=None if self.permutations is None else self.permutations[t],
                **fields)

  def head_classes(self, t: int) -> np.ndarray:
    """int32 output indices usable at task t (class-IL: all seen so far; task-IL: 0..C_t-1)."""
    return np.flatnonzero(self.head_mask[int(t)]).astype(np.int32)


def normalize(x: types.Array, mean: types.Array, std: types.Array) -> jax.Array:
  """``(x / 255 - mean) / std`` with per-channel ``mean``/``std`` [C]; jit-compatible.

  Broadcasting is explicit (same rank), so it works under ``jax_numpy_rank_promotion='raise'``.

  Args:
    x: images [..., C], any dtype (uint8 expected).
    mean: [C] in [0, 1] units.
    std: [C].

  Returns:
    float32 array shaped like ``x``.
  """
  x = jnp.asarray(x).astype(jnp.float32)
  shape = (1,) * (x.ndim - 1) + (-1,)
  mean = jnp.reshape(jnp.asarray(mean, jnp.float32), shape)
  std = jnp.reshape(jnp.asarray(std, jnp.float32), shape)
  return (x * jnp.float32(1.0 / 255.0) - mean) / std


def make_stream(source: Source, *, scenario: str = 'split', num_tasks: int,
                incremental: str = 'task', class_order: str | Sequence[int] | None = None,
                classes_per_task: Sequence[int] | None = None, val_fraction: float = 0.1,
                seed: int = 0, max_train_per_task: int | None = None,
                max_eval_per_task: int | None = None, permute_first: bool = False) -> TaskStream:
  """Builds a padded, stacked continual-learning task stream from a source.

  Validation: ``val_fraction`` of each class's *training* images is held out, stratified per class
  (``round(val_fraction * n_c)`` images, at least 1 and at most n_c - 1 per class, none when
  ``val_fraction == 0``), deterministically from ``seed``. The split depends only on the source
  and the seed (not on the class order), and the test split is never used for selection. In a
  permuted stream the same source images are held out in every task.

  Args:
    source: the `Source`.
    scenario: ``'split'``: the class order is cut into ``num_tasks`` consecutive groups (Split
      MNIST/CIFAR). ``'permuted'``: every task has all classes of the class order, with its own
      fixed pixel permutation (Permuted MNIST).
    num_tasks: number of tasks T.
    incremental: ``'task'`` (labels within the task, task id known) or ``'class'`` (global labels
      over all tasks seen); see `TaskStream`.
    class_order: ``None``: a random permutation of all classes drawn from ``seed`` (split;
      sorted for permuted streams, where the order would only rename the labels);
      ``'natural'``: sorted; ``'coarse'``: sorted by superclass then label (needs
      ``source.coarse_labels``; CIFAR-100 with ``num_tasks=20`` gives CPG's one superclass per
      task); or an explicit sequence of distinct labels (may be a subset of the classes).
    classes_per_task: split only: explicit number of classes of each task (length ``num_tasks``,
      summing to the number of classes in the order). Without it the order must divide evenly.
    val_fraction: fraction of each class's training images held out for validation, in [0, 1).
    seed: seeds the class order, validation split, permutations and subsampling.
    max_train_per_task: keep at most this many training images per task (stratified random
      subset; for quick runs).
    max_eval_per_task: keep at most this many validation and test images per task (stratified).
    permute_first: permuted only: permute task 0 too (default: task 0 is the original images).

  Returns:
    The `TaskStream`.

  Raises:
    ValueError: bad scenario/incremental/num_tasks/class order/classes_per_task/val_fraction, or a
      task without training images.
  """
  if scenario not in SCENARIOS:
    raise ValueError(f'scenario must be one of {SCENARIOS}, got {scenario!r}.')
  if incremental not in INCREMENTAL:
    raise ValueError(f'incremental must be one of {INCREMENTAL}, got {incremental!r}.')
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f'num_tasks must be a positive integer, got {num_tasks!r}.')
  num_tasks = int(num_tasks)
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction must lie in [0, 1), got {val_fraction}.')
  for arg_name, value in (('max_train_per_task', max_train_per_task),
                          ('max_eval_per_task', max_eval_per_task)):
    if value is not None and value < 1:
      raise ValueError(f'{arg_name} must be positive or None, got {value}.')
  if class_order is None and scenario == 'permuted':
    class_order = 'natural'  # Every task has every class: the order would only rename labels.
  order = _resolve_class_order(source, class_order, seed)

  if scenario == 'split':
    sizes = _task_sizes(len(order), num_tasks, classes_per_task)
    bounds = np.cumsum([0] + sizes)
    task_classes = [order[bounds[t]:bounds[t + 1]] for t in range(num_tasks)]
  else:
    if classes_per_task is not None:
      raise ValueError('classes_per_task applies to the split scenario only.')
    task_classes = [list(order) for _ in range(num_tasks)]
  offsets = np.cumsum([0] + [len(c) for c in task_classes])

  train_pool, val_pool = _stratified_split(
      source.y_train, val_fraction, np.random.default_rng((seed, _SALT_VAL_SPLIT)))
  test_pool = np.arange(source.y_test.shape[0])
  pools = {'train': (source.x_train, source.y_train, train_pool, max_train_per_task),
           'val': (source.x_train, source.y_train, val_pool, max_eval_per_task),
           'test': (source.x_test, source.y_test, test_pool, max_eval_per_task)}

  # Rows of each task and split (indices into the source arrays).
  rows = {split: [] for split in pools}
  for t, classes in enumerate(task_classes):
    for salt, (split, (_, labels, pool, cap)) in enumerate(pools.items()):
      idx = pool[np.isin(labels[pool], classes)]
      rng = np.random.default_rng((seed, _SALT_SUBSAMPLE, t, salt))
      rows[split].append(_stratified_subsample(idx, labels, cap, rng))
    if rows['train'][t].size == 0:
      raise ValueError(f'task {t} (classes {classes}) has no training images.')

  height, width, channels = source.input_shape
  permutations = None
  if scenario == 'permuted':
    rng = np.random.default_rng((seed, _SALT_PERMUTATION))
    permutations = np.tile(np.arange(height * width, dtype=np.int32), (num_tasks, 1))
    for t in range(0 if permute_first else 1, num_tasks):
      permutations[t] = rng.permutation(height * width).astype(np.int32)

  arrays = {}
  next_id = 0
  for split, (images, labels, _, _) in pools.items():
    counts = np.asarray([r.size for r in rows[split]], np.int32)
    n_max = int(counts.max(initial=0))
    x = np.zeros((num_tasks, n_max, height, width, channels), np.uint8)
    y = np.zeros((num_tasks, n_max), np.int32)
    y_global = np.zeros((num_tasks, n_max), np.int32)
    ids = np.full((num_tasks, n_max), -1, np.int32)
    for t, (idx, classes) in enumerate(zip(rows[split], task_classes, strict=True)):
      n = idx.size
      task_x = images[idx]
      if permutations is not None and not np.array_equal(permutations[t],
                                                         np.arange(height * width)):
        # Move whole pixels (all channels together): flat index of (pixel p, channel c).
        flat = (permutations[t][:, None] * channels + np.arange(channels)).ravel()
        task_x = np.take(task_x.reshape(n, flat.size), flat, axis=1)
      x[t, :n] = task_x.reshape(n, height, width, channels)
      local = np.full((source.num_classes,), -1, np.int32)
      local[classes] = np.arange(len(classes), dtype=np.int32)
      y_global[t, :n] = labels[idx]
      y[t, :n] = local[labels[idx]] + (offsets[t] if incremental == 'class' else 0)
      ids[t, :n] = np.arange(next_id, next_id + n, dtype=np.int32)
      next_id += n
    arrays.update({f'x_{split}': x, f'y_{split}': y, f'y_{split}_global': y_global,
                   f'ids_{split}': ids, f'n_{split}': counts})

  mean, std = _channel_stats(source.x_train, rows['train'])
  classes_max = max(len(c) for c in task_classes)
  total = int(offsets[-1])
  num_outputs = classes_max if incremental == 'task' else total
  head_mask = np.zeros((num_tasks, num_outputs), bool)
  task_mask = np.zeros((num_tasks, num_outputs), bool)
  for t, classes in enumerate(task_classes):
    if incremental == 'task':
      head_mask[t, :len(classes)] = True
      task_mask[t, :len(classes)] = True
    else:
      head_mask[t, :offsets[t + 1]] = True
      task_mask[t, offsets[t]:offsets[t + 1]] = True

  return TaskStream(
      name=source.name, scenario=scenario, incremental=incremental,
      classes=[[int(c) for c in classes] for classes in task_classes], num_tasks=num_tasks,
      classes_per_task=classes_max, num_classes_total=total,
      input_shape=(height, width, channels), mean=mean, std=std, head_mask=head_mask,
      task_mask=task_mask, permutations=permutations, seed=int(seed), **arrays)


def _resolve_class_order(source: Source, class_order: str | Sequence[int] | None,
                         seed: int) -> list[int]:
  num_classes = source.num_classes
  if class_order is None:
    rng = np.random.default_rng((seed, _SALT_CLASS_ORDER))
    return [int(c) for c in rng.permutation(num_classes)]
  if isinstance(class_order, str):
    if class_order == 'natural':
      return list(range(num_classes))
    if class_order == 'coarse':
      if source.coarse_labels is None:
        raise ValueError(f'class_order="coarse" needs a source with coarse_labels; '
                         f'{source.name} has none.')
      return [int(c) for c in np.lexsort((np.arange(num_classes), source.coarse_labels))]
    raise ValueError(f'class_order must be None, "natural", "coarse" or a list of labels, got '
                     f'{class_order!r}.')
  order = [int(c) for c in class_order]
  if not order or len(set(order)) != len(order) or min(order) < 0 or max(order) >= num_classes:
    raise ValueError(f'class_order must list distinct labels in [0, {num_classes}), got '
                     f'{list(class_order)}.')
  return order


def _task_sizes(num_classes: int, num_tasks: int,
                classes_per_task: Sequence[int] | None) -> list[int]:
  if classes_per_task is not None:
    sizes = [int(s) for s in classes_per_task]
    if len(sizes) != num_tasks or min(sizes) < 1 or sum(sizes) != num_classes:
      raise ValueError(f'classes_per_task {list(classes_per_task)} must have {num_tasks} '
                       f'positive entries summing to the {num_classes} classes of the order.')
    return sizes
  if num_classes % num_tasks:
    raise ValueError(f'num_tasks={num_tasks} does not divide the {num_classes} classes; pass '
                     'classes_per_task=[...] for uneven tasks or choose another num_tasks.')
  return [num_classes // num_tasks] * num_tasks


def _channel_stats(images: np.ndarray,
                   rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Exact per-channel mean/std in [0, 1] units of ``images[rows[t]]`` over all tasks t.

  Pixel permutations do not change a histogram, so the source rows suffice; tasks with the same
  rows (a permuted stream) are counted once and weighted.
  """
  channels = images.shape[-1]
  hist = np.zeros((channels, 256), np.int64)
  per_rows = {}
  for idx in rows:
    key = idx.tobytes()
    if key not in per_rows:
      counts = np.zeros((channels, 256), np.int64)
      for start in range(0, idx.size, _STATS_CHUNK_ROWS):
        flat = images[idx[start:start + _STATS_CHUNK_ROWS]].reshape(-1, channels)
        for c in range(channels):
          counts[c] += np.bincount(flat[:, c], minlength=256)
      per_rows[key] = counts
    hist += per_rows[key]
  values = np.arange(256, dtype=np.float64) / 255.0
  total = np.maximum(hist.sum(axis=1), 1)
  mean = hist @ values / total
  var = np.maximum(hist @ values**2 / total - mean**2, 0.0)
  return mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-6).astype(np.float32)


_STATS_CHUNK_ROWS = 4096


# ------------------------------------------------------------------------------------------------
# Exemplar memory
# ------------------------------------------------------------------------------------------------


def select_exemplars(labels: Any, k: int, *, method: str = 'random', features: Any = None,
                     key_or_seed: Any = 0, classes: Sequence[int] | None = None) -> np.ndarray:
  """Chooses up to ``k`` exemplars per class (host side).

  ``'herding'`` is iCaRL's greedy mean matching (Rebuffi et al. 2017, Algorithm 4,
  "ConstructExemplarSet"): with phi the L2-normalised features of class c and mu their mean, the
  j-th exemplar is ``argmin_x || mu - (phi(x) + sum_{i<j} p_i) / j ||`` over the not yet chosen x
  (ties: lowest index). Its order matters: the first m exemplars are the best m (iCaRL's
  ReduceExemplarSet keeps a prefix). ``'random'`` draws k without replacement per class.

  Args:
    labels: int [N] labels of the candidates (valid rows only).
    k: exemplars per class (a class with fewer than k candidates gives all of them).
    method: ``'random'`` or ``'herding'``.
    features: float [N, D], required for herding.
    key_or_seed: an int seed or a JAX PRNG key (raw uint32 or typed); random only.
    classes: the classes to select for (default: every label present), in this order.

  Returns:
    int64 indices into ``labels``, grouped by class (in ``classes`` order), each group in
    selection order.

  Raises:
    ValueError: bad method, k or features.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D, got shape {labels.shape}.')
  if k < 0:
    raise ValueError(f'k must be non-negative, got {k}.')
  classes = np.unique(labels) if classes is None else np.asarray(classes)
  chosen = []
  if method == 'random':
    rng = np.random.default_rng(_numpy_seed(key_or_seed))
    for c in classes:
      idx = np.flatnonzero(labels == c)
      chosen.append(rng.permutation(idx)[:k])
  elif method == 'herding':
    if features is None:
      raise ValueError('herding needs features [N, D].')
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
      raise ValueError(f'features must be [N, D] with N={labels.shape[0]}, got '
                       f'{features.shape}.')
    for c in classes:
      idx = np.flatnonzero(labels == c)
      chosen.append(idx[_herding(features[idx], k)])
  else:
    raise ValueError(f'method must be "random" or "herding", got {method!r}.')
  return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros((0,), np.int64)


def _herding(features: np.ndarray, k: int) -> np.ndarray:
  """iCaRL herding order (positions into ``features``), at most ``k`` of them."""
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  phi = features / np.maximum(norms, 1e-12)
  mu = phi.mean(axis=0)
  available = np.ones(phi.shape[0], bool)
  running = np.zeros_like(mu)
  order = []
  for j in range(1, min(k, phi.shape[0]) + 1):
    distances = np.linalg.norm(mu[None, :] - (running[None, :] + phi) / j, axis=1)
    distances[~available] = np.inf
    best = int(np.argmin(distances))
    order.append(best)
    available[best] = False
    running += phi[best]
  return np.asarray(order, np.int64)


def _numpy_seed(key_or_seed: Any) -> Any:
  """An int seed, or the key data of a JAX PRNG key, as a numpy seed."""
  if isinstance(key_or_seed, (int, np.integer)):
    return int(key_or_seed)
  key = key_or_seed
  if hasattr(key, 'dtype') and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return [int(v) for v in np.asarray(key, np.uint32).ravel()]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExemplarMemory:
  """A fixed-capacity exemplar buffer whose shapes never change (a pytree: pass it to jit).

  Rows ``0..n-1`` are valid; the rest are padding (zeros, label 0, id -1).

  Attributes:
    x: uint8 [M, H, W, C] images.
    y: int32 [M] labels (whatever the loss uses, e.g. class-IL global labels).
    ids: int32 [M] stream ids of the stored examples, -1 on padding.
    n: int32 [] number of valid rows.
  """

  x: np.ndarray
  y: np.ndarray
  ids: np.ndarray
  n: np.ndarray

  @classmethod
  def empty(cls, capacity: int, input_shape: Sequence[int]) -> ExemplarMemory:
    """An empty memory of ``capacity`` rows of images shaped ``input_shape`` (H, W, C)."""
    return cls(x=np.zeros((capacity,) + tuple(input_shape), np.uint8),
               y=np.zeros((capacity,), np.int32), ids=np.full((capacity,), -1, np.int32),
               n=np.asarray(0, np.int32))

  @property
  def capacity(self) -> int:
    return int(self.x.shape[0])

  @property
  def valid(self) -> np.ndarray:
    """bool [M]: which rows hold exemplars."""
    return np.arange(self.capacity) < int(self.n)

  def add(self, x: Any, y: Any, ids: Any) -> ExemplarMemory:
    """Returns a new memory with the examples appended (host side; ``self`` is unchanged).

    Call as ``memory.add(x, y, ids)`` or ``ExemplarMemory.add(memory, x, y, ids)``.

    Args:
      x: uint8 [K, H, W, C] images.
      y: int [K] labels.
      ids: int [K] ids.

    Returns:
      The new memory, same shapes and dtypes.

    Raises:
      ValueError: more examples than free rows, or mismatched shapes.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    ids = np.asarray(ids)
    count, n = x.shape[0], int(self.n)
    if x.shape[1:] != self.x.shape[1:] or y.shape != (count,) or ids.shape != (count,):
      raise ValueError(f'cannot add images {x.shape}, labels {y.shape}, ids {ids.shape} to a '
                       f'memory of images {self.x.shape[1:]}.')
    if x.dtype != np.uint8:
      raise ValueError(f'exemplar images must be uint8, got {x.dtype}.')
    if n + count > self.capacity:
      raise ValueError(f'memory overflow: {n} + {count} > capacity {self.capacity}.')
    new_x, new_y, new_ids = np.array(self.x), np.array(self.y), np.array(self.ids)  # Copies.
    new_x[n:n + count] = x
    new_y[n:n + count] = y
    new_ids[n:n + count] = ids
    return ExemplarMemory(x=new_x, y=new_y, ids=new_ids, n=np.asarray(n + count, np.int32))


# ------------------------------------------------------------------------------------------------
# Batching helpers (jit-compatible)
# ------------------------------------------------------------------------------------------------


def epoch_permutation(key: types.PRNGKey, n_valid: types.Array, n_max: int) -> jax.Array:
  """A random order of ``0..n_max-1`` with the valid rows (``< n_valid``) first.

  The valid indices come in uniformly random order, then the padding indices in increasing order.
  ``n_valid`` may be traced; ``n_max`` must be static.

  Args:
    key: PRNG key.
    n_valid: number of valid rows (int scalar, may be traced).
    n_max: padded number of rows (static int).

  Returns:
    int32 [n_max].
  """
  perm = jax.random.permutation(key, n_max).astype(jnp.int32)
  # Sort key: -1 for every valid index (a stable sort keeps their random order), the index itself
  # for padding (increasing order after the valid ones).
  return perm[jnp.argsort(jnp.where(perm < n_valid, -1, perm), stable=True)]


def num_batches(n_valid: Any, batch_size: int) -> Any:
  """``ceil(n_valid / batch_size)``; works on Python ints and (traced) integer arrays."""
  return (n_valid + batch_size - 1) // batch_size


def batch_indices(perm: types.Array, step: types.Array, batch_size: int,
                  n_valid: types.Array) -> tuple[jax.Array, jax.Array]:
  """Rows of batch ``step`` of an epoch order, and which of them are valid.

  The last batch of an epoch is partly padding: those positions get a valid (repeated) index and
  ``valid=False``, so mask the loss with it (e.g. ``sum(loss * valid) / max(sum(valid), 1)``).

  Args:
    perm: int [n_max] from `epoch_permutation`.
    step: batch number within the epoch (may be traced).
    batch_size: static batch size.
    n_valid: number of valid rows (may be traced).

  Returns:
    (indices int32 [batch_size], valid bool [batch_size]).
  """
  positions = step * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
  indices = jnp.take(perm, jnp.minimum(positions, perm.shape[0] - 1))
  return indices.astype(jnp.int32), positions < n_valid


# ------------------------------------------------------------------------------------------------
# Which source rows a stream uses (for unlabeled pools drawn from the rest)
# ------------------------------------------------------------------------------------------------


def stream_source_rows(source: Source, *, scenario: str = 'split', num_tasks: int,
                       class_order: str | Sequence[int] | None = None,
                       classes_per_task: Sequence[int] | None = None, val_fraction: float = 0.1,
                       seed: int = 0, max_train_per_task: int | None = None,
                       max_eval_per_task: int | None = None) -> dict[str, list[np.ndarray]]:
  """The source rows `make_stream` puts in each task of each split (host side, no images copied).

  Takes the row-selecting arguments of `make_stream` and repeats its selection exactly (same
  random streams: class order, stratified validation hold-out, stratified per-task caps), so
  ``source.x_train[rows['train'][t]]`` are the (unpermuted) images of task t's training rows in
  stream order, ``rows['val'][t]`` likewise from ``x_train``, and ``rows['test'][t]`` index
  ``x_test``. Lifelong Lottery Tickets uses it to find the training images that a capped stream
  leaves unused (`unused_train_rows`), which then serve as an unlabeled pool.

  Returns:
    ``{'train': [...], 'val': [...], 'test': [...]}``: one sorted int64 index array per task.
  """
  if class_order is None and scenario == 'permuted':
    class_order = 'natural'
  order = _resolve_class_order(source, class_order, seed)
  if scenario == 'split':
    sizes = _task_sizes(len(order), num_tasks, classes_per_task)
    bounds = np.cumsum([0] + sizes)
    task_classes = [order[bounds[t]:bounds[t + 1]] for t in range(num_tasks)]
  elif scenario == 'permuted':
    task_classes = [list(order) for _ in range(num_tasks)]
  else:
    raise ValueError(f'scenario must be one of {SCENARIOS}, got {scenario!r}.')
  train_pool, val_pool = _stratified_split(
      source.y_train, val_fraction, np.random.default_rng((seed, _SALT_VAL_SPLIT)))
  test_pool = np.arange(source.y_test.shape[0])
  pools = {'train': (source.y_train, train_pool, max_train_per_task),
           'val': (source.y_train, val_pool, max_eval_per_task),
           'test': (source.y_test, test_pool, max_eval_per_task)}
  rows = {split: [] for split in pools}
  for t, classes in enumerate(task_classes):
    for salt, (split, (labels, pool, cap)) in enumerate(pools.items()):
      idx = pool[np.isin(labels[pool], classes)]
      rng = np.random.default_rng((seed, _SALT_SUBSAMPLE, t, salt))
      rows[split].append(_stratified_subsample(idx, labels, cap, rng))
  return rows


def unused_train_rows(source: Source, **stream_kwargs: Any) -> np.ndarray:
  """Sorted indices of ``source.x_train`` rows that the stream uses neither for training nor
  for validation (arguments as in `stream_source_rows`): images a capped stream leaves over,
  usable as an unlabeled pool whose labels are discarded."""
  rows = stream_source_rows(source, **stream_kwargs)
  used = np.concatenate([np.zeros((0,), np.int64)] + rows['train'] + rows['val'])
  return np.setdiff1d(np.arange(source.x_train.shape[0]), used)
