"""Overhead of the sparse_cl_jax core on a ~3M-parameter MLP: three ratios, each within one run.

1. ``mask+freeze step / dense step``: a jitted AdamW step whose forward uses ``masks.apply`` and
   whose chain ends with ``transforms.keep_sparse()`` and ``transforms.freeze()`` (masks passed as
   keyword extra args), against the same step without any mask. Target <= 1.05.
2. ``mask update / training step``: one jitted topology update (``growth.drop_and_grow`` with
   magnitude drop and gradient growth at fraction 0.3, ``growth.regrow``, ``growth.reset_moments``)
   and one jitted top-k re-selection (``topk.topk_mask`` at 90% sparsity, per-leaf counts from
   ``sparsity.target_counts``), each divided by the masked training step. Target <= 10. For
   reference: a jaxpruner-style full ``jnp.argsort`` top-k.
3. ``DST step between updates / plain masked step``: a dynamic sparse training loop in which the
   mask update is a separate jitted function called every dT=100 steps (our design), against the
   plain masked step; also the amortised per-step cost including updates. Target <= 1.1. For
   comparison: the jaxpruner pattern, one jitted step that carries the optimiser state through
   ``jax.lax.cond(step % dT == 0, update, no_update, ...)``.

Timing: everything is compiled and warmed up first; the variants being compared are interleaved
(their order rotates between repeats); every timed block ends with ``block_until_ready``; train
states are donated to the steps. The step ratios of parts 1 and 3 are medians of per-repeat paired
ratios (variants timed back to back, which cancels slow drifts of the machine's load); the ratio of
the medians and, for part 1, the ratio of process CPU time are printed next to them as cross-checks.
Part 2 divides medians of the update timings by the median masked-step time. A reference row in
part 1 (keep_sparse + freeze in the chain, no ``masks.apply`` in the forward) attributes the cost.
The load average is printed at the start and end: other processes competing for the cores make all
figures noisy; re-run if it is high.

Run::

  .venv/bin/python benchmarks/core_overhead.py           # a few minutes on 2 CPU cores
  .venv/bin/python benchmarks/core_overhead.py --quick   # < 60 s on an idle machine, noisier
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_cl_jax import criteria, growth, masks, sparsity, topk, transforms

SIZES = (784, 1400, 1400, 10)  # 3.07M parameters
BATCH = 128
SPARSITY = 0.9
DROP_FRACTION = 0.3
DT = 100  # steps between mask updates


# --------------------------------------------------------------------------------------------------
# Problem.


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def init_params(rng: np.random.Generator, sizes=SIZES):
  """LeCun-normal kernels, zero biases (NumPy on the host: fast, no compilation)."""
  names = [f"dense_{i}" for i in range(len(sizes) - 2)] + ["head"]
  params = {}
  for i, name in enumerate(names):
    fan_in, fan_out = sizes[i], sizes[i + 1]
    kernel = rng.standard_normal((fan_in, fan_out), dtype=np.float32) / np.float32(np.sqrt(fan_in))
    params[name] = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((fan_out,), jnp.float32)}
  return params


def loss_fn(params, x, y):
  h = x
  names = sorted(k for k in params if k.startswith("dense_"))
  for name in names:
    h = jax.nn.relu(h @ params[name]["kernel"] + params[name]["bias"])
  logits = h @ params["head"]["kernel"] + params["head"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = init_params(rng)
  x = jnp.asarray(rng.standard_normal((BATCH, SIZES[0]), dtype=np.float32))
  y = jnp.asarray(rng.integers(0, SIZES[-1], BATCH, dtype=np.int32))
  spec = masks.maskable(params)  # dense_*/kernel; biases and the head stay dense
  counts = sparsity.target_counts(params, SPARSITY, spec=spec)

  def random_mask(p, count, maskable):  # exactly `count` random positions (host side)
    if not maskable:
      return np.ones(p.shape, bool)
    flat = np.zeros(p.size, bool)
    flat[rng.permutation(p.size)[:count]] = True
    return flat.reshape(p.shape)

  sparse_np = jax.tree.map(random_mask, params, counts, spec)
  # An earlier task owns (freezes) half of the active weights of every maskable leaf.
  frozen_np = jax.tree.map(lambda m, f: m & (rng.random(m.shape) < 0.5) if f else np.zeros_like(m),
                           sparse_np, spec)
  sparse, frozen = jax.tree.map(jnp.asarray, (sparse_np, frozen_np))
  params = masks.apply(params, sparse)
  return params, x, y, spec, counts, sparse, frozen


def n_params(params) -> int:
  return sum(int(np.size(p)) for p in jax.tree.leaves(params))


def copy_tree(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def block(tree):
  return jax.block_until_ready(tree)


# --------------------------------------------------------------------------------------------------
# Steps.


def build(spec):
  tx_dense = optax.adamw(1e-3, weight_decay=1e-4)
  tx = optax.chain(optax.adamw(1e-3, weight_decay=1e-4), transforms.keep_sparse(),
                   transforms.freeze())

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def dense_step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx_dense.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def masked_step(params, opt_state, sparse, frozen, x, y):
    grads = jax.grad(lambda p: loss_fn(masks.apply(p, sparse), x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params, sparse_mask=sparse, frozen=frozen)
    return optax.apply_updates(params, updates), opt_state

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def chain_only_step(params, opt_state, sparse, frozen, x, y):
    """Reference for attribution: keep_sparse + freeze in the chain, no masks.apply in forward."""
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, sparse_mask=sparse, frozen=frozen)
    return optax.apply_updates(params, updates), opt_state

  def topology(params, opt_state, sparse, frozen, grads, fraction):
    res = growth.drop_and_grow(sparse, criteria.magnitude(params),
                               criteria.gradient(params, grads=grads), fraction, spec=spec,
                               drop_candidates=masks.logical_not(frozen))
    params = growth.regrow(params, res.grown, mode="zero")
    opt_state = growth.reset_moments(tx, opt_state, res.changed)
    return params, opt_state, res.masks

  def dense_grads(params, sparse, x, y):
    # Gradient growth needs dL/dw at every position, i.e. w.r.t. the masked weights.
    return criteria.gradient(params, masks=sparse, loss_fn=lambda w: loss_fn(w, x, y))

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def mask_update(params, opt_state, sparse, frozen, x, y, fraction):
    """Our design: the topology update is its own jitted function, called every dT steps."""
    return topology(params, opt_state, sparse, frozen, dense_grads(params, sparse, x, y), fraction)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def mask_update_given_grads(params, opt_state, sparse, frozen, grads, fraction):
    return topology(params, opt_state, sparse, frozen, grads, fraction)

  @jax.jit
  def grads_only(params, sparse, x, y):
    return dense_grads(params, sparse, x, y)

  @jax.jit
  def topk_reselect(params, counts):
    return topk.topk_mask(criteria.magnitude(params), counts, spec=spec)

  def argsort_one(scores, k):
    # jaxpruner's mask_calculator._topk_mask_calculator_internal, with k given directly.
    flat = scores.reshape(-1)
    idx = jnp.argsort(-flat)[jnp.maximum(k, 1) - 1]
    thr = flat[idx]
    by_value = flat >= thr
    by_index = (jnp.arange(flat.size) <= idx) | (flat != thr)
    return (by_value & by_index).reshape(scores.shape)

  @jax.jit
  def argsort_reselect(params, counts):
    scores = criteria.magnitude(params)
    return jax.tree.map(lambda s, k, f: argsort_one(s, k) if f else jnp.ones(s.shape, jnp.bool_),
                        scores, counts, spec)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2, 4))
  def cond_step(params, opt_state, sparse, frozen, step, x, y, fraction):
    """jaxpruner pattern: the update lives inside the step behind a lax.cond on the step count."""
    w = masks.apply(params, sparse)
    g_dense = jax.grad(loss_fn)(w, x, y)

    def update(ops):
      p, s, m = ops
      return topology(p, s, m, frozen, g_dense, fraction)

    params, opt_state, sparse = jax.lax.cond(step % DT == 0, update, lambda ops: ops,
                                             (params, opt_state, sparse))
    grads = masks.apply(g_dense, sparse)
    updates, opt_state = tx.update(grads, opt_state, params, sparse_mask=sparse, frozen=frozen)
    return optax.apply_updates(params, updates), opt_state, sparse, step + 1

  return {
      "tx_dense": tx_dense, "tx": tx, "dense_step": dense_step, "masked_step": masked_step,
      "chain_only_step": chain_only_step, "mask_update": mask_update,
      "mask_update_given_grads": mask_update_given_grads, "grads_only": grads_only,
      "topk_reselect": topk_reselect, "argsort_reselect": argsort_reselect,
      "cond_step": cond_step,
  }


# --------------------------------------------------------------------------------------------------
# Timing helpers.


def median(xs):
  return statistics.median(xs)


def spread(xs):
  return f"{min(xs):.3f}-{max(xs):.3f}"


class Runner:
  """Holds one donated train state per variant so that the variants can be interleaved.

  ``dense``/``masked``: parts 1 and 3 (plain steps, fixed masks). ``upd``: part 2 (masked steps with
  topology updates in between). ``ours``: part 3, our design. ``cond``: part 3, jaxpruner pattern.
  """

  def __init__(self, fns, params, x, y, sparse, frozen):
    self.f = fns
    self.x, self.y = x, y
    self.frozen = frozen
    self.frac = jnp.float32(DROP_FRACTION)
    self.state = {
        "dense": (copy_tree(params), fns["tx_dense"].init(params)),
        "masked": (copy_tree(params), fns["tx"].init(params), copy_tree(sparse)),
        "chain": (copy_tree(params), fns["tx"].init(params), copy_tree(sparse)),
        "upd": (copy_tree(params), fns["tx"].init(params), copy_tree(sparse)),
        "ours": (copy_tree(params), fns["tx"].init(params), copy_tree(sparse)),
        "cond": (copy_tree(params), fns["tx"].init(params), copy_tree(sparse), jnp.int32(1)),
    }

  def steps(self, name, n):
    """n training steps of variant ``name`` (no mask update); returns wall seconds per step.

    The process CPU seconds per step (all threads) are left in ``self.cpu`` as a cross-check that is
    less sensitive to other processes competing for the cores."""
    st = block(self.state[name])
    if name == "cond":  # these must all be non-update steps
      first = int(st[3])
      assert first % DT and first // DT == (first + n - 1) // DT, (first, n)
    x, y, fr = self.x, self.y, self.frozen
    c0 = time.process_time()
    t0 = time.perf_counter()
    if name == "dense":
      p, s = st
      for _ in range(n):
        p, s = self.f["dense_step"](p, s, x, y)
      st = (p, s)
    elif name == "cond":
      p, s, m, step = st
      for _ in range(n):
        p, s, m, step = self.f["cond_step"](p, s, m, fr, step, x, y, self.frac)
      st = (p, s, m, step)
    else:  # masked, upd, ours: the plain masked step with the variant's current mask
      fn = self.f["chain_only_step" if name == "chain" else "masked_step"]
      p, s, m = st
      for _ in range(n):
        p, s = fn(p, s, m, fr, x, y)
      st = (p, s, m)
    self.state[name] = block(st)
    wall = (time.perf_counter() - t0) / n
    self.cpu = (time.process_time() - c0) / n
    return wall

  def update(self, name):
    """One separately jitted mask update (dense grad + topology) on ``upd`` or ``ours``."""
    p, s, m = block(self.state[name])
    t0 = time.perf_counter()
    out = block(self.f["mask_update"](p, s, m, self.frozen, self.x, self.y, self.frac))
    self.state[name] = out
    return time.perf_counter() - t0

  def update_given_grads(self, grads):
    p, s, m = block(self.state["upd"])
    t0 = time.perf_counter()
    out = block(self.f["mask_update_given_grads"](p, s, m, self.frozen, grads, self.frac))
    self.state["upd"] = out
    return time.perf_counter() - t0

  def grads(self):
    p, _, m = block(self.state["upd"])
    t0 = time.perf_counter()
    g = block(self.f["grads_only"](p, m, self.x, self.y))
    return time.perf_counter() - t0, g

  def cond_update_step(self):
    """The jaxpruner pattern's update step: moves the counter to a multiple of DT, one step.

    At most DT - 1 non-update steps may follow before the next call."""
    p, s, m, step = block(self.state["cond"])
    step = jnp.int32((int(step) + DT - 1) // DT * DT)
    t0 = time.perf_counter()
    out = block(self.f["cond_step"](p, s, m, self.frozen, step, self.x, self.y, self.frac))
    self.state["cond"] = out
    return time.perf_counter() - t0


def timed(fn, *args):
  t0 = time.perf_counter()
  block(fn(*args))
  return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# Main.


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="fewer repeats (< 60 s)")
  args = ap.parse_args()
  quick = args.quick
  # Part 1: r1 repeats of k1 steps per variant. Part 2: r2 repeats. Part 3: r3 dT-cycles, each
  # with c3 interleaved chunks of k3 steps per variant between the updates (c3 * k3 <= DT - 1).
  r1, k1 = (24, 1) if quick else (160, 1)
  r2, k2 = (3, 2) if quick else (9, 3)
  r3, c3, k3 = (1, 8, 3) if quick else (3, 11, 9)
  assert c3 * k3 <= DT - 1

  t_start = time.perf_counter()
  print(f"jax {jax.__version__}, optax {optax.__version__}, devices: {jax.devices()}")
  dev = jax.devices()[0]
  print(f"device kind: {getattr(dev, 'device_kind', '?')}; CPU: {cpu_name()} "
        f"({os.cpu_count()} logical cores); load avg at start: {loadavg()}")

  params, x, y, spec, counts, sparse, frozen = make_problem()
  print(f"MLP {'-'.join(map(str, SIZES))}: {n_params(params) / 1e6:.2f}M params, batch {BATCH}, "
        f"AdamW(wd=1e-4); masked leaves {masks.maskable_paths(spec)} at {SPARSITY:.0%} sparsity, "
        f"half of the active weights frozen; drop fraction {DROP_FRACTION}, dT={DT}; "
        f"{'quick' if quick else 'default'} run")
  fns = build(spec)
  run = Runner(fns, params, x, y, sparse, frozen)
  counts_arr = jax.tree.map(jnp.int32, counts)  # traced counts: a new sparsity does not recompile

  # Compile and warm up everything.
  t0 = time.perf_counter()
  for rnd in range(2):  # round 0 compiles everything; round 1 warms up the steps once more
    for name in ("dense", "masked", "chain", "upd", "ours", "cond"):
      run.steps(name, 2)
    if rnd == 0:
      run.update("upd")
      _, g = run.grads()
      run.update_given_grads(g)
      run.update("ours")
      run.cond_update_step()
      timed(fns["topk_reselect"], run.state["masked"][0], counts_arr)
      timed(fns["argsort_reselect"], run.state["masked"][0], counts_arr)
  print(f"compile + warm-up: {time.perf_counter() - t0:.1f} s")
  check(run, spec, counts, counts_arr, sparse)
  marks = [time.perf_counter()]

  # ---- Part 1: mask+freeze step vs dense step (interleaved, alternating order).
  # The reference variant "chain" (keep_sparse + freeze, no masks.apply) attributes the overhead.
  wall1 = {"dense": [], "masked": [], "chain": []}
  cpu1 = {"dense": [], "masked": [], "chain": []}
  variants1 = ["dense", "masked", "chain"]
  for r in range(r1):
    order = variants1[r % 3:] + variants1[:r % 3]
    if r % 2:
      order = order[::-1]
    for name in order:
      wall1[name].append(run.steps(name, k1))
      cpu1[name].append(run.cpu)
  masked_t = wall1["masked"]
  d_med, m_med, c_med = (median(wall1[k]) for k in ("dense", "masked", "chain"))
  # Primary figure: the median of the per-repeat paired ratios (cancels slow load drifts).
  pair1 = [m / d for m, d in zip(wall1["masked"], wall1["dense"])]
  pair1c = [c / d for c, d in zip(wall1["chain"], wall1["dense"])]
  cpu_ratio1 = median([m / d for m, d in zip(cpu1["masked"], cpu1["dense"])])
  marks.append(time.perf_counter())

  # ---- Part 2: mask updates in a training loop, top-k re-selection, vs the masked step.
  upd_t, updg_t, grad_t, topk_t, sort_t, step2_t = [], [], [], [], [], []
  for r in range(r2):
    step2_t.append(run.steps("upd", k2))
    upd_t.append(run.update("upd"))
    step2_t.append(run.steps("upd", k2))
    gt, g = run.grads()
    grad_t.append(gt)
    updg_t.append(run.update_given_grads(g))
    p = run.state["upd"][0]
    if r % 2:
      topk_t.append(timed(fns["topk_reselect"], p, counts_arr))
      sort_t.append(timed(fns["argsort_reselect"], p, counts_arr))
    else:
      sort_t.append(timed(fns["argsort_reselect"], p, counts_arr))
      topk_t.append(timed(fns["topk_reselect"], p, counts_arr))
  s2 = median(step2_t + masked_t)  # every masked-step sample of parts 1 and 2
  marks.append(time.perf_counter())

  # ---- Part 3: DST loop. Per dT-cycle: our separate jitted update and the jaxpruner update step,
  # then the non-update steps of the plain / ours / cond variants in interleaved chunks.
  plain3, ours_s, cond_s, ours_u, cond_u = [], [], [], [], []
  variants = ["masked", "ours", "cond"]
  for r in range(r3):
    if r % 2:
      cond_u.append(run.cond_update_step())
      ours_u.append(run.update("ours"))
    else:
      ours_u.append(run.update("ours"))
      cond_u.append(run.cond_update_step())
    for c in range(c3):
      order = variants[c % 3:] + variants[:c % 3]
      for name in order:
        t = run.steps(name, k3)
        {"masked": plain3, "ours": ours_s, "cond": cond_s}[name].append(t)
  marks.append(time.perf_counter())
  p3 = median(plain3)
  # Chunks of one round ran back to back: pair them (median of paired ratios is the figure).
  pair3 = [o / p for o, p in zip(ours_s, plain3)]
  pair3c = [c / p for c, p in zip(cond_s, plain3)]
  # Per training step over a cycle of DT steps: ours = DT steps + 1 separate update; the jaxpruner
  # pattern = 1 update step (which also trains) + DT - 1 plain steps.
  ours_amort = (median(ours_u) + DT * median(ours_s)) / DT
  cond_amort = (median(cond_u) + (DT - 1) * median(cond_s)) / DT
  ours_amort_ratio = median(pair3) + median(ours_u) / (DT * p3)
  cond_amort_ratio = ((DT - 1) * median(pair3c) + median(cond_u) / p3) / DT

  # ---- Report.
  def ms(t):
    return f"{1e3 * t:.2f}"

  rows = [
      ("1 mask+freeze step / dense step", median(pair1), 1.05,
       (f"masked {ms(m_med)} / dense {ms(d_med)} ms (ratio of medians {m_med / d_med:.3f}, "
        f"paired range {spread(pair1)}, process-CPU-time ratio {cpu_ratio1:.3f})")),
      ("1   ref: keep_sparse+freeze, no masks.apply / dense", median(pair1c), None,
       (f"{ms(c_med)} ms (ratio of medians {c_med / d_med:.3f}, CPU-time ratio "
        f"{median([c / d for c, d in zip(cpu1['chain'], cpu1['dense'])]):.3f})")),
      ("2 mask update (dense grad + drop/grow + regrow + reset) / step", median(upd_t) / s2, 10.0,
       f"update {ms(median(upd_t))} / step {ms(s2)} ms"),
      ("2   same, grads given (drop/grow + regrow + reset only)", median(updg_t) / s2, 10.0,
       f"update {ms(median(updg_t))} ms (the dense grad alone {ms(median(grad_t))} ms)"),
      ("2 top-k re-selection (bisection) / step", median(topk_t) / s2, 10.0,
       f"top-k {ms(median(topk_t))} ms"),
      ("2   ref: jaxpruner argsort top-k / step", median(sort_t) / s2, None,
       f"argsort {ms(median(sort_t))} ms"),
      ("3 DST non-update step (separate jit) / plain step", median(pair3), 1.1,
       (f"between updates {ms(median(ours_s))} / plain {ms(p3)} ms (ratio of medians "
        f"{median(ours_s) / p3:.3f}, paired range {spread(pair3)})")),
      ("3   amortised incl. 1 update per dT / plain step", ours_amort_ratio, 1.1,
       f"{ms(ours_amort)} ms/step (the update {ms(median(ours_u))} ms)"),
      ("3   ref: jaxpruner lax.cond non-update step / plain", median(pair3c), None,
       f"between updates {ms(median(cond_s))} ms (ratio of medians {median(cond_s) / p3:.3f})"),
      ("3   ref: jaxpruner lax.cond amortised / plain", cond_amort_ratio, None,
       f"{ms(cond_amort)} ms/step (the update step {ms(median(cond_u))} ms)"),
  ]
  w = max(len(r[0]) for r in rows)
  print()
  print(f"{'measurement':<{w}}  {'ratio':>7}  {'target':>7}  {'':4}  absolute (medians)")
  for name, ratio, target, detail in rows:
    tgt = f"<={target:g}" if target is not None else "-"
    verdict = ("PASS" if ratio <= target else "FAIL") if target is not None else "ref"
    print(f"{name:<{w}}  {ratio:7.3f}  {tgt:>7}  {verdict:4}  {detail}")
  print()
  print(f"samples: part 1 {r1} x {k1} steps per variant; part 2 {r2} updates of each kind, "
        f"{len(step2_t)} x {k2} steps; part 3 {r3} cycles x {c3} chunks x {k3} steps per variant.")
  secs = ", ".join(f"part {i + 1} {b - a:.0f} s" for i, (a, b) in enumerate(itertools.pairwise(marks)))
  print(f"time: {secs}; total {time.perf_counter() - t_start:.0f} s. Load avg at end: {loadavg()}")


def loadavg() -> str:
  try:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "?"


def check(run, spec, counts, counts_arr, sparse):
  """Sanity: exact counts, both top-k selections agree, masked weights stay exactly zero."""
  p = run.state["masked"][0]
  sel_ours = jax.device_get(run.f["topk_reselect"](p, counts_arr))
  sel_sort = jax.device_get(run.f["argsort_reselect"](p, counts_arr))
  for path, a, b, c, f in zip(masks.paths(sel_ours), jax.tree.leaves(sel_ours),
                              jax.tree.leaves(sel_sort), jax.tree.leaves(counts),
                              jax.tree.leaves(spec)):
    if f:
      assert int(a.sum()) == c, (path, int(a.sum()), c)
      assert (a == b).all(), f"top-k and argsort selections differ on {path}"
  want = jax.tree.map(lambda m: int(np.sum(m)), jax.device_get(sparse))
  for name in ("masked", "upd", "ours", "cond"):
    p, m = jax.device_get((run.state[name][0], run.state[name][2]))
    assert jax.tree.map(lambda a: int(a.sum()), m) == want, name
    if name in ("masked", "cond"):  # last call was a training step (keep_sparse zeroes dropped w)
      for pl, ml in zip(jax.tree.leaves(p), jax.tree.leaves(m)):
        assert not np.any(pl[~ml] != 0), f"{name}: masked weight not zero"


if __name__ == "__main__":
  main()
