"""The paper protocols at full size on one accelerator: throughput, compile time, memory, MFU.

  python benchmarks/gpu.py                         # every protocol, float32 and bfloat16
  python benchmarks/gpu.py --protocols=cpg_cifar100 --dtypes=bfloat16
  python benchmarks/gpu.py --accuracy              # + bf16 vs fp32 accuracy on Fashion-MNIST
  python benchmarks/gpu.py --smoke                 # tiny sizes, any backend (checks the script)

Each protocol is the paper preset of ``configs/`` (model, batch size, optimiser, the method's own
training step with its masks) on synthetic data of the real shape (random uint8 images and labels:
throughput does not depend on the pixel values). Each (protocol, dtype) runs in a fresh
subprocess, so compile time and peak memory are its own. Measured:

* compile: first epoch minus a steady epoch (tracing + XLA compilation of the epoch loop);
* step time and images/s: a steady epoch of task 0 (the library's jitted epoch loop);
* eval images/s: the accuracy of one task's test split;
* FLOPs per step: counted from the jaxpr of one training step (2 per multiply-add of every
  convolution and matrix product, forward and backward; XLA's own cost analysis cannot be used
  on GPU, where convolutions and GEMMs are library calls it counts as zero); MFU = FLOPs per step /
  step time / the chip's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s);
* peak memory: the device allocator's peak;
* protocol estimate: the protocol's training images (every phase of every task, from the
  preset's epochs) / images/s + its evaluations / eval images/s + compile. It assumes no retry:
  CPG's growth retries and CLNP's hyperparameter grid multiply it.

``--accuracy`` trains PackNet on 5-task Split Fashion-MNIST (``configs/packnet.py:fashion_mnist``)
in float32 and in bfloat16 compute and prints both accuracies (needs the IDX files in
``--fmnist_dir``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for _mod, _dir in (("ml_collections", ".gpu_deps"), ("tqdm", ".gpu_deps")):
  try:  # the accelerator machine lacks some pure-Python dependencies: a carried copy
    __import__(_mod)
  except ImportError:
    sys.path.append(os.path.join(ROOT, _dir))

from absl import app  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

_PROTOCOLS = flags.DEFINE_list(
    "protocols", ["clnp_mlp2000", "dst_cifar100_10", "cpg_cifar100"], "Protocols to run.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes (script check on any backend).")
_ACCURACY = flags.DEFINE_bool("accuracy", False, "bf16 vs fp32 accuracy on Fashion-MNIST.")
_FMNIST = flags.DEFINE_string("fmnist_dir", "", "Directory with the Fashion-MNIST IDX files.")
_ONE = flags.DEFINE_string("one", "", "internal: 'protocol,dtype' for a subprocess.")
_OUT = flags.DEFINE_string("out", "", "Append JSON lines here.")
_TIMEOUT = flags.DEFINE_integer("timeout", 240, "Seconds per (protocol, dtype) subprocess.")
_XLA_FLAGS = flags.DEFINE_string("extra_xla_flags", "", "Appended to XLA_FLAGS of the runs.")

# name: (config module, preset, image shape, classes, train size, test size)
PROTOCOLS = {
    "cpg_cifar100": ("cpg", "cifar100", (32, 32, 3), 100, 50000, 10000),
    "dst_cifar100_10": ("dst_cl", "cifar100_10", (32, 32, 3), 100, 50000, 10000),
    "clnp_mlp2000": ("clnp", "permuted_mnist", (28, 28, 1), 10, 60000, 10000),
    # CPG's network, batch and optimiser with plain fine-tuning: the method's own cost per step
    # is the difference to cpg_cifar100.
    "finetune_vgg16_cifar100": ("cpg", "cifar100", (32, 32, 3), 100, 50000, 10000),
}

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _config(name: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  module, preset, *_ = PROTOCOLS[name]
  spec = importlib.util.spec_from_file_location(module, os.path.join(ROOT, "configs",
                                                                     f"{module}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(preset)
  if name.startswith("finetune_"):
    config.method = "finetune"
    config.norm = "task_batch"
  return config


def jaxpr_flops(jaxpr) -> float:
  """2 x multiply-adds of every convolution and dot in ``jaxpr`` (sub-jaxprs included; a loop
  body counted once)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params["dimension_numbers"]
      k_in = rhs[dn.rhs_spec[1]]
      k_sp = np.prod([rhs[d] for d in dn.rhs_spec[2:]])
      total += 2.0 * np.prod(out) * k_in * k_sp  # grouped convs: k_in is already per group
    elif name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lc])
    for sub in _subjaxprs(eqn):
      total += jaxpr_flops(sub)
  return float(total)


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for item in (v if isinstance(v, (list, tuple)) else (v,)):
      if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr
      elif hasattr(item, "eqns"):
        yield item


def protocol_images(config, stream) -> tuple[int, int]:
  """(training images, evaluated images) of the whole protocol as the preset configures it."""
  n_train = [int(n) for n in stream.n_train]
  n_eval = [int(a) + int(b) for a, b in zip(stream.n_val, stream.n_test)]
  epochs = int(config.epochs)
  m = config.method
  if m in ("cpg", "pae"):
    cc = config.cpg
    per_task = (epochs + len(tuple(cc.stages)) * int(cc.stage_epochs) + int(cc.retrain_epochs)
                + int(cc.get("goal_epochs", epochs)))  # + the individual model of the goal
  elif m == "clnp":
    per_task = epochs + int(config.clnp.get("finetune_epochs", 0))
  else:
    per_task = epochs
  T = len(n_train)
  # After each task every task is evaluated on validation and test.
  return per_task * sum(n_train), T * sum(n_eval)


def measure(name: str, dtype: str) -> dict:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax import experiment  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax.train import steps as train_steps  # pylint: disable=g-import-not-at-top

  _, _, shape, classes, n_tr, n_te = PROTOCOLS[name]
  config = _config(name)
  config.dataset = "arrays"
  config.progress = False
  config.checkpoint_every_epochs = 0
  config.compute_dtype = dtype
  config.compilation_cache = "none"
  if _SMOKE.value:
    n_tr, n_te = 400, 100
    config.batch_size = min(int(config.batch_size), 32)
    config.width_multiplier = 0.125 if config.model != "mlp" else config.width_multiplier
    if config.model == "mlp":
      config.hidden = (64, 64)
  rng = np.random.default_rng(0)
  per_class_tr, per_class_te = n_tr // classes, n_te // classes
  y_tr = np.repeat(np.arange(classes), per_class_tr).astype(np.int32)
  y_te = np.repeat(np.arange(classes), per_class_te).astype(np.int32)
  src = data_lib.from_arrays(rng.integers(0, 256, (len(y_tr),) + shape, dtype=np.uint8), y_tr,
                             rng.integers(0, 256, (len(y_te),) + shape, dtype=np.uint8), y_te,
                             name=name)
  dev = jax.devices()[0]
  t_build = time.perf_counter()
  trainer = experiment.build(config, source=src)
  state = trainer.init_state()
  jax.block_until_ready(state)
  t_build = time.perf_counter() - t_build
  stream = trainer.stream
  n0 = int(stream.n_train[0])
  bs = trainer.batch_size
  steps = -(-n0 // bs)

  def epoch(st, t):
    trainer.begin_task(t)
    t0 = time.perf_counter()
    st = trainer.train(st, t, epochs=1)
    jax.block_until_ready(st)
    return st, time.perf_counter() - t0

  state, first = epoch(state, 0)
  steady = []
  for t in (0, 1, 0):
    state, dt = epoch(state, t % stream.num_tasks)
    steady.append(dt)
  steady_s = float(np.median(steady))
  # Evaluation throughput (compile excluded).
  trainer.accuracy(state, 0, split="test", current=0)
  t0 = time.perf_counter()
  for _ in range(3):
    trainer.accuracy(state, 0, split="test", current=0)
  eval_s = (time.perf_counter() - t0) / 3
  n_eval0 = int(stream.n_test[0])
  # FLOPs of one training step, from its jaxpr.
  data = trainer.task_data(0)
  perm = trainer.programs.permutation(trainer.op_key(0), data.n, int(data.x.shape[0]))
  jaxpr = jax.make_jaxpr(functools.partial(  # pylint: disable=protected-access
      train_steps.host_step, trainer.env, trainer._consts))(
      state, jnp.zeros(3, jnp.float32), data, perm, jnp.int32(0), jnp.int32(0),
      jnp.float32(0.01), jnp.float32(0.0))
  flops = jaxpr_flops(jaxpr.jaxpr)
  stats = dev.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  kind = dev.device_kind
  peak_flops = next((v for k, v in PEAK_BF16.items() if k in kind), float("nan"))
  step_s = steady_s / steps
  train_imgs, eval_imgs = protocol_images(config, stream)
  ips = n0 / steady_s
  eips = n_eval0 / eval_s
  compile_s = first - steady_s
  est = train_imgs / ips + eval_imgs / eips + compile_s
  return {
      "protocol": name, "dtype": dtype, "device": f"{dev.platform}:{kind}",
      "model": config.model, "batch_size": bs, "steps_per_epoch": steps,
      "step_ms": 1000 * step_s, "train_images_per_s": ips, "eval_images_per_s": eips,
      "compile_s": compile_s, "build_s": t_build, "first_epoch_s": first,
      "flops_per_step": flops, "mfu_vs_bf16_peak": flops / step_s / peak_flops,
      "peak_memory_gib": (peak / 2**30) if peak else None,
      "protocol_train_images": train_imgs, "protocol_eval_images": eval_imgs,
      "protocol_estimate_min": est / 60, "trace_counts": dict(trainer.trace_counts),
  }


def accuracy_effect(fmnist_dir: str) -> list[dict]:
  import importlib.util  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax import experiment  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("packnet", os.path.join(ROOT, "configs",
                                                                        "packnet.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  out = []
  for dtype in ("float32", "bfloat16"):
    c = mod.get_config("fashion_mnist")
    c.data_dir = fmnist_dir
    c.progress = False
    c.compute_dtype = dtype
    c.compilation_cache = "none"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as wd:
      r = experiment.run(c, wd, print_summary=False)
    out.append({"accuracy_run": "packnet:fashion_mnist", "dtype": dtype, "acc": r["acc"],
                "seconds": time.perf_counter() - t0})
  return out


def _emit(rec: dict) -> None:
  line = json.dumps(rec)
  print(line, flush=True)
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      f.write(line + "\n")


def main(argv):
  del argv
  if _ONE.value:
    name, dtype = _ONE.value.split(",")
    print("RESULT " + json.dumps(measure(name, dtype)), flush=True)
    return
  for name in _PROTOCOLS.value:
    if name not in PROTOCOLS:
      raise app.UsageError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    for dtype in _DTYPES.value:
      cmd = [sys.executable, os.path.abspath(__file__), f"--one={name},{dtype}",
             f"--smoke={_SMOKE.value}"]
      t0 = time.perf_counter()
      env = dict(os.environ)
      if _XLA_FLAGS.value:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + _XLA_FLAGS.value).strip()
      try:
        p = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                           timeout=_TIMEOUT.value)
      except subprocess.TimeoutExpired:
        _emit({"protocol": name, "dtype": dtype, "error": f"timeout {_TIMEOUT.value} s"})
        continue
      lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
      if p.returncode or not lines:
        _emit({"protocol": name, "dtype": dtype, "error": p.stderr.strip().splitlines()[-5:]})
        continue
      rec = json.loads(lines[-1][len("RESULT "):])
      rec["process_s"] = time.perf_counter() - t0
      rec["extra_xla_flags"] = _XLA_FLAGS.value
      _emit(rec)
  if _ACCURACY.value:
    for rec in accuracy_effect(_FMNIST.value):
      _emit(rec)


if __name__ == "__main__":
  app.run(main)
