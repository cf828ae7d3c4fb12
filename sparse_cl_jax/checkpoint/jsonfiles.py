"""Durable JSON files of a run: JSON-able conversion, atomic writes, one-line error text.

Pure file-system helpers of the checkpoint package (no orbax, no JAX state): every JSON file of a
workdir (``run.json``, ``results.json``, a step's ``checksums.json``) is written through
:func:`write_json_atomic`, so a reader sees the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections import abc
from typing import Any

import jax
import numpy as np


def jsonable(obj: Any, *, what: str, strict: bool = False) -> Any:
  """Plain JSON types from ``obj`` (NumPy scalars and small arrays converted).

  Args:
    obj: nested dicts / lists / tuples / scalars / NumPy or JAX arrays.
    what: how to call ``obj`` in error messages.
    strict: replace NaN and infinities by ``None`` (strict JSON).

  Raises:
    TypeError: naming the offending entry when something cannot be written as JSON.
  """

  def convert(x, where):
    if isinstance(x, abc.Mapping):
      out = {}
      for k, v in x.items():
        if not isinstance(k, (str, int, float, bool)) and k is not None:
          raise TypeError(f"{what}: key {k!r} at {where or '<root>'} is not a JSON key")
        out[str(k)] = convert(v, f"{where}.{k}" if where else str(k))
      return out
    if isinstance(x, (list, tuple)):
      return [convert(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
      x = np.asarray(x)
      if x.dtype.kind not in "biuf":
        raise TypeError(f"{what}: {where or '<root>'} has dtype {x.dtype}, not JSON-able")
      return convert(x.tolist(), where)
    if isinstance(x, float) and strict and not math.isfinite(x):
      return None
    if x is None or isinstance(x, (str, int, float, bool)):
      return x
    raise TypeError(f"{what}: {where or '<root>'} is a {type(x).__name__}, not JSON-able "
                    "(pass plain dicts, e.g. config.to_dict())")

  return convert(obj, "")


def fsync_dir(path: pathlib.Path) -> None:
  """Makes a rename inside ``path`` durable (best effort: not every file system allows it)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_json_atomic(path: pathlib.Path, obj: Any, *, strict: bool = False) -> None:
  """Writes ``obj`` to ``path`` atomically: a temporary file, fsync, ``os.replace``, fsync the dir.

  Readers see the old file or the new one, never a partial one, even if the process is killed.
  """
  text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=not strict) + "\n"
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)  # Our own partial temporary file, never a saved one.
    raise
  fsync_dir(path.parent)


def first_line(e: BaseException, limit: int = 160) -> str:
  """``e``'s message on one line (whitespace collapsed), cut to ``limit`` characters."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."
