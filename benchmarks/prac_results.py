"""PrAC lottery tickets against its baselines on Fashion-MNIST (issue 13, item 11).

Produces the table of ``docs/results.md`` ("PrAC lottery tickets")::

  python benchmarks/prac_results.py --workdir=/tmp/prac_table --seeds=0,1
  python benchmarks/prac_results.py --workdir=/tmp/prac_table --seeds=0,1 --table-only

Every run is ``experiment.run`` with ``configs/prac.py:fashion_mnist`` (LeNet-300-100 on all 54k
training images, 6k held out for validation, 6 rounds of 20%) and one ``prac.mode``. Per seed the
``prac`` run goes first: ``random_subset`` (sets of its sizes, its epochs), ``snip`` / ``grasp`` /
``synflow`` (its sets and epochs: the same budget) and ``random_reinit`` (its masks) read its
``results.json`` through ``prac.subset_from``. ``imp`` is vanilla IMP on the full data;
``random_prune`` trains nothing during its search. A finished run is reused, so the script can be
stopped and restarted.

Results: ``WORKDIR/<mode>_s<seed>/results.json``, ``WORKDIR/summary.json`` and the markdown table
printed at the end (also written to ``WORKDIR/table.md``). "Saved" compares a mode's cumulative
search steps with the ``imp`` run of the same seed at the same density (measured, not analytic).

Matched tickets, two rules: the paper's (Fig. 3: a ticket matches vanilla IMP when its mean test
accuracy is within one standard deviation, over seeds, of IMP's at that density; a ticket above
IMP's mean matches too) and the half-point rule (mean within 0.5 points below IMP's). For each
mode, the highest sparsity at which it matches and the search steps it saved to get there. The
paired table gives, per density, each mode's per-seed difference to PrAC (same seed: same split,
initialisation and data order) as mean ± sd.
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
ORDER = ("prac", "imp", "random_subset", "snip", "grasp", "synflow", "random_prune",
         "random_reinit")
USES_PRAC = ("random_subset", "snip", "grasp", "synflow", "random_reinit")
LABELS = {"prac": "PrAC", "imp": "vanilla IMP", "random_subset": "random subset",
          "snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow", "random_prune": "random pruning",
          "random_reinit": "random re-init"}


def load_config(arg: str):
  path = os.path.join(_REPO, "configs", "prac.py")
  spec = importlib.util.spec_from_file_location("config_prac", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run_one(root: str, mode: str, seed: int, preset: str, rounds: int = 0,
            min_full_lr_epochs: int = -1) -> dict:
  workdir = os.path.join(root, f"{mode}_s{seed}")
  done = os.path.join(workdir, "results.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  c = load_config(preset)
  c.progress = False
  c.seed = seed
  c.prac.mode = mode
  if rounds:
    c.prac.rounds = rounds
  if min_full_lr_epochs >= 0:
    c.prac.min_full_lr_epochs = min_full_lr_epochs
  if mode in USES_PRAC:
    c.prac.subset_from = os.path.join(root, f"prac_s{seed}")
  t0 = time.time()
  r = experiment.run(c, workdir, print_summary=False)
  r["wall_seconds"] = time.time() - t0
  with open(os.path.join(workdir, "wall.json"), "w") as f:
    json.dump({"wall_seconds": r["wall_seconds"]}, f)
  print(f"{mode} seed {seed}: {r['wall_seconds']:.0f} s, steps_total {r['steps_total']}, "
        f"tickets {[x['test_accuracy'] for x in r['rounds']]}", flush=True)
  return r


def run_dense(root: str, seed: int, preset: str) -> float:
  """Test accuracy of the dense network: ``configs/finetune.py`` on the same 1-task stream,
  model and schedule (last epoch), the reference line of the table."""
  workdir = os.path.join(root, f"dense_s{seed}")
  done = os.path.join(workdir, "results.json")
  if not os.path.exists(done):
    p = load_config(preset)
    path = os.path.join(_REPO, "configs", "finetune.py")
    spec = importlib.util.spec_from_file_location("config_finetune", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for k in ("dataset", "num_tasks", "model", "hidden", "epochs", "batch_size", "optimizer",
              "learning_rate", "momentum", "weight_decay", "lr_milestones", "val_fraction"):
      c[k] = p[k]
    c.seed, c.progress = seed, False
    experiment.run(c, workdir, print_summary=False)
  with open(done) as f:
    return json.load(f)["acc"]


def wall(root, mode, seed):
  path = os.path.join(root, f"{mode}_s{seed}", "wall.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["wall_seconds"]


def _ms(values, scale=100.0, digits=2):
  return _stats.mean_sd([None if x is None else scale * x for x in values], digits)


def matched(res, seeds, mode: str, rounds: int, rule: str):
  """``(round, saved)``: the highest-sparsity round at which ``mode``'s tickets match vanilla IMP's
  under ``rule`` ('sd': within one sd over seeds; 'half': within 0.5 points), and the mean over
  seeds of the search steps saved against IMP to reach it; ``(None, None)`` if none matches."""
  best = None
  for r in range(rounds):
    a = np.asarray([res[(mode, s)]["rounds"][r]["test_accuracy"] for s in seeds]) * 100
    b = np.asarray([res[("imp", s)]["rounds"][r]["test_accuracy"] for s in seeds]) * 100
    tol = b.std(ddof=1) if rule == "sd" else 0.5
    if a.mean() >= b.mean() - tol:
      best = r
  if best is None:
    return None, None
  saved = np.mean([1 - res[(mode, s)]["rounds"][best]["steps_cumulative"]
                   / res[("imp", s)]["rounds"][best]["steps_cumulative"] for s in seeds])
  return best, saved


def paired_lines(res, seeds, present, rounds) -> list:
  """Per density: each mode's per-seed difference to PrAC (mode minus PrAC), mean ± sd."""
  others = [m for m in present if m != "prac"]
  lines = ["Paired by seed: each mode minus PrAC at each density (points; mean ± sd of the "
           "per-seed differences; positive = the mode is above PrAC):\n"]
  head = ["density"] + [LABELS[m] for m in others]
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "---|" * len(head))
  for r in range(rounds):
    row = [f"{100 * res[('prac', seeds[0])]['rounds'][r]['density']:.1f}%"]
    for m in others:
      d = [res[(m, s)]["rounds"][r]["test_accuracy"] - res[("prac", s)]["rounds"][r]
           ["test_accuracy"] for s in seeds]
      row.append(_ms(d, digits=2) + " (" + ", ".join(f"{100 * x:+.2f}" for x in d) + ")")
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  return lines


def matched_lines(res, seeds, present, rounds) -> list:
  """The paper's one-sd rule and the half-point rule, per mode."""
  lines = ["Highest sparsity at which a mode's tickets match vanilla IMP's, and the search steps "
           "saved to reach it (paper: within one sd of IMP; half-point: within 0.5 points):\n",
           "| mode | 1-sd rule: density | saved | half-point rule: density | saved |",
           "|---|---|---|---|---|"]
  for m in present:
    if m == "imp":
      continue
    row = [LABELS[m]]
    for rule in ("sd", "half"):
      r, saved = matched(res, seeds, m, rounds, rule)
      row += (["none", "-"] if r is None else
              [f"{100 * res[(m, seeds[0])]['rounds'][r]['density']:.1f}%",
               f"{100 * saved:.1f}%"])
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  return lines


def table(root: str, seeds, modes) -> str:
  res = {}
  for m in modes:
    for s in seeds:
      path = os.path.join(root, f"{m}_s{s}", "results.json")
      if os.path.exists(path):
        with open(path) as f:
          res[(m, s)] = json.load(f)
  present = [m for m in modes if all((m, s) in res for s in seeds)]
  if "prac" not in present:
    return "no finished prac runs"
  rounds = len(res[("prac", seeds[0])]["rounds"])
  lines = []
  dense = [os.path.join(root, f"dense_s{s}", "results.json") for s in seeds]
  if all(os.path.exists(d) for d in dense):
    accs = []
    for d in dense:
      with open(d) as f:
        accs.append(json.load(f)["acc"])
    lines.append(f"Dense LeNet-300-100, same schedule (last epoch): {_ms(accs)}%.\n")
  head = ["density"] + [LABELS[m] for m in present]
  lines.append("Test accuracy (%) of each round's ticket retrained on the full training set "
               f"(mean ± sd over seeds {','.join(map(str, seeds))}; best-validation epoch):\n")
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "---|" * len(head))
  for r in range(rounds):
    dens = res[("prac", seeds[0])]["rounds"][r]["density"]
    row = [f"{100 * dens:.1f}%"]
    for m in present:
      row.append(_ms([res[(m, s)]["rounds"][r]["test_accuracy"] for s in seeds]))
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  lines += paired_lines(res, seeds, present, rounds)
  if "imp" in present and len(seeds) > 1:
    lines += matched_lines(res, seeds, present, rounds)
  lines.append("Search cost per round (mean over seeds): the PrAC run's training-set size, "
               "epochs run and optimiser steps, vanilla IMP's steps, cumulative steps and the "
               "iterations PrAC saved against IMP to reach that density:\n")
  head = ["round", "density", "PrAC set", "PrAC set %", "next set: CET / CEP", "PrAC epochs",
          "PrAC steps", "IMP steps", "PrAC cum.", "IMP cum.", "saved"]
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "---|" * len(head))
  have_imp = "imp" in present
  for r in range(rounds):
    pr = [res[("prac", s)]["rounds"][r] for s in seeds]
    row = [str(r), f"{100 * pr[0]['density']:.1f}%",
           f"{np.mean([x['subset_size'] for x in pr]):.0f}",
           f"{100 * np.mean([x['subset_fraction'] for x in pr]):.1f}%",
           f"{np.mean([x['critical_training'] for x in pr]):.0f} / "
           f"{np.mean([x['critical_pruning'] for x in pr]):.0f}",
           f"{np.mean([x['epochs'] for x in pr]):.1f} of "
           f"{np.mean([x['planned_epochs'] for x in pr]):.1f}",
           f"{np.mean([x['steps'] for x in pr]):.0f}"]
    if have_imp:
      im = [res[("imp", s)]["rounds"][r] for s in seeds]
      pc = np.mean([x["steps_cumulative"] for x in pr])
      ic = np.mean([x["steps_cumulative"] for x in im])
      saved = np.mean([1 - a["steps_cumulative"] / b["steps_cumulative"] for a, b in zip(pr, im)])
      row += [f"{np.mean([x['steps'] for x in im]):.0f}", f"{pc:.0f}", f"{ic:.0f}",
              f"{100 * saved:.1f}%"]
    else:
      row += ["-"] * 4
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  lines.append("Totals per run (mean over seeds): search steps, ticket-retraining steps, wall "
               "time of the whole run (search + every ticket retrained) on the shared 2-core "
               "machine:\n")
  head = ["mode", "search steps", "saved vs IMP", "retraining steps", "wall (s)"]
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "---|" * len(head))
  for m in present:
    st = [res[(m, s)]["steps_total"] for s in seeds]
    saved = ([1 - res[(m, s)]["steps_total"] / res[("imp", s)]["steps_total"] for s in seeds]
             if have_imp else [])
    rt = [sum(x["ticket_steps"] for x in res[(m, s)]["rounds"]) for s in seeds]
    walls = [w for w in (wall(root, m, s) for s in seeds) if w is not None]
    lines.append(f"| {LABELS[m]} | {np.mean(st):.0f} | "
                 f"{(_ms(saved, digits=1) + '%') if saved else '-'} | {np.mean(rt):.0f} | "
                 f"{np.mean(walls):.0f} |" if walls else
                 f"| {LABELS[m]} | {np.mean(st):.0f} | - | {np.mean(rt):.0f} | - |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="/tmp/prac_table")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--modes", default=",".join(ORDER))
  p.add_argument("--preset", default="fashion_mnist")
  p.add_argument("--rounds", type=int, default=0, help="override prac.rounds (0: the preset's)")
  p.add_argument("--min-full-lr-epochs", type=int, default=-1,
                 help="override prac.min_full_lr_epochs (-1: the preset's; 0: as coded)")
  p.add_argument("--table-only", action="store_true")
  p.add_argument("--dense", action="store_true", help="also train the dense reference")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  modes = [m for m in args.modes.split(",") if m]
  for m in modes:
    if m not in ORDER:
      raise SystemExit(f"--modes: {m!r} is not one of {list(ORDER)}")
  os.makedirs(args.workdir, exist_ok=True)
  if not args.table_only:
    t0 = time.time()
    for s in seeds:
      for m in [m for m in ORDER if m in modes or (m == "prac" and set(modes) & set(USES_PRAC))]:
        run_one(args.workdir, m, s, args.preset, args.rounds, args.min_full_lr_epochs)
    if args.dense:
      for s in seeds:
        run_dense(args.workdir, s, args.preset)
    print(f"all runs: {time.time() - t0:.0f} s", flush=True)
  text = table(args.workdir, seeds, [m for m in ORDER if m in modes])
  with open(os.path.join(args.workdir, "table.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
