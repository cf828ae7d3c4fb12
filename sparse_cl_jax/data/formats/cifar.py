"""The official CIFAR-10/100 python archives (or their extracted folders), read in place.

The archive's pickles (dicts with ``b'data'`` uint8 [N, 3072] in CHW order and ``b'labels'``, or
``b'fine_labels'`` and ``b'coarse_labels'`` for CIFAR-100) are read by `safe_pickle`, which
admits numpy arrays and nothing else.
"""

from __future__ import annotations

import io
import pathlib
import tarfile
from collections.abc import Sequence

import numpy as np

from sparse_cl_jax.data import source as source_lib
from sparse_cl_jax.data.formats import safe_pickle

# Official CIFAR python archives: (archive file, folder it extracts to, train members, test
# members, meta member, label key, class-name key).
CIFAR_ARCHIVES = {
    'cifar10': ('cifar-10-python.tar.gz', 'cifar-10-batches-py',
                tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',), 'batches.meta',
                b'labels', b'label_names'),
    'cifar100': ('cifar-100-python.tar.gz', 'cifar-100-python', ('train',), ('test',), 'meta',
                 b'fine_labels', b'fine_label_names'),
}
_PICKLE = safe_pickle.PickleFormat(
    name='CIFAR python pickle', origin='a CIFAR archive',
    contents='the official files hold only numpy arrays, lists and strings.', encoding='bytes')


def find_cifar(name: str, directory: pathlib.Path) -> pathlib.Path | None:
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


def load_cifar(name: str, location: pathlib.Path) -> source_lib.Source:
  """CIFAR-10 or CIFAR-100 from the official python archive or its extracted folder."""
  _, _, train_files, test_files, meta_file, label_key, names_key = CIFAR_ARCHIVES[name]
  raw = _read_cifar_members(location, list(train_files) + list(test_files) + [meta_file])
  splits = {}
  for split, files in (('train', train_files), ('test', test_files)):
    xs, ys, coarse = [], [], []
    for f in files:
      d = safe_pickle.load_dict(io.BytesIO(raw[f]), f'{location}/{f}', _PICKLE)
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
  meta = safe_pickle.load_dict(io.BytesIO(raw[meta_file]), f'{location}/{meta_file}', _PICKLE)
  num_classes = 100 if name == 'cifar100' else 10
  names = meta.get(names_key)
  class_names = None
  if names is not None and len(names) == num_classes:
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
  coarse_labels = None
  if name == 'cifar100':
    coarse_labels = source_lib.class_to_coarse(splits['train'][1], splits['train'][2], num_classes)
  return source_lib.from_arrays(splits['train'][0], splits['train'][1], splits['test'][0],
                                splits['test'][1], name=name, num_classes=num_classes,
                                class_names=class_names, coarse_labels=coarse_labels)
