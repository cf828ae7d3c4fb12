"""Lockstep: the runs of a sweep, each in its own thread, share one compiled program per step.

A sweep runs every cell (one run of the grid) as a normal run in its own thread: its own method
code, host decisions, checkpoints and logs. Only the trainer's programs (a chunk of an epoch, one
host-loop step, an evaluation pass) go through :class:`Lockstep`. When every live cell is waiting
on a program call, the calls are grouped: calls whose single-run programs are the same XLA
computation (their lowered StableHLO text is identical, so the cells differ only in data: seed,
learning rate, masks, task index ...) and whose arguments have the same shapes run as ONE program,
the single-run body under ``jax.vmap`` over a leading run axis; a call alone in its group runs its
own single-run program, exactly as a run outside a sweep does. Cells whose decisions diverge (one
prunes while another trains) simply stop meeting in the same group; they meet again when their
calls line up.

With more than one device the stacked arguments are sharded over a ``jax.sharding`` mesh axis
``'run'`` when the group divides evenly over the devices; each cell's results go back to its own
placement.

Numerics: on XLA:CPU a vmapped dense network computes bit-identical results to the single run
(measured); convolutions under vmap become grouped convolutions and may differ by floating-point
reordering (~1e-7 per step). ``docs/results.md`` has the measured differences.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class _Request:
  cell: str
  kind: str
  body: Callable[..., Any]
  env: Any
  consts: Any
  static: dict  # static keyword arguments of the program (e.g. the multi-source spec)
  single: Callable[..., Any]  # the cell's own jitted single-run program
  args: tuple
  put: Callable[[Any], Any]
  key: tuple | None = None
  result: Any = None
  error: BaseException | None = None
  done: bool = False


@dataclasses.dataclass
class CellStats:
  """How a cell's program calls ran: alone or batched, and with which other cells."""
  calls: int = 0
  batched_calls: int = 0
  largest_group: int = 1
  partners: set = dataclasses.field(default_factory=set)

  def as_dict(self) -> dict:
    return {"calls": self.calls, "batched_calls": self.batched_calls,
            "largest_group": self.largest_group, "shared_with": sorted(self.partners)}


def _abstract(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (str(treedef), tuple((tuple(np.shape(x)), str(jnp.result_type(x)),
                               bool(getattr(x, "weak_type", False))) for x in leaves))


class Lockstep:
  """Groups the program calls of a sweep's cells (one thread each) into vmapped programs.

  Usage: ``join`` every cell before any cell thread starts, run each cell's
  ``experiment.run(..., lockstep=ls, cell=name)`` in its own thread, and ``leave`` in a
  ``finally`` when the thread ends (finished, diverged or failed).
  """

  def __init__(self, mesh: jax.sharding.Mesh | None = None):
    self._cond = threading.Condition()
    self._live: set[str] = set()
    self._class: dict[str, str] = {}
    self._class_hlo: dict[tuple, tuple[str, str]] = {}
    self._split_classes: set[str] = set()
    self._pending: dict[str, _Request] = {}
    self._hlo: dict[tuple, str] = {}
    self._batched: dict[tuple, Callable[..., Any]] = {}
    self._stack_cache: collections.OrderedDict = collections.OrderedDict()
    self.stats: dict[str, CellStats] = {}
    self.mesh = mesh

  # ----------------------------------------------------------------------------------------------
  # Cells.

  def join(self, cell: str, program_class: str | None = None) -> None:
    """Adds a cell. Cells of one ``program_class`` are expected to compile the same programs.

    The sweep puts cells whose configs differ only in data-valued fields in one class; the
    first two cells of a class to call a program are checked (their lowered HLO must be equal),
    and a class that fails the check falls back to comparing every cell's HLO.
    """
    with self._cond:
      self._live.add(cell)
      self._class[cell] = cell if program_class is None else program_class
      self.stats.setdefault(cell, CellStats())

  def leave(self, cell: str) -> None:
    with self._cond:
      self._live.discard(cell)
      self._pending.pop(cell, None)
      ready = self._ready()
    if ready:
      self._execute(ready)

  def report(self) -> dict[str, dict]:
    """Per cell: calls, batched calls, the largest group it ran in, the cells it shared with."""
    return {cell: s.as_dict() for cell, s in sorted(self.stats.items())}

  # ----------------------------------------------------------------------------------------------
  # Programs.

  def program(self, cell: str, kind: str, body, env, consts, single, put):
    """The cell's program ``kind``: a callable with the single-run program's signature."""

    def call(*args, **static):
      return self._submit(_Request(cell=cell, kind=kind, body=body, env=env, consts=consts,
                                   static=static, single=single, args=args, put=put))

    return call

  def _submit(self, req: _Request):
    req.key = self._key(req)
    with self._cond:
      if req.cell not in self._live:
        raise RuntimeError(f"cell {req.cell!r} calls a program without having joined the sweep")
      self._pending[req.cell] = req
      ready = self._ready()
    if ready:
      self._execute(ready)
    with self._cond:
      while not req.done:
        self._cond.wait()
    if req.error is not None:
      raise req.error
    return req.result

  def _ready(self) -> list[_Request] | None:
    """All pending requests, taken, once every live cell is waiting (called with the lock)."""
    if self._pending and len(self._pending) == len(self._live):
      reqs = list(self._pending.values())
      self._pending.clear()
      return reqs
    return None

  def _hlo_hash(self, req: _Request, sig: tuple) -> str:
    """The sha256 of the request's single-run program, lowered (cached per signature)."""
    if sig not in self._hlo:
      counts = dict(req.env.trace_counts)
      try:
        lowered = jax.jit(functools.partial(req.body, req.env),
                          static_argnames=tuple(req.static)).lower(req.consts, *req.args,
                                                                   **req.static)
        self._hlo[sig] = hashlib.sha256(lowered.as_text().encode()).hexdigest()
      finally:  # the fingerprint's trace is not one of the cell's own compilations
        req.env.trace_counts.clear()
        req.env.trace_counts.update(counts)
    return self._hlo[sig]

  def _key(self, req: _Request) -> tuple:
    """What must be equal for two calls to share one program: kind, static args, shapes, code.

    The code is the program class of the cell, checked once per program signature: the first
    cell's lowered HLO against the second's (the other cells wait for the verdict), or, for a
    class whose check failed, every cell's own lowered HLO.
    """
    static = repr(sorted(req.static.items()))
    shapes = _abstract(req.args)
    cls = self._class.get(req.cell, req.cell)
    ckey = (cls, req.kind, static, shapes)
    with self._cond:
      entry = self._class_hlo.get(ckey)
      role = "first" if entry is None else ("second" if entry[0] is None else "wait")
      if entry is None:
        entry = self._class_hlo[ckey] = [None, None, threading.Event()]  # hash, checker, done
      elif role == "second":
        entry[0] = req.cell
    sig = (req.cell, req.kind, static, shapes)
    if role == "first":
      try:
        entry[1] = self._hlo_hash(req, sig)
      except BaseException:
        entry[1] = "failed"  # the cell's own call raises; the class is compared cell by cell
        raise
    elif role == "second":
      try:
        while entry[1] is None:  # the first cell is still lowering
          time.sleep(0.001)
        if self._hlo_hash(req, sig) != entry[1]:
          self._split_classes.add(cls)
      except BaseException:
        self._split_classes.add(cls)
        raise
      finally:
        entry[2].set()
    else:
      entry[2].wait()
    if cls in self._split_classes:
      return ("hlo", req.kind, static, shapes, self._hlo_hash(req, sig))
    return ("class", cls, req.kind, static, shapes)

  def split_classes(self) -> list[str]:
    """Program classes whose cells turned out to compile different programs."""
    return sorted(self._split_classes)

  def _execute(self, reqs: list[_Request]) -> None:
    groups: dict[tuple, list[_Request]] = collections.defaultdict(list)
    for r in sorted(reqs, key=lambda r: r.cell):
      groups[r.key].append(r)
    for group in groups.values():
      try:
        if len(group) == 1:
          r = group[0]
          results = [r.single(*r.args, **r.static)]
        else:
          results = self._run_batched(group)
        for r, res in zip(group, results):
          r.result = res
      except Exception as e:  # pylint: disable=broad-except  # handed to every caller
        for r in group:
          r.error = e
      names = {r.cell for r in group}
      for r in group:
        s = self.stats[r.cell]
        s.calls += 1
        if len(group) > 1:
          s.batched_calls += 1
          s.largest_group = max(s.largest_group, len(group))
          s.partners |= names - {r.cell}
    with self._cond:
      for r in reqs:
        r.done = True
      self._cond.notify_all()

  # ----------------------------------------------------------------------------------------------
  # One vmapped program for a group.

  def _run_batched(self, group: list[_Request]) -> list[Any]:
    rep = group[0]
    flat = [jax.tree.leaves((r.consts, r.args)) for r in group]
    treedef = jax.tree.structure((rep.consts, rep.args))
    n = len(flat[0])
    shared = tuple(all(f[i] is flat[0][i] for f in flat) for i in range(n))
    leaves: list[Any] = [flat[0][i] if shared[i] else None for i in range(n)]
    fresh = []
    for i in range(n):
      if not shared[i]:
        column = [f[i] for f in flat]
        hit = self._cached_stack(column)
        if hit is None:
          fresh.append(i)
        leaves[i] = hit
    if fresh:  # one dispatch stacks every leaf that changed since the last call
      stacked = _stack_columns([[f[i] for f in flat] for i in fresh])
      for i, a in zip(fresh, stacked):
        leaves[i] = self._keep(flat, i, a)
    consts, args = jax.tree.unflatten(treedef, leaves)
    axes_c, axes_a = jax.tree.unflatten(treedef, [None if s else 0 for s in shared])
    key = (rep.key, shared)
    if key not in self._batched:
      static = dict(rep.static)

      def batched(c, *a):
        return jax.vmap(lambda ci, *ai: rep.body(rep.env, ci, *ai, **static),
                        in_axes=(axes_c, *axes_a))(c, *a)

      self._batched[key] = jax.jit(batched)
    result = self._batched[key](consts, *args)
    if self.mesh is not None and jax.process_count() > 1:
      # Several processes: each cell's share is gathered onto every device (the cells' own
      # programs and host reads need it whole on every process).
      return _unstack_replicated(len(group), self.mesh)(result)
    outs = _unstack(result, len(group))
    if self.mesh is not None:
      outs = [r.put(o) for r, o in zip(group, outs)]
    return outs

  def _cached_stack(self, column: list):
    """The stacked column if the same arrays were stacked before (data passed call after call)."""
    hit = self._stack_cache.get(tuple(id(x) for x in column))
    if hit is not None and all(a is b for a, b in zip(hit[0], column)):
      return hit[1]
    return None

  def _keep(self, flat, i: int, stacked):
    """Shards a freshly stacked leaf over the 'run' axis if it divides; caches large ones."""
    column = [f[i] for f in flat]
    if self.mesh is not None and len(column) % self.mesh.size == 0:
      stacked = jax.device_put(stacked, jax.sharding.NamedSharding(
          self.mesh, jax.sharding.PartitionSpec("run")))
    if int(np.prod(stacked.shape)) >= 4096:  # only data worth keeping: states change every call
      self._stack_cache[tuple(id(x) for x in column)] = (column, stacked)
      while len(self._stack_cache) > 16:
        self._stack_cache.popitem(last=False)
    return stacked


@jax.jit
def _stack_columns(columns):
  return [jnp.stack(column) for column in columns]


def _parts(tree, n: int):
  """The ``n`` runs of a stacked tree, one tree each."""
  return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)]


_unstack = jax.jit(_parts, static_argnums=1)


@functools.lru_cache(maxsize=None)
def _unstack_replicated(n: int, mesh: jax.sharding.Mesh):
  """:func:`_unstack` of ``n`` runs, each part replicated over every device of ``mesh``."""
  return jax.jit(functools.partial(_parts, n=n),
                 out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
