"""Tests for sparse_cl_jax.data: sources, task streams, exemplar memory and batching helpers."""

import collections
import gzip
import importlib.util
import io
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import tarfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import data
from sparse_cl_jax.data import selection
from sparse_cl_jax.data import streams
from sparse_cl_jax.data.formats import safe_pickle

REAL_FASHION_MNIST = pathlib.Path(data.FASHION_MNIST_DIR)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _index_source(train_counts=(10, 12, 14, 16, 18, 20), test_counts=(3, 4, 5, 6, 7, 8)):
  """6 classes of uneven sizes; every 4x4 image is constant = its index in its split (< 256)."""
  y_train = np.repeat(np.arange(len(train_counts)), train_counts).astype(np.int32)
  y_test = np.repeat(np.arange(len(test_counts)), test_counts).astype(np.int32)
  # Interleave so that classes are not contiguous in the source.
  y_train = y_train[np.random.default_rng(0).permutation(y_train.size)]
  x_train = np.broadcast_to(np.arange(y_train.size, dtype=np.uint8)[:, None, None, None],
                            (y_train.size, 4, 4, 1)).copy()
  x_test = np.broadcast_to(np.arange(y_test.size, dtype=np.uint8)[:, None, None, None],
                           (y_test.size, 4, 4, 1)).copy()
  return data.from_arrays(x_train, y_train, x_test, y_test, name='index')


def _random_source(num_classes=4, per_class=12, shape=(5, 5, 1), seed=0):
  rng = np.random.default_rng(seed)
  y_train = np.tile(np.arange(num_classes), per_class).astype(np.int32)
  y_test = np.tile(np.arange(num_classes), 3).astype(np.int32)
  x_train = rng.integers(0, 256, (y_train.size,) + shape, dtype=np.uint8)
  x_test = rng.integers(0, 256, (y_test.size,) + shape, dtype=np.uint8)
  return data.from_arrays(x_train, y_train, x_test, y_test, name='random')


def _source_index(stream, split, t):
  """Source row of each valid row of task t (decoded from the constant image values)."""
  n = int(getattr(stream, f'n_{split}')[t])
  return getattr(stream, f'x_{split}')[t, :n, 0, 0, 0].astype(np.int64)


def _write_idx(path, array, type_code=0x08):
  array = np.asarray(array)
  dtype = {0x08: '>u1', 0x0C: '>i4', 0x0D: '>f4'}[type_code]
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(dtype).tobytes())


def _write_fake_fashion_mnist(directory, n_train=12, n_test=5, shape=(6, 5)):
  rng = np.random.default_rng(1)
  arrays = {
      'train-images-idx3-ubyte': rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
      'train-labels-idx1-ubyte': np.arange(n_train, dtype=np.uint8) % 10,
      't10k-images-idx3-ubyte': rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
      't10k-labels-idx1-ubyte': np.arange(n_test, dtype=np.uint8) % 10,
  }
  for stem, array in arrays.items():
    _write_idx(directory / f'{stem}.gz', array)
  return arrays


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_stratified_split():
  source = data.load_source('digits')
  assert source.name == 'digits' and source.num_classes == 10
  assert source.x_train.dtype == np.uint8 and source.y_train.dtype == np.int32
  assert source.x_train.shape[1:] == (8, 8, 1) and source.input_shape == (8, 8, 1)
  assert source.x_train.shape[0] + source.x_test.shape[0] == 1797
  assert source.x_train.max() == 255 and source.x_train.min() == 0
  train_counts = np.bincount(source.y_train, minlength=10)
  test_counts = np.bincount(source.y_test, minlength=10)
  total = train_counts + test_counts
  np.testing.assert_array_equal(test_counts, np.round(0.2 * total).astype(int))
  # The split is a partition of the 1797 images: the multiset of images is unchanged.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  original = np.rint(datasets.load_digits().images * 255.0 / 16.0).astype(np.uint8)
  both = np.concatenate([source.x_train, source.x_test])[..., 0]
  assert sorted(map(bytes, both)) == sorted(map(bytes, original))


def test_digits_deterministic_per_seed():
  a, b = data.load_source('digits'), data.load_source('digits', seed=0)
  np.testing.assert_array_equal(a.x_test, b.x_test)
  np.testing.assert_array_equal(a.y_train, b.y_train)
  c = data.load_source('digits', seed=1)
  assert not np.array_equal(a.x_test, c.x_test)


def test_read_idx_round_trip_and_errors(tmp_path):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / 'a.gz', images)
  np.testing.assert_array_equal(data.read_idx(tmp_path / 'a.gz'), images)
  with gzip.open(tmp_path / 'a.gz', 'rb') as f:
    assert struct.unpack('>I', f.read(4))[0] == 2051  # The MNIST images magic number.
  ints = np.asarray([[-5, 70000], [1, 2]], np.int32)
  _write_idx(tmp_path / 'b.gz', ints, type_code=0x0C)
  out = data.read_idx(tmp_path / 'b.gz')
  np.testing.assert_array_equal(out, ints)
  assert out.dtype == np.int32
  # Uncompressed files are read too.
  with gzip.open(tmp_path / 'a.gz', 'rb') as f:
    (tmp_path / 'c').write_bytes(f.read())
  np.testing.assert_array_equal(data.read_idx(tmp_path / 'c'), images)
  (tmp_path / 'bad').write_bytes(b'\x01\x02\x08\x01' + b'\x00' * 8)
  with pytest.raises(ValueError, match='not an IDX file'):
    data.read_idx(tmp_path / 'bad')
  (tmp_path / 'short').write_bytes(bytes([0, 0, 8, 1]) + struct.pack('>I', 10) + b'\x00' * 3)
  with pytest.raises(ValueError, match='IDX header says'):
    data.read_idx(tmp_path / 'short')


def test_fashion_mnist_from_synthetic_idx_files(tmp_path):
  arrays = _write_fake_fashion_mnist(tmp_path)
  source = data.load_source('fashion_mnist', data_dir=tmp_path)
  assert source.x_train.shape == (12, 6, 5, 1) and source.x_test.shape == (5, 6, 5, 1)
  assert source.x_train.dtype == np.uint8 and source.y_test.dtype == np.int32
  assert source.num_classes == 10 and source.class_names[9] == 'Ankle boot'
  np.testing.assert_array_equal(source.x_train[..., 0], arrays['train-images-idx3-ubyte'])
  np.testing.assert_array_equal(source.y_test, arrays['t10k-labels-idx1-ubyte'])


def test_fashion_mnist_missing_files_message(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
    data.load_source('fashion_mnist', data_dir=tmp_path)


@pytest.mark.skipif(not (REAL_FASHION_MNIST / 'train-images-idx3-ubyte.gz').is_file(),
                    reason=f'real Fashion-MNIST not installed in {REAL_FASHION_MNIST} '
                    '(apt-get install -y dataset-fashion-mnist)')
def test_fashion_mnist_real_files():
  source = data.load_source('fashion_mnist')
  assert source.x_train.shape == (60000, 28, 28, 1) and source.x_test.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(source.y_train), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(source.y_test), np.full(10, 1000))
  assert 0.25 < source.x_train.mean() / 255.0 < 0.33  # Fashion-MNIST's pixel mean is ~0.286.


@pytest.mark.parametrize('name, shape, num_classes', [
    ('mnist', (28, 28, 1), 10),
    ('cifar10', (32, 32, 3), 10),
    ('cifar100', (32, 32, 3), 100),
    ('tfds:fashion_mnist', (28, 28, 1), 10),
])
def test_tfds_sources_under_mock_data(tmp_path, name, shape, num_classes):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=7):
    source = data.load_source(name, data_dir=tmp_path)
  assert source.name == name.removeprefix('tfds:')
  assert source.x_train.shape == (7,) + shape and source.x_test.shape == (7,) + shape
  assert source.x_train.dtype == np.uint8 and source.y_train.dtype == np.int32
  assert source.num_classes == num_classes
  assert source.y_train.min() >= 0 and source.y_train.max() < num_classes
  if name == 'cifar100':
    assert source.coarse_labels.shape == (100,)
    assert source.coarse_labels.min() >= 0 and source.coarse_labels.max() < 20
  if importlib.util.find_spec('tensorflow') is None:
    assert 'tensorflow' not in sys.modules  # It really ran without TensorFlow.


def _fake_imagenet_source(size, num_classes=3, per_class=4):
  rng = np.random.default_rng(2)
  y = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  x = rng.integers(0, 256, (y.size, size, size, 3), dtype=np.uint8)
  return data.from_arrays(x, y, x[::2], y[::2], class_names=[f'n0{i}' for i in range(num_classes)])


@pytest.mark.parametrize('name, size', [('tiny_imagenet', 64), ('mini_imagenet', 84)])
def test_imagenet_variants_from_npz(tmp_path, name, size):
  fake = _fake_imagenet_source(size)
  data.save_npz(fake, tmp_path)
  source = data.load_source(name, data_dir=tmp_path)
  assert source.name == name and source.num_classes == 3
  assert source.x_train.shape == (12, size, size, 3) and source.x_test.shape == (6, size, size, 3)
  np.testing.assert_array_equal(source.x_train, fake.x_train)
  np.testing.assert_array_equal(source.y_test, fake.y_test)
  assert source.class_names == ('n00', 'n01', 'n02')


def test_tiny_imagenet_original_folder_layout(tmp_path):
  image_lib = pytest.importorskip('PIL.Image')
  wnids = ['n02', 'n01']  # Classes are the sorted folder names: n01 -> 0, n02 -> 1.
  colors = {'n01': (200, 10, 10), 'n02': (10, 10, 200)}
  for wnid in wnids:
    folder = tmp_path / 'train' / wnid / 'images'
    folder.mkdir(parents=True)
    for i in range(3):
      image_lib.new('RGB', (64, 64), colors[wnid]).save(folder / f'{wnid}_{i}.JPEG')
  # A grayscale and an odd-sized image are converted to 64x64 RGB.
  image_lib.new('L', (64, 64), 128).save(tmp_path / 'train' / 'n01' / 'images' / 'gray.JPEG')
  image_lib.new('RGB', (32, 40), colors['n02']).save(
      tmp_path / 'train' / 'n02' / 'images' / 'small.JPEG')
  (tmp_path / 'val' / 'images').mkdir(parents=True)
  lines = []
  for i, wnid in enumerate(['n01', 'n02', 'n02']):
    image_lib.new('RGB', (64, 64), colors[wnid]).save(tmp_path / 'val' / 'images' / f'val_{i}.JPEG')
    lines.append(f'val_{i}.JPEG\t{wnid}\t0\t0\t63\t63')
  (tmp_path / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
  (tmp_path / 'test' / 'images').mkdir(parents=True)  # Unlabeled: ignored.
  image_lib.new('RGB', (64, 64)).save(tmp_path / 'test' / 'images' / 'test_0.JPEG')

  source = data.load_source('tiny_imagenet', data_dir=tmp_path)
  assert source.x_train.shape == (8, 64, 64, 3) and source.x_test.shape == (3, 64, 64, 3)
  assert source.class_names == ('n01', 'n02')
  np.testing.assert_array_equal(np.bincount(source.y_train), [4, 4])
  np.testing.assert_array_equal(source.y_test, [0, 1, 1])
  mean_color = source.x_test.reshape(3, -1, 3).mean(axis=1)
  np.testing.assert_allclose(mean_color, [colors['n01'], colors['n02'], colors['n02']], atol=4)


def test_mini_imagenet_pickles(tmp_path):
  rng = np.random.default_rng(3)
  for split, wnids in (('train', ['n03', 'n01']), ('val', ['n02']), ('test', ['n04'])):
    images = rng.integers(0, 256, (6 * len(wnids), 84, 84, 3), dtype=np.uint8)
    class_dict = {w: list(range(6 * i, 6 * i + 6)) for i, w in enumerate(wnids)}
    with open(tmp_path / f'mini-imagenet-cache-{split}.pkl', 'wb') as f:
      pickle.dump({'image_data': images, 'class_dict': class_dict}, f)
  source = data.load_source('mini_imagenet', data_dir=tmp_path)
  assert source.num_classes == 4 and source.class_names == ('n01', 'n02', 'n03', 'n04')
  np.testing.assert_array_equal(np.bincount(source.y_train), [5, 5, 5, 5])
  np.testing.assert_array_equal(np.bincount(source.y_test), [1, 1, 1, 1])
  assert source.x_train.shape == (20, 84, 84, 3)


class _Evil:
  """A pickle that calls print when loaded by an unrestricted unpickler."""

  def __reduce__(self):
    return (print, ('this must never run',))


def _write_mini_imagenet_train(directory, image_data, protocol):
  class_dict = {'n01': [0, 1, 2, 3, 4, 5], 'n02': [6, 7, 8, 9, 10, 11]}
  with open(directory / 'mini-imagenet-cache-train.pkl', 'wb') as f:
    pickle.dump({'image_data': image_data, 'class_dict': class_dict}, f, protocol=protocol)


def test_mini_imagenet_pickles_refuse_other_globals(tmp_path, capsys):
  _write_mini_imagenet_train(tmp_path, _Evil(), protocol=4)
  with pytest.raises(ValueError, match=r'refusing to load (__builtin__|builtins)\.print') as info:
    data.load_source('mini_imagenet', data_dir=tmp_path)
  assert '\n' not in str(info.value)  # One line.
  assert 'mini-imagenet-cache-train.pkl' in str(info.value)
  assert 'this must never run' not in capsys.readouterr().out


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_mini_imagenet_pickles_of_any_protocol_load(tmp_path, protocol):
  images = np.random.default_rng(5).integers(0, 256, (12, 84, 84, 3), dtype=np.uint8)
  _write_mini_imagenet_train(tmp_path, images, protocol)
  source = data.load_source('mini_imagenet', data_dir=tmp_path)
  # 6 images per class: round(6 / 6) = 1 test image per class, both splits keep file order.
  np.testing.assert_array_equal(np.bincount(source.y_train), [5, 5])
  np.testing.assert_array_equal(np.bincount(source.y_test), [1, 1])
  rebuilt = np.concatenate([source.x_train, source.x_test])
  assert sorted(map(bytes, rebuilt)) == sorted(map(bytes, images))


def test_safe_pickle_load_dict_arrays_only():
  fmt = safe_pickle.PickleFormat(name='test pickle', origin='a test file',
                                 contents='only arrays.', encoding='bytes')
  array = np.arange(6, dtype=np.int16).reshape(2, 3)
  for protocol in (2, 5):
    loaded = safe_pickle.load_dict(io.BytesIO(pickle.dumps({'a': array, 'b': [1, 'x']},
                                                           protocol=protocol)), 'f', fmt)
    np.testing.assert_array_equal(loaded['a'], array)
    assert loaded['a'].dtype == np.int16 and loaded['b'] == [1, 'x']
  with pytest.raises(ValueError, match='expected a pickled dict, got list'):
    safe_pickle.load_dict(io.BytesIO(pickle.dumps([array])), 'f', fmt)
  with pytest.raises(ValueError, match=r'f: not a test pickle \(refusing to load '
                     r'collections\.OrderedDict from a test file: only arrays\.\)'):
    safe_pickle.load_dict(io.BytesIO(pickle.dumps(collections.OrderedDict(a=1))), 'f', fmt)


def test_folder_sources_need_a_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match='data_dir'):
    data.load_source('tiny_imagenet')
  with pytest.raises(FileNotFoundError, match='no accepted layout'):
    data.load_source('mini_imagenet', data_dir=tmp_path)


def test_from_arrays_conversions_and_errors():
  x = np.linspace(0.0, 1.0, 2 * 3 * 3).reshape(2, 3, 3)
  source = data.from_arrays(x, [0, 2], x, [1, 1])
  assert source.x_train.shape == (2, 3, 3, 1) and source.x_train.dtype == np.uint8
  assert source.x_train.max() == 255 and source.num_classes == 3
  assert source.y_train.dtype == np.int32
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    data.from_arrays(x * 2.0, [0, 1], x, [0, 1])
  with pytest.raises(ValueError, match='non-negative'):
    data.from_arrays(x, [0, -1], x, [0, 1])
  with pytest.raises(ValueError, match='outside'):
    data.from_arrays(x, [0, 5], x, [0, 1], num_classes=3)


def test_unknown_dataset():
  with pytest.raises(ValueError, match='digits, fashion_mnist, mnist, cifar10, cifar100'):
    data.load_source('imagenet21k')


# ------------------------------------------------------------------------------------------------
# Official CIFAR python archives and MNIST IDX files (no TensorFlow, no TFDS)
# ------------------------------------------------------------------------------------------------


def _cifar_images(n, seed):
  """uint8 [n, 32, 32, 3] with distinct, position-dependent values per channel."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _cifar_rows(images):
  """The official row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major."""
  return images.transpose(0, 3, 1, 2).reshape(images.shape[0], 3 * 32 * 32).copy()


def _dump(path, obj):
  with open(path, 'wb') as f:
    pickle.dump(obj, f, protocol=2)  # The official archives are protocol-2 pickles.


def _write_cifar10(root, per_batch=3, n_test=4):
  """cifar-10-batches-py/ (5 data batches, test_batch, batches.meta) and its .tar.gz archive."""
  folder = root / 'cifar-10-batches-py'
  folder.mkdir(parents=True)
  train_x, train_y = [], []
  for i in range(1, 6):
    x = _cifar_images(per_batch, i)
    y = [(3 * i + j) % 10 for j in range(per_batch)]
    _dump(folder / f'data_batch_{i}', {b'batch_label': f'training batch {i} of 5'.encode(),
                                        b'labels': y, b'data': _cifar_rows(x),
                                        b'filenames': [b'x.png'] * per_batch})
    train_x.append(x)
    train_y += y
  test_x = _cifar_images(n_test, 9)
  test_y = [9 - j for j in range(n_test)]
  _dump(folder / 'test_batch', {b'batch_label': b'testing batch 1 of 1', b'labels': test_y,
                                b'data': _cifar_rows(test_x), b'filenames': [b'x.png'] * n_test})
  names = [b'airplane', b'automobile', b'bird', b'cat', b'deer', b'dog', b'frog', b'horse',
           b'ship', b'truck']
  _dump(folder / 'batches.meta', {b'num_cases_per_batch': per_batch, b'label_names': names,
                                  b'num_vis': 3072})
  archive = root / 'archive' / 'cifar-10-python.tar.gz'
  archive.parent.mkdir()
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(folder, arcname='cifar-10-batches-py')
  return folder, archive, np.concatenate(train_x), np.asarray(train_y), test_x, np.asarray(test_y)


def test_cifar10_from_the_official_archive_and_its_folder(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # The TFDS route is unavailable.
  folder, archive, x_train, y_train, x_test, y_test = _write_cifar10(tmp_path / 'files')
  for data_dir in (archive.parent, archive, folder.parent, folder):
    source = data.load_source('cifar10', data_dir=data_dir)
    assert source.name == 'cifar10' and source.num_classes == 10
    assert source.x_train.shape == (15, 32, 32, 3) and source.x_test.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(source.x_train, x_train)  # HWC pixels from CHW rows.
    np.testing.assert_array_equal(source.y_train, y_train)
    np.testing.assert_array_equal(source.x_test, x_test)
    np.testing.assert_array_equal(source.y_test, y_test)
    assert source.class_names[0] == 'airplane' and source.class_names[9] == 'truck'
    assert source.coarse_labels is None


def test_cifar100_fine_and_coarse_labels_and_validation_from_train(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  folder = tmp_path / 'cifar-100-python'
  folder.mkdir()
  fine_to_coarse = np.arange(100) % 20
  n_train = 400  # Four images per fine class.
  fine_train = np.tile(np.arange(100), 4)
  x_train, x_test = _cifar_images(n_train, 0), _cifar_images(100, 1)
  fine_test = np.arange(100)[::-1]
  for name, x, fine in (('train', x_train, fine_train), ('test', x_test, fine_test)):
    _dump(folder / name, {b'filenames': [b'x.png'] * len(fine), b'batch_label': name.encode(),
                          b'fine_labels': fine.tolist(),
                          b'coarse_labels': fine_to_coarse[fine].tolist(),
                          b'data': _cifar_rows(x)})
  _dump(folder / 'meta', {b'fine_label_names': [f'fine{i}'.encode() for i in range(100)],
                          b'coarse_label_names': [f'coarse{i}'.encode() for i in range(20)]})
  with tarfile.open(tmp_path / 'cifar-100-python.tar.gz', 'w:gz') as tar:
    tar.add(folder, arcname='cifar-100-python')
  from_folder = data.load_source('cifar100', data_dir=tmp_path)
  (tmp_path / 'only_archive').mkdir()
  (tmp_path / 'cifar-100-python.tar.gz').rename(tmp_path / 'only_archive' / 'a.tar.gz')
  from_archive = data.load_source('cifar100', data_dir=tmp_path / 'only_archive' / 'a.tar.gz')
  for source in (from_folder, from_archive):
    assert source.num_classes == 100 and source.class_names[7] == 'fine7'
    np.testing.assert_array_equal(source.y_train, fine_train)  # Fine labels, not coarse.
    np.testing.assert_array_equal(source.y_test, fine_test)
    np.testing.assert_array_equal(source.coarse_labels, fine_to_coarse)
    np.testing.assert_array_equal(source.x_test, x_test)
  # CPG's superclass order and the project's validation rule (held out of train, never test).
  stream = data.make_stream(from_folder, num_tasks=20, class_order='coarse', val_fraction=0.25)
  assert stream.classes[0] == [0, 20, 40, 60, 80]
  np.testing.assert_array_equal(stream.n_val, np.full(20, 5))
  np.testing.assert_array_equal(stream.n_train, np.full(20, 15))
  train_rows = {bytes(r) for r in x_train.reshape(n_train, -1)}
  val_rows = stream.x_val[:, :5].reshape(100, -1)
  assert all(bytes(r) in train_rows for r in val_rows)


def test_cifar_archive_pickles_may_hold_arrays_only(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()

  class Evil:
    def __reduce__(self):
      return (print, ('this must never run',))

  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch', 'batches.meta']:
    _dump(folder / name, {b'data': Evil(), b'labels': [0]})
  with pytest.raises(ValueError, match=r'refusing to load (__builtin__|builtins)\.print'):
    data.load_source('cifar10', data_dir=tmp_path)


def _write_mnist(directory, gz):
  rng = np.random.default_rng(4)
  arrays = {'train-images-idx3-ubyte': rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
            'train-labels-idx1-ubyte': np.asarray([0, 1, 2, 7, 8, 9], np.uint8),
            't10k-images-idx3-ubyte': rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
            't10k-labels-idx1-ubyte': np.asarray([5, 6, 7], np.uint8)}
  directory.mkdir(parents=True)
  for stem, array in arrays.items():
    _write_idx(directory / f'{stem}.gz', array)
    if not gz:
      with gzip.open(directory / f'{stem}.gz', 'rb') as f:
        (directory / stem).write_bytes(f.read())
      (directory / f'{stem}.gz').unlink()
  return arrays


@pytest.mark.parametrize('gz', [True, False])
def test_mnist_from_idx_files(tmp_path, monkeypatch, gz):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  arrays = _write_mnist(tmp_path / 'mnist', gz)
  source = data.load_source('mnist', data_dir=tmp_path / 'mnist')
  assert source.name == 'mnist' and source.num_classes == 10
  assert source.x_train.shape == (6, 28, 28, 1) and source.x_test.shape == (3, 28, 28, 1)
  np.testing.assert_array_equal(source.x_train[..., 0], arrays['train-images-idx3-ubyte'])
  np.testing.assert_array_equal(source.y_train, [0, 1, 2, 7, 8, 9])
  np.testing.assert_array_equal(source.y_test, [5, 6, 7])


@pytest.mark.parametrize('name, official', [
    ('cifar10', 'cifar-10-python.tar.gz'),
    ('cifar100', 'cifar-100-python.tar.gz'),
    ('mnist', 'train-images-idx3-ubyte.gz'),
])
def test_missing_data_names_both_routes(tmp_path, monkeypatch, name, official):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # As on a machine without TFDS.
  with pytest.raises(FileNotFoundError) as info:
    data.load_source(name, data_dir=tmp_path)
  message = str(info.value)
  assert official in message and f'tfds build {name}' in message
  assert 'sparse_cl_jax[tfds]' in message and 'tensorflow-datasets is not installed' in message
  assert 'ModuleNotFoundError' not in message
  if importlib.util.find_spec('tensorflow_datasets') is not None:
    monkeypatch.delitem(sys.modules, 'tensorflow_datasets')
    # With TFDS installed but no prepared tree, the error still names both routes.
    with pytest.raises(FileNotFoundError, match=f'{official}.*tfds build {name}'):
      data.load_source(name, data_dir=tmp_path)


def test_package_imports_without_tensorflow_datasets(tmp_path):
  _, archive, *_ = _write_cifar10(tmp_path)
  code = ('import sys; sys.modules["tensorflow_datasets"] = None\n'
          'import sparse_cl_jax, sparse_cl_jax.experiment\n'
          'from sparse_cl_jax import data\n'
          f's = data.load_source("cifar10", data_dir={str(archive)!r})\n'
          'print(s.x_train.shape)\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=False,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '(15, 32, 32, 3)'


# ------------------------------------------------------------------------------------------------
# Task streams
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('incremental', ['task', 'class'])
def test_split_stream_labels_hand_checked(incremental):
  source = _index_source()
  stream = data.make_stream(source, scenario='split', num_tasks=3, incremental=incremental,
                            class_order=[3, 0, 5, 1, 4, 2], val_fraction=0.2)
  assert stream.classes == [[3, 0], [5, 1], [4, 2]]
  assert stream.classes_per_task == 2 and stream.num_classes_total == 6
  if incremental == 'task':
    expected = {0: {3: 0, 0: 1}, 1: {5: 0, 1: 1}, 2: {4: 0, 2: 1}}
    assert stream.num_outputs == 2
  else:
    expected = {t: {3: 0, 0: 1, 5: 2, 1: 3, 4: 4, 2: 5} for t in range(3)}
    assert stream.num_outputs == 6
  for split in ('train', 'val', 'test'):
    for t in range(3):
      n = int(getattr(stream, f'n_{split}')[t])
      y = getattr(stream, f'y_{split}')[t, :n]
      y_global = getattr(stream, f'y_{split}_global')[t, :n]
      assert set(y_global.tolist()) == set(stream.classes[t])
      np.testing.assert_array_equal(y, [expected[t][g] for g in y_global])
      # Global labels are the source's labels of the stored images.
      source_y = getattr(source, f'y_{"test" if split == "test" else "train"}')
      np.testing.assert_array_equal(y_global, source_y[_source_index(stream, split, t)])
  if incremental == 'class':
    np.testing.assert_array_equal(stream.head_classes(0), [0, 1])
    np.testing.assert_array_equal(stream.head_classes(2), [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(stream.task_mask[1], [0, 0, 1, 1, 0, 0])
  else:
    np.testing.assert_array_equal(stream.head_classes(2), [0, 1])


def test_split_stream_counts_padding_and_ids():
  source = _index_source()
  stream = data.make_stream(source, num_tasks=3, class_order=[3, 0, 5, 1, 4, 2],
                            val_fraction=0.2)
  # Train counts per class 10+2c, val round(0.2 n_c) = 2,2,3,3,4,4, test counts 3+c.
  np.testing.assert_array_equal(stream.n_train, [21, 26, 25])
  np.testing.assert_array_equal(stream.n_val, [5, 6, 7])
  np.testing.assert_array_equal(stream.n_test, [9, 12, 12])
  assert stream.x_train.shape == (3, 26, 4, 4, 1) and stream.x_val.shape == (3, 7, 4, 4, 1)
  assert stream.x_test.shape == (3, 12, 4, 4, 1)
  for name in ('x_train', 'x_val', 'x_test'):
    assert getattr(stream, name).dtype == np.uint8
  for name in ('y_train', 'y_train_global', 'ids_train', 'n_train', 'y_test', 'ids_val'):
    assert getattr(stream, name).dtype == np.int32
  all_ids = []
  for split in ('train', 'val', 'test'):
    n = getattr(stream, f'n_{split}')
    for t in range(3):
      pad = slice(int(n[t]), None)
      assert not getattr(stream, f'x_{split}')[t, pad].any()
      assert not getattr(stream, f'y_{split}')[t, pad].any()
      assert not getattr(stream, f'y_{split}_global')[t, pad].any()
      assert (getattr(stream, f'ids_{split}')[t, pad] == -1).all()
      all_ids += getattr(stream, f'ids_{split}')[t, :int(n[t])].tolist()
  assert sorted(all_ids) == list(range(stream.num_ids)) and stream.num_ids == 72 + 18 + 33
  train_ids = np.concatenate([stream.ids_train[t, :stream.n_train[t]] for t in range(3)])
  np.testing.assert_array_equal(train_ids, np.arange(stream.num_train_ids))
  view = stream.task(1)
  assert view.x_train.shape == (26, 4, 4, 1) and view.classes == [5, 1]
  assert view.ids_val.shape == (6,) and view.permutation is None


def test_validation_disjoint_deterministic_and_seeded():
  source = _index_source()

  def val_rows(stream):
    return sorted(np.concatenate([_source_index(stream, 'val', t) for t in range(3)]).tolist())

  a = data.make_stream(source, num_tasks=3, val_fraction=0.2, seed=0)
  b = data.make_stream(source, num_tasks=3, val_fraction=0.2, seed=0)
  c = data.make_stream(source, num_tasks=3, val_fraction=0.2, seed=1)
  for t in range(3):
    train = set(_source_index(a, 'train', t).tolist())
    val = set(_source_index(a, 'val', t).tolist())
    assert not train & val
    expected = set(np.flatnonzero(np.isin(source.y_train, a.classes[t])).tolist())
    assert train | val == expected
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.x_val, b.x_val)
  assert a.classes == b.classes
  assert val_rows(a) != val_rows(c)
  # The default class order is a seeded permutation; 'natural' is sorted.
  natural = data.make_stream(source, num_tasks=3, class_order='natural')
  assert natural.classes == [[0, 1], [2, 3], [4, 5]]


def test_uneven_classes_per_task_and_limits():
  source = _index_source()
  stream = data.make_stream(source, num_tasks=3, class_order='natural', classes_per_task=[1, 2, 3],
                            incremental='task', max_train_per_task=9, max_eval_per_task=4)
  assert stream.classes == [[0], [1, 2], [3, 4, 5]] and stream.classes_per_task == 3
  np.testing.assert_array_equal(stream.head_mask, [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
  np.testing.assert_array_equal(stream.n_train, [9, 9, 9])
  assert (stream.n_val <= 4).all() and (stream.n_test <= 4).all()
  # Stratified subsample: every class of task 2 keeps 3 of its training images.
  np.testing.assert_array_equal(np.bincount(stream.task(2).y_train), [3, 3, 3])
  class_il = data.make_stream(source, num_tasks=3, class_order='natural',
                              classes_per_task=[1, 2, 3], incremental='class')
  np.testing.assert_array_equal(class_il.head_classes(1), [0, 1, 2])
  assert class_il.num_outputs == 6


def test_permuted_stream():
  source = _random_source()
  stream = data.make_stream(source, scenario='permuted', num_tasks=3, val_fraction=0.25)
  assert stream.classes == [[0, 1, 2, 3]] * 3 and stream.num_classes_total == 12
  n = int(stream.n_train[0])
  assert (stream.n_train == n).all()
  np.testing.assert_array_equal(stream.permutations[0], np.arange(25))  # Task 0 unpermuted.
  for t in range(3):
    perm = stream.permutations[t]
    np.testing.assert_array_equal(np.sort(perm), np.arange(25))  # A bijection.
    np.testing.assert_array_equal(stream.y_train[t], stream.y_train[0])
    np.testing.assert_array_equal(stream.y_train_global[t], stream.y_train[0])  # Task-IL natural.
    np.testing.assert_array_equal(stream.x_train[t].reshape(n, 25),
                                  stream.x_train[0].reshape(n, 25)[:, perm])
    np.testing.assert_array_equal(stream.x_test[t].reshape(-1, 25),
                                  source.x_test.reshape(-1, 25)[:, perm])
  assert not np.array_equal(stream.permutations[1], stream.permutations[2])
  # Task 0 holds the original training images (those not held out for validation).
  train_rows = np.concatenate([stream.x_train[0, :n], stream.x_val[0, :stream.n_val[0]]])
  assert sorted(map(bytes, train_rows)) == sorted(map(bytes, source.x_train))

  first = data.make_stream(source, scenario='permuted', num_tasks=2, permute_first=True)
  assert not np.array_equal(first.permutations[0], np.arange(25))
  class_il = data.make_stream(source, scenario='permuted', num_tasks=3, incremental='class')
  for t in range(3):
    m = int(class_il.n_train[t])
    np.testing.assert_array_equal(class_il.y_train[t, :m], class_il.y_train_global[t, :m] + 4 * t)
  np.testing.assert_array_equal(class_il.head_classes(1), np.arange(8))


def test_permuted_color_moves_whole_pixels():
  source = _random_source(shape=(3, 3, 3))
  stream = data.make_stream(source, scenario='permuted', num_tasks=2, val_fraction=0.0)
  perm = stream.permutations[1]
  np.testing.assert_array_equal(stream.x_train[1].reshape(-1, 9, 3),
                                source.x_train.reshape(-1, 9, 3)[:, perm])


@pytest.mark.usefixtures('strict_dtypes')
def test_normalize_in_jit_and_channel_stats():
  source = _random_source()
  stream = data.make_stream(source, num_tasks=2, class_order='natural')
  valid = np.concatenate([stream.task(t).x_train for t in range(2)]).astype(np.float64) / 255.0
  np.testing.assert_allclose(stream.mean, [valid.mean()], rtol=1e-6)
  np.testing.assert_allclose(stream.std, [valid.std()], rtol=1e-6)
  assert stream.mean.dtype == np.float32 and stream.mean.shape == (1,)
  batch = jnp.asarray(stream.x_train[0, :6])
  out = jax.jit(stream.normalize)(batch)
  assert out.dtype == jnp.float32 and out.shape == batch.shape
  expected = (np.asarray(batch, np.float32) / 255.0 - stream.mean) / stream.std
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # Works for a whole stacked split too (extra leading axes).
  assert jax.jit(stream.normalize)(jnp.asarray(stream.x_val)).shape == stream.x_val.shape


def test_stream_errors():
  source = _index_source()
  with pytest.raises(ValueError, match='scenario'):
    data.make_stream(source, scenario='rotated', num_tasks=3)
  with pytest.raises(ValueError, match='incremental'):
    data.make_stream(source, num_tasks=3, incremental='domain')
  with pytest.raises(ValueError, match='does not divide'):
    data.make_stream(source, num_tasks=4)
  with pytest.raises(ValueError, match='num_tasks'):
    data.make_stream(source, num_tasks=0)
  with pytest.raises(ValueError, match='classes_per_task'):
    data.make_stream(source, num_tasks=2, classes_per_task=[2, 3])
  with pytest.raises(ValueError, match='distinct'):
    data.make_stream(source, num_tasks=2, class_order=[0, 0, 1, 2])
  with pytest.raises(ValueError, match='coarse'):
    data.make_stream(source, num_tasks=2, class_order='coarse')
  with pytest.raises(ValueError, match='val_fraction'):
    data.make_stream(source, num_tasks=2, val_fraction=1.0)


def test_task_classes_split_and_permuted():
  order = [4, 0, 5, 2, 1, 3]
  assert selection.task_classes(order, 'split', 3, None) == [[4, 0], [5, 2], [1, 3]]
  assert selection.task_classes(order, 'split', 2, [1, 5]) == [[4], [0, 5, 2, 1, 3]]
  assert selection.task_classes(order, 'permuted', 2, None) == [order, order]
  with pytest.raises(ValueError, match='scenario'):
    selection.task_classes(order, 'rotated', 2, None)


def test_task_rows_partition_the_training_split():
  source = _index_source()
  classes = [[5, 0], [3], [1, 2, 4]]
  rows = selection.task_rows(source, classes, val_fraction=0.2, seed=3, max_train_per_task=None,
                             max_eval_per_task=None)
  for split, labels in (('train', source.y_train), ('val', source.y_train),
                        ('test', source.y_test)):
    for t, task in enumerate(classes):
      assert set(labels[rows[split][t]].tolist()) == set(task)
  # Uncapped, train and val of all tasks together are every training row exactly once.
  used = np.concatenate(rows['train'] + rows['val'])
  np.testing.assert_array_equal(np.sort(used), np.arange(source.y_train.size))
  # round(0.2 * n_c) validation rows per class (classes of 10..20 images: 2, 2, 3, 3, 4, 4).
  val_counts = np.bincount(source.y_train[np.concatenate(rows['val'])], minlength=6)
  np.testing.assert_array_equal(val_counts, [2, 2, 3, 3, 4, 4])
  np.testing.assert_array_equal(np.sort(np.concatenate(rows['test'])),
                                np.arange(source.y_test.size))


def test_permute_pixels_moves_whole_pixels():
  x = np.arange(2 * 2 * 2 * 2, dtype=np.uint8).reshape(2, 2, 2, 2)  # [N, H, W, C]
  perm = np.asarray([2, 0, 3, 1])
  out = streams.permute_pixels(x, perm)
  for n in range(2):
    for j in range(4):  # Pixel j of the output is pixel perm[j] of the input, both channels.
      np.testing.assert_array_equal(out[n, j // 2, j % 2], x[n, perm[j] // 2, perm[j] % 2])


def test_pixel_permutations_identity_first():
  perms = streams.pixel_permutations(3, 6, seed=0, permute_first=False)
  assert perms.dtype == np.int32 and perms.shape == (3, 6)
  np.testing.assert_array_equal(perms[0], np.arange(6))
  for t in range(3):
    np.testing.assert_array_equal(np.sort(perms[t]), np.arange(6))


@pytest.mark.parametrize('incremental', ['task', 'class'])
def test_output_masks_hand_checked(incremental):
  head, task = streams.output_masks([[3, 1], [0], [2, 4, 5]], incremental)
  if incremental == 'task':  # C_t outputs per task, within the largest task's 3.
    expected = [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    np.testing.assert_array_equal(head, np.asarray(expected, bool))
    np.testing.assert_array_equal(task, np.asarray(expected, bool))
  else:  # Global outputs 0-1, 2, 3-5.
    np.testing.assert_array_equal(head, np.asarray([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                                    [1, 1, 1, 1, 1, 1]], bool))
    np.testing.assert_array_equal(task, np.asarray([[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                                    [0, 0, 0, 1, 1, 1]], bool))


@pytest.mark.parametrize('class_il', [False, True])
def test_stack_split_hand_checked(class_il):
  images = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1)
  labels = np.asarray([2, 0, 2, 1, 0], np.int32)
  rows = [np.asarray([0, 2, 3]), np.asarray([4])]  # Task 0: classes (2, 1); task 1: class (0,).
  offsets = np.asarray([0, 2, 3]) if class_il else None
  out = streams.stack_split(images, labels, rows, [[2, 1], [0]], None, num_classes=3,
                            offsets=offsets, first_id=10)
  np.testing.assert_array_equal(out['n'], [3, 1])
  np.testing.assert_array_equal(out['x'][:, :, 0, 0, 0], [[0, 2, 3], [4, 0, 0]])  # Zero padding.
  np.testing.assert_array_equal(out['y_global'], [[2, 2, 1], [0, 0, 0]])
  np.testing.assert_array_equal(out['y'], [[0, 0, 1], [2, 0, 0]] if class_il
                                else [[0, 0, 1], [0, 0, 0]])
  np.testing.assert_array_equal(out['ids'], [[10, 11, 12], [13, -1, -1]])


def test_coarse_class_order():
  source = _index_source()
  source = data.from_arrays(source.x_train, source.y_train, source.x_test, source.y_test,
                            coarse_labels=[1, 0, 1, 0, 2, 2])
  stream = data.make_stream(source, num_tasks=3, class_order='coarse')
  assert stream.classes == [[1, 3], [0, 2], [4, 5]]


# ------------------------------------------------------------------------------------------------
# Exemplar memory
# ------------------------------------------------------------------------------------------------


def test_random_exemplars_counts_and_determinism():
  labels = np.asarray([0] * 7 + [1] * 2 + [2] * 5)
  idx = data.select_exemplars(labels, 3, key_or_seed=0)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [3, 2, 3])
  assert len(set(idx.tolist())) == idx.size
  np.testing.assert_array_equal(labels[idx], np.sort(labels[idx]))  # Grouped by class.
  np.testing.assert_array_equal(idx, data.select_exemplars(labels, 3, key_or_seed=0))
  from_key = data.select_exemplars(labels, 3, key_or_seed=jax.random.key(0))
  np.testing.assert_array_equal(np.bincount(labels[from_key]), [3, 2, 3])
  only = data.select_exemplars(labels, 2, key_or_seed=1, classes=[2])
  assert (labels[only] == 2).all() and only.size == 2


def test_herding_hand_made():
  # Class 1 at indices 1, 3, 4 with normalised features a=(1,0), b=(0,1), c=(1,1)/sqrt2.
  # mu = (0.569, 0.569); c is closest; then a and b tie (lowest index first), then b.
  labels = np.asarray([0, 1, 0, 1, 1])
  features = np.asarray([[0.0, 1.0], [5.0, 0.0], [0.0, 3.0], [0.0, 2.0], [3.0, 3.0]])
  idx = data.select_exemplars(labels, 3, method='herding', features=features)
  np.testing.assert_array_equal(idx, [0, 2, 4, 1, 3])
  np.testing.assert_array_equal(
      data.select_exemplars(labels, 2, method='herding', features=features, classes=[1]), [4, 1])
  # Scale-invariant: herding works on L2-normalised features.
  scaled = features * np.asarray([1.0, 7.0, 2.0, 0.5, 9.0])[:, None]
  np.testing.assert_array_equal(
      data.select_exemplars(labels, 3, method='herding', features=scaled), idx)
  with pytest.raises(ValueError, match='features'):
    data.select_exemplars(labels, 2, method='herding')
  with pytest.raises(ValueError, match='method'):
    data.select_exemplars(labels, 2, method='kmeans')


def test_exemplar_memory_fixed_shape_and_pure():
  memory = data.ExemplarMemory.empty(5, (4, 4, 1))
  assert memory.x.shape == (5, 4, 4, 1) and memory.x.dtype == np.uint8 and int(memory.n) == 0
  x = np.full((2, 4, 4, 1), 9, np.uint8)
  added = data.ExemplarMemory.add(memory, x, np.asarray([3, 4]), np.asarray([10, 11]))
  assert int(memory.n) == 0 and not memory.x.any()  # The input is unchanged.
  assert added.x.shape == memory.x.shape and added.y.shape == (5,) and int(added.n) == 2
  np.testing.assert_array_equal(added.y, [3, 4, 0, 0, 0])
  np.testing.assert_array_equal(added.ids, [10, 11, -1, -1, -1])
  np.testing.assert_array_equal(added.valid, [1, 1, 0, 0, 0])
  again = added.add(x[:1], [5], [12])
  assert int(again.n) == 3 and again.x.shape == (5, 4, 4, 1)
  with pytest.raises(ValueError, match='overflow'):
    again.add(np.zeros((3, 4, 4, 1), np.uint8), [0, 0, 0], [1, 2, 3])

  @jax.jit
  @chex.assert_max_traces(n=1)
  def count_valid(mem):
    return jnp.sum(jnp.arange(mem.y.shape[0]) < mem.n)

  assert int(count_valid(added)) == 2 and int(count_valid(again)) == 3  # One compile.


# ------------------------------------------------------------------------------------------------
# Batching helpers
# ------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures('strict_dtypes')
def test_epoch_permutation_valid_first_and_compiles_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def perm_fn(key, n_valid):
    return data.epoch_permutation(key, n_valid, 10)

  perms = []
  for seed, n_valid in ((0, 7), (1, 7), (2, 4)):
    perm = np.asarray(perm_fn(jax.random.key(seed), jnp.int32(n_valid)))
    assert perm.dtype == np.int32
    np.testing.assert_array_equal(np.sort(perm[:n_valid]), np.arange(n_valid))
    np.testing.assert_array_equal(perm[n_valid:], np.arange(n_valid, 10))
    perms.append(perm)
  assert not np.array_equal(perms[0], perms[1])


@pytest.mark.usefixtures('strict_dtypes')
def test_num_batches_and_batch_indices():
  assert data.num_batches(7, 3) == 3 and data.num_batches(6, 3) == 2 and data.num_batches(0, 3) == 0
  assert int(jax.jit(data.num_batches, static_argnums=1)(jnp.int32(7), 3)) == 3
  perm = data.epoch_permutation(jax.random.key(0), 7, 9)
  batch = jax.jit(data.batch_indices, static_argnums=2)
  seen = []
  for step in range(data.num_batches(7, 3)):
    idx, valid = batch(perm, jnp.int32(step), 3, jnp.int32(7))
    assert idx.shape == (3,) and valid.dtype == jnp.bool_
    seen += np.asarray(idx)[np.asarray(valid)].tolist()
  assert sorted(seen) == list(range(7))



def test_herding_order_against_a_brute_force_icarl_construction():
  rng = np.random.default_rng(7)
  feats = rng.normal(size=(9, 4))
  labels = np.zeros(9, np.int64)
  got = data.select_exemplars(labels, 5, method='herding', features=feats)
  # iCaRL Algorithm 4 by hand: phi normalised, mu their mean; the j-th exemplar minimises
  # || mu - (phi(x) + sum of the chosen) / j || over the rest.
  phi = feats / np.linalg.norm(feats, axis=1, keepdims=True)
  mu = phi.mean(axis=0)
  chosen = []
  for j in range(1, 6):
    best = min((i for i in range(9) if i not in chosen),
               key=lambda i: np.linalg.norm(mu - (phi[i] + phi[chosen].sum(axis=0)) / j))
    chosen.append(best)
  np.testing.assert_array_equal(got, chosen)


def test_validation_holds_out_at_least_one_example_of_every_class():
  labels = np.array([0] * 3 + [1] * 20)  # 0.1 * 3 rounds to 0: still one held out
  kept, held = data.splits.stratified_split(labels, 0.1, np.random.default_rng(0))
  assert np.sum(labels[held] == 0) == 1 and np.sum(labels[held] == 1) == 2
  assert np.sum(labels[kept] == 0) == 2
  # Never the last one of a class, and nothing held out at fraction 0.
  kept, held = data.splits.stratified_split(np.array([0, 0, 1]), 0.9, np.random.default_rng(0))
  assert held.size == 1 and held[0] in (0, 1) and 2 in kept
  assert data.splits.stratified_split(labels, 0.0, np.random.default_rng(0))[1].size == 0
