"""Config fields declared with their rules: each default and what it allows, in one place.

A config (``config.base``) and each of its groups (``config.cpg``, ``config.dst``, ``config.wandb``,
...) is a :class:`Group`: an ``ml_collections.ConfigDict`` whose values are plain Python values
and which also knows the rule of each field declared in it. A field is declared where its default
is set::

  c = fields.Group()
  c.momentum = fields.field(0.9, fields.Number(0, 1, hi_open=True))
  c.momentum = 0.5  # an override: a plain value; the rule stays with the group

The rules travel with the group through overrides, ``copy.deepcopy``, pickling and
``copy_and_resolve_references``; ``to_dict`` and everything that reads a value sees the plain
value only. :func:`check` (called by ``config.validate``) checks every declared field of a config
and of its groups and raises a one-line ``ValueError`` naming the field, its value and what is
allowed, e.g. ``config.momentum=1.5 must be in [0, 1)``.

Rules (all finite numbers; ``bool`` is never a number):

* :class:`Number` / :class:`Int`: a number (an integer) with optional bounds, open or closed; a
  bound may be another field (:class:`Ref`), e.g. ``dst.drop_fraction_final <= dst.drop_fraction``.
* :class:`Choice`, :class:`Flag` (a bool), :class:`Text` (a string; optionally non-empty or a full
  match of a pattern).
* :class:`Seq`: a tuple whose entries follow a rule (or one rule per position), with a length, an
  order (strictly increasing) or a first entry required.
* :class:`Elsewhere`: a field whose values are checked where more is known (the model's own fields
  of ``model_kwargs`` when the model is built).

Any rule takes ``when=When(field, values)``: it applies only while a sibling field (or a field of
the whole config) holds one of ``values`` (``negate=True``: none of them); and ``hint``, a few
words appended to its message. Every field of every preset has a rule
(``tests/test_config_fields.py``); a field a config adds without one is not checked.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
from typing import Any

import ml_collections


# --------------------------------------------------------------------------------------------------
# References to other fields, and conditions.


@dataclasses.dataclass(frozen=True)
class Ref:
  """The value of another field: a sibling in the same group, or (``top``) a dotted field of the
  whole config."""
  name: str
  top: bool = False

  def lookup(self, ctx: "Context") -> tuple[bool, Any]:
    """``(found, value)``."""
    node: Any = ctx.root if self.top else ctx.group
    for part in self.name.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        return False, None
      node = node[part]
    return True, node

  def path(self, ctx: "Context") -> str:
    return f"config.{self.name}" if self.top else f"{ctx.prefix}{self.name}"

  def text(self, ctx: "Context") -> str:
    _, value = self.lookup(ctx)
    return f"{self.path(ctx)}={value!r}"


@dataclasses.dataclass(frozen=True)
class When:
  """A rule's condition: the field ``ref`` holds one of ``values`` (``negate``: none of them)."""
  ref: Ref
  values: tuple
  negate: bool = False

  def holds(self, ctx: "Context") -> bool:
    found, value = self.ref.lookup(ctx)
    if not found:
      return False
    inside = _hashable(value) in self.values
    return inside != self.negate

  def text(self, ctx: "Context") -> str:
    return f" (with {self.ref.text(ctx)})"


def when(name: str, *values, negate: bool = False, top: bool = False) -> When:
  """``When(Ref(name, top), values, negate)``: the rule applies while ``name`` is one of
  ``values`` (``negate=True``: while it is none of them)."""
  return When(Ref(name, top), tuple(values), negate)


@dataclasses.dataclass(frozen=True)
class Context:
  """Where a field is checked: its group, the whole config and the group's dotted prefix."""
  group: ml_collections.ConfigDict
  root: ml_collections.ConfigDict
  prefix: str  # "config." or "config.cpg."


def _hashable(value):
  if isinstance(value, list):
    return tuple(value)
  try:
    hash(value)
  except TypeError:
    return repr(value)
  return value


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(x) -> str:
  return repr(x) if not isinstance(x, float) or not x.is_integer() else f"{x:g}"


# --------------------------------------------------------------------------------------------------
# Rules.


@dataclasses.dataclass(frozen=True)
class Rule(abc.ABC):
  """What a field allows. :meth:`problem` is ``None`` for an allowed value, else the words after
  ``config.FIELD=VALUE`` in the error (``'must be in [0, 1)'``)."""

  @abc.abstractmethod
  def problem(self, value, ctx: Context) -> str | None:
    """None if ``value`` is allowed, else the words of the error."""

  def refs(self) -> tuple[Ref, ...]:
    """The other fields the rule reads (bounds, lengths, its condition)."""
    return (self.when.ref,) if getattr(self, "when", None) else ()

  @abc.abstractmethod
  def noun(self, ctx: Context, plural: bool = False) -> str:
    """What the rule allows as a noun phrase ('a number in (0, 1)', 'integers >= 1')."""


def _full(rule, words: str | None, ctx: Context) -> str | None:
  if words is None:
    return None
  if rule.when is not None:
    words += rule.when.text(ctx)
  if rule.hint:
    words += f"; {rule.hint}"
  return words


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
  """One of ``options`` (compared with ``==``)."""
  options: tuple = ()
  when: When | None = None
  hint: str = ""

  def problem(self, value, ctx):
    if _hashable(value) in self.options:
      return None
    return _full(self, f"is not valid; choose one of {list(self.options)}", ctx)

  def noun(self, ctx, plural=False):
    return f"entries from {list(self.options)}" if plural else f"one of {list(self.options)}"


@dataclasses.dataclass(frozen=True)
class Flag(Rule):
  """``True`` or ``False``."""
  when: When | None = None
  hint: str = ""

  def problem(self, value, ctx):
    return None if isinstance(value, bool) else _full(self, "must be true or false", ctx)

  def noun(self, ctx, plural=False):
    return "booleans" if plural else "a boolean"


@dataclasses.dataclass(frozen=True)
class Number(Rule):
  """A finite number (``integer``: an ``int``) within the bounds; a bound may be a :class:`Ref`
  (skipped while that field is missing or not a number)."""
  lo: Any = None
  hi: Any = None
  lo_open: bool = False
  hi_open: bool = False
  integer: bool = False
  when: When | None = None
  hint: str = ""

  def refs(self):
    return super().refs() + tuple(b for b in (self.lo, self.hi) if isinstance(b, Ref))

  def _bound(self, b, ctx) -> tuple[Any, str] | None:
    if b is None:
      return None
    if isinstance(b, Ref):
      found, v = b.lookup(ctx)
      if not found or not _is_number(v):
        return None
      return v, b.text(ctx)
    return b, _fmt(b)

  def _range(self, ctx) -> str:
    lo, hi = self._bound(self.lo, ctx), self._bound(self.hi, ctx)
    if lo and hi:
      return f"in {'(' if self.lo_open else '['}{lo[1]}, {hi[1]}{')' if self.hi_open else ']'}"
    if lo:
      return f"{'>' if self.lo_open else '>='} {lo[1]}"
    if hi:
      return f"{'<' if self.hi_open else '<='} {hi[1]}"
    return ""

  def noun(self, ctx, plural=False):
    kind = ("integers" if plural else "an integer") if self.integer else (
        ("numbers" if plural else "a number"))
    rng = self._range(ctx)
    return f"{kind} {rng}".strip()

  def _allowed(self, value, ctx) -> bool:
    lo, hi = self._bound(self.lo, ctx), self._bound(self.hi, ctx)
    if lo and (value <= lo[0] if self.lo_open else value < lo[0]):
      return False
    if hi and (value >= hi[0] if self.hi_open else value > hi[0]):
      return False
    return True

  def problem(self, value, ctx):
    typed = isinstance(value, int) if self.integer else True
    if not _is_number(value) or not typed or not math.isfinite(value):
      kind = "an integer" if self.integer else "a finite number"
      return _full(self, f"must be {kind} {self._range(ctx)}".rstrip(), ctx)
    if self._allowed(value, ctx):
      return None
    rng = self._range(ctx)
    only_refs = any(isinstance(b, Ref) for b in (self.lo, self.hi)) and not (
        self.lo is not None and self.hi is not None)
    if self.integer:
      words = f"must be an integer {rng}"
    elif only_refs or (self.lo is not None and self.hi is not None):
      words = f"must be {rng}"
    else:
      words = f"must be a number {rng}"
    return _full(self, words, ctx)


def Int(lo=None, hi=None, **kwargs) -> Number:  # pylint: disable=invalid-name
  """An integer (``int``, not ``bool``) within the bounds (see :class:`Number`)."""
  return Number(lo, hi, integer=True, **kwargs)


@dataclasses.dataclass(frozen=True)
class Text(Rule):
  """A string; ``nonempty``; ``pattern``: a full match of it (``allowed`` says it in words)."""
  nonempty: bool = False
  pattern: str | None = None
  allowed: str = ""
  when: When | None = None
  hint: str = ""

  def noun(self, ctx, plural=False):
    if self.allowed:
      return self.allowed
    if self.nonempty:
      return "non-empty strings" if plural else "a non-empty string"
    return "strings" if plural else "a string"

  def problem(self, value, ctx):
    ok = isinstance(value, str) and (not self.nonempty or value.strip()) and (
        self.pattern is None or re.fullmatch(self.pattern, value, flags=re.S) is not None)
    return None if ok else _full(self, f"must be {self.noun(ctx)}", ctx)


@dataclasses.dataclass(frozen=True)
class Seq(Rule):
  """A tuple (or list): every entry follows ``item`` (or entry ``i`` follows ``items[i]``);
  ``lengths``: the allowed lengths (ints or :class:`Ref`), ``min_len``; ``increasing``: strictly;
  ``first``: the value the first entry must have."""
  item: Rule | None = None
  items: tuple = ()
  min_len: int = 0
  lengths: tuple = ()
  increasing: bool = False
  first: Any = None
  when: When | None = None
  hint: str = ""

  def refs(self):
    inner = tuple(r for rule in ((self.item,) if self.item else ()) + tuple(self.items)
                  for r in rule.refs())
    return super().refs() + inner + tuple(n for n in self.lengths if isinstance(n, Ref))

  def _lengths(self, ctx) -> list[tuple[int, str]]:
    out = []
    for n in self.lengths:
      if isinstance(n, Ref):
        found, v = n.lookup(ctx)
        if found and isinstance(v, int) and not isinstance(v, bool):
          out.append((v, n.text(ctx)))
      else:
        out.append((n, str(n)))
    return out

  def noun(self, ctx, plural=False):
    adj = ("non-empty " if self.min_len and not self.lengths else "") + (
        "increasing " if self.increasing else "")
    if plural:
      what = f"{adj}tuples"
    else:
      what = f"{'an' if adj[:1] in ('a', 'e', 'i', 'o', 'u') else 'a'} {adj}tuple"
    if self.items:
      what += " (" + ", ".join(r.noun(ctx) for r in self.items) + ")"
    elif self.item is not None:
      what += f" of {self.item.noun(ctx, plural=True)}"
    if self.first is not None:
      what += f" starting at {_fmt(self.first)}"
    lengths = self._lengths(ctx)
    if lengths:
      what += f" with {' or '.join(t for _, t in lengths)} entries"
    return what

  def problem(self, value, ctx):
    bad = _full(self, f"must be {self.noun(ctx)}", ctx)
    if not isinstance(value, (tuple, list)):
      return bad
    if self.items and len(value) != len(self.items):
      return bad
    rules = self.items or ((self.item,) * len(value) if self.item is not None else ())
    for rule, v in zip(rules, value):
      if rule.problem(v, ctx) is not None:
        return bad
    if len(value) < self.min_len:
      return bad
    lengths = self._lengths(ctx)
    if lengths and len(value) not in [n for n, _ in lengths]:
      return bad
    if self.increasing and any(not b > a for a, b in zip(value, value[1:])):
      return bad
    if self.first is not None and (not value or value[0] != self.first):
      return bad
    return None


@dataclasses.dataclass(frozen=True)
class Elsewhere(Rule):
  """Any value here; ``where`` names the check that has what it needs (e.g. the built model)."""
  where: str = ""
  when: When | None = None
  hint: str = ""

  def problem(self, value, ctx):
    return None

  def noun(self, ctx, plural=False):
    return f"anything {self.where} accepts"


# --------------------------------------------------------------------------------------------------
# Declaring fields.


@dataclasses.dataclass(frozen=True)
class Field:
  """A default and its rules, assigned to a field of a :class:`Group` (which keeps the rules and
  stores the plain default)."""
  default: Any
  rules: tuple


def field(default, *rules: Rule) -> Field:
  """Declares a field of a :class:`Group`: ``group.name = field(default, rule, ...)``.

  Every rule must allow the value (a rule with ``when`` only while its condition holds).
  """
  if not rules or not all(isinstance(r, Rule) for r in rules):
    raise TypeError(f"fields.field({default!r}, ...) needs at least one rule (fields.Number, "
                    "fields.Choice, ...)")
  return Field(default, tuple(rules))


class Group(ml_collections.ConfigDict):
  """A ConfigDict that keeps the rules of its declared fields (values stay plain)."""

  def __init__(self, *args, **kwargs):
    object.__setattr__(self, "_rules", {})
    super().__init__(*args, **kwargs)

  def __setitem__(self, key, value):
    if isinstance(value, Field):
      self._rules[key] = value.rules
      value = value.default
    super().__setitem__(key, value)

  def __setstate__(self, state):
    super().__setstate__(state)
    object.__setattr__(self, "_rules", dict(state.get("_rules", {})))

  def copy_and_resolve_references(self, visit_map=None):
    out = super().copy_and_resolve_references(visit_map)
    object.__setattr__(out, "_rules", dict(self._rules))
    return out


def group() -> Group:
  """An empty :class:`Group` (a method's ``config.<name>``)."""
  return Group()


def rules_of(group_: ml_collections.ConfigDict, name: str) -> tuple[Rule, ...]:
  """The declared rules of ``group_.name`` (``()``: none)."""
  return tuple(getattr(group_, "_rules", {}).get(name, ()))


def declared(config: ml_collections.ConfigDict, prefix: str = ""
             ) -> list[tuple[str, ml_collections.ConfigDict, str, tuple[Rule, ...]]]:
  """``(dotted path, group, name, rules)`` of every field of ``config`` and its groups, in
  declaration order (then the undeclared ones); ``rules`` is ``()`` for an undeclared field."""
  own = getattr(config, "_rules", {})
  order = list(own) + [k for k in config.keys() if k not in own]
  out = []
  for name in order:
    if name not in config:
      continue
    value = config[name]
    out.append((prefix + name, config, name, rules_of(config, name)))
    if isinstance(value, ml_collections.ConfigDict) and not any(
        isinstance(r, Elsewhere) for r in rules_of(config, name)):
      out.extend(declared(value, prefix + name + "."))
  return out


def undeclared(config: ml_collections.ConfigDict) -> list[str]:
  """Dotted paths of the leaf fields without a rule (a group without one is looked into)."""
  return [path for path, g, name, rules in declared(config)
          if not rules and not (isinstance(g[name], ml_collections.ConfigDict) and len(g[name]))]


def problem(config: ml_collections.ConfigDict, path: str, g, name: str, rules,
            relations: bool | None = None) -> str | None:
  """The one-line error of the field, or ``None``. ``relations``: only the rules that read other
  fields (True), only those that do not (False), or all (None)."""
  value = g[name]
  ctx = Context(group=g, root=config, prefix=f"config.{path[:-len(name)]}")
  for rule in rules:
    if relations is not None and bool(rule.refs()) != relations:
      continue
    if rule.when is not None and not rule.when.holds(ctx):
      continue
    words = rule.problem(value, ctx)
    if words is not None:
      return f"config.{path}={value!r} {words}"
  return None


def check(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ``ValueError`` for the first field whose value a rule refuses.

  Every field's own rules are checked before the rules that read other fields, so a bad value is
  named as itself rather than through a relation of another field.
  """
  entries = declared(config)
  for path, g, name, _ in entries:
    if isinstance(g[name], Field):
      raise ValueError(f"config.{path} holds fields.field(...) in a plain ConfigDict; create its "
                       "group with sparse_cl_jax.fields.Group()")
  for relations in (False, True):
    for path, g, name, rules in entries:
      message = problem(config, path, g, name, rules, relations)
      if message is not None:
        raise ValueError(message)
