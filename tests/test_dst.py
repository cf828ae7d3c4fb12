"""DST for CL (issue 5): exact counts, growth picks, frozen subnetworks, one trace per step kind."""

import functools
import importlib.util
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_cl_jax import experiment
from sparse_cl_jax import growth
from sparse_cl_jax import masks
from sparse_cl_jax import sparsity
from sparse_cl_jax import transforms
from sparse_cl_jax.methods import dst
from sparse_cl_jax.train import state as train_state

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg="runlocal"):
  spec = importlib.util.spec_from_file_location("dst_cl", os.path.join(_REPO, "configs",
                                                                       "dst_cl.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.progress = False
  return c


def _adam_with_mu(params, grads):
  """The trainer's chain (injected Adam + freeze) after one update with ``grads``: mu = 0.1 g."""
  tx = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
                   transforms.freeze(mask_arg="frozen"))
  state = tx.init(params)
  _, state = tx.update(grads, state, params, frozen=masks.zeros(params))
  return state


# --------------------------------------------------------------------------------------------------
# The update function on hand-made trees.

SPEC = {"k": {"kernel": True}, "b": {"bias": False}}


def _hand_case():
  # Flat positions 0..7 of one kernel. Position 4 is a reused frozen weight (owner 2) in the mask;
  # position 2 is owned by task 1 and outside the mask; 0, 1 are the task's own active weights.
  mask = {"k": {"kernel": jnp.array([1, 1, 0, 0, 1, 0, 0, 0], bool)},
          "b": {"bias": jnp.ones(2, bool)}}
  own = {"k": {"kernel": jnp.array([0, 0, 1, 0, 2, 0, 0, 0], jnp.int32)},
         "b": {"bias": jnp.zeros(2, jnp.int32)}}
  params = {"k": {"kernel": jnp.array([0.1, -0.9, 5.0, 0.0, 0.01, 0.0, 0.0, 0.0])},
            "b": {"bias": jnp.ones(2)}}
  m = {"mask": mask, "own": own, "used": mask}
  return m, params


@pytest.mark.parametrize("mode", ["gradient", "momentum"])
def test_gradient_and_momentum_growth_pick_hand_computed_positions(mode):
  m, params = _hand_case()
  # |score| at the growth candidates (free, inactive: 3, 5, 6, 7) is 0.3, 0.8, 0.1, 0.7; the owned
  # position 2 has the largest score (50) and must never be grown.
  g = {"k": {"kernel": jnp.array([9.0, 9.0, 50.0, 0.3, 9.0, -0.8, 0.1, 0.7])},
       "b": {"bias": jnp.ones(2)}}
  kwargs = {"grads": g} if mode == "gradient" else {"opt_state": _adam_with_mu(params, g)}
  if mode == "momentum":  # the scores come from the optimiser state, not from the gradient
    kwargs["grads"] = jax.tree.map(jnp.zeros_like, g)
  update = jax.jit(lambda m, p, f, kw: dst.topology_update(m, p, fraction=f, growth=mode,
                                                           spec=SPEC, **kw))
  # Half of the 2 trainable active weights: drop the smaller |w| (position 0), grow the top one (5).
  new, res = update(m, params, jnp.float32(0.5), kwargs)
  np.testing.assert_array_equal(res.dropped["k"]["kernel"], [1, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(res.grown["k"]["kernel"], [0, 0, 0, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(new["mask"]["k"]["kernel"], [0, 1, 0, 0, 1, 1, 0, 0])
  # All trainable weights: drop 0 and 1 (never the frozen 4, though its |w| is the smallest),
  # grow 5 and 7.
  new, res = update(m, params, jnp.float32(1.0), kwargs)
  np.testing.assert_array_equal(new["mask"]["k"]["kernel"], [0, 0, 0, 0, 1, 1, 0, 1])
  np.testing.assert_array_equal(new["used"]["k"]["kernel"], [1, 1, 0, 0, 1, 1, 0, 1])
  assert bool(new["mask"]["b"]["bias"].all()) and not res.changed["b"]["bias"].any()


def test_tied_growth_is_returned_by_the_compiled_update_and_warned_after_the_task():
  m, params = _hand_case()
  m = {**m, "num_updates": jnp.zeros(2, jnp.int32), "num_regrown": jnp.zeros(2, jnp.int32)}
  state = train_state.TrainState(params=params, batch_stats={}, opt_state=(), aux={},
                                 aux_opt_state=(), method=m, step=jnp.int32(0))
  zero = lambda st, data, t, key, run: jax.tree.map(jnp.zeros_like, st.params)  # noqa: E731
  update = jax.jit(functools.partial(dst.topology_step, mode="gradient", tx=None, spec=SPEC,
                                     drop_frozen=False, regrow="zero", reset_moments=False,
                                     fresh=None, grads_of=zero))
  tied = []
  hook = dst.topology_hook(update, None, jnp.int32(0), schedule=lambda s: jnp.float32(0.5),
                           end=10, key=jax.random.key(0), run={}, tied=tied)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing is reported inside the update
    hook(state, 2)
  # A zero gradient ties every growth candidate of the kernel; the bias takes no part.
  np.testing.assert_array_equal(np.asarray(tied[0]), [False, True])
  with pytest.warns(growth.TiedGrowthWarning, match="k/kernel"):
    growth.report_ties(np.stack([np.asarray(f) for f in tied]), masks.paths(params), "warn")


def test_drop_frozen_option_drops_reused_weights():
  m, params = _hand_case()
  g = {"k": {"kernel": jnp.arange(8.0)}, "b": {"bias": jnp.ones(2)}}
  _, res = dst.topology_update(m, params, fraction=0.34, growth="gradient", spec=SPEC, grads=g,
                               drop_frozen=True)
  # 3 droppable (0, 1, 4): drop 1, the smallest |w| = frozen position 4; grow 7 (largest |g|).
  np.testing.assert_array_equal(res.dropped["k"]["kernel"], [0, 0, 0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(res.grown["k"]["kernel"], [0, 0, 0, 0, 0, 0, 0, 1])


def _random_case(seed):
  rng = np.random.default_rng(seed)
  shapes = {"a": {"kernel": (12, 16)}, "c": {"kernel": (3, 3, 4, 6)}, "a_b": {"bias": (16,)}}
  spec = {"a": {"kernel": True}, "c": {"kernel": True}, "a_b": {"bias": False}}
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  own = jax.tree.map(lambda p, f: jnp.asarray(rng.integers(0, 3, p.shape) * (rng.random(p.shape)
                                                                             < 0.4) * f,
                                              jnp.int32), params, spec)
  mask = jax.tree.map(lambda p, f: jnp.asarray(rng.random(p.shape) < 0.3) | (not f), params, spec)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  return spec, params, {"mask": mask, "own": own, "used": mask}, grads


def test_drop_and_grow_keep_exact_layer_counts_and_unfired_never_reuses():
  spec, params, m0, grads = _random_case(0)
  opt_state = _adam_with_mu(params, grads)
  flags = jax.tree.leaves(spec)
  counts0 = [int(x.sum()) for x in jax.tree.leaves(m0["mask"])]

  @jax.jit
  def updates(m, key):
    # Every growth mode, each chained over three drop fractions (a scan: one compiled body).
    out = {}
    for mode in dst.GROWTH_MODES:
      def body(mm, xs, mode=mode):
        frac, k = xs
        new, res = dst.topology_update(mm, params, fraction=frac, growth=mode, spec=spec, key=k,
                                       grads=grads, opt_state=opt_state)
        return new, (mm, new, res)

      fracs = jnp.array([0.5, 1.0, 0.3], jnp.float32)
      out[mode] = jax.lax.scan(body, m, (fracs, jax.random.split(key, 3)))[1]
    return out

  out = jax.device_get(updates(m0, jax.random.key(0)))
  out = {mode: [jax.tree.map(lambda x, i=i: x[i], steps) for i in range(3)]
         for mode, steps in out.items()}
  for mode, steps in out.items():
    grown = 0
    for old, new, res in steps:
      assert [int(x.sum()) for x in jax.tree.leaves(new["mask"])] == counts0, mode
      for f, a, o, d, g, u in zip(flags, *map(jax.tree.leaves, (old["mask"], old["own"],
                                                                res.dropped, res.grown,
                                                                old["used"]))):
        if not f:
          assert not d.any() and not g.any()
          continue
        assert d.sum() == g.sum()
        assert not (d & ~(a & (o == 0))).any(), "dropped outside the task's own weights"
        assert not (g & (a | (o != 0))).any(), "grew an active or owned position"
        if mode == "unfired":  # used positions only once every unfired candidate is grown
          unfired_left = (~a) & (o == 0) & ~u & ~g
          assert not ((g & u).any() and unfired_left.any()), "unfired skipped unfired positions"
        grown += int(g.sum())
    assert grown > 0, mode


def test_task_mask_bits_round_trip():
  p = {"w": jnp.zeros((3, 5))}
  bits = dst.new_bits(p, 40)
  assert bits["w"].shape == (2, 3, 5) and bits["w"].dtype == jnp.uint32
  rng = np.random.default_rng(1)
  want = {t: {"w": jnp.asarray(rng.random((3, 5)) < 0.5)} for t in (0, 5, 31, 32, 39)}
  for t, mk in want.items():
    bits = jax.jit(dst.set_task_mask)(bits, mk, jnp.int32(t))
  for t, mk in want.items():
    np.testing.assert_array_equal(jax.jit(dst.get_task_mask)(bits, jnp.int32(t))["w"], mk["w"])
  assert not dst.get_task_mask(bits, 7)["w"].any()


def test_growth_schedule_and_config_checks():
  assert dst.growth_schedule("random", (), 3) == ["random"] * 3
  assert dst.growth_schedule("random", "random, gradient,gradient", 3) == [
      "random", "gradient", "gradient"]
  with pytest.raises(ValueError, match="2 entries for 3 tasks"):
    dst.growth_schedule("random", ("random", "gradient"), 3)
  with pytest.raises(ValueError, match="unknown DST growth"):
    dst.growth_schedule("rigl", (), 2)
  c = _config("cifar100_10,adaptive")
  assert tuple(c.dst.growth_per_task) == ("random",) * 5 + ("gradient",) * 5
  # Sec. 5.3 ran the adaptive strategy with ERK at 90% sparsity.
  assert c.model == "resnet18" and c.epochs == 100 and c.dst.init == "erk"
  assert c.dst.sparsity == 0.9
  assert _config("cifar100_10,uniform,adaptive").dst.init == "uniform"
  with pytest.raises(ValueError, match="t_end"):
    c = _config("runlocal")
    c.dst.t_end = 0.0
    dst.make(c, None)


def test_unfired_growth_fills_the_shortfall_at_random():
  # 8 positions, all free. Active: 0..3 (the task's own). Used this task: 0..5, so only 6 and 7
  # were never active. Dropping 4 needs 4 growths: 6 and 7 first, then 2 of the fired 4, 5 (as
  # coded: all unfired, then the shortfall at random), not a drop count shrunk to 2.
  spec = {"k": {"kernel": True}}
  mask = {"k": {"kernel": jnp.array([1, 1, 1, 1, 0, 0, 0, 0], bool)}}
  used = {"k": {"kernel": jnp.array([1, 1, 1, 1, 1, 1, 0, 0], bool)}}
  own = {"k": {"kernel": jnp.zeros(8, jnp.int32)}}
  params = {"k": {"kernel": jnp.array([0.4, -0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0])}}
  m = {"mask": mask, "own": own, "used": used}
  picks = set()
  for seed in range(8):
    new, res = dst.topology_update(m, params, fraction=1.0, growth="unfired", spec=spec,
                                   key=jax.random.key(seed))
    dropped = np.asarray(res.dropped["k"]["kernel"])
    grown = np.asarray(res.grown["k"]["kernel"])
    np.testing.assert_array_equal(dropped, [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(grown, [0, 0, 0, 0, 1, 1, 1, 1])
    assert int(new["mask"]["k"]["kernel"].sum()) == 4
  # With enough unfired positions, only unfired ones are grown, at random.
  for seed in range(8):
    _, res = dst.topology_update(m, params, fraction=0.5, growth="unfired", spec=spec,
                                 key=jax.random.key(seed))
    grown = np.asarray(res.grown["k"]["kernel"])
    np.testing.assert_array_equal(grown, [0, 0, 0, 0, 0, 0, 1, 1])
  # One drop: a random one of the two unfired positions.
  for seed in range(16):
    _, res = dst.topology_update(m, params, fraction=0.25, growth="unfired", spec=spec,
                                 key=jax.random.key(seed))
    grown = np.asarray(res.grown["k"]["kernel"])
    assert grown.sum() == 1 and grown[6:].sum() == 1
    picks.add(int(np.argmax(grown)))
  assert picks == {6, 7}


def test_drop_count_is_floor_of_scheduled_fraction_times_trainable_active():
  """The drop count by hand: ``floor(f(step) * n)`` with ``n`` the task's own active weights and
  ``f`` the cosine from 0.5 to 0.005 over ``T_end`` steps (not the authors' ``ceil(f * n_mask)``).
  """
  # One layer of 30: 10 own active weights (|w| = 0.1 .. 1.0), 4 reused frozen ones in the mask
  # (n_mask = 14), 16 free inactive positions to grow into.
  spec = {"k": {"kernel": True}}
  mask = {"k": {"kernel": jnp.arange(30) < 14}}
  own = {"k": {"kernel": jnp.where((jnp.arange(30) >= 10) & (jnp.arange(30) < 14), 1, 0)}}
  w = np.zeros(30, np.float32)
  w[:10] = np.arange(10, 0, -1) / 10  # position 9 is the smallest
  w[10:14] = 0.01
  params = {"k": {"kernel": jnp.asarray(w)}}
  m = {"mask": mask, "own": own, "used": mask}

  def dropped(sched, step):
    _, res = dst.topology_update(m, params, fraction=sched(step), growth="random", spec=spec,
                                 key=jax.random.key(step))
    d = np.asarray(res.dropped["k"]["kernel"])
    assert int(np.asarray(res.grown["k"]["kernel"]).sum()) == d.sum()
    assert not d[10:].any()  # never a frozen weight
    np.testing.assert_array_equal(np.flatnonzero(d), np.arange(10 - d.sum(), 10))  # smallest |w|
    return int(d.sum())

  kwargs = {"drop_fraction": 0.5, "drop_fraction_final": 0.005}
  end, sched = dst.drop_schedule(100, t_end=1.0, **kwargs)
  assert end == 100
  assert dropped(sched, 0) == 5  # f = 0.5: 5.0
  # f(25) = 0.005 + 0.2475 (1 + cos(pi / 4)) = 0.42751: 4.275 -> 4 (ceil / round: 5 / 4).
  assert dropped(sched, 25) == 4
  # f(50) = 0.005 + 0.2475 = 0.2525: 2.525 -> 2 (round: 3; the authors' ceil(0.2525 * 14) = 4).
  assert dropped(sched, 50) == 2
  # T_end = 75 steps: the cosine ends there. f(50) = 0.005 + 0.2475 (1 + cos(2 pi / 3)) = 0.12875:
  # 1.2875 -> 1; from step 75 on f = 0.005: 0.05 -> 0.
  end, sched = dst.drop_schedule(100, t_end=0.75, **kwargs)
  assert end == 75
  assert dropped(sched, 50) == 1
  assert dropped(sched, 75) == 0


def test_update_end_leaves_training_after_the_last_update():
  assert dst.update_end(100, 1.0) == 100  # as coded: an update may follow the last batch
  assert dst.update_end(100, 0.75) == 75
  assert dst.update_end(4, 0.99) == 3  # t_end < 1 always leaves at least one step after it
  assert dst.update_end(1, 0.5) == 0


def test_paper_presets_use_the_authors_resnet18_and_fwt_names():
  import types  # pylint: disable=g-import-not-at-top
  c = _config("cifar100_10")
  assert c.model_kwargs.stem == "imagenet7x7_nopool" and c.model_kwargs.head_bias is False
  assert c.dst.t_end == 0.75 and _config("cifar100_10,as_coded").dst.t_end == 1.0
  stream = types.SimpleNamespace(incremental="task", num_tasks=10, num_outputs=10)
  model = experiment.build_model(c, stream)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), task=0,
                                               train=False), jax.random.key(0))["params"]
  assert shapes["stem"]["kernel"].shape == (7, 7, 3, 64)
  assert set(shapes["head"]) == {"kernel"}
  # DST's upper triangle is task i's subnetwork and head on task j: no 'gem' FWT is reported.
  assert experiment.upper_triangle("dst") == "subnetwork"
  assert experiment.upper_triangle("packnet") == "gem"


# --------------------------------------------------------------------------------------------------
# End to end through the trainer (per-task BN).


def test_earlier_subnetworks_bit_identical_and_no_retrace():
  dst.clear_shared()  # the jitted phases are shared by the runs of a process: trace them afresh
  dst.TRACE_COUNTS.clear()
  c = _config("runlocal,erk")
  c.norm = "task_batch"
  c.dst.growth_per_task = ("gradient", "momentum", "gradient", "random", "random")
  trainer = experiment.build(c)
  method, model, T = trainer.method, trainer.model, trainer.stream.num_tasks
  x = trainer.stream.normalize(trainer.task_data(0, "test").x[:40])
  spec = trainer.ctx.spec
  counts = sparsity.target_counts(trainer.ctx.params, c.dst.sparsity, distribution="erk",
                                  spec=spec)

  def view(state, j, current):
    fp = method.forward_params(state.params, state.aux, state.method, j, current)
    logits = model.apply({"params": fp, "batch_stats": state.batch_stats}, x, task=j,
                         train=False)
    return np.asarray(logits), [np.asarray(p) for p, f in zip(jax.tree.leaves(fp),
                                                              jax.tree.leaves(spec)) if f]

  state = trainer.init_state()
  first = {}
  n_tasks = 3
  for t in range(n_tasks):
    trainer.begin_task(t)
    state = method.run_task(trainer, state, t)
    trainer.accuracy_row(state, t)
    first[t] = view(state, t, t)
    for j in range(t):  # earlier tasks: logits and effective weights bit-identical
      logits, weights = view(state, j, t)
      np.testing.assert_array_equal(logits, first[j][0])
      for a, b in zip(weights, first[j][1]):
        np.testing.assert_array_equal(a, b)
    # Forward transfer view: a later task j sees task t's subnetwork, head and BN.
    if t + 1 < T:
      np.testing.assert_array_equal(view(state, t + 1, t)[0], first[t][0])
    # Every task's stored mask holds exactly the ERK counts per layer.
    mt = dst.get_task_mask(state.method["bits"], t)
    for mk, k, f in zip(*map(jax.tree.leaves, (mt, counts, spec))):
      if f:
        assert int(mk.sum()) == k
  m = state.method
  assert np.all(np.asarray(m["num_updates"])[:n_tasks] > 0)
  # T_end: updates only at multiples of update_every up to floor(t_end * steps) < steps.
  for t in range(n_tasks):
    steps = -(-int(trainer.task_data(t).n) // c.batch_size) * c.epochs
    end = dst.update_end(steps, c.dst.t_end)
    assert end < steps
    assert int(m["num_updates"][t]) == end // c.dst.update_every
  assert np.all(np.asarray(m["num_regrown"])[:n_tasks] > 0)
  # The topology changes never retraced the train or eval step; each jitted DST function traced
  # once (one update function per growth mode).
  assert trainer.trace_counts["run_steps"] == 1 and trainer.trace_counts["train_step"] == 1
  assert trainer.trace_counts["eval"] == 1
  assert dict(dst.TRACE_COUNTS) == {"begin": 1, "finish": 1, "update_gradient": 1,
                                    "update_momentum": 1}
