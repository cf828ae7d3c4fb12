"""Small statistics shared by the benchmark scripts that report verdicts over seeds.

Paired comparisons follow docs/results.md: the per-seed difference of two methods run with the
same seed (same data order, split and initialisation), its mean, sample standard deviation and
two-sided 95% Student-t interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% quantiles of Student's t (t_{0.975, df}), df = 1 .. 10.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_sd(values: Sequence[float], digits: int = 2) -> str:
  """``"m ± sd"`` (sample sd) of ``values``; one value alone; ``"-"`` for none."""
  v = [float(x) for x in values if x is not None]
  if not v:
    return "-"
  m = sum(v) / len(v)
  if len(v) == 1:
    return f"{m:.{digits}f}"
  sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
  return f"{m:.{digits}f} ± {sd:.{digits}f}"


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
  """``a - b`` per seed: ``{diffs, mean, sd, low, high}`` (95% t interval; needs 2 .. 11 seeds)."""
  d = [float(x) - float(y) for x, y in zip(a, b)]
  n = len(d)
  if not 2 <= n <= len(T975) + 1:
    raise ValueError(f"a paired interval needs 2 to {len(T975) + 1} seeds, got {n}")
  m = sum(d) / n
  sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
  half = T975[n - 2] * sd / math.sqrt(n)
  return {"diffs": d, "mean": m, "sd": sd, "low": m - half, "high": m + half}


def paired_cells(p: dict) -> str:
  """A :func:`paired` result as markdown cells: per-seed differences | mean ± sd | interval."""
  return (f"{', '.join(f'{x:+.2f}' for x in p['diffs'])} | {p['mean']:+.2f} ± {p['sd']:.2f} | "
          f"[{p['low']:+.2f}, {p['high']:+.2f}]")


def verdict(p: dict, claim_sign: int = 1) -> str:
  """"confirmed" when the 95% interval lies on the claimed side of 0, "refuted" when it lies on
  the other side, else "not decided by these seeds"."""
  low, high = (p["low"], p["high"]) if claim_sign > 0 else (-p["high"], -p["low"])
  if low > 0:
    return "confirmed"
  if high < 0:
    return "refuted"
  return "not decided by these seeds"
