"""Mask algebra: bool masks and integer ownership trees that mirror a params pytree.

Layer 1 of the design. Everything here is a pure function; everything that takes arrays works under
``jax.jit``. Conventions:

* A mask tree has exactly the params' tree structure and leaf shapes (never ``None`` leaves).
  Leaves that are not *maskable* carry an all-True mask.
* An ownership tree is integer: 0 = free, k = owned by task k (tasks are numbered from 1 here, so
  that 0 can mean free; the training loop's task index t maps to owner ``t + 1``).
* Which leaves may be masked is decided by path filters on the ``/``-joined key path of each leaf
  (default: Dense/Conv ``kernel`` leaves outside any ``head`` module).
* Flax NNX trees (``nnx.state(model)``, ``nnx.state(model, nnx.Param)``, the pure trees
  ``nnx.Optimizer.update`` hands to optax) work like Linen params dicts. A leaf's path is named
  through the ``nnx.Variable`` that holds it (``'conv1/kernel'``, not ``'conv1/kernel/value'``),
  and only ``nnx.Param`` variables can be maskable: BatchNorm running statistics
  (``nnx.BatchStat``) and every other non-Param variable never are. A mask built from an NNX tree
  (``masks.ones(state)``, ``jax.tree.map`` over it) keeps its ``Param`` wrappers, so it has exactly
  the tree's structure.

Example::

  from sparse_cl_jax import masks
  params = {'dense_0': {'kernel': w, 'bias': b}, 'head': {'kernel': h, 'bias': hb}}
  spec = masks.maskable(params)           # {'dense_0': {'kernel': True, 'bias': False}, ...}
  m = masks.ones(params)                  # all-True bool tree
  sparse_params = masks.apply(params, m)  # zero where the mask is False
"""

from __future__ import annotations

import math
import re
import sys
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_cl_jax import types

DEFAULT_INCLUDE = (r"(^|/)kernel$",)
DEFAULT_EXCLUDE = (r"(^|/)head(/|$)",)


# --------------------------------------------------------------------------------------------------
# Paths and structure checks.


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def describe_path_mismatch(missing, extra) -> str:
  """``'missing leaves [...]; unexpected leaves [...]'`` (at most 5 each) for an error message."""
  parts = []
  if missing:
    parts.append(f"missing leaves {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
  if extra:
    parts.append(f"unexpected leaves {extra[:5]}" + (" ..." if len(extra) > 5 else ""))
  if not parts:
    parts.append("same paths but a different container structure (e.g. None leaves, tuple vs "
                 "list, or nnx.Variable-wrapped vs plain arrays)")
  return "; ".join(parts)


def path_str(path) -> str:
  """Joins a JAX key path into ``'a/b/c'``."""
  return "/".join(_key_name(k) for k in path)


def _nnx_variable_class():
  """``flax.nnx.Variable`` once ``flax.nnx`` is imported (only then can a tree hold one), else None.

  The core never imports Flax itself, so code without NNX does not pay for it.
  """
  nnx = sys.modules.get("flax.nnx")
  return getattr(nnx, "Variable", None)


def _is_nnx_param(variable) -> bool:
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(variable, nnx.Param)


def _named_leaves(tree, is_leaf: Callable | None = None) -> list[tuple[str, object, object]]:
  """``(path, leaf, variable)`` for every leaf, in ``jax.tree.leaves(tree, is_leaf)`` order.

  ``variable`` is the ``nnx.Variable`` that holds the leaf (None outside NNX trees); the
  ``value`` attribute key under which a Variable keeps its array is left out of the path, so that
  ``nnx.state(model, nnx.Param)``, its pure form and a Linen-style dict of the same arrays name
  their leaves alike (``'conv1/kernel'``).
  """
  variable_cls = _nnx_variable_class()
  if variable_cls is None:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return [(path_str(p), x, None) for p, x in flat]

  def stop(x):
    return isinstance(x, variable_cls) or (is_leaf is not None and is_leaf(x))

  out = []
  for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)[0]:
    if not isinstance(x, variable_cls):
      out.append((path_str(p), x, None))
      continue
    for q, y in jax.tree_util.tree_flatten_with_path(x, is_leaf=is_leaf)[0]:
      if q and isinstance(q[0], jax.tree_util.GetAttrKey) and q[0].name == "value":
        q = q[1:]
      out.append((path_str(tuple(p) + tuple(q)), y, x))
  return out


def paths(tree, *, is_leaf: Callable | None = None) -> list[str]:
  """The ``/``-joined path of every leaf, in ``jax.tree.leaves`` order.

  An NNX variable's leaf is named by the variable's path: ``'conv1/kernel'`` for
  ``nnx.state(model)['conv1']['kernel']``.
  """
  return [name for name, _, _ in _named_leaves(tree, is_leaf)]


def map_with_path(fn: Callable, tree, *rest):
  """``jax.tree.map`` whose function also receives the leaf's ``/``-joined path first."""
  leaves, treedef = jax.tree.flatten(tree)
  rest = [treedef.flatten_up_to(r) for r in rest]
  return treedef.unflatten([fn(name, *xs) for name, *xs in zip(paths(tree), leaves, *rest)])


def _is_one_leaf(x) -> bool:
  treedef = jax.tree.structure(x)
  return treedef.num_leaves == 1 and treedef.num_nodes == 1


def align(reference, tree, *, is_leaf: Callable | None = None, what: str = "tree") -> list:
  """The leaves of ``tree`` matched to those of ``reference``, by structure or else by path.

  When ``tree`` has ``reference``'s structure the match is structural (``flatten_up_to``).
  Otherwise leaves are matched by their ``/``-joined paths, so container types do not matter:
  an ``nnx.State`` and a dict with the same keys match, and ``nnx.Variable`` wrappers (``Param``
  in a mask, ``OptVariable`` in an ``nnx.Optimizer`` state, none in the pure trees optax sees)
  are looked through.

  Args:
    reference: the tree whose leaf order the result follows.
    tree: the tree to match against it.
    is_leaf: marks nodes of ``reference`` that stand for a left-out subtree (e.g.
      ``optax.MaskedNode``): they get ``None`` and whatever ``tree`` holds there is ignored.
    what: how to call ``tree`` in the error message.

  Returns:
    A list with one entry per leaf of ``jax.tree.leaves(reference, is_leaf=is_leaf)``.

  Raises:
    ValueError: the paths of the two trees differ (naming the leaves) or are ambiguous.
  """
  ref_leaves, ref_def = jax.tree.flatten(reference, is_leaf=is_leaf)
  try:
    parts = ref_def.flatten_up_to(tree)
  except (ValueError, TypeError):
    parts = None
  if parts is not None and all((is_leaf is not None and is_leaf(r)) or _is_one_leaf(t)
                               for r, t in zip(ref_leaves, parts)):
    return [None if is_leaf is not None and is_leaf(r) else t for r, t in zip(ref_leaves, parts)]
  ref_named = _named_leaves(reference, is_leaf)
  skipped = [name for name, x, _ in ref_named if is_leaf is not None and is_leaf(x)]
  by_path = {}
  for name, x, _ in _named_leaves(tree):
    if name in by_path:
      raise ValueError(f"{what} has two leaves named {name!r}: cannot match it by path")
    by_path[name] = x

  def under(q, roots):
    return any(q == r or q.startswith(r + "/") or not r for r in roots)

  missing = [name for name, x, _ in ref_named
             if not (is_leaf is not None and is_leaf(x)) and name not in by_path]
  ref_names = {name for name, _, _ in ref_named}
  extra = sorted(q for q in by_path if q not in ref_names and not under(q, skipped))
  if missing or extra:
    raise ValueError(f"{what} does not match the params tree: "
                     + describe_path_mismatch(sorted(missing), extra))
  return [None if is_leaf is not None and is_leaf(x) else by_path[name]
          for name, x, _ in ref_named]


def check_like(params: types.Params, tree, *, what: str = "mask tree",
               check_shapes: bool = True) -> None:
  """Raises ``ValueError`` naming the problem if ``tree`` does not mirror ``params``.

  Args:
    params: the reference pytree.
    tree: a mask / ownership / score tree that must have the same structure (and leaf shapes).
    what: how to call ``tree`` in the message.
    check_shapes: also require equal leaf shapes.
  """
  p_paths = paths(params)
  t_paths = paths(tree)
  if jax.tree.structure(params) != jax.tree.structure(tree):
    missing = sorted(set(p_paths) - set(t_paths))
    extra = sorted(set(t_paths) - set(p_paths))
    raise ValueError(f"{what} does not match the params tree: "
                     + describe_path_mismatch(missing, extra))
  if check_shapes:
    bad = [
        f"{p}: {tuple(np.shape(t))} vs params {tuple(np.shape(x))}"
        for p, x, t in zip(p_paths, jax.tree.leaves(params), jax.tree.leaves(tree))
        if tuple(np.shape(t)) != tuple(np.shape(x))
    ]
    if bad:
      raise ValueError(f"{what} does not match the params shapes: " + "; ".join(bad[:5]))


# --------------------------------------------------------------------------------------------------
# Which leaves may be masked.


def maskable(params: types.Params, *, include: Sequence[str] = DEFAULT_INCLUDE,
             exclude: Sequence[str] = DEFAULT_EXCLUDE,
             predicate: Callable[[str, object], bool] | None = None) -> types.LeafSpec:
  """A tree of Python bools: which leaves may be masked.

  A leaf is maskable when its path matches one of ``include`` (regular expressions, searched in the
  ``/``-joined path), matches none of ``exclude``, and ``predicate(path, leaf)`` (if given) is True.
  The default selects Dense/Conv kernels and leaves out biases, normalisation parameters and any
  leaf under a ``head`` module. The result can be passed straight to ``optax.masked``.

  Flax NNX trees (``nnx.state(model)`` or ``nnx.state(model, nnx.Param)``) are matched on the
  variables' paths (``'conv1/kernel'``); only ``nnx.Param`` leaves can be maskable, so BatchNorm
  running statistics (``nnx.BatchStat``) never are, whatever the patterns say. The spec keeps
  the tree's ``Param`` wrappers. Under ``nnx.Optimizer`` pass the function itself,
  ``optax.masked(tx, masks.maskable)``: the optimiser initialises on the wrapped state and updates
  on its pure form, and the function builds the matching spec for each.

  Example::

    masks.maskable(params, include=(r"kernel$", r"head/kernel$"), exclude=())  # heads too
  """
  inc = [re.compile(r) for r in include]
  exc = [re.compile(r) for r in exclude]

  def decide(path, leaf, variable):
    if variable is not None and not _is_nnx_param(variable):
      return False  # nnx.BatchStat and any other non-Param NNX variable: never masked
    ok = any(r.search(path) for r in inc) and not any(r.search(path) for r in exc)
    if ok and predicate is not None:
      ok = bool(predicate(path, leaf))
    return ok

  return jax.tree.unflatten(jax.tree.structure(params),
                            [decide(*named) for named in _named_leaves(params)])


def maskable_paths(spec: types.LeafSpec) -> list[str]:
  """The paths whose leaf in a maskable spec is True."""
  return [p for p, v in zip(paths(spec), jax.tree.leaves(spec)) if v]


# --------------------------------------------------------------------------------------------------
# Construction and element-wise algebra.


def ones(params: types.Params) -> types.Masks:
  """An all-True bool mask tree (dense)."""
  return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)


def zeros(params: types.Params) -> types.Masks:
  """An all-False bool mask tree."""
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.bool_), params)


def from_spec(params: types.Params, spec: types.LeafSpec) -> types.Masks:
  """A bool tree whose leaf is all-True where ``spec`` is True and all-False elsewhere."""
  return jax.tree.map(lambda p, s: jnp.full(jnp.shape(p), bool(s), jnp.bool_), params, spec)


def apply(params: types.Params, masks: types.Masks) -> types.Params:
  """Zeros the params where the mask is False (exact +0.0, also for negative weights)."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def logical_and(a: types.Masks, b: types.Masks) -> types.Masks:
  return jax.tree.map(jnp.logical_and, a, b)


def logical_or(a: types.Masks, b: types.Masks) -> types.Masks:
  return jax.tree.map(jnp.logical_or, a, b)


def logical_not(a: types.Masks) -> types.Masks:
  return jax.tree.map(jnp.logical_not, a)


def where_spec(spec: types.LeafSpec, masks: types.Masks, fill: bool = True) -> types.Masks:
  """Keeps ``masks`` on leaves where ``spec`` is True; elsewhere a constant ``fill`` leaf."""
  return jax.tree.map(
      lambda s, m: m if s else jnp.full(jnp.shape(m), fill, jnp.bool_), spec, masks)


# --------------------------------------------------------------------------------------------------
# Counting.


def size_per_leaf(tree) -> types.LeafSpec:
  """Number of elements of every leaf (Python ints)."""
  return jax.tree.map(lambda x: int(np.prod(np.shape(x), dtype=np.int64)), tree)


def count_per_leaf(masks: types.Masks):
  """Number of True elements per leaf (int32 scalars, jit-compatible)."""
  return jax.tree.map(lambda m: jnp.sum(m, dtype=jnp.int32), masks)


def count(masks: types.Masks, spec: types.LeafSpec | None = None):
  """Total number of True elements (over the leaves selected by ``spec`` if given)."""
  leaves = jax.tree.leaves(masks)
  if spec is not None:
    leaves = [m for m, s in zip(leaves, jax.tree.leaves(spec)) if s]
  return sum((jnp.sum(m, dtype=jnp.int32) for m in leaves), jnp.int32(0))


def density_per_leaf(masks: types.Masks):
  """Fraction of True elements per leaf (float32 scalars)."""
  return jax.tree.map(
      lambda m: jnp.sum(m, dtype=jnp.float32) / max(int(np.size(m)), 1), masks)


def density(masks: types.Masks, spec: types.LeafSpec | None = None):
  """Overall fraction of True elements (over the leaves selected by ``spec`` if given)."""
  leaves = jax.tree.leaves(masks)
  if spec is not None:
    leaves = [m for m, s in zip(leaves, jax.tree.leaves(spec)) if s]
  total = sum(int(np.size(m)) for m in leaves)
  if total == 0:
    return jnp.float32(0.0)
  return count(leaves).astype(jnp.float32) / total


def sparsity(masks: types.Masks, spec: types.LeafSpec | None = None):
  """``1 - density``."""
  return 1.0 - density(masks, spec)


# --------------------------------------------------------------------------------------------------
# Ownership trees (0 = free, k = owned by task k >= 1).


def new_ownership(params: types.Params, dtype=jnp.int32) -> types.Ownership:
  """All-free ownership tree."""
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)


def free(ownership: types.Ownership) -> types.Masks:
  """Positions no task owns."""
  return jax.tree.map(lambda o: o == 0, ownership)


def owned_by(ownership: types.Ownership, owner) -> types.Masks:
  """Positions owned by exactly ``owner`` (may be traced)."""
  return jax.tree.map(lambda o: o == owner, ownership)


def visible(ownership: types.Ownership, owner) -> types.Masks:
  """What a finished task ``owner`` computes with: weights owned by tasks 1..owner.

  Free weights and weights of later tasks are excluded, so evaluating an earlier task never sees
  anything trained after it.
  """
  return jax.tree.map(lambda o: (o >= 1) & (o <= owner), ownership)


def trainable(ownership: types.Ownership, owner) -> types.Masks:
  """What task ``owner`` may change while it trains: free weights and its own."""
  return jax.tree.map(lambda o: (o == 0) | (o == owner), ownership)


def training_view(ownership: types.Ownership, owner) -> types.Masks:
  """What task ``owner`` computes with while it trains: earlier tasks', its own and free weights."""
  return jax.tree.map(lambda o: o <= owner, ownership)


def assign(ownership: types.Ownership, masks: types.Masks, owner) -> types.Ownership:
  """Gives the free positions selected by ``masks`` to ``owner``; owned positions are untouched."""
  return jax.tree.map(
      lambda o, m: jnp.where(m & (o == 0), jnp.asarray(owner, o.dtype), o), ownership, masks)


def release(ownership: types.Ownership, keep: types.Masks, owner) -> types.Ownership:
  """Frees the positions of ``owner`` that ``keep`` does not select (pruned -> free)."""
  return jax.tree.map(
      lambda o, k: jnp.where((o == owner) & ~k, jnp.zeros_like(o), o), ownership, keep)


# --------------------------------------------------------------------------------------------------
# Bit-packing for storage (host side, NumPy).


def pack(masks: types.Masks) -> dict[str, np.ndarray]:
  """Packs a bool mask tree into ``{path: uint8 array}`` with 8 mask bits per byte."""
  return {p: np.packbits(np.asarray(m, dtype=bool).reshape(-1))
          for p, m in zip(paths(masks), jax.tree.leaves(masks))}


def unpack(packed: dict[str, np.ndarray], like: types.Params) -> types.Masks:
  """Inverse of :func:`pack`, restoring the structure and shapes of ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  names = paths(like)
  out = []
  for name, leaf in zip(names, leaves):
    if name not in packed:
      raise ValueError(f"packed masks have no entry for {name!r}")
    n = int(np.prod(np.shape(leaf), dtype=np.int64))
    data = np.asarray(packed[name], np.uint8)
    if data.size != (n + 7) // 8:
      raise ValueError(f"packed mask {name!r} has {data.size} bytes, expected {(n + 7) // 8} "
                       f"for shape {tuple(np.shape(leaf))}")
    out.append(np.unpackbits(data, count=n).astype(bool).reshape(np.shape(leaf)))
  extra = set(packed) - set(names)
  if extra:
    raise ValueError(f"packed masks have entries the params lack: {sorted(extra)[:5]}")
  return jax.tree_util.tree_unflatten(treedef, out)


def packed_nbytes(tree, bits_per_element: int = 1,
                  spec: types.LeafSpec | None = None) -> int:
  """Stored size in bytes of a tree packed at ``bits_per_element`` (each leaf rounded up)."""
  leaves = jax.tree.leaves(tree)
  if spec is not None:
    leaves = [x for x, s in zip(leaves, jax.tree.leaves(spec)) if s]
  return sum((int(np.size(x)) * bits_per_element + 7) // 8 for x in leaves)


def ownership_bits(num_tasks: int) -> int:
  """Bits needed to store an owner in 0..num_tasks."""
  return max(1, math.ceil(math.log2(num_tasks + 1)))


def pack_ownership(ownership: types.Ownership, num_tasks: int) -> dict[str, np.ndarray]:
  """Packs an ownership tree at ``ownership_bits(num_tasks)`` bits per element."""
  bits = ownership_bits(num_tasks)
  out = {}
  for p, o in zip(paths(ownership), jax.tree.leaves(ownership)):
    o = np.asarray(o).reshape(-1).astype(np.int64)
    if o.size and (o.min() < 0 or o.max() > num_tasks):
      raise ValueError(f"ownership leaf {p!r} has owners outside 0..{num_tasks}")
    planes = ((o[:, None] >> np.arange(bits)[None, :]) & 1).astype(bool)
    out[p] = np.packbits(planes.reshape(-1))
  return out


def unpack_ownership(packed: dict[str, np.ndarray], like, num_tasks: int,
                     dtype=np.int32) -> types.Ownership:
  """Inverse of :func:`pack_ownership`."""
  bits = ownership_bits(num_tasks)
  leaves, treedef = jax.tree.flatten(like)
  out = []
  for name, leaf in zip(paths(like), leaves):
    if name not in packed:
      raise ValueError(f"packed ownership has no entry for {name!r}")
    n = int(np.prod(np.shape(leaf), dtype=np.int64))
    planes = np.unpackbits(np.asarray(packed[name], np.uint8), count=n * bits).reshape(n, bits)
    vals = (planes.astype(np.int64) << np.arange(bits)[None, :]).sum(axis=1)
    out.append(vals.astype(dtype).reshape(np.shape(leaf)))
  return jax.tree_util.tree_unflatten(treedef, out)


def leaves_with_paths(tree) -> Iterable[tuple[str, object]]:
  """``(path, leaf)`` pairs in leaf order (NNX leaves named as by :func:`paths`)."""
  return zip(paths(tree), jax.tree.leaves(tree))
