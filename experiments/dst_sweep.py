r"""DST for CL sweep: init x growth x sparsity x seeds, one table of mean +- std (paper Tables 1-4).

  python experiments/dst_sweep.py --workdir=/tmp/dst_sweep
  python experiments/dst_sweep.py --workdir=/tmp/dst_sweep --seeds=0,1,2 \
      --growths=random,unfired,gradient,momentum,adaptive --config.epochs=2
  python experiments/dst_sweep.py --config=configs/dst_cl.py:cifar100_10 --workdir=/tmp/c10 \
      --config.data_dir=/data/tfds

Every cell runs ``sparse_cl_jax.experiment.run`` on the base config (``--config``, default the
Split Fashion-MNIST preset) with ``config.dst.{init, growth, sparsity}`` and ``config.seed`` set,
in its own workdir ``WORKDIR/<init>_<growth>_s<sparsity>_seed<seed>``. Finished cells are read
back from their results.json and interrupted ones resume, so re-running the command continues a
sweep. Growth ``adaptive`` is the paper's Sec. 5.3 schedule: random growth for the first half of
the tasks, gradient growth after.

Writes ``WORKDIR/dst_table.md`` and ``WORKDIR/dst_table.json``: rows init + growth, columns
sparsity, each with ACC, BWT and FWT (the paper's subnetwork FWT, eq. 4) in percent as
mean +- sample std over seeds, plus the per-cell raw values, the command and the wall time.
"""

import json
import os
import platform
import sys
import time

from absl import flags
import jax
import numpy as np

from sparse_cl_jax import cli
from sparse_cl_jax import distributed
from sparse_cl_jax import experiment
from sparse_cl_jax import reliability

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "dst_cl.py") + ":fashion_mnist",
    "Base config (configs/dst_cl.py:<preset>).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root folder: one sub-folder per cell.")
_INITS = flags.DEFINE_list("inits", ["uniform", "erk"], "Sparse initialisations.")
_GROWTHS = flags.DEFINE_list("growths", ["random", "unfired", "gradient", "momentum"],
                             "Growth modes (and 'adaptive': random, then gradient).")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.8", "0.9", "0.95"], "Per-task sparsities.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds.")

METRICS = (("ACC", "acc"), ("BWT", "bwt"), ("FWT", "fwt"))


def cell_config(base, init, growth, sparsity, seed):
  c = base.copy_and_resolve_references()
  c.dst.init, c.dst.sparsity, c.seed = init, float(sparsity), int(seed)
  if growth == "adaptive":
    half = c.num_tasks // 2
    c.dst.growth = "random"
    c.dst.growth_per_task = ("random",) * half + ("gradient",) * (c.num_tasks - half)
  else:
    c.dst.growth, c.dst.growth_per_task = growth, ()
  c.progress = False
  return c


def run_cell(config, workdir):
  if os.path.exists(os.path.join(workdir, "results.json")):
    return experiment.load_results(workdir)
  try:
    return experiment.run(config, workdir, print_summary=False)
  except reliability.FaultError as e:  # one line naming the fault and what to do
    sys.exit(f"error: cell {workdir}: {e}")


def fmt(values):
  v = np.asarray(values, float) * 100.0
  std = v.std(ddof=1) if v.size > 1 else 0.0
  return f"{v.mean():.2f} ± {std:.2f}"


def table(cells, inits, growths, sparsities):
  head = ["init + growth"] + [f"{s} {name}" for s in sparsities for name, _ in METRICS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for init in inits:
    for g in growths:
      row = [f"{init} + {g}"]
      for s in sparsities:
        cell = cells[f"{init}_{g}_s{s}"]
        row += [fmt(cell[key]) for _, key in METRICS]
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  base, root = _CONFIG.value, _WORKDIR.value
  inits, growths, sparsities, seeds = _INITS.value, _GROWTHS.value, _SPARSITIES.value, _SEEDS.value
  os.makedirs(root, exist_ok=True)
  t0 = time.time()
  cells = {}
  for init in inits:
    for g in growths:
      for s in sparsities:
        cell = cells.setdefault(f"{init}_{g}_s{s}", {"acc": [], "bwt": [], "fwt": [],
                                                      "train_seconds": [], "seeds": []})
        for seed in seeds:
          r = run_cell(cell_config(base, init, g, s, seed),
                       os.path.join(root, f"{init}_{g}_s{s}_seed{seed}"))
          for key, value in (("acc", r["acc"]), ("bwt", r["bwt"]),
                             ("fwt", r["fwt"]["subnetwork"]),
                             ("train_seconds", r["train_seconds"]), ("seeds", int(seed))):
            cell[key].append(value)
          if distributed.is_primary():
            print(f"{init} + {g} s={s} seed={seed}: ACC {r['acc']:.4f} BWT {r['bwt']:.4f} "
                  f"FWT {r['fwt']['subnetwork']:.4f}", flush=True)
  wall = time.time() - t0
  if not distributed.is_primary():  # process 0 writes and prints a multi-process sweep's tables
    return
  md = table(cells, inits, growths, sparsities)
  device = f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores, {platform.machine()})"
  meta = {"command": " ".join(sys.argv), "wall_seconds": wall, "device": device,
          "dataset": base.dataset, "num_tasks": base.num_tasks, "model": base.model,
          "epochs": base.epochs, "seeds": seeds}
  with open(os.path.join(root, "dst_table.md"), "w") as f:
    f.write(md + "\n\nACC / BWT / FWT in %, mean ± sample std over seeds "
            f"{','.join(seeds)}. Command: `{meta['command']}`. Wall time {wall:.0f} s "
            f"on {device}.\n")
  with open(os.path.join(root, "dst_table.json"), "w") as f:
    json.dump({"meta": meta, "cells": cells}, f, indent=1)
  print(md)
  print(f"wall time {wall:.0f} s; tables in {root}/dst_table.md and .json")


if __name__ == "__main__":
  cli.run(main, required=("workdir",))
