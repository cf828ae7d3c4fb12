r"""Where each second of a whole library run goes (issue 27).

  .venv/bin/python benchmarks/run_breakdown.py                        # convnet, warm cache
  .venv/bin/python benchmarks/run_breakdown.py --cache_dir=none       # every program compiled
  .venv/bin/python benchmarks/run_breakdown.py --dataset=digits --net=mlp256 --json=/tmp/b.json

Runs the library side of ``benchmarks/peer_pytorch.py``'s whole run (its ``make_config``:
PackNet, 5-task Split Fashion-MNIST, batch 128, SGD momentum, ``--epochs`` training +
``--retrain`` retraining epochs per task, checkpoints, TensorBoard, metrics.csv and plots as
``experiment.run`` writes them) in this process, with wall-clock timers on its parts, and prints:

* the parts, each as exclusive time (a part's own time without the parts it calls): start-up
  (interpreter and imports), building the stream, model and trainer, each training epoch, the
  method's own work between epochs (pruning, freezing), evaluation (every task's test and
  validation accuracy after each task, and the random-init baseline), checkpoints, TensorBoard,
  metrics.csv, plots, results.json and the rest of ``experiment.run``;
* of each part, the seconds JAX spent tracing, lowering and compiling (``jax.monitoring``'s
  compilation events, attributed to the part that was running);
* every epoch: task, phase, seconds, of which compilation.

Without ``--cache_dir`` the run uses the persistent compilation cache where a run normally keeps
it (run it twice: the first run fills it); ``--cache_dir=none`` compiles everything.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import threading
import time


def _process_age() -> float:
  """Seconds since this process started (Linux ``/proc``; 0 elsewhere)."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return 0.0


_AGE_AT_START = _process_age()
_T0 = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_pytorch  # noqa: E402  (its flags and make_config; imports the library's runtime)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

from sparse_cl_jax import experiment  # noqa: E402
from sparse_cl_jax import logs  # noqa: E402
from sparse_cl_jax import runtime  # noqa: E402
from sparse_cl_jax.checkpoint import checkpointer  # noqa: E402
from sparse_cl_jax.train import loops  # noqa: E402
from sparse_cl_jax.train import trainer as trainer_lib  # noqa: E402

_IMPORTS_DONE = time.perf_counter()
_JSON = flags.DEFINE_string("json", "", "Also write the breakdown here.")
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class Timers:
  """Exclusive wall time per part (nested parts are subtracted), and compilation per part."""

  def __init__(self):
    self.own = collections.Counter()
    self.calls = collections.Counter()
    self.compile = collections.Counter()
    self.epochs: list[dict] = []
    self._stack = threading.local()

  def _frames(self) -> list:
    if not hasattr(self._stack, "frames"):
      self._stack.frames = []
    return self._stack.frames

  def current(self) -> str:
    frames = self._frames()
    return frames[-1][0] if frames else "rest of experiment.run"

  @contextlib.contextmanager
  def part(self, name: str):
    frames = self._frames()
    frame = [name, time.perf_counter(), 0.0, 0.0]  # name, start, children's time, compile
    frames.append(frame)
    try:
      yield frame
    finally:
      frames.pop()
      total = time.perf_counter() - frame[1]
      self.own[name] += total - frame[2]
      self.calls[name] += 1
      if frames:
        frames[-1][2] += total

  def on_event(self, event: str, seconds: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_EVENTS:
      self.compile[self.current()] += seconds
      for frame in self._frames():
        frame[3] += seconds

  def wrap(self, owner, attr: str, name: str) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
      with self.part(name):
        return fn(*args, **kwargs)

    setattr(owner, attr, timed)


def instrument(t: Timers) -> None:
  """Timers on the parts of ``experiment.run`` (patched in this process only)."""
  t.wrap(experiment, "build", "build (stream, model, method, trainer)")
  t.wrap(trainer_lib.Trainer, "accuracy", "evaluation")
  t.wrap(trainer_lib.Trainer, "init_state", "initial state")
  t.wrap(checkpointer.Checkpointer, "save", "checkpoints")
  t.wrap(checkpointer.Checkpointer, "finish", "results.json")
  t.wrap(logs, "write_run_plots", "plots")
  t.wrap(experiment, "_report", "report (metrics of the run)")
  for cls, name in ((logs.TensorBoardLog, "TensorBoard"), (logs.CsvLog, "metrics.csv")):
    for attr in ("start", "epoch", "task_end", "finish", "close"):
      if attr in vars(cls):
        t.wrap(cls, attr, name)
  run_epoch = loops.run_epoch

  def timed_epoch(programs, loop, op, *args, **kwargs):
    with t.part("training epochs") as frame:
      out = run_epoch(programs, loop, op, *args, **kwargs)
      jax.block_until_ready(out[0])
    t.epochs.append({"task": op.task + 1, "phase": op.phase,
                     "seconds": round(time.perf_counter() - frame[1], 3),
                     "compile_seconds": round(frame[3], 3)})
    return out

  loops.run_epoch = timed_epoch
  build = experiment.build

  def build_with_timed_method(*args, **kwargs):
    tr = build(*args, **kwargs)
    run_task = tr.method.run_task

    def timed_run_task(*a, **k):
      with t.part("method's own work (prune, freeze, masks)"):
        return run_task(*a, **k)

    tr.method = dataclasses.replace(tr.method, run_task=timed_run_task)
    return tr

  experiment.build = build_with_timed_method
  jax.monitoring.register_event_duration_secs_listener(t.on_event)


def main(argv):
  del argv
  if peer_pytorch._CACHE.value:  # pylint: disable=protected-access
    runtime.enable_compilation_cache(peer_pytorch._CACHE.value)  # pylint: disable=protected-access
  t = Timers()
  instrument(t)
  workdir = tempfile.mkdtemp(prefix="breakdown_")
  config = peer_pytorch.make_config(peer_pytorch._NET.value, peer_pytorch._EPOCHS.value,  # pylint: disable=protected-access
                                    peer_pytorch._RETRAIN.value)  # pylint: disable=protected-access
  start = time.perf_counter()
  with t.part("rest of experiment.run"):
    results = experiment.run(config, workdir, print_summary=False)
  run_s = time.perf_counter() - start
  shutil.rmtree(workdir, ignore_errors=True)
  startup = _AGE_AT_START + (_IMPORTS_DONE - _T0)
  parts = {"start-up (interpreter, imports)": round(startup, 3)}
  parts.update({k: round(v, 3) for k, v in t.own.most_common()})
  out = {"net": peer_pytorch._NET.value, "dataset": peer_pytorch._DATASET.value,  # pylint: disable=protected-access
         "epochs": peer_pytorch._EPOCHS.value, "retrain": peer_pytorch._RETRAIN.value,  # pylint: disable=protected-access
         "cache_dir": runtime.compilation_cache_dir(peer_pytorch._CACHE.value or None),  # pylint: disable=protected-access
         "whole_process_s": round(startup + (time.perf_counter() - _IMPORTS_DONE), 3),
         "experiment_run_s": round(run_s, 3), "parts_s": parts,
         "calls": dict(t.calls),
         "compile_s_by_part": {k: round(v, 3) for k, v in t.compile.most_common()},
         "epoch_times": t.epochs, "acc": float(results["acc"]), "cpus": os.cpu_count(),
         "load_average": os.getloadavg()[0]}
  print(f"whole process {out['whole_process_s']:.2f} s (experiment.run {run_s:.2f} s), "
        f"{out['net']} on {out['dataset']}, {out['epochs']}+{out['retrain']} epochs per task, "
        f"ACC {out['acc']:.4f}, load average {out['load_average']:.1f}")
  for name, sec in parts.items():
    comp = t.compile.get(name, 0.0)
    print(f"  {name:45s} {sec:7.2f} s  ({t.calls.get(name, 1):3d} calls; compilation "
          f"{comp:5.2f} s)")
  print("  epochs (task, phase: seconds, of which compilation):")
  for e in t.epochs:
    print(f"    task {e['task']} {e['phase']:10s} {e['seconds']:6.2f} s  ({e['compile_seconds']:.2f})")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
