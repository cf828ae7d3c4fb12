"""A dataset directory you prepared (Tiny-ImageNet, miniImageNet): its layouts, tried in order.

1. ``train.npz`` + ``test.npz`` (or ``val.npz``): `load_npz_pair`; `save_npz` writes it.
2. Image folders ``train/<class>/**`` with a labelled test split: `load_image_folders` (pillow).
3. miniImageNet only: the cache pickles ``mini-imagenet-cache-{train,val,test}.pkl``, read by the
   restricted unpickler of `safe_pickle`: `load_mini_imagenet_pickles`.

`load_folder_dataset` picks the layout; see ``data.load_source`` for the details of each.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from sparse_cl_jax.data import source as source_lib
from sparse_cl_jax.data import splits
from sparse_cl_jax.data.formats import safe_pickle

# Image side used when reading image folders (images of another size are resized, bilinear).
FOLDER_IMAGE_SIZE = {'tiny_imagenet': 64, 'mini_imagenet': 84}
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png', '.bmp')
MINI_IMAGENET_TEST_FRACTION = 1.0 / 6.0  # 600 images per class -> 500 train / 100 test.
_MINI_IMAGENET_PICKLE = safe_pickle.PickleFormat(
    name='miniImageNet cache pickle', origin='a miniImageNet cache',
    contents='such files hold only numpy arrays, dicts, lists and strings.', encoding='latin1')


def save_npz(source: source_lib.Source, directory: str | os.PathLike[str]) -> None:
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


def load_folder_dataset(name: str, data_dir: str | os.PathLike[str] | None,
                        seed: int) -> source_lib.Source:
  """``name`` (a key of `FOLDER_IMAGE_SIZE`) from the first layout found in ``data_dir``."""
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
    return load_npz_pair(name, root / 'train.npz', test_npz)
  if (root / 'train').is_dir():
    return load_image_folders(name, root, FOLDER_IMAGE_SIZE[name])
  pickles = [root / f'mini-imagenet-cache-{s}.pkl' for s in ('train', 'val', 'test')]
  if name == 'mini_imagenet' and any(p.is_file() for p in pickles):
    return load_mini_imagenet_pickles([p for p in pickles if p.is_file()], seed)
  raise FileNotFoundError(
      f'{name}: no accepted layout in {root} (looked for train.npz + test.npz, a train/ image '
      'folder' + (', mini-imagenet-cache-*.pkl' if name == 'mini_imagenet' else '') +
      '). See load_source\'s docstring.')


def load_npz_pair(name: str, train_path: pathlib.Path,
                  test_path: pathlib.Path) -> source_lib.Source:
  """Layout 1: arrays ``x``, ``y`` and maybe ``class_names`` of two ``.npz`` files."""
  loaded = []
  for path in (train_path, test_path):
    with np.load(path, allow_pickle=False) as f:
      if 'x' not in f or 'y' not in f:
        raise ValueError(f'{path}: expected arrays "x" and "y", found {sorted(f.files)}.')
      loaded.append((f['x'], f['y'], f.get('class_names')))
  class_names = loaded[0][2]
  return source_lib.from_arrays(
      loaded[0][0], loaded[0][1], loaded[1][0], loaded[1][1], name=name,
      num_classes=None if class_names is None else len(class_names),
      class_names=None if class_names is None else [str(c) for c in class_names])


def _list_images(directory: pathlib.Path) -> list[pathlib.Path]:
  """The image files under ``directory`` (any depth), sorted."""
  return sorted(p for p in directory.rglob('*')
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_images(paths: Sequence[pathlib.Path], size: int) -> np.ndarray:
  """uint8 [N, size, size, 3]: each image as RGB, resized (bilinear) when its size differs."""
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


def load_image_folders(name: str, root: pathlib.Path, size: int) -> source_lib.Source:
  """Layout 2: classes are the sorted ``train/`` folders; see `_labelled_test_paths`."""
  class_names = sorted(p.name for p in (root / 'train').iterdir() if p.is_dir())
  if not class_names:
    raise FileNotFoundError(f'{name}: {root / "train"} has no class folders.')
  index = {c: i for i, c in enumerate(class_names)}
  train_paths, train_labels = [], []
  for c in class_names:
    paths = _list_images(root / 'train' / c)
    train_paths += paths
    train_labels += [index[c]] * len(paths)
  test_paths, test_labels = _labelled_test_paths(name, root, index)
  return source_lib.from_arrays(
      _read_images(train_paths, size), np.asarray(train_labels, np.int32),
      _read_images(test_paths, size), np.asarray(test_labels, np.int32),
      name=name, num_classes=len(class_names), class_names=class_names)


def _labelled_test_paths(name: str, root: pathlib.Path,
                         index: dict[str, int]) -> tuple[list[pathlib.Path], list[int]]:
  """The test split of layout 2, and its labels (``index``: class folder name -> label).

  ``test/<class>/**`` or ``val/<class>/**`` (the first whose folders are all train classes), else
  Tiny-ImageNet's ``val/images`` + ``val/val_annotations.txt`` (``<file>\\t<wnid>\\t...``).
  """
  test_paths, test_labels = [], []
  for split in ('test', 'val'):
    folder = root / split
    subdirs = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if subdirs and set(subdirs) <= set(index):
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
  return test_paths, test_labels


def load_mini_imagenet_pickles(paths: Sequence[pathlib.Path], seed: int) -> source_lib.Source:
  """Layout 3: the few-shot class splits merged (sorted wnids), then a stratified test split.

  Each class keeps ``round(n_c / 6)`` test images, drawn from ``seed``. The pickles are read by
  `safe_pickle.load_dict`: a global other than numpy's array rebuilders is refused.
  """
  images, labels_by_wnid = [], {}
  offset = 0
  for path in paths:
    with open(path, 'rb') as f:
      content = safe_pickle.load_dict(f, str(path), _MINI_IMAGENET_PICKLE)
    if 'image_data' not in content or 'class_dict' not in content:
      raise ValueError(f'{path}: expected keys "image_data" and "class_dict", found '
                       f'{sorted(str(k) for k in content)}.')
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
  rng = np.random.default_rng((seed, splits.SALT_SOURCE_SPLIT))
  train_idx, test_idx = splits.stratified_split(y_all, MINI_IMAGENET_TEST_FRACTION, rng)
  return source_lib.from_arrays(
      x_all[train_idx], y_all[train_idx], x_all[test_idx], y_all[test_idx],
      name='mini_imagenet', num_classes=len(class_names), class_names=class_names)
