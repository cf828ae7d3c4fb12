"""Setting checkpoint steps that cannot be restored aside, into ``corrupt-checkpoints/``.

Nothing is ever deleted: a step that fails to restore is moved, as it is, to
``corrupt-checkpoints/step-<step>-<timestamp>``; an incomplete one (its save stopped between orbax's
commit and the checksums, so it was never a finished checkpoint) to
``corrupt-checkpoints/incomplete-step-<step>-<timestamp>``. Only corrupt ones make a run that has
no valid checkpoint left refuse to start again from scratch (:func:`holds_corrupt`): an incomplete
first step is like a save killed inside orbax's own write, which a rerun simply repeats.
"""

from __future__ import annotations

import os
import pathlib

from sparse_cl_jax import reliability
from sparse_cl_jax.checkpoint import jsonfiles

INCOMPLETE_PREFIX = "incomplete-"


def set_aside(step_dir: pathlib.Path, corrupt_dir: pathlib.Path, step: int, *,
              incomplete: bool = False) -> pathlib.Path:
  """Moves ``step_dir`` to ``corrupt_dir/[incomplete-]step-<step>-<timestamp>``; returns that path.

  ``corrupt_dir`` is created if missing; the rename is made durable in ``step_dir``'s parent.
  """
  corrupt_dir.mkdir(exist_ok=True)
  prefix = f"{INCOMPLETE_PREFIX if incomplete else ''}step-{step}-"
  dest = reliability.fresh_path(corrupt_dir, prefix)
  os.replace(step_dir, dest)
  jsonfiles.fsync_dir(step_dir.parent)
  return dest


def holds_corrupt(corrupt_dir: pathlib.Path) -> bool:
  """Whether ``corrupt_dir`` holds a step set aside as corrupt (not merely incomplete)."""
  return corrupt_dir.is_dir() and any(not p.name.startswith(INCOMPLETE_PREFIX)
                                      for p in corrupt_dir.iterdir())
