"""Where an XLA:CPU training step spends its time: stock vs `ops` convolutions, loop vs top level.

  .venv/bin/python benchmarks/cpu_step.py                 # every variant, each in its own process
  .venv/bin/python benchmarks/cpu_step.py --variants=fast_fori,fast_fori_ynn

A bare Flax step of the small convnet (conv3x3-32, pool, conv3x3-64, pool, dense 256, 5 heads;
batch 128 gathered on the device from 2,048 images; SGD momentum), no masks, no harness. Each
variant runs in a fresh process because the XLA:CPU flag must be set before JAX starts:

* ``stock_fori`` / ``stock_host``: ``nn.Conv`` + ``nn.max_pool`` inside ``lax.fori_loop`` / one
  jitted step per call from Python;
* ``fast_fori`` / ``fast_host``: :mod:`sparse_cl_jax.ops` (custom-VJP convolution, slice pooling);
* ``*_ynn``: the same without the library's XLA:CPU setting (convolutions left to YNNPACK).

Prints wall ms and process-CPU ms per step (median of 3 timed calls of 10 steps) and minor page
faults per step.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("stock_fori", "stock_host", "fast_fori", "fast_host", "fast_fori_ynn")


def one(variant: str) -> str:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from sparse_cl_jax import runtime  # pylint: disable=g-import-not-at-top  (before JAX starts)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax import models  # pylint: disable=g-import-not-at-top

  runtime.use_fast_ops(variant.startswith("fast"))
  model = models.create("small_convnet", num_heads=5, num_classes=2, norm="none")
  params = models.init(model, jax.random.key(0), (1, 28, 28, 1))["params"]
  tx = optax.sgd(0.01, momentum=0.9)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2048, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(np.random.default_rng(1).integers(0, 2, 2048), jnp.int32)

  def step(p, s, i):
    idx = (i * 128 + jnp.arange(128)) % 2048
    x, y = images[idx], labels[idx]
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        model.apply({"params": p}, x, task=jnp.int32(1)), y).mean()
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  if variant.split("_")[1] == "fori":
    loop = jax.jit(lambda p, s, n: jax.lax.fori_loop(0, n, lambda i, c: step(*c, i), (p, s)))
    run = lambda p, s: loop(p, s, 10)  # noqa: E731
  else:
    stepj = jax.jit(step)

    def run(p, s):
      for i in range(10):
        p, s = stepj(p, s, i)
      return p, s
  state = (params, tx.init(params))
  state = jax.block_until_ready(run(*state))
  walls, cpus, faults = [], [], []
  for _ in range(3):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    state = jax.block_until_ready(run(*state))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    walls.append((time.perf_counter() - t0) * 100)
    cpus.append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 100)
    faults.append((r1.ru_minflt - r0.ru_minflt) / 10)
  return (f"{variant:14s} wall {statistics.median(walls):8.1f} ms/step  cpu "
          f"{statistics.median(cpus):8.1f} ms/step  minor faults {statistics.median(faults):7.0f}"
          f"/step  (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")


def main():
  args = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
  if "--one" in args:
    print(one(args["--one"]), flush=True)
    return
  variants = args.get("--variants", ",".join(VARIANTS)).split(",")
  print(f"load average {os.getloadavg()}")
  for v in variants:
    if v not in VARIANTS:
      raise SystemExit(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
    env = dict(os.environ)
    if v.endswith("_ynn"):
      env["SPARSE_CL_JAX_XLA_CPU_TUNING"] = "0"
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={v}"], env=env,
                         capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(v)]
    print(lines[-1] if lines else f"{v}: failed: {out.stderr.strip().splitlines()[-1:]}",
          flush=True)


if __name__ == "__main__":
  main()
