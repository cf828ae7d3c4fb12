"""A state pytree <-> orbax's nested dict of leaves, and the abstract tree a restore reads into.

Orbax stores a nested dict keyed by path components; a state is any pytree of arrays (dataclasses,
optax states, tuples ...). These pure functions (JAX and NumPy only, no orbax) flatten a state into
``(path components, leaf)`` pairs, nest them under escaped names for saving, look them up again
after a restore, convert leaves to what can be written, describe the ``like`` tree of a restore
abstractly, and list where a stored tree differs from it.
"""

from __future__ import annotations

from collections import abc
from typing import Any

import jax
import numpy as np

PyTree = Any
Leaves = list[tuple[tuple[str, ...], Any]]


def key_name(k) -> str:
  """The name of one pytree path entry (dict key, attribute name or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def escape(name: str) -> str:
  """``name`` as stored: orbax joins nested keys with '.', so a '.' inside a key would alias."""
  return name.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def leaves(tree: PyTree) -> tuple[Leaves, Any]:
  """``([(path components, leaf)], treedef)``; raises on two leaves with the same stored name."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = [(tuple(key_name(k) for k in path), leaf) for path, leaf in with_path]
  seen = {}
  for parts, _ in out:
    stored = tuple(escape(p) for p in parts)
    if stored in seen:
      raise ValueError(f"leaves {'/'.join(seen[stored])!r} and {'/'.join(parts)!r} map to the same "
                       "checkpoint name")
    seen[stored] = parts
  return out, treedef


def nest(pairs: Leaves) -> dict[str, Any]:
  """Nested dict keyed by the escaped path components (orbax's native layout)."""
  root: dict[str, Any] = {}
  for parts, leaf in pairs:
    if not parts:
      raise ValueError("state must be a container of arrays, not a single array")
    node = root
    for p in parts[:-1]:
      node = node.setdefault(escape(p), {})
    node[escape(parts[-1])] = leaf
  return root


def lookup(nested: abc.Mapping[str, Any], parts: tuple[str, ...]) -> Any:
  """The leaf at path ``parts`` of a nested dict built by :func:`nest`."""
  node = nested
  for p in parts:
    node = node[escape(p)]
  return node


def is_key_dtype(dtype) -> bool:
  """Whether ``dtype`` is a typed PRNG key dtype."""
  return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def host_leaf(path: str, x: Any) -> Any:
  """A leaf orbax can write: jax arrays as they are, others as canonical-dtype NumPy arrays."""
  if isinstance(x, jax.Array):
    if is_key_dtype(x.dtype):
      raise TypeError(f"state leaf {path!r} is a typed PRNG key; save jax.random.key_data(key) "
                      "(uint32) and rebuild it with jax.random.wrap_key_data after restore")
    return x
  x = np.asarray(x)
  if x.dtype.kind in "OUSMm" or x.dtype.fields is not None:
    raise TypeError(f"state leaf {path!r} has dtype {x.dtype}; only numeric and bool arrays can be "
                    "checkpointed (put strings and small Python values into meta)")
  return x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)


def default_sharding() -> jax.sharding.Sharding:
  """A single-device sharding on JAX's default device (``jax_default_device`` or the first)."""
  device = jax.config.jax_default_device
  if device is None:
    device = jax.local_devices()[0]
  elif isinstance(device, str):
    device = jax.local_devices(backend=device)[0]
  return jax.sharding.SingleDeviceSharding(device)


def abstract_leaf(x: Any, default: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
  """``ShapeDtypeStruct`` of a ``like`` leaf, with its sharding or the default device's."""
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    shape, dtype, sharding = tuple(x.shape), x.dtype, getattr(x, "sharding", None)
  else:
    x = np.asarray(x)
    shape, dtype, sharding = x.shape, jax.dtypes.canonicalize_dtype(x.dtype), None
  if is_key_dtype(dtype):
    raise TypeError("`like` holds a typed PRNG key; checkpoints store raw uint32 key data")
  sharding = default if sharding is None else sharding
  return jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)


def mismatches(stored: Any, abstract: Leaves) -> list[str]:
  """Every path where the stored tree's metadata and the abstract ``like`` leaves differ.

  Args:
    stored: the stored tree's metadata (leaves with ``shape`` and ``dtype``), keyed by escaped
      names as :func:`nest` writes them.
    abstract: ``[(path components, ShapeDtypeStruct)]`` of ``like``.

  Returns:
    One line per problem, sorted within each kind: paths in ``like`` but not stored, stored but
    not in ``like``, then shape or dtype differences.
  """
  stored_leaves = {}
  for path, meta in jax.tree_util.tree_flatten_with_path(stored)[0]:
    stored_leaves["/".join(key_name(k) for k in path)] = meta
  wanted = {"/".join(escape(p) for p in parts): ("/".join(parts), x) for parts, x in abstract}
  problems = []
  for name in sorted(set(wanted) - set(stored_leaves)):
    problems.append(f"{wanted[name][0]}: in `like` but not in the checkpoint")
  for name in sorted(set(stored_leaves) - set(wanted)):
    problems.append(f"{name}: in the checkpoint but not in `like`")
  for name in sorted(set(wanted) & set(stored_leaves)):
    path, x = wanted[name]
    meta = stored_leaves[name]
    shape, dtype = tuple(getattr(meta, "shape", ())), getattr(meta, "dtype", None)
    if shape != tuple(x.shape):
      problems.append(f"{path}: shape {shape} in the checkpoint, {tuple(x.shape)} in `like`")
    elif dtype is not None and np.dtype(dtype) != np.dtype(x.dtype):
      problems.append(f"{path}: dtype {np.dtype(dtype)} in the checkpoint, "
                      f"{np.dtype(x.dtype)} in `like`")
  return problems


def abstract_like(like: PyTree) -> tuple[Leaves, Any]:
  """``([(path components, ShapeDtypeStruct)], treedef)`` of ``like`` (see :func:`abstract_leaf`)."""
  pairs, treedef = leaves(like)
  default = default_sharding()
  return [(parts, abstract_leaf(x, default)) for parts, x in pairs], treedef
