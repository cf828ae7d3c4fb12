"""A restricted unpickler for user-supplied pickles: numpy arrays, dicts, lists and strings only.

Every pickle the data package reads (CIFAR batches, miniImageNet caches) goes through
`load_dict`, so a crafted file cannot name a class or function to call: any global other than
the few numpy ones that rebuild arrays is refused with a one-line ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import IO

import numpy as np


@dataclasses.dataclass(frozen=True)
class PickleFormat:
  """A family of pickled dicts: how errors name it and how its Python 2 strings decode.

  Attributes:
    name: what a valid file is (``'{what}: not a {name} (...)'``).
    origin: where a refused global came from (``'refusing to load m.f from {origin}: ...'``).
    contents: what valid files hold (ends that message).
    encoding: ``pickle.Unpickler``'s ``encoding`` (``'bytes'`` keeps Python 2 strings as bytes).
  """

  name: str
  origin: str
  contents: str
  encoding: str


class ArrayUnpickler(pickle.Unpickler):
  """An unpickler that rebuilds dicts, lists, strings and numpy arrays and nothing else.

  Any other global (a class or function a crafted pickle could call) is refused.
  """

  _ALLOWED = frozenset({
      ('numpy', 'ndarray'), ('numpy', 'dtype'),
      ('numpy.core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
      ('numpy._core.multiarray', '_reconstruct'), ('numpy._core.multiarray', 'scalar'),
      # How pickle protocol 5 stores a contiguous array (a buffer, a dtype and a shape).
      ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
      ('_codecs', 'encode'),  # how protocol-2 pickles written by Python 3 store bytes
  })

  def __init__(self, file: IO[bytes], pickle_format: PickleFormat):
    super().__init__(file, encoding=pickle_format.encoding)
    self._format = pickle_format

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
          f'refusing to load {module}.{name} from {self._format.origin}: '
          f'{self._format.contents}')
    if module.startswith('numpy.core.') and hasattr(np, '_core'):
      module = 'numpy._core.' + module.removeprefix('numpy.core.')  # NumPy 2 (old path warns)
    return super().find_class(module, name)


def load_dict(file: IO[bytes], what: str, pickle_format: PickleFormat) -> dict:
  """Unpickles one dict from ``file`` with `ArrayUnpickler`.

  Args:
    file: a binary file object positioned at the pickle.
    what: names the file in error messages (e.g. its path).
    pickle_format: the `PickleFormat` of the file.

  Returns:
    The dict.

  Raises:
    ValueError: a refused global, a malformed or truncated pickle, or content that is no dict.
  """
  try:
    content = ArrayUnpickler(file, pickle_format).load()
  except (pickle.UnpicklingError, EOFError, ValueError) as e:
    raise ValueError(f'{what}: not a {pickle_format.name} ({e}).') from e
  if not isinstance(content, dict):  # Bad file content (not a bad argument): a ValueError.
    kind = type(content).__name__
    raise ValueError(f'{what}: expected a pickled dict, got {kind}.')  # noqa: TRY004
  return content
