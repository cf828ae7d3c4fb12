"""Every field of every preset has a rule, and its rule refuses exactly what it says (issue 25).

The presets are every ``configs/*.py`` with each argument its error for an unknown argument
lists. Property tests (hypothesis, derandomised) draw, for every field, values its rule allows
(accepted, or refused only through a declared relation of another field) and values it refuses
(one line naming the field); the launchers refuse the issue's examples with exit status 2, one line
on stderr and nothing written.
"""

import copy
import functools
import math
import os
import re
import subprocess
import sys

from hypothesis import assume
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
import ml_collections
import pytest

from sparse_cl_jax import cli
from sparse_cl_jax import config as config_lib
from sparse_cl_jax import fields

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = os.path.join(_REPO, "configs")
_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


def _arguments(path: str) -> list[str | None]:
  """None and every argument the file's error for an unknown argument names."""
  try:
    cli.load_config_file(f"{path}:zz_unknown")
  except cli.UsageError as e:
    words = re.findall(r"'([\w\[\],]+)'", str(e))
  else:
    raise AssertionError(f"{path} accepts any argument")
  return [None] + sorted({re.sub(r"\[.*\]", "", w) for w in words if w != "zz_unknown"})


@functools.lru_cache(maxsize=None)
def presets() -> dict[str, ml_collections.ConfigDict]:
  out = {}
  for name in sorted(os.listdir(_CONFIGS)):
    if name.endswith(".py") and not name.startswith("_"):
      path = os.path.join(_CONFIGS, name)
      for arg in _arguments(path):
        out[f"{name[:-3]}:{arg or ''}"] = cli.load_config_file(path + (f":{arg}" if arg else ""))
  return out


def _leaves(c):
  return [(p, g, n, r) for p, g, n, r in fields.declared(c)
          if r and not any(isinstance(x, fields.Elsewhere) for x in r)]


@functools.lru_cache(maxsize=None)
def field_paths() -> list[str]:
  seen = {}
  for c in presets().values():
    for path, *_ in _leaves(c):
      seen.setdefault(path, None)
  return list(seen)


def test_the_presets_are_found():
  names = set(presets())
  for want in ("packnet:runlocal", "cpg:cifar100", "pae:fashion_mnist", "dst_cl:cifar100_10",
               "dst_cl:adaptive", "llt:tiny_imagenet", "prac:cifar10", "clnp:cifar_wide",
               "piggyback:cifar100", "finetune:", "individual:fashion_mnist"):
    assert want in names
  assert len(field_paths()) > 100


def test_every_field_of_every_preset_has_a_rule_and_the_preset_passes_it():
  for name, c in presets().items():
    assert fields.undeclared(c) == [], name
    config_lib.validate(c)


# --------------------------------------------------------------------------------------------------
# Values drawn from a rule.


def _ctx(c, path, g):
  name = path.rsplit(".", 1)[-1]
  return fields.Context(group=g, root=c, prefix=f"config.{path[:-len(name)]}")


def _bound(b, ctx):
  if isinstance(b, fields.Ref):
    found, v = b.lookup(ctx)
    return v if found and isinstance(v, (int, float)) and not isinstance(v, bool) else None
  return b


def _lengths(rule, ctx):
  out = []
  for n in rule.lengths:
    n = _bound(n, ctx)
    if n is not None:
      out.append(int(n))
  return out


def allowed(rule, ctx):
  """Values ``rule`` allows (boundaries first)."""
  if isinstance(rule, fields.Choice):
    return st.sampled_from(rule.options)
  if isinstance(rule, fields.Flag):
    return st.booleans()
  if isinstance(rule, fields.Number):
    lo, hi = _bound(rule.lo, ctx), _bound(rule.hi, ctx)
    edges = [b for b, is_open in ((lo, rule.lo_open), (hi, rule.hi_open))
             if b is not None and not is_open]
    if rule.integer:
      low = None if lo is None else math.floor(lo) + (1 if rule.lo_open and lo == int(lo) else 0)
      high = None if hi is None else math.ceil(hi) - (1 if rule.hi_open and hi == int(hi) else 0)
      if low is not None and high is None:
        high = low + 10_000
      inner = st.integers(low, high)
      edges = [int(e) for e in edges if e == int(e)]
    else:
      inner = st.floats(lo, hi, exclude_min=rule.lo_open and lo is not None,
                        exclude_max=rule.hi_open and hi is not None, allow_nan=False,
                        allow_infinity=False)
      edges = [float(e) for e in edges]
    return st.one_of(st.sampled_from(edges), inner) if edges else inner
  if isinstance(rule, fields.Text):
    if rule.pattern is not None:
      return st.from_regex(rule.pattern, fullmatch=True)
    return st.text(min_size=1).filter(str.strip) if rule.nonempty else st.text()
  if isinstance(rule, fields.Seq):
    if rule.items:
      return st.tuples(*(allowed(r, ctx) for r in rule.items))
    item = allowed(rule.item, ctx) if rule.item is not None else st.integers()
    lengths = _lengths(rule, ctx)
    sizes = st.sampled_from(lengths) if lengths else st.integers(rule.min_len, rule.min_len + 4)

    def build(n):
      values = st.lists(item, min_size=n, max_size=n, unique=rule.increasing)
      if rule.increasing:
        values = values.map(sorted)
      if rule.first is not None:
        values = values.map(
            lambda v: [rule.first] + [x for x in v if x > rule.first][:max(0, n - 1)])
      return values.map(tuple)

    return sizes.flatmap(build)
  raise AssertionError(f"no strategy for {rule!r}")


_NON_NUMBERS = ("0.5", None, True, float("nan"), float("inf"), -float("inf"))


def refused(rule, ctx):
  """Values ``rule`` refuses (boundaries and the wrong types first)."""
  if isinstance(rule, fields.Choice):
    return st.one_of(st.sampled_from([None, 1, "", "no such choice"]),
                     st.text().filter(lambda s: s not in rule.options))
  if isinstance(rule, fields.Flag):
    return st.sampled_from([0, 1, "true", None, 1.0])
  if isinstance(rule, fields.Number):
    lo, hi = _bound(rule.lo, ctx), _bound(rule.hi, ctx)
    out = [st.sampled_from(_NON_NUMBERS + ((1.5, 2.0) if rule.integer else ()))]
    if lo is not None:
      below = [lo] if rule.lo_open else []
      if rule.integer:
        out.append(st.sampled_from(below + [math.ceil(lo) - 1]) if below else
                   st.integers(max_value=math.ceil(lo) - 1))
      else:
        out.append(st.sampled_from(below) if below else st.nothing())
        out.append(st.floats(max_value=lo, exclude_max=True, allow_nan=False, allow_infinity=False))
    if hi is not None:
      above = [hi] if rule.hi_open else []
      if rule.integer:
        out.append(st.sampled_from(above) if above else st.integers(min_value=math.floor(hi) + 1))
        out.append(st.integers(min_value=math.floor(hi) + 1))
      else:
        out.append(st.sampled_from(above) if above else st.nothing())
        out.append(st.floats(min_value=hi, exclude_min=True, allow_nan=False, allow_infinity=False))
    return st.one_of(*reversed(out[1:]), out[0]) if len(out) > 1 else out[0]
  if isinstance(rule, fields.Text):
    wrong = st.sampled_from([None, 1, ("a",)])
    if rule.pattern is not None:
      return st.one_of(st.text().filter(
          lambda s: re.fullmatch(rule.pattern, s, flags=re.S) is None), wrong)
    return st.one_of(st.sampled_from(["", "  "]), wrong) if rule.nonempty else wrong
  if isinstance(rule, fields.Seq):
    out = [st.sampled_from([None, 1, "a"])]
    inner = rule.items or ((rule.item,) if rule.item is not None else ())
    if inner:
      ok = [allowed(r, ctx) for r in inner]
      for i, r in enumerate(inner):  # one bad entry among good ones
        parts = list(ok[:len(ok)]) if rule.items else [ok[0]]
        parts[i if rule.items else 0] = refused(r, ctx)
        out.append(st.tuples(*parts))
    if rule.increasing and rule.item is not None:
      out.append(allowed(rule.item, ctx).map(lambda x: (x, x)))
      out.append(st.lists(allowed(rule.item, ctx), min_size=2, max_size=4, unique=True).map(
          lambda v: tuple(sorted(v, reverse=True))))
    if rule.first is not None and rule.item is not None:
      out.append(st.lists(allowed(rule.item, ctx), min_size=1, max_size=3).filter(
          lambda v: v[0] != rule.first).map(tuple))
    lengths = _lengths(rule, ctx)
    if lengths and rule.item is not None:
      out.append(st.integers(0, max(lengths) + 2).filter(lambda n: n not in lengths).flatmap(
          lambda n: st.lists(allowed(rule.item, ctx), min_size=n, max_size=n).map(tuple)))
    if rule.min_len:
      out.append(st.just(()))
    return st.one_of(*reversed(out))
  raise AssertionError(f"no strategy for {rule!r}")


def _intersect(first, more, ctx):
  """``first`` with the bounds of the other Number rules folded in; the rules left over."""
  if not isinstance(first, fields.Number):
    return first, more
  lo, hi = _bound(first.lo, ctx), _bound(first.hi, ctx)
  lo_open, hi_open = first.lo_open, first.hi_open
  rest = []
  for r in more:
    if not isinstance(r, fields.Number):
      rest.append(r)
      continue
    b = _bound(r.lo, ctx)
    if b is not None and (lo is None or b > lo or (b == lo and r.lo_open)):
      lo, lo_open = b, r.lo_open
    b = _bound(r.hi, ctx)
    if b is not None and (hi is None or b < hi or (b == hi and r.hi_open)):
      hi, hi_open = b, r.hi_open
  return fields.Number(lo, hi, lo_open, hi_open, integer=first.integer), rest


def _entry(c, path):
  for p, g, n, r in _leaves(c):
    if p == path:
      return g, n, r
  return None


def _applicable(c, path, g, rules):
  ctx = _ctx(c, path, g)
  return ctx, [r for r in rules if r.when is None or r.when.holds(ctx)]


def _dependents(c, path) -> set[str]:
  """Fields whose rules read ``path`` (bounds, lengths, conditions)."""
  out = set()
  for p, g, n, rules in _leaves(c):
    prefix = p[:-len(n)]
    for rule in rules:
      if any((ref.name if ref.top else prefix + ref.name) == path for ref in rule.refs()):
        out.add(p)
  return out


def _set(c, path, value):
  *parents, last = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[last] = value


@functools.lru_cache(maxsize=None)
def _presets_with(path):
  return sorted(n for n, c in presets().items() if _entry(c, path) is not None)


@pytest.mark.parametrize("path", field_paths())
@_SETTINGS
@given(data=st.data())
def test_a_value_the_rule_refuses_is_named_in_one_line(path, data):
  c = copy.deepcopy(presets()[data.draw(st.sampled_from(_presets_with(path)), label="preset")])
  g, name, rules = _entry(c, path)
  ctx, rules = _applicable(c, path, g, rules)
  rule = data.draw(st.sampled_from(rules), label="rule")
  value = data.draw(refused(rule, ctx), label="value")
  # ConfigDict turns an int (or a bool) set on a float field into a float: not the value drawn.
  assume(not (isinstance(g[name], float) and isinstance(value, int)))
  _set(c, path, value)
  with pytest.raises(ValueError) as info:
    config_lib.validate(c)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"config.{path}={value!r} "), message


@pytest.mark.parametrize("path", field_paths())
@_SETTINGS
@given(data=st.data())
def test_a_value_the_rule_allows_is_accepted(path, data):
  c = copy.deepcopy(presets()[data.draw(st.sampled_from(_presets_with(path)), label="preset")])
  g, name, rules = _entry(c, path)
  ctx, rules = _applicable(c, path, g, rules)
  first, more = _intersect(rules[0], rules[1:], ctx)
  value = data.draw(allowed(first, ctx).filter(  # the other rules (not Number): as they say
      lambda v: all(r.problem(v, ctx) is None for r in more)), label="value")
  _set(c, path, value)
  try:
    config_lib.validate(c)
  except ValueError as e:  # only through a relation of a field that reads this one
    named = re.match(r"config\.([\w.]+)=", str(e)).group(1)
    assert named in _dependents(c, path), str(e)


def test_rules_survive_overrides_copies_and_pickling():
  import pickle  # pylint: disable=g-import-not-at-top
  c = copy.deepcopy(presets()["cpg:runlocal"])
  c.momentum = 0.5
  cli.apply_overrides(c, [("cpg.stages", "0.3,0.6")])
  for other in (copy.deepcopy(c), pickle.loads(pickle.dumps(c)), c.copy_and_resolve_references()):
    assert fields.undeclared(other) == [] and other.momentum == 0.5
    assert config_lib.to_dict(other) == config_lib.to_dict(c)
    other.momentum = 1.0
    with pytest.raises(ValueError, match=r"^config\.momentum=1\.0 must be in \[0, 1\)$"):
      config_lib.validate(other)
  assert type(c.to_dict()["momentum"]) is float  # plain values  # noqa: E721


# --------------------------------------------------------------------------------------------------
# Through the launchers: exit status 2, one line, nothing written.

MAIN = os.path.join(_REPO, "experiments", "main.py")
SWEEP = os.path.join(_REPO, "experiments", "sweep.py")
CASES = (
    (MAIN, "packnet:runlocal", "--config.momentum=1.5",
     "error: --config.momentum=1.5 must be in [0, 1)"),
    (MAIN, "packnet:runlocal", "--config.hidden=0",
     "error: --config.hidden=(0,) must be a tuple of integers >= 1"),
    (MAIN, "cpg:runlocal", "--config.cpg.stages=0.9,0.5",
     "error: --config.cpg.stages=(0.9, 0.5) must be an increasing tuple"),
    (MAIN, "cpg:runlocal", "--config.cpg.levels=0.5",
     "error: --config.cpg.levels=(0.5,) must be a non-empty increasing tuple"),
    (MAIN, "packnet:runlocal", "--config.learning_rate=inf",
     "error: --config.learning_rate=inf must be a finite number > 0"),
    (SWEEP, "packnet:runlocal", "--sweep.momentum=0.9,1.5",
     "error: cell momentum-1.5: --sweep.momentum=1.5 must be in [0, 1)"),
)


def test_the_launchers_refuse_bad_values_before_anything_runs(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  runs = []
  for i, (launcher, preset, flag, _) in enumerate(CASES):
    workdir = tmp_path / f"w{i}"
    runs.append((workdir, subprocess.Popen(
        [sys.executable, launcher, f"--config={preset}", f"--workdir={workdir}", flag],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
  for (workdir, proc), (_, _, flag, message) in zip(runs, CASES):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (flag, err[-2000:])
    assert err.strip().splitlines() == [err.strip()], err  # one line
    assert err.startswith(message), err
    assert not workdir.exists() and not out
