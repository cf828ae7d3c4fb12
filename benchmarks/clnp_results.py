#!/usr/bin/env python
"""CLNP vs fine-tuning vs single-task training on 10-task permuted Fashion-MNIST (single head).

Three runs of the same architecture, optimiser, batch size, epochs and data:

1. ``clnp``: ``configs/clnp.py:<preset>`` through ``experiment.run`` (graceful forgetting, the
   paper's per-layer L1 and margin, single head with the other tasks' final units masked).
2. ``finetune``: the same network trained on every task in turn, nothing protected (no L1).
3. ``single-task``: for every task, a fresh network (the same initial weights) trained on that
   task alone with the library's trainer and evaluated on its test split; the reference of the
   paper's Table 1 ("single task SGD"). No L1, no pruning.

Writes ``<workdir>/summary.json``, the Markdown table (``--table``) and the neuron-usage figure
(``--png``: per hidden layer and task, the earlier units the task reuses and the units it newly
activates, and the fraction of the layer used after each task, as in Fig. 3 of the paper).

Run (real data: ``make fashion-mnist``)::

  .venv/bin/python benchmarks/clnp_results.py --workdir=/tmp/clnp_bench \
      --png=docs/clnp_neurons.png --table=/tmp/clnp_bench/table.md

Options shrink or grow the preset (``--hidden=2000,2000 --epochs=10 --max_train=0`` is the
paper's network on all 54k training images per task).

Long settings survive being stopped: ``summary.json`` is written after each of the three runs,
and running the same command again keeps what is finished (a finished ``clnp`` or ``finetune``
run in its folder, each single-task network in ``single_task.json``), resumes an unfinished
``clnp`` or ``finetune`` run from its newest checkpoint and runs the rest. ``--overwrite`` starts
every run that is not skipped again (a finished one is moved aside, not deleted). A folder that
holds results of another setting is refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import experiment
from sparse_cl_jax.checkpoint import jsonfiles

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None):
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(_REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def clnp_config(args):
  c = load_config("clnp", args.preset)
  if args.hidden:
    c.hidden = tuple(int(x) for x in args.hidden.split(","))
  if args.epochs:
    c.epochs = args.epochs
  if args.max_train is not None:
    c.max_train_per_task = args.max_train
  if args.tasks:
    c.num_tasks = args.tasks
  if args.margin is not None:
    c.clnp.margin = args.margin
  if args.grid_l1_scale:
    c.clnp.grid_l1_scale = tuple(float(x) for x in args.grid_l1_scale.split(","))
  c.seed = args.seed
  c.progress = False
  return c


def baseline_config(c):
  """Fine-tuning with everything the CLNP config fixes about data, network and optimiser."""
  b = config_lib.base("finetune")
  for field in ("dataset", "data_dir", "scenario", "num_tasks", "incremental", "class_order",
                "val_fraction", "max_train_per_task", "max_eval_per_task", "model", "hidden",
                "norm", "width_multiplier", "multi_head", "epochs", "batch_size",
                "eval_batch_size", "optimizer", "learning_rate", "momentum", "nesterov",
                "weight_decay", "lr_milestones", "lr_decay", "seed", "num_devices", "progress"):
    b[field] = c[field]
  return b


def single_task(config, path: str | None = None) -> dict:
  """Each task trained alone from the same initial weights; test and val accuracy per task.

  With ``path``, every finished task is saved there (JSON) and a later call with the same config
  starts after the tasks already saved.
  """
  trainer = experiment.build(config)
  T = trainer.stream.num_tasks
  done = {"config": config_lib.to_dict(config), "test": [], "val": [], "train_seconds": 0.0}
  if path and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    _check_same_setting(saved["config"], done["config"], path)
    done = saved
    if done["test"]:
      print(f"single-task: {len(done['test'])} of {T} tasks kept from {path}", flush=True)
  for t in range(len(done["test"]), T):
    t0 = time.perf_counter()
    trainer.begin_task(t)
    state = trainer.init_state()
    state = trainer.train(state, t, epochs=int(config.epochs), phase="single-task")
    done["test"].append(trainer.accuracy(state, t, split="test", current=t))
    done["val"].append(trainer.accuracy(state, t, split="val", current=t))
    done["train_seconds"] += time.perf_counter() - t0
    print(f"single-task {t + 1}/{T}: test {done['test'][-1]:.4f}", flush=True)
    if path:
      _write_json(path, done)
  return {"test": done["test"], "val": done["val"], "acc": float(np.mean(done["test"])),
          "train_seconds": done["train_seconds"]}


def _write_json(path: str, obj) -> None:
  jsonfiles.write_json_atomic(pathlib.Path(path), obj)


def _check_same_setting(saved: dict, wanted: dict, where: str) -> None:
  differ = sorted(k for k in set(saved) | set(wanted)
                  if k not in experiment._NOT_FINGERPRINTED  # the fields a run checkpoint ignores
                  and saved.get(k) != wanted.get(k))
  if differ:
    raise SystemExit(f"clnp_results: {where} holds results of another setting (fields "
                     f"{', '.join(differ)} differ); pass another --workdir, or --overwrite to "
                     "run again")


def run_or_keep(config, workdir: str, overwrite: bool) -> dict:
  """The results of ``config`` in ``workdir``: kept if finished there, else run (or resumed)."""
  finished = os.path.join(workdir, "results.json")
  if os.path.exists(finished) and not overwrite:
    with open(finished) as f:
      r = json.load(f)
    _check_same_setting(r["config"], config_lib.to_dict(config), workdir)
    print(f"kept the finished run in {workdir}", flush=True)
    return r
  return experiment.run(config, workdir, overwrite=overwrite)


def plot(neurons: dict, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  layers = list(neurons)
  fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 3.8), squeeze=False)
  for ax, name in zip(axes[0], layers):
    d = neurons[name]
    u = d["units"]
    T = len(d["new_per_task"])
    x = np.arange(1, T + 1)
    reused = np.asarray(d["reused_per_task"]) / u * 100
    new = np.asarray(d["new_per_task"]) / u * 100
    ax.bar(x, reused, color="#8da0cb", label="reused (earlier units active on the task)")
    ax.bar(x, new, bottom=reused, color="#fc8d62", label="newly activated")
    ax.plot(x, np.asarray(d["used_fraction_after_task"]) * 100, "k.-",
            label="layer used after the task")
    ax.set_title(f"{name} ({u} units)")
    ax.set_xlabel("task")
    ax.set_xticks(x)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of the layer's units")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def clnp_label(summary: dict) -> str:
  cc = summary["config"]["clnp"]
  scales = "/".join(f"{x:g}" for x in cc["grid_l1_scale"])
  return f"CLNP, m = {cc['margin'] * 100:g}%, L1 x{scales}"


def table(summary: dict, others=()) -> str:
  """Markdown tables: methods, per-task final accuracy, neuron usage of every CLNP variant."""
  variants = [(clnp_label(x), x["clnp"]) for x in (summary, *others) if "clnp" in x]
  f = summary["finetune"]
  s = summary["single_task"]
  T = len(s["test"])

  def used(c):
    return " / ".join(f"{d['used_fraction_after_task'][-1] * 100:.0f}"
                      for d in c["neurons"].values())

  rows = [
      ("| method | ACC % (test, after the last task) | BWT % | max drop of an earlier task % "
       "| hidden units used after the last task % | train time (s) |"),
      "|---|---|---|---|---|---|",
      (f"| single-task training ({T} separate networks) | {s['acc'] * 100:.2f} | n/a | n/a | "
       f"n/a | {s['train_seconds']:.0f} |"),
  ]
  for label, c in variants:
    rows.append(f"| {label} | {c['acc'] * 100:.2f} | {c['bwt'] * 100:+.2f} | "
                f"{c['max_drop'] * 100:.2f} | {used(c)} | {c['train_seconds']:.0f} |")
  rows.append(f"| fine-tuning | {f['acc'] * 100:.2f} | {f['bwt'] * 100:+.2f} | "
              f"{f['max_drop'] * 100:.2f} | 100 / 100 | {f['train_seconds']:.0f} |")
  per_task = ["", "| test accuracy % of task | " + " | ".join(str(j + 1) for j in range(T)) + " |",
              "|---|" + "---|" * T, "| single-task | " + " | ".join(
                  f"{a * 100:.2f}" for a in s["test"]) + " |"]
  for label, c in variants:
    per_task.append(f"| {label}: after the last task | " + " | ".join(
        f"{a * 100:.2f}" for a in c["final_row"]) + " |")
    per_task.append(f"| {label}: just after training the task | " + " | ".join(
        f"{a * 100:.2f}" for a in c["diagonal"]) + " |")
  per_task.append("| fine-tuning: after the last task | " + " | ".join(
      f"{a * 100:.2f}" for a in f["final_row"]) + " |")
  neuron_rows = []
  for i, (label, c) in enumerate(variants):  # reuse counts for the main run only
    neuron_rows += ["", f"| {label}: layer | " + " | ".join(
        f"task {j + 1}" for j in range(T)) + " |", "|---|" + "---|" * T]
    for name, d in c["neurons"].items():
      neuron_rows.append(f"| {name}: % used after the task | " + " | ".join(
          f"{x * 100:.1f}" for x in d["used_fraction_after_task"]) + " |")
      if i == 0:
        neuron_rows.append(f"| {name}: units new / reused | " + " | ".join(
            f"{n} / {r}" for n, r in zip(d["new_per_task"], d["reused_per_task"])) + " |")
      else:
        neuron_rows.append(f"| {name}: units new | " + " | ".join(
            str(n) for n in d["new_per_task"]) + " |")
  return "\n".join(rows + per_task + neuron_rows) + "\n"


def summarise(r: dict) -> dict:
  R = np.asarray(r["accuracy_matrix"], float)
  T = R.shape[0]
  drops = [R[j, j] - R[i, j] for j in range(T) for i in range(j + 1, T)]
  return {"acc": r["acc"], "bwt": r["bwt"], "final_row": R[-1].tolist(),
          "diagonal": np.diag(R).tolist(), "max_drop": float(max(drops) if drops else 0.0),
          "bit_identical": bool(all(R[i, j] == R[j, j] for j in range(T)
                                    for i in range(j + 1, T))),
          "train_seconds": r["train_seconds"], "accuracy_matrix": R.tolist()}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/clnp_bench")
  p.add_argument("--preset", default="permuted_fashion_mnist_small")
  p.add_argument("--hidden", default="", help="e.g. 2000,2000 (default: the preset's)")
  p.add_argument("--epochs", type=int, default=0)
  p.add_argument("--max_train", type=int, default=None, help="images per task (0 = all)")
  p.add_argument("--tasks", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--margin", type=float, default=None, help="CLNP margin m (default: preset's)")
  p.add_argument("--grid_l1_scale", default="", help="e.g. 10,30 (default: the preset's)")
  p.add_argument("--png", default=os.path.join(_REPO, "docs", "clnp_neurons.png"))
  p.add_argument("--table", default="")
  p.add_argument("--skip", default="", help="comma list of runs to skip: clnp,finetune,single "
                 "(skip all three to redraw the table and figure from summary.json)")
  p.add_argument("--overwrite", action="store_true", help="run again what is finished in "
                 "--workdir (finished runs are moved aside, not deleted)")
  p.add_argument("--compare", default="", help="comma list of other workdirs whose CLNP run is "
                 "added to the table (e.g. another margin)")
  args = p.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  os.makedirs(args.workdir, exist_ok=True)
  summary_path = os.path.join(args.workdir, "summary.json")
  summary = {}
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  c = clnp_config(args)
  b = baseline_config(c)
  t_all = time.perf_counter()
  runs = {"clnp", "finetune", "single"} - skip
  if runs and "config" in summary and not args.overwrite:
    _check_same_setting(summary["config"], config_lib.to_dict(c), summary_path)
  if runs:
    summary["command"] = "python benchmarks/clnp_results.py " + " ".join(
        f"--{k}={v}" for k, v in vars(args).items() if v not in ("", None, 0))
    summary["device"] = (f"{jax.devices()[0].platform}: "
                         f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores visible")
    summary["config"] = config_lib.to_dict(c)

  if "clnp" not in skip and (args.overwrite or "clnp" not in summary):
    t0 = time.perf_counter()
    r = run_or_keep(c, os.path.join(args.workdir, "clnp"), args.overwrite)
    summary["clnp"] = summarise(r)
    summary["clnp"]["wall_seconds"] = time.perf_counter() - t0
    summary["clnp"]["neurons"] = r["neurons_per_layer"]
    summary["clnp"]["selection"] = r["clnp"]["selection"]
    summary["clnp"]["density_per_task"] = r["density_per_task"]
    _write_json(summary_path, summary)
  if "finetune" not in skip and (args.overwrite or "finetune" not in summary):
    t0 = time.perf_counter()
    r = run_or_keep(b, os.path.join(args.workdir, "finetune"), args.overwrite)
    summary["finetune"] = summarise(r)
    summary["finetune"]["wall_seconds"] = time.perf_counter() - t0
    _write_json(summary_path, summary)
  if "single" not in skip and (args.overwrite or "single_task" not in summary):
    t0 = time.perf_counter()
    progress = os.path.join(args.workdir, "single_task.json")
    if args.overwrite and os.path.exists(progress):
      os.replace(progress, progress + ".old")
    summary["single_task"] = single_task(b, progress)
    summary["single_task"]["wall_seconds"] = time.perf_counter() - t0
    _write_json(summary_path, summary)
  if runs:
    summary[f"wall_seconds_{'_'.join(sorted(runs))}"] = time.perf_counter() - t_all
    _write_json(summary_path, summary)
  others = []
  for d in filter(None, args.compare.split(",")):
    with open(os.path.join(d, "summary.json")) as f:
      others.append(json.load(f))
  if all(k in summary for k in ("clnp", "finetune", "single_task")):
    md = table(summary, others)
    print(md)
    if args.table:
      with open(args.table, "w") as f:
        f.write(md)
  if "clnp" in summary and args.png:
    T = len(summary["clnp"]["diagonal"])
    plot(summary["clnp"]["neurons"], args.png,
         f"CLNP neuron usage, {T}-task permuted Fashion-MNIST, single-head MLP "
         f"{'x'.join(str(h) for h in c.hidden)}")
  print(f"summary: {summary_path}")


if __name__ == "__main__":
  main()
