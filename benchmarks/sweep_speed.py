r"""Sweeps against their runs one after another, each its own process (issue 21).

  python benchmarks/sweep_speed.py --workdir=/tmp/sweep_bench            # the bar and runs/hour
  python benchmarks/sweep_speed.py --workdir=/tmp/sb --only=bar           # the bar only
  python benchmarks/sweep_speed.py --workdir=/tmp/sb --only=bar --bar=dst_cl --repeats=5

The bar: for ``packnet`` and ``dst_cl`` ``:runlocal`` with ``--sweep.seed=0,1
--sweep.learning_rate=LR,2LR``, the sweep (one process, ``experiments/sweep.py``) against the four
cells run alone (four ``experiments/main.py`` processes, one after another), both with a warm
compilation cache (everything is run once before it is timed). ``--repeats=N`` times both N
times, alternating (the four singles, then the sweep, then the singles again ...), and reports
the median of the N ratios (each ratio from one round, back to back) beside the medians of the
wall times; also the CPU time (user + system) of the same processes and its ratio, which other
jobs on a shared machine disturb less than the wall time, and the load average at the end. Prints how many cells shared one program and the largest difference between a cell's
accuracy matrix and the same cell run alone.

Runs per hour: a 5-task Split-Digits stream on LeNet-300-100 and on the small convnet (PackNet,
2 epochs + 1 retraining epoch per task): one run alone against sweeps of 4 and 8 seeds.

Methods: every config's ``:runlocal`` as a 2x2 sweep in one process against its cells run alone
(the largest accuracy difference, the share of program calls that ran batched).

Every figure is wall-clock time on this machine (the device is printed); ratios come from one
invocation, back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable


def _run_cpu(cmd: list[str]) -> tuple[float, float]:
  """Runs ``cmd``: its wall time and the CPU time (user + system) of the process, in seconds."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
  return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _run(cmd: list[str]) -> float:
  return _run_cpu(cmd)[0]


def _fresh(path: pathlib.Path) -> str:
  shutil.rmtree(path, ignore_errors=True)
  return str(path)


def _single(config: str, workdir: pathlib.Path, overrides: dict, extra: list[str], run=_run):
  args = [f"--config.{k}={v}" for k, v in overrides.items()]
  return run([PY, "experiments/main.py", f"--config={config}", f"--workdir={_fresh(workdir)}",
               *extra, *args])


def _sweep(config: str, workdir: pathlib.Path, grid: dict, extra: list[str], run=_run):
  args = [f"--sweep.{k}={','.join(map(str, v))}" for k, v in grid.items()]
  return run([PY, "experiments/sweep.py", f"--config={config}", f"--workdir={_fresh(workdir)}",
               *extra, *args])


def _cells(workdir: pathlib.Path) -> list[dict]:
  return json.loads((workdir / "sweep.json").read_text())["cells"]


def _matrix(workdir) -> list:
  return json.loads(pathlib.Path(workdir, "results.json").read_text())["accuracy_matrix"]


def bar(root: pathlib.Path, names=("packnet", "dst_cl"), repeats: int = 1) -> list[dict]:
  import importlib.util  # pylint: disable=g-import-not-at-top
  import statistics  # pylint: disable=g-import-not-at-top
  rows = []
  for name in names:
    spec = importlib.util.spec_from_file_location(f"bar_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lr = float(module.get_config("runlocal").learning_rate)  # the preset's LR, and 2 LR
    config = f"configs/{name}.py:runlocal"
    grid = {"seed": [0, 1], "learning_rate": [lr, 2 * lr]}
    cells = [{"seed": s, "learning_rate": v} for s in grid["seed"] for v in grid["learning_rate"]]
    # Warm-up: every program of both ways into the persistent compilation cache.
    _sweep(config, root / f"{name}_warm", grid, [])
    for i, c in enumerate(cells):
      _single(config, root / f"{name}_warm_single{i}", c, [])
    rounds = []
    for _ in range(repeats):  # alternating: the four singles, then the sweep
      singles = [_single(config, root / f"{name}_single{i}", c, [], _run_cpu)
                 for i, c in enumerate(cells)]
      sweep = _sweep(config, root / f"{name}_sweep", grid, [], _run_cpu)
      rounds.append((sum(w for w, _ in singles), sweep[0], sum(c for _, c in singles), sweep[1]))
    diffs = []
    for cell in _cells(root / f"{name}_sweep"):
      i = cells.index({k: cell["overrides"][k] for k in ("seed", "learning_rate")})
      a, b = _matrix(cell["workdir"]), _matrix(root / f"{name}_single{i}")
      diffs.append(max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)))
    shared = max(c.get("cells_in_program", 1) for c in _cells(root / f"{name}_sweep"))
    largest = max(len(c.get("shared_with", [])) + 1 for c in _cells(root / f"{name}_sweep"))
    rows.append({"case": f"bar {name}:runlocal seed 0,1 x lr {lr},{2 * lr}",
                 "singles_s": round(statistics.median(r[0] for r in rounds), 2),
                 "sweep_s": round(statistics.median(r[1] for r in rounds), 2),
                 "ratio": round(statistics.median(r[1] / r[0] for r in rounds), 3),
                 "ratios": [round(r[1] / r[0], 3) for r in rounds],
                 "singles_cpu_s": round(statistics.median(r[2] for r in rounds), 2),
                 "sweep_cpu_s": round(statistics.median(r[3] for r in rounds), 2),
                 "cpu_ratio": round(statistics.median(r[3] / r[2] for r in rounds), 3),
                 "load_average": os.getloadavg()[0], "cells_in_program": shared,
                 "largest_group": largest, "max_abs_diff_vs_alone": max(diffs)})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def runs_per_hour(root: pathlib.Path) -> list[dict]:
  rows = []
  common = ["--config.num_tasks=5", "--config.epochs=2", "--config.packnet.retrain_epochs=1",
            "--config.max_train_per_task=0"]
  models = {"lenet_300_100": ["--config.model=mlp", "--config.hidden=300,100"],
            "small_convnet": ["--config.model=small_convnet"]}
  for model, flags in models.items():
    extra = common + flags
    config = "configs/packnet.py:runlocal"
    _single(config, root / f"rph_{model}_warm", {"seed": 0}, extra)
    one = _single(config, root / f"rph_{model}_one", {"seed": 0}, extra)
    row = {"case": f"runs/hour {model} (packnet, 5-task Split-Digits)",
           "one_run_s": round(one, 2), "runs_per_hour_alone": round(3600 / one, 1)}
    for n in (4, 8):
      grid = {"seed": list(range(n))}
      _sweep(config, root / f"rph_{model}_warm{n}", grid, extra)
      wall = _sweep(config, root / f"rph_{model}_sweep{n}", grid, extra)
      row[f"sweep{n}_s"] = round(wall, 2)
      row[f"runs_per_hour_sweep{n}"] = round(3600 * n / wall, 1)
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def methods(root: pathlib.Path) -> list[dict]:
  """Every config's ``:runlocal`` as a 2x2 sweep (seed x learning rate) in one process, against
  the same cells run alone: the largest accuracy difference and how the calls were shared."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax import experiment  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax.train import lockstep as lockstep_lib  # pylint: disable=g-import-not-at-top

  def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("runlocal")
    c.progress = False
    return c

  rows = []
  names = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))
  for name in names:
    cells = {}
    for seed in (0, 1):
      for mult in (1, 2):
        c = load(name)
        c.seed, c.learning_rate = seed, c.learning_rate * mult
        cells[f"seed{seed}_lr{mult}"] = c
    ls = lockstep_lib.Lockstep()
    for cell in cells:
      ls.join(cell, program_class="all")
    out = {}

    def work(cell, name=name):
      try:
        out[cell] = experiment.run(cells[cell], _fresh(root / "methods" / name / cell),
                                   print_summary=False, lockstep=ls, cell=cell)
      finally:
        ls.leave(cell)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(cell,)) for cell in cells]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    sweep_s = time.perf_counter() - start
    start = time.perf_counter()
    diff = 0.0
    for cell, c in cells.items():
      alone = experiment.run(c, _fresh(root / "methods" / name / f"{cell}_alone"),
                             print_summary=False)
      for ra, rb in zip(out[cell]["accuracy_matrix"], alone["accuracy_matrix"]):
        diff = max(diff, max(abs(x - y) for x, y in zip(ra, rb)))
    alone_s = time.perf_counter() - start
    report = ls.report()
    rows.append({"case": f"methods {name}:runlocal 2 seeds x 2 lr", "max_abs_diff_vs_alone": diff,
                 "largest_group": max(r["largest_group"] for r in report.values()),
                 "batched_fraction": round(sum(r["batched_calls"] for r in report.values()) /
                                           max(1, sum(r["calls"] for r in report.values())), 3),
                 "split_programs": ls.split_classes(), "sweep_in_process_s": round(sweep_s, 2),
                 "alone_in_process_s": round(alone_s, 2)})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--only", choices=("bar", "rph", "methods"), default=None)
  parser.add_argument("--bar", default="packnet,dst_cl", help="the presets of the bar")
  parser.add_argument("--repeats", type=int, default=1, help="alternating rounds of the bar")
  a = parser.parse_args()
  root = pathlib.Path(a.workdir)
  root.mkdir(parents=True, exist_ok=True)
  print(json.dumps({"device": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()}), flush=True)
  rows = []
  if a.only in (None, "bar"):
    rows += bar(root, [n for n in a.bar.split(",") if n], max(1, a.repeats))
  if a.only in (None, "rph"):
    rows += runs_per_hour(root)
  if a.only in (None, "methods"):
    rows += methods(root)
  (root / "sweep_speed.json").write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
