"""The library against a reference-style PyTorch PackNet on the same CPU, data and network.

  .venv/bin/pip install torch==2.13.0      # bench-only dependency (the CPU wheel)
  make fashion-mnist                        # real data (Debian package)
  .venv/bin/python benchmarks/peer_pytorch.py                       # all nets, epochs + whole run
  .venv/bin/python benchmarks/peer_pytorch.py --nets=convnet --whole=false

The peer is written the way the PackNet/CPG reference code trains (arunmallya/packnet,
ivclab/CPG): an ``nn.Module``, ``loss.backward()``, the gradients of weights owned by earlier
tasks zeroed after the backward pass, ``optimizer.step()``, pruned weights zeroed after the step,
one head per task. It is given its best case: the task's images already normalised in one float
tensor, batches gathered with ``index_select`` (no DataLoader), all cores. Both sides train the
same Split Fashion-MNIST task arrays (the library's stream), batch 128 (the MLP-2000 at 256),
SGD momentum 0.9, the same pruning (60% of each layer's task weights, one shot, by magnitude).

Measured, in one process, alternating:
* epoch time: one training epoch of a task (after a warm-up epoch; compilation excluded), the
  median over ``--repeats``; ratio = library / PyTorch (targets: <= 1.0 convnet, <= 0.5 MLPs);
* whole run: 5 tasks x (``--epochs`` train + ``--retrain`` retrain) with the test and validation
  accuracy of every task after each task, each side in a fresh subprocess, from the start of the
  run to its end, compilation included (the library: ``experiment.run``, which also loads the
  data, writes checkpoints, TensorBoard, metrics.csv and plots; PyTorch: after its data is
  loaded). The library runs once with its persistent compilation cache off and once filling it,
  then ``--whole_repeats`` pairs of runs alternate (library with the warm cache, PyTorch): the
  ratio is of the two medians (issue 27's bar: at most 0.75), also with the imports counted.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Before anything starts JAX's backends: the library's XLA:CPU settings (runtime.py) apply then.
from sparse_cl_jax import runtime  # noqa: E402  pylint: disable=g-import-not-at-top

_NETS = flags.DEFINE_list("nets", ["convnet", "mlp256", "mlp2000"], "Networks to compare.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed epochs per side and net (median).")
_WHOLE = flags.DEFINE_bool("whole", True, "Also time the whole 5-task run (convnet).")
_WHOLE_REPEATS = flags.DEFINE_integer(
    "whole_repeats", 3, "Whole runs per side with a warm cache, alternating (median).")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Whole run: training epochs per task.")
_RETRAIN = flags.DEFINE_integer("retrain", 1, "Whole run: retraining epochs per task.")
_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "fashion_mnist (or digits: no data).")
_ROLE = flags.DEFINE_string("role", "", "internal: 'jax' or 'torch' for a whole-run subprocess.")
_NET = flags.DEFINE_string("net", "convnet", "internal: the net of a whole-run subprocess.")
_CACHE = flags.DEFINE_string("cache_dir", "", "internal: compilation cache dir ('' = off).")

NETS = {  # name: (library model, MLP hidden sizes, batch size)
    "convnet": ("small_convnet", (), 128),
    "mlp256": ("mlp", (256, 256), 128),
    "mlp2000": ("mlp", (2000, 2000), 256),
}


def make_config(net: str, epochs: int = 1, retrain: int = 1):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  model, hidden, bs = NETS[net]
  c = config_lib.base("packnet")
  c.dataset = _DATASET.value
  c.num_tasks = 5
  c.model = model
  c.norm = "none"
  if hidden:
    c.hidden = hidden
  c.batch_size = bs
  c.epochs = epochs
  c.optimizer = "sgd"
  c.learning_rate = 0.02
  c.momentum = 0.9
  c.progress = False
  c.checkpoint_every_epochs = 0
  c.packnet = ml_collections.ConfigDict(
      {"prune_fraction": 0.6, "retrain_epochs": retrain, "retrain_lr": 0.002})
  return c


# ------------------------------------------------------------------------------------------------
# The PyTorch peer.

def torch_peer(stream, net: str):
  """(train_epoch(t, lr, seed), prune(t), finish(t), accuracy(t, split)) over ``stream``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  _, hidden, bs = NETS[net]
  T, classes = stream.num_tasks, int(stream.classes_per_task)
  mean = np.asarray(stream.mean, np.float32).reshape(1, 1, 1, -1)
  std = np.asarray(stream.std, np.float32).reshape(1, 1, 1, -1)

  def tensors(x, y, n):
    x = (np.asarray(x[:n], np.float32) / 255.0 - mean) / std  # NHWC
    return (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
            torch.from_numpy(np.asarray(y[:n], np.int64)))

  data = {split: [tensors(getattr(stream, f"x_{split}")[t], getattr(stream, f"y_{split}")[t],
                          int(getattr(stream, f"n_{split}")[t])) for t in range(T)]
          for split in ("train", "val", "test")}
  c, h, w = data["train"][0][0].shape[1:]

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      if net == "convnet":
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), 256), nn.ReLU())
        d = 256
      else:
        layers, d = [nn.Flatten()], c * h * w
        for width in hidden:
          layers += [nn.Linear(d, width), nn.ReLU()]
          d = width
        self.body = nn.Sequential(*layers)
      self.heads = nn.ModuleList([nn.Linear(d, classes) for _ in range(T)])

    def forward(self, x, t):
      return self.heads[t](self.body(x))

  model = Net()
  body = [p for n, p in model.body.named_parameters() if n.endswith("weight")]
  owner = [torch.zeros_like(p, dtype=torch.int64) for p in body]  # 0 = free, k = task k
  opt = {"sgd": None}

  def train_epoch(t, lr, seed, new_optimizer):
    if new_optimizer or opt["sgd"] is None:
      opt["sgd"] = torch.optim.SGD(
          list(model.body.parameters()) + list(model.heads[t].parameters()), lr=lr, momentum=0.9)
    for g in opt["sgd"].param_groups:
      g["lr"] = lr
    x, y = data["train"][t]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    model.train()
    fixed = [(o > 0) & (o != t + 1) for o in owner]  # earlier tasks' weights
    pruned = [o < 0 for o in owner]
    biases_fixed = t > 0  # PackNet trains shared biases in the first task only
    for b in range(0, x.shape[0], bs):
      idx = perm[b:b + bs]
      xb, yb = x.index_select(0, idx), y.index_select(0, idx)
      opt["sgd"].zero_grad(set_to_none=False)
      loss = nn.functional.cross_entropy(model(xb, t), yb)
      loss.backward()
      with torch.no_grad():
        for p, f in zip(body, fixed):  # reference: make_grads_zero
          p.grad.masked_fill_(f, 0.0)
        if biases_fixed:
          for n, p in model.body.named_parameters():
            if n.endswith("bias"):
              p.grad.zero_()
      opt["sgd"].step()
      with torch.no_grad():
        for p, f, pr in zip(body, fixed, pruned):  # reference: make_pruned_zero
          p.masked_fill_(pr, 0.0)

  def prune(t):
    with torch.no_grad():
      for i, p in enumerate(body):
        cand = (owner[i] == 0) | (owner[i] == t + 1)
        vals = p.abs()[cand]
        keep = int(round(0.4 * vals.numel()))
        thresh = torch.kthvalue(vals, vals.numel() - keep).values if keep < vals.numel() else -1
        kept = cand & (p.abs() > thresh)
        released = cand & ~kept
        p.masked_fill_(released, 0.0)
        owner[i] = torch.where(kept, torch.full_like(owner[i], t + 1), owner[i])
        owner[i] = torch.where(released, torch.full_like(owner[i], -1), owner[i])

  def finish(t):
    del t
    for i in range(len(owner)):  # released weights become free for the next task
      owner[i] = torch.where(owner[i] < 0, torch.zeros_like(owner[i]), owner[i])

  def accuracy(t, split):
    x, y = data[split][t]
    model.eval()
    saved = [p.detach().clone() for p in body]
    with torch.no_grad():
      for p, o in zip(body, owner):  # task t's view: weights of tasks 1..t+1
        p.masked_fill_((o <= 0) | (o > t + 1), 0.0)
      hits = 0
      for b in range(0, x.shape[0], 500):
        hits += int((model(x[b:b + 500], t).argmax(-1) == y[b:b + 500]).sum())
      for p, s in zip(body, saved):
        p.copy_(s)
    return hits / x.shape[0]

  return train_epoch, prune, finish, accuracy


# ------------------------------------------------------------------------------------------------
# Epoch times in one process.

def epoch_times(net: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax import experiment  # pylint: disable=g-import-not-at-top
  config = make_config(net)
  trainer = experiment.build(config)
  stream = trainer.stream
  train_epoch, _, _, _ = torch_peer(stream, net)
  state = trainer.init_state()
  T = stream.num_tasks
  times = {"jax": [], "torch": []}
  for r in range(_REPEATS.value + 1):  # round 0 is the warm-up (compilation)
    t = r % T
    for side in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
      start = time.perf_counter()
      if side == "jax":
        trainer.begin_task(t)
        state = trainer.train(state, t, epochs=1)
        jax.block_until_ready(state)
      else:
        train_epoch(t, 0.02, r, True)
      if r:
        times[side].append(time.perf_counter() - start)
  n = int(stream.n_train[0])
  j, p = statistics.median(times["jax"]), statistics.median(times["torch"])
  return {"net": net, "train_images_per_epoch": n, "batch_size": NETS[net][2],
          "jax_s": j, "torch_s": p, "ratio": j / p, "jax_all": times["jax"],
          "torch_all": times["torch"], "trace_counts": dict(trainer.trace_counts)}


# ------------------------------------------------------------------------------------------------
# Whole runs, each in a fresh process.

def whole_jax(net: str) -> dict:
  start = time.perf_counter()
  from sparse_cl_jax import experiment  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.enable_compilation_cache(_CACHE.value or None)
  workdir = tempfile.mkdtemp(prefix="peer_jax_")
  config = make_config(net, _EPOCHS.value, _RETRAIN.value)
  t0 = time.perf_counter()
  results = experiment.run(config, workdir, print_summary=False)
  elapsed = time.perf_counter() - t0
  shutil.rmtree(workdir, ignore_errors=True)
  return {"seconds": elapsed, "with_imports": time.perf_counter() - start,
          "acc": float(results["acc"])}


def whole_torch(net: str) -> dict:
  start = time.perf_counter()
  from sparse_cl_jax import experiment  # pylint: disable=g-import-not-at-top
  config = make_config(net, _EPOCHS.value, _RETRAIN.value)
  stream = experiment.build_stream(config)
  t0 = time.perf_counter()
  train_epoch, prune, finish, accuracy = torch_peer(stream, net)
  T = stream.num_tasks
  R = []
  for t in range(T):
    for e in range(_EPOCHS.value):
      train_epoch(t, 0.02, 100 * t + e, e == 0)
    prune(t)
    for e in range(_RETRAIN.value):
      train_epoch(t, 0.002, 100 * t + 50 + e, e == 0)
    finish(t)
    R.append([accuracy(j, "test") for j in range(T)])
    [accuracy(j, "val") for j in range(T)]  # pylint: disable=expression-not-assigned
  elapsed = time.perf_counter() - t0
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {"seconds": elapsed, "with_imports": time.perf_counter() - start,
          "acc": float(np.mean(R[-1]))}


def run_whole(role: str, net: str, cache_dir: str = "") -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--role={role}", f"--net={net}",
         f"--epochs={_EPOCHS.value}", f"--retrain={_RETRAIN.value}",
         f"--dataset={_DATASET.value}", f"--cache_dir={cache_dir}"]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _ROLE.value:
    res = whole_jax(_NET.value) if _ROLE.value == "jax" else whole_torch(_NET.value)
    print(json.dumps(res))
    return
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  print(f"jax {jax.__version__} backend {jax.default_backend()} | torch {torch.__version__} "
        f"threads {torch.get_num_threads()} | cpus {os.cpu_count()} | dataset {_DATASET.value} | "
        f"XLA:CPU tuned {runtime.XLA_CPU_TUNED} | fast ops {runtime.fast_ops()}")
  rows = []
  for net in _NETS.value:
    r = epoch_times(net)
    rows.append(r)
    print(f"epoch  {net:8s} batch {r['batch_size']:3d}: library {r['jax_s']:7.2f} s  "
          f"PyTorch {r['torch_s']:7.2f} s  ratio {r['ratio']:.2f}  "
          f"(all: {[round(v, 2) for v in r['jax_all']]} vs "
          f"{[round(v, 2) for v in r['torch_all']]}; traces {r['trace_counts']})", flush=True)
  if _WHOLE.value:
    whole_runs()


def whole_runs():
  """The whole 5-task run, each in a fresh process: the library once with every program compiled
  and once filling the compilation cache, then ``--whole_repeats`` pairs of PyTorch and the
  library with the warm cache, alternating which goes first; medians and their ratio."""
  cache = tempfile.mkdtemp(prefix="peer_cache_")
  cold = run_whole("jax", "convnet")
  filling = run_whole("jax", "convnet", cache)
  runs = {"torch": [], "jax": []}
  for i in range(max(1, _WHOLE_REPEATS.value)):
    for role in (("torch", "jax") if i % 2 == 0 else ("jax", "torch")):
      runs[role].append(run_whole(role, "convnet", cache if role == "jax" else ""))
  shutil.rmtree(cache, ignore_errors=True)
  med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
  med_imp = {k: statistics.median(r["with_imports"] for r in v) for k, v in runs.items()}
  print(f"whole 5-task run, convnet, {_EPOCHS.value}+{_RETRAIN.value} epochs per task: library "
        f"with every program compiled {cold['seconds']:.1f} s (ACC {cold['acc']:.3f}), filling the "
        f"cache {filling['seconds']:.1f} s")
  print(f"whole run, warm cache, median of {len(runs['jax'])} alternating: library "
        f"{med['jax']:.1f} s, PyTorch {med['torch']:.1f} s (ACC {runs['torch'][0]['acc']:.3f}), "
        f"ratio {med['jax'] / med['torch']:.2f}; with imports {med_imp['jax']:.1f} s vs "
        f"{med_imp['torch']:.1f} s, ratio {med_imp['jax'] / med_imp['torch']:.2f}  (library "
        f"{[round(r['seconds'], 1) for r in runs['jax']]}, PyTorch "
        f"{[round(r['seconds'], 1) for r in runs['torch']]})", flush=True)


if __name__ == "__main__":
  app.run(main)
