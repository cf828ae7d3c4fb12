"""SHA-256 checksums of a checkpoint step: write, read and verify its ``checksums.json``.

TensorStore checks the integrity of its index but not of compressed array data, so a flipped byte
there would restore silently as different numbers. Right after orbax commits a step, the SHA-256 of
every file of the step's items goes into ``<step>/checksums.json``::

  {"algorithm": "sha256", "files": {"meta/metadata": "<hex digest>", "state/...": ...}}

and a restore first verifies it. Pure file-system functions (no orbax); a problem is raised as
:class:`ChecksumError` naming the file (relative to the step directory) and the reason, which the
checkpointer turns into a ``CorruptCheckpointError`` naming the step too.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections import abc

from sparse_cl_jax.checkpoint import jsonfiles

FILE = "checksums.json"
ALGORITHM = "sha256"


class ChecksumError(Exception):
  """A step's files do not verify against its ``checksums.json`` (or it cannot be read).

  Attributes:
    file: the file that failed, relative to the step directory.
    reason: what is wrong with it, a few words.
  """

  def __init__(self, file: str, reason: str):
    super().__init__(f"{file}: {reason}")
    self.file, self.reason = file, reason


class MissingChecksumsError(ChecksumError):
  """The step has no ``checksums.json``: its save stopped between orbax's commit and the checksums."""


def file_sha256(path: pathlib.Path) -> str:
  """The SHA-256 hex digest of the file at ``path``, read in blocks of 1 MiB."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def step_files(step_dir: pathlib.Path, items: abc.Iterable[str]) -> list[str]:
  """The files under ``step_dir/<item>`` for each of ``items``, relative to ``step_dir``, sorted."""
  out = []
  for item in items:
    root = step_dir / item
    if root.is_dir():
      out.extend(p.relative_to(step_dir).as_posix() for p in root.rglob("*") if p.is_file())
  return sorted(out)


def compute(step_dir: pathlib.Path, items: abc.Iterable[str]) -> dict[str, str]:
  """``{file: SHA-256}`` of every file of ``items`` in ``step_dir`` (see :func:`step_files`)."""
  return {name: file_sha256(step_dir / name) for name in step_files(step_dir, items)}


def write(step_dir: pathlib.Path, items: abc.Iterable[str]) -> None:
  """Records the SHA-256 of every file of ``items`` in ``step_dir/checksums.json`` (atomically)."""
  files = compute(step_dir, items)
  jsonfiles.write_json_atomic(step_dir / FILE, {"algorithm": ALGORITHM, "files": files})


def read(step_dir: pathlib.Path) -> dict[str, str]:
  """The ``{file: SHA-256}`` recorded in ``step_dir/checksums.json``.

  Raises:
    MissingChecksumsError: there is no ``checksums.json``.
    ChecksumError: (file ``checksums.json``) it cannot be read, is not JSON, or is not an object
      with ``"algorithm": "sha256"`` and a non-empty ``"files"`` object of string digests.
  """
  path = step_dir / FILE
  if not path.exists():
    raise MissingChecksumsError(
        FILE, "missing (the save stopped between orbax's commit and the checksums)")
  try:
    recorded = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors.
    raise ChecksumError(FILE, f"unreadable ({type(e).__name__})") from None
  problem = _layout_problem(recorded)
  if problem is not None:
    raise ChecksumError(FILE, f"unreadable ({problem})")
  return dict(recorded["files"])


def _layout_problem(recorded) -> str | None:
  """What keeps a parsed ``checksums.json`` from being a usable record, or None."""
  if not isinstance(recorded, dict):
    return f"a JSON {type(recorded).__name__}, not an object"
  if recorded.get("algorithm") != ALGORITHM:
    return f"algorithm {recorded.get('algorithm')!r}, not {ALGORITHM!r}"
  files = recorded.get("files")
  if not isinstance(files, dict):
    return f"'files' is a JSON {type(files).__name__}, not an object"
  if not files:
    return "'files' lists no file"
  for name, digest in files.items():
    if not isinstance(digest, str):
      return f"the digest of {name} is a JSON {type(digest).__name__}, not a string"
  return None


def verify(step_dir: pathlib.Path, items: abc.Iterable[str]) -> None:
  """Checks that the files of ``items`` in ``step_dir`` are exactly those recorded, unchanged.

  Raises:
    MissingChecksumsError, ChecksumError: as :func:`read`; or a ChecksumError naming the first
      file (in sorted order) that is recorded but missing, present but not recorded, unreadable,
      or whose SHA-256 differs from the recorded one.
  """
  recorded = read(step_dir)
  present = set(step_files(step_dir, items))
  for name in sorted(set(recorded) | present):
    if name not in present:
      raise ChecksumError(name, "missing")
    if name not in recorded:
      raise ChecksumError(name, f"not in {FILE} (added after it was written)")
    try:
      digest = file_sha256(step_dir / name)
    except OSError as e:
      raise ChecksumError(name, f"unreadable ({type(e).__name__})") from None
    if digest != recorded[name]:
      raise ChecksumError(name, "checksum mismatch (changed after it was written)")
