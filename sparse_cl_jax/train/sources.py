"""The sources of the multi-source step (``Trainer.train(..., sources=...)``) and their checks."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

SOURCE_ORDERS = ("epoch", "cycle")


class Source(NamedTuple):
  """One on-device source of the multi-source step (``Trainer.train(..., sources=...)``).

  Attributes:
    data: a dict of arrays with a common leading row axis (padded to a fixed capacity, so shapes
      never change between tasks or rounds) and the key ``'n'`` (int32 scalar: valid rows; rows
      ``>= n`` are never drawn). ``'x'`` holds ``uint8`` images when ``augment`` is on; every other
      key (``'y'``, ``'ids'``, stored logits ...) is gathered alongside.
    batch_size: rows per step (static: another size is another compiled step kind).
    order: ``'epoch'`` (exactly one source: an epoch is one pass over its valid rows in a fresh
      random order; the last batch is topped up with ``valid=False`` rows) or ``'cycle'`` (a fresh
      random order of its own each epoch, restarted from its start when exhausted; every row is
      valid unless ``n == 0``).
    augment: apply ``config.augment`` to the gathered ``'x'``.
  """
  data: dict
  batch_size: int
  order: str = "cycle"
  augment: bool = True


def as_dict(data) -> dict:
  """A source's data as a plain dict (a NamedTuple such as ``TaskData`` is accepted)."""
  return dict(data._asdict()) if hasattr(data, "_asdict") else dict(data)


def check_sources(sources: dict) -> tuple:
  """The static description ``((name, batch_size, order, augment), ...)`` of ``sources``."""
  if not sources:
    raise ValueError("sources must name at least one train.Source")
  spec = []
  for name in sorted(sources):
    src = sources[name]
    if not isinstance(src, Source):
      raise ValueError(f"sources[{name!r}] is a {type(src).__name__}; pass a train.Source")
    if src.order not in SOURCE_ORDERS:
      raise ValueError(f"sources[{name!r}].order={src.order!r}; choose one of {SOURCE_ORDERS}")
    if isinstance(src.batch_size, bool) or not isinstance(src.batch_size, int) or \
        src.batch_size < 1:
      raise ValueError(f"sources[{name!r}].batch_size={src.batch_size!r} must be an int >= 1")
    if "n" not in as_dict(src.data):
      raise ValueError(f"sources[{name!r}].data has no 'n' (the number of valid rows)")
    if src.augment and "x" not in as_dict(src.data):
      raise ValueError(f"sources[{name!r}] asks for augmentation but its data has no 'x'")
    spec.append((name, src.batch_size, src.order, bool(src.augment)))
  epochs = [s[0] for s in spec if s[2] == "epoch"]
  if len(epochs) != 1:
    raise ValueError(f"exactly one source must have order='epoch' (it defines the epoch); got "
                     f"{epochs or 'none'}")
  return tuple(spec)


def place(sources: dict, put: Callable) -> tuple[tuple, dict, int, dict]:
  """Checks ``sources`` and places their data: ``(spec, data, batches per epoch, rows)``.

  ``data`` maps each source's name to its dict of device arrays (copies: a source may hold arrays
  of the train state, e.g. a method's exemplar memory, and the state's buffers are donated to
  every step); the epoch has as many batches as the ``'epoch'`` source's valid rows fill;
  ``rows`` is each source's capacity.
  """
  spec = check_sources(sources)
  data = put(jax.tree.map(lambda a: jnp.copy(a) if isinstance(a, jax.Array) else a,
                          {name: as_dict(src.data) for name, src in sources.items()}))
  primary = next(s for s in spec if s[2] == "epoch")
  nb = max(1, -(-int(data[primary[0]]["n"]) // primary[1]))
  rows = {name: int(next(v for k, v in d.items() if k != "n").shape[0])
          for name, d in data.items()}
  return spec, data, nb, rows
