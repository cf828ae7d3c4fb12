"""CPG, PAE, PackNet, fine-tuning and individual models on 5-task Split Fashion-MNIST (issue 4).

Produces the table of ``docs/results.md``::

  python benchmarks/cpg_results.py --workdir=/tmp/cpg_results
  python benchmarks/cpg_results.py --workdir=/tmp/cpg_results --methods=cpg,pae  # reuses the rest

Every method runs through ``experiment.run`` with its ``configs/<method>.py`` and the same data,
model and schedule overrides (:func:`common`): 5 tasks of 2 classes (natural order), task-IL,
``small_convnet``, ``max_train_per_task`` training examples per task (the validation split is
held out from the full training set, the test split is the full test set), SGD momentum 0.9,
batch 128, lr 0.02 decayed x0.1 at 50% and 80% of each phase, seed 0. The individual models run
first: their validation accuracies are the accuracy goals of CPG and PAE
(``cpg.goal='fixed'``, ``cpg.goal_values``), exactly the as-coded "baseline accuracy" goal,
without training the individual models a second time inside CPG.

Results: ``WORKDIR/<method>/results.json`` per method, ``WORKDIR/summary.json`` and the markdown
table printed at the end (and written to ``WORKDIR/table.md``).

Over seeds (one workdir per seed, each run as above with ``--seed``)::

  python benchmarks/cpg_results.py --seeds_of=/tmp/cpg_s0,/tmp/cpg_s1,/tmp/cpg_s2

prints each method's mean ± sd and the paired comparisons behind the claims (CPG against PAE,
PackNet and the individual models; PAE against PackNet), without running anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import jax
import numpy as np
from absl import logging

import _stats
from sparse_cl_jax import config as config_lib
from sparse_cl_jax import experiment

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("individual", "finetune", "packnet", "pae", "cpg", "piggyback")
LABELS = {"individual": "Individual models", "finetune": "Fine-tuning", "packnet": "PackNet",
          "pae": "PAE", "cpg": "CPG", "piggyback": "Piggyback"}
MIB = 2.0 ** 20


def load_config(name: str, arg: str | None):
  path = os.path.join(_REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def common(c, args):
  """The data, model and schedule every method shares."""
  config_lib.short_split_fashion_mnist(c)
  c.num_tasks = 5
  c.class_order = "natural"
  c.incremental = "task"
  c.max_train_per_task = args.max_train_per_task
  c.epochs = args.epochs
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.seed = args.seed
  c.progress = False
  c.checkpoint_every_epochs = 0
  return c


def make_config(name: str, args, goals=None):
  if name == "finetune":
    c = common(load_config("finetune", None), args)
  elif name == "packnet":
    c = common(load_config("packnet", "fashion_mnist"), args)
    c.packnet.retrain_epochs = args.retrain_epochs
    c.packnet.retrain_lr = 0.002
  elif name in ("cpg", "pae"):
    c = common(load_config(name, "fashion_mnist"), args)
    c.cpg.goal = "fixed"
    c.cpg.goal_values = tuple(float(g) for g in goals)
    c.cpg.goal_tolerance = args.goal_tolerance
  else:
    c = common(load_config(name, "fashion_mnist"), args)
  return c


def run_one(name: str, args, goals=None) -> dict:
  workdir = os.path.join(args.workdir, name)
  c = make_config(name, args, goals)
  print(f"\n=== {name}: {workdir}", flush=True)
  t0 = time.perf_counter()
  r = experiment.run(c, workdir, overwrite=True)
  r["wall_seconds"] = time.perf_counter() - t0
  with open(os.path.join(workdir, "wall.json"), "w") as f:
    json.dump({"wall_seconds": r["wall_seconds"]}, f)
  return r


def load_done(name: str, args) -> dict | None:
  workdir = os.path.join(args.workdir, name)
  if not os.path.exists(os.path.join(workdir, "results.json")):
    return None
  r = experiment.load_results(workdir)
  wall = os.path.join(workdir, "wall.json")
  if os.path.exists(wall):
    with open(wall) as f:
      r.update(json.load(f))
  return r


def row(name: str, r: dict) -> dict:
  R = np.asarray(r["accuracy_matrix"], dtype=float)
  T = R.shape[0]
  if name in ("cpg", "pae"):
    exp, red = r["expansion"], r["redundant"]
  elif name == "individual":
    exp, red = float(T), 0.0
  elif name == "packnet":
    exp, red = 1.0, r.get("capacity_total", {}).get("free", float("nan"))
  else:
    exp, red = 1.0, 0.0
  return {"method": LABELS[name], "final": R[-1].tolist(), "acc": r["acc"], "bwt": r["bwt"],
          "bwt_exactly_zero": bool(all(R[i, j] == R[j, j] for i in range(T) for j in range(i))),
          "expansion": exp, "redundant": red, "stored_mib": r["model_bytes"]["total"] / MIB,
          "train_seconds": r["train_seconds"], "wall_seconds": r.get("wall_seconds", float("nan")),
          "levels": r.get("param_multiplier_per_task"),
          "sparsity": r.get("chosen_sparsity_per_task"),
          "picked": r.get("picked_fraction_per_task")}


def table(rows: list[dict]) -> str:
  T = len(rows[0]["final"])
  head = ("| Method | " + " | ".join(f"Task {j + 1}" for j in range(T))
          + " | Avg. | BWT | Exp. (x) | Red. (x) | Stored MB | Train s |")
  sep = "|" + "---|" * (T + 7)
  lines = [head, sep]
  for x in rows:
    accs = " | ".join(f"{100 * a:.2f}" for a in x["final"])
    bwt = "0 (exact)" if x["bwt_exactly_zero"] else f"{100 * x['bwt']:+.2f}"
    lines.append(f"| {x['method']} | {accs} | {100 * x['acc']:.2f} | {bwt} | "
                 f"{x['expansion']:.2f} | {x['redundant']:.2f} | {x['stored_mib']:.3f} | "
                 f"{x['train_seconds']:.0f} |")
  return "\n".join(lines)


CLAIMS = (("CPG", "PAE"), ("CPG", "PackNet"), ("CPG", "Individual models"), ("PAE", "PackNet"))


def seeds_table(workdirs) -> str:
  """Mean ± sd per method over the seeds' ``summary.json``, then paired differences of ACC."""
  rows = {}
  seeds = []
  for d in workdirs:
    path = os.path.join(d, "summary.json")
    if not os.path.exists(path):
      raise SystemExit(f"no summary.json in {d}: run `cpg_results.py --workdir={d} --seed=S` "
                       "first")
    with open(path) as f:
      summary = json.load(f)
    seeds.append(summary["args"]["seed"])
    for r in summary["rows"]:
      rows.setdefault(r["method"], []).append(r)
  if len(set(seeds)) != len(seeds):
    raise SystemExit(f"the workdirs repeat a seed ({seeds}); give one workdir per seed")
  full = {m: v for m, v in rows.items() if len(v) == len(workdirs)}
  out = [f"Seeds {seeds}; mean ± sd over seeds (ACC and BWT in points).\n",
         "| Method | ACC | BWT | BWT exactly 0 | Exp. (x) | Red. (x) | Stored MB |",
         "|---|---|---|---|---|---|---|"]
  for m, v in full.items():
    out.append(f"| {m} | {_stats.mean_sd([100 * r['acc'] for r in v])} | "
               f"{_stats.mean_sd([100 * r['bwt'] for r in v])} | "
               f"{sum(r['bwt_exactly_zero'] for r in v)} of {len(v)} | "
               f"{_stats.mean_sd([r['expansion'] for r in v])} | "
               f"{_stats.mean_sd([r['redundant'] for r in v])} | "
               f"{_stats.mean_sd([r['stored_mib'] for r in v], 3)} |")
  out += ["", "Paired by seed, ACC (points): first minus second, mean ± sd, 95% t interval.\n",
          "| Comparison | per seed | mean ± sd | 95% interval | verdict (first >= second) |",
          "|---|---|---|---|---|"]
  for a, b in CLAIMS:
    if a in full and b in full:
      p = _stats.paired([100 * r["acc"] for r in full[a]], [100 * r["acc"] for r in full[b]])
      out.append(f"| {a} - {b} | {_stats.paired_cells(p)} | {_stats.verdict(p)} |")
  if "CPG" in full and "PAE" in full:
    out += ["", "Paired by seed, weights allocated at the end (Exp., x the 1x network): CPG minus "
            "PAE (the paper: CPG needs fewer).\n", "| per seed | mean ± sd | 95% interval | "
            "verdict (CPG < PAE) |", "|---|---|---|---|"]
    p = _stats.paired([r["expansion"] for r in full["CPG"]], [r["expansion"] for r in full["PAE"]])
    out.append(f"| {_stats.paired_cells(p)} | {_stats.verdict(p, claim_sign=-1)} |")
  return "\n".join(out)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="", help="where the runs go (required unless --seeds_of)")
  p.add_argument("--methods", default=",".join(METHODS[:5]),
                 help=f"comma-separated subset of {METHODS}; finished ones are reused")
  p.add_argument("--rerun", action="store_true", help="run even methods with results.json")
  p.add_argument("--max_train_per_task", type=int, default=1000)
  p.add_argument("--epochs", type=int, default=4)
  p.add_argument("--retrain_epochs", type=int, default=2, help="PackNet's retraining epochs")
  p.add_argument("--goal_tolerance", type=float, default=0.005)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--seeds_of", default="", help="comma-separated workdirs of finished runs, one "
                 "per seed: print the table over seeds and the paired comparisons, run nothing")
  args = p.parse_args()
  if args.seeds_of:
    print(seeds_table([d for d in args.seeds_of.split(",") if d]))
    return
  if not args.workdir:
    raise SystemExit("give --workdir=DIR (where the runs go) or --seeds_of=DIR,DIR,...")
  logging.set_verbosity(logging.INFO)  # CPG / PAE log growth, stage accuracies and choices
  wanted = [m for m in args.methods.split(",") if m]
  for m in wanted:
    if m not in METHODS:
      raise SystemExit(f"unknown method {m!r}; choose from {METHODS}")
  print(f"devices: {jax.devices()}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  "
        f"cpu count: {os.cpu_count()}", flush=True)
  results = {}
  order = [m for m in METHODS if m in wanted or (m == "individual" and {"cpg", "pae"} & set(wanted))]
  for name in order:
    done = None if args.rerun else load_done(name, args)
    if done is not None:
      print(f"=== {name}: reusing {os.path.join(args.workdir, name)}")
      results[name] = done
      continue
    goals = None
    if name in ("cpg", "pae"):
      ind = results["individual"]
      goals = np.diag(np.asarray(ind["val_accuracy_matrix"], dtype=float)).tolist()
      print(f"accuracy goals (individual models, validation): {np.round(goals, 4).tolist()}")
    results[name] = run_one(name, args, goals)
  rows = [row(m, results[m]) for m in METHODS if m in results]
  md = table(rows)
  summary = {"args": vars(args), "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "devices": [str(d) for d in jax.devices()], "rows": rows}
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(args.workdir, "table.md"), "w") as f:
    f.write(md + "\n")
  print("\n" + md)
  for x in rows:
    if x["levels"] is not None:
      print(f"{x['method']}: parameter multiplier per task {x['levels']}, chosen sparsity "
            f"{np.round(x['sparsity'], 2).tolist()}, picked fraction of old weights "
            f"{np.round(x['picked'], 3).tolist()}")


if __name__ == "__main__":
  main()
