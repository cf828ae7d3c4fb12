"""Lifelong Lottery Tickets on 5-task class-IL Split Fashion-MNIST, pool from another distribution.

Issue 23. Every row is ``experiment.run`` with ``configs/llt.py:<preset>`` and one ``llt.mode``;
the rows (``ROWS``) pair a mode with lottery teaching on or off and a pool:
``fashion_mnist_digits`` (the embedded digits resized to 28x28: another distribution, as the
paper's 80M Tiny Images are for CIFAR) or ``fashion_mnist`` (the stream's own unused training
images)::

  python benchmarks/llt_results.py --workdir=/tmp/llt_table --seeds=0,1,2
  python benchmarks/llt_results.py --workdir=/tmp/llt_table --seeds=0,1,2 --table-only

A finished run is reused, so the script can be stopped and restarted. Results:
``WORKDIR/<row>_s<seed>/results.json`` and the markdown table printed at the end (also written
to ``WORKDIR/table.md``): ACC per seed, mean ± sd, paired differences against the dense row and
between chosen pairs (same seed: same split, initialisation and data order), remaining weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np

import _stats
from sparse_cl_jax import experiment

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# row: (label, preset, llt.mode, lottery_teaching)
ROWS = {
    "dense": ("Dense class-IL model, digits pool", "fashion_mnist_digits", "dense", True),
    "td": ("TD tickets (LT), digits pool", "fashion_mnist_digits", "td", True),
    "bu": ("BU tickets (TR), digits pool", "fashion_mnist_digits", "bu", True),
    "imp": ("Plain IMP (no lottery teaching)", "fashion_mnist_digits", "imp", False),
    "td_nolt": ("TD tickets without lottery teaching", "fashion_mnist_digits", "td", False),
    "dense_nolt": ("Dense without lottery teaching", "fashion_mnist_digits", "dense", False),
    "td_own": ("TD tickets (LT), own-distribution pool", "fashion_mnist", "td", True),
}
# (a, b): the paired differences a - b reported besides "minus dense"
PAIRS = (("td", "td_nolt"), ("td_own", "td_nolt"), ("dense", "dense_nolt"), ("td", "imp"),
         ("td", "td_own"), ("bu", "dense"), ("td", "dense"), ("imp", "dense"))


def load_config(arg: str):
  path = os.path.join(_REPO, "configs", "llt.py")
  spec = importlib.util.spec_from_file_location("config_llt", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run_one(root: str, row: str, seed: int) -> dict:
  workdir = os.path.join(root, f"{row}_s{seed}")
  done = os.path.join(workdir, "results.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  _, preset, mode, teach = ROWS[row]
  c = load_config(preset)
  c.progress = False
  c.seed = seed
  c.llt.mode = mode
  c.llt.lottery_teaching = teach
  t0 = time.time()
  r = experiment.run(c, workdir, print_summary=False)
  wall = time.time() - t0
  with open(os.path.join(workdir, "wall.json"), "w") as f:
    json.dump({"wall_seconds": wall}, f)
  print(f"{row} seed {seed}: {wall:.0f} s, acc {r['acc']:.4f}, remaining "
        f"{r.get('remaining_weights', [1.0])[-1]:.4f}", flush=True)
  return r


_ms = _stats.mean_sd


def table(root: str, seeds, rows) -> str:
  res = {}
  for row in rows:
    for s in seeds:
      path = os.path.join(root, f"{row}_s{s}", "results.json")
      if os.path.exists(path):
        with open(path) as f:
          res[(row, s)] = json.load(f)
  present = [r for r in rows if all((r, s) in res for s in seeds)]
  acc = {r: [100 * res[(r, s)]["acc"] for s in seeds] for r in present}
  lines = [f"ACC (%) after the last task, seeds {','.join(map(str, seeds))}:\n",
           "| row | ACC per seed | mean ± sd | BWT mean | remaining weights after task 5 | "
           "pool images | wall (s, mean) |", "|---|---|---|---|---|---|---|"]
  for r in present:
    rem = [res[(r, s)].get("remaining_weights", [1.0])[-1] for s in seeds]
    rem_s = (f"{100 * min(rem):.2f}-{100 * max(rem):.2f}%" if max(rem) - min(rem) > 1e-9
             else f"{100 * rem[0]:.2f}%")
    pool = res[(r, seeds[0])].get("llt", {}).get("pool_size", "-")
    walls = []
    for s in seeds:
      path = os.path.join(root, f"{r}_s{s}", "wall.json")
      if os.path.exists(path):
        with open(path) as f:
          walls.append(json.load(f)["wall_seconds"])
    bwt = np.mean([100 * res[(r, s)]["bwt"] for s in seeds])
    lines.append(f"| {ROWS[r][0]} | {', '.join(f'{a:.2f}' for a in acc[r])} | {_ms(acc[r])} | "
                 f"{bwt:.1f} | {rem_s} | {pool} | {np.mean(walls):.0f} |"
                 if walls else f"| {ROWS[r][0]} | - | - | - | - | - | - |")
  lines += ["", "Paired by seed (points; per-seed differences, mean ± sd):\n",
            "| comparison | per seed | mean ± sd |", "|---|---|---|"]
  for a, b in PAIRS:
    if a in present and b in present:
      d = [x - y for x, y in zip(acc[a], acc[b])]
      lines.append(f"| {ROWS[a][0]} minus {ROWS[b][0]} | {', '.join(f'{x:+.2f}' for x in d)} | "
                   f"{_ms(d)} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="/tmp/llt_table")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--rows", default=",".join(ROWS))
  p.add_argument("--table-only", action="store_true")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = [r for r in args.rows.split(",") if r]
  for r in rows:
    if r not in ROWS:
      raise SystemExit(f"--rows: {r!r} is not one of {list(ROWS)}")
  os.makedirs(args.workdir, exist_ok=True)
  if not args.table_only:
    t0 = time.time()
    for r in rows:
      for s in seeds:
        run_one(args.workdir, r, s)
    print(f"all runs: {time.time() - t0:.0f} s", flush=True)
  text = table(args.workdir, seeds, [r for r in ROWS if r in rows])
  with open(os.path.join(args.workdir, "table.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
