"""sparse_cl_jax's core inside one's own Flax/optax training code, as a new user would write it.

No sparse_cl_jax harness: a small Flax CNN (Conv, BatchNorm, LayerNorm, Dense, a ``head``), masks
from path filters, ``keep_sparse`` / ``freeze`` inside ``optax.chain``, ``multi_transform`` (with a
label function), ``masked``, ``inject_hyperparams`` and ``MultiSteps``; RigL drop-and-grow by the
dense gradient with a moment reset; an orbax round-trip of masks and ownership; a masked step under
``jax.vmap`` over seeds; a traced ERK sparsity schedule.

PRNG keys are ``impl="rbg"``: the same code, several times faster to compile on XLA:CPU than
threefry, which keeps this module short.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import traverse_util

from sparse_cl_jax import criteria, growth, masks, schedules, sparsity, topk, transforms


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(4, (3, 3))(x)))
    x = nn.relu(nn.LayerNorm()(nn.Conv(8, (3, 3), strides=2)(x))).mean(axis=(1, 2))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3, name="head")(x)


MODEL = CNN()
X = jnp.asarray(np.random.default_rng(1).normal(size=(32, 8, 8, 1)), jnp.float32)
Y = jnp.arange(32) % 3


def key(seed):
  return jax.random.key(seed, impl="rbg")


def plain_loss(params, stats):
  """The loss of the params as given (no mask inside): what gradient growth differentiates."""
  logits, upd = MODEL.apply({"params": params, "batch_stats": stats}, X, train=True,
                            mutable=["batch_stats"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean(), upd["batch_stats"]


def train_step(tx, params, stats, opt_state, sparse, frozen):
  """The user's own step: forward at the masked params, the transforms keep masks and freezes."""
  grads, stats = jax.grad(lambda p: plain_loss(masks.apply(p, sparse), stats),
                          has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params, sparse_mask=sparse, frozen=frozen)
  return optax.apply_updates(params, updates), stats, opt_state


def _label_fn(params):
  return traverse_util.path_aware_map(lambda path, _: "decay" if path[-1] == "kernel" else "plain",
                                      params)


def _adamw():
  return optax.adamw(1e-2, weight_decay=1e-2)


WRAPPERS = {
    "chain": lambda spec: optax.chain(_adamw(), transforms.keep_sparse(), transforms.freeze()),
    # The transforms inside one group, optax's default mask_compatible_extra_args=False.
    "multi_transform": lambda spec: optax.multi_transform(
        {"decay": optax.chain(_adamw(), transforms.keep_sparse(), transforms.freeze()),
         "plain": optax.chain(optax.adam(1e-2), transforms.freeze())}, _label_fn),
    "masked": lambda spec: optax.chain(
        _adamw(), optax.masked(optax.chain(transforms.keep_sparse(), transforms.freeze()), spec)),
    "inject_hyperparams": lambda spec: optax.chain(
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=1e-2),
        transforms.keep_sparse(), transforms.freeze()),
    "multi_steps": lambda spec: optax.MultiSteps(
        optax.chain(_adamw(), transforms.keep_sparse(), transforms.freeze()), every_k_schedule=2),
}


@pytest.fixture(scope="module")
def setup():
  # Shapes first (no compute): path filters, ERK counts as Python ints.
  abstract = jax.eval_shape(lambda: MODEL.init(key(0), X[:1], train=False))
  spec = masks.maskable(abstract["params"])  # path filters: kernels outside the head
  counts = sparsity.target_counts(abstract["params"], 0.8, distribution="erk", spec=spec)

  @jax.jit
  def init(k):  # params, BN statistics and a random ERK mask for one seed (the seed is data)
    variables = MODEL.init(k, X[:1], train=False)
    params = variables["params"]
    sparse = topk.topk_mask(criteria.random(params, key=jax.random.fold_in(k, 1)), counts,
                            spec=spec)
    return params, variables["batch_stats"], sparse

  @jax.jit
  def ownership(sparse):  # task 1 owns every other active maskable weight; task 2 trains now
    every_other = jax.tree.map(lambda m: jnp.arange(m.size).reshape(m.shape) % 2 == 0, sparse)
    owned = jax.tree.map(lambda m, e, f: m & e & f, sparse, every_other, spec)
    own = masks.assign(masks.new_ownership(sparse), owned, 1)
    return own, masks.logical_not(masks.trainable(own, 2))

  params, stats, sparse = init(key(0))
  own, frozen = ownership(sparse)
  steps = {}

  def step_for(name):  # one compiled step per wrapper, shared by the tests
    if name not in steps:
      tx, traces = WRAPPERS[name](spec), []

      def step(*args):
        traces.append(1)
        return train_step(tx, *args)

      steps[name] = (tx, jax.jit(step), traces)
    return steps[name]

  return {"params": params, "stats": stats, "spec": spec, "counts": counts, "sparse": sparse,
          "own": own, "frozen": frozen, "init": init, "step_for": step_for}


def test_path_filter_masks_are_exact(setup):
  spec, sparse, counts = setup["spec"], setup["sparse"], setup["counts"]
  assert masks.maskable_paths(spec) == ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"]
  n = sum(x.size for x, f in zip(jax.tree.leaves(setup["params"]), jax.tree.leaves(spec)) if f)
  assert int(masks.count(sparse, spec)) == sparsity.kept_total(0.8, n)
  for path, m, c, f in zip(masks.paths(sparse), *map(jax.tree.leaves, (sparse, counts, spec))):
    assert int(m.sum()) == c and (f or bool(m.all())), path  # BN, LN, biases, head: dense


def _check_sparse_and_frozen(p0, p1, sparse, frozen):
  moved = False
  for a, b, m, f in zip(*map(jax.tree.leaves, (p0, p1, sparse, frozen))):
    a, b, m, f = map(np.asarray, (a, b, m, f))
    np.testing.assert_array_equal(b.view(np.uint32)[f], a.view(np.uint32)[f])  # bit-identical
    assert (b.view(np.uint32)[~m & ~f] == 0).all()  # exactly +0.0
    moved |= bool((b[m & ~f] != a[m & ~f]).any())
  assert moved


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_transforms_inside_optax_wrappers(setup, name):
  s = setup
  tx, step, traces = s["step_for"](name)
  params, stats, opt_state = s["params"], s["stats"], tx.init(s["params"])
  for i in range(4):  # MultiSteps: two real updates
    if name == "inject_hyperparams" and i == 2:  # a new learning rate is data too
      opt_state[0].hyperparams["learning_rate"] = jnp.asarray(5e-3, jnp.float32)
    params, stats, opt_state = step(params, stats, opt_state, s["sparse"], s["frozen"])
  _check_sparse_and_frozen(s["params"], params, s["sparse"], s["frozen"])
  assert not np.allclose(stats["BatchNorm_0"]["mean"], s["stats"]["BatchNorm_0"]["mean"])
  # A new mask (the next task's) is data as well: same compiled step.
  step(params, stats, opt_state, masks.logical_not(s["sparse"]), masks.zeros(params))
  assert len(traces) == 1
  # Moments of changed positions reset, in whatever state this wrapper keeps.
  changed = jax.tree.map(lambda m: jnp.zeros(m.shape, bool), s["sparse"])
  changed["Conv_1"]["kernel"] = jnp.ones((3, 3, 4, 8), bool)
  new = jax.jit(lambda st, c: growth.reset_moments(tx, st, c))(opt_state, changed)
  reset = 0
  for old_leaf, new_leaf in zip(jax.tree.leaves(opt_state), jax.tree.leaves(new)):
    if np.shape(old_leaf) == (3, 3, 4, 8):
      reset += 1
      assert not np.asarray(new_leaf).any()
    else:
      np.testing.assert_array_equal(new_leaf, old_leaf)
  assert reset >= 2  # Adam's mu and nu at least


def test_rigl_growth_by_dense_gradient_with_moment_reset(setup):
  s = setup
  spec, own = s["spec"], s["own"]
  tx, step, traces = s["step_for"]("multi_transform")
  params, stats, opt_state, sparse = s["params"], s["stats"], tx.init(s["params"]), s["sparse"]
  for _ in range(3):
    params, stats, opt_state = step(params, stats, opt_state, sparse, s["frozen"])
  loss = lambda p: plain_loss(p, stats)[0]

  # The pattern that used to grow the first inactive positions now says so.
  blocked = jax.jit(jax.grad(lambda p: loss(masks.apply(p, sparse))))(params)
  with pytest.warns(growth.TiedGrowthWarning, match="Conv_0/kernel"):
    growth.drop_and_grow(sparse, criteria.magnitude(params),
                         criteria.gradient(params, grads=blocked), 0.3, spec=spec)

  @jax.jit
  def rigl(params, sparse, fraction):  # the criterion differentiates at the masked weights
    grow = criteria.gradient(params, masks=sparse, loss_fn=loss)
    return growth.drop_and_grow(sparse, criteria.magnitude(params), grow, fraction, spec=spec,
                                drop_candidates=masks.trainable(own, 2),
                                grow_candidates=masks.free(own))

  with warnings.catch_warnings():
    warnings.simplefilter("error", growth.TiedGrowthWarning)
    res = rigl(params, sparse, 0.3)
    jax.effects_barrier()
  dense = jax.jit(jax.grad(loss))(masks.apply(params, sparse))  # the dense gradient, written out
  leaves = [jax.tree.leaves(t) for t in (sparse, dense, res.grown, res.dropped, own)]
  for path, f, *arrays in zip(masks.paths(params), jax.tree.leaves(spec), *leaves):
    m, g, gr, dr, o = map(np.asarray, arrays)
    g = np.abs(g)
    if not f:
      assert not gr.any() and not dr.any()
      continue
    assert gr.sum() == dr.sum() > 0, path
    cand = ~m & (o == 0) & ~gr
    assert g[gr].min() > g[cand].max(), path  # the top-|grad| free inactive positions
    assert not (dr & (o != 0)).any(), path  # never drops task 1's weights
  assert jax.tree.map(lambda x: int(x.sum()), res.masks) == s["counts"]

  params = growth.apply_topology(params, res)
  opt_state = jax.jit(lambda st, c: growth.reset_moments(tx, st, c))(opt_state, res.changed)
  adam = opt_state.inner_states["decay"].inner_state[0][0]  # the kernels' Adam (adamw's first)
  is_node = lambda x: isinstance(x, optax.MaskedNode)
  for moments in (adam.mu, adam.nu):
    checked = 0
    for c, mom in zip(jax.tree.leaves(res.changed), jax.tree.leaves(moments, is_leaf=is_node)):
      if not is_node(mom):  # the "plain" group's leaves keep no state here
        assert not np.asarray(mom)[np.asarray(c)].any()
        checked += 1
    assert checked == 4  # the four kernels, head included
  before = params
  params, stats, opt_state = step(params, stats, opt_state, res.masks, s["frozen"])
  _check_sparse_and_frozen(before, params, res.masks, s["frozen"])
  task1 = np.asarray(own["Conv_1"]["kernel"]) == 1  # the very same bits as at the start
  np.testing.assert_array_equal(np.asarray(params["Conv_1"]["kernel"])[task1],
                                np.asarray(s["params"]["Conv_1"]["kernel"])[task1])
  assert len(traces) == 1


def test_orbax_round_trip_of_masks_and_ownership(setup, tmp_path):
  tree = {"sparse": setup["sparse"], "own": setup["own"]}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "masks", tree)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "masks", jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and a.dtype in (jnp.bool_, jnp.int32)
    np.testing.assert_array_equal(a, b)
  # The restored ownership gives the same views; the restored masks drive the same step.
  frozen = masks.logical_not(masks.trainable(restored["own"], 2))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(setup["frozen"])):
    np.testing.assert_array_equal(a, b)
  tx, step, _ = setup["step_for"]("chain")
  args = (setup["params"], setup["stats"], tx.init(setup["params"]))
  a = step(*args, setup["sparse"], setup["frozen"])[0]
  b = step(*args, restored["sparse"], frozen)[0]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_vmapped_masked_step_over_seeds(setup):
  counts, init = setup["counts"], setup["init"]
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), transforms.keep_sparse(), transforms.freeze())

  def run(params, stats, sparse):  # one masked step of one seed's model
    frozen = masks.zeros(params)
    params, _, _ = train_step(tx, params, stats, tx.init(params), sparse, frozen)
    return params

  seeds = [init(key(s)) for s in (5, 6, 7)]  # per-seed params, BN statistics, ERK masks
  params, stats, sparse = jax.tree.map(lambda *xs: jnp.stack(xs), *seeds)
  out = jax.jit(jax.vmap(run))(params, stats, sparse)
  one = jax.jit(run)(*seeds[1])
  for i, (_, _, sparse_i) in enumerate(seeds):
    assert jax.tree.map(lambda m: int(m.sum()), sparse_i) == counts
    for p, m in zip(jax.tree.leaves(out), jax.tree.leaves(sparse_i)):
      assert (np.asarray(p[i]).view(np.uint32)[~np.asarray(m)] == 0).all()
  assert not np.array_equal(seeds[0][2]["Conv_1"]["kernel"], seeds[1][2]["Conv_1"]["kernel"])
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(out)):
    np.testing.assert_allclose(a, b[1], rtol=1e-5, atol=1e-6)


def test_traced_erk_schedule_hits_the_host_counts(setup):
  params, spec = setup["params"], setup["spec"]
  schedule = schedules.cubic(0.9, begin_step=0, end_step=8, frequency=2)
  traces = []

  @jax.jit
  def prune(params, step):  # gradual magnitude pruning with a traced sparsity
    traces.append(1)
    counts = sparsity.target_counts(params, schedule(step), distribution="erk", spec=spec)
    return topk.topk_mask(criteria.magnitude(params), counts, spec=spec)

  for step in range(0, 11, 2):
    mask = prune(params, step)
    host = sparsity.target_counts(params, float(schedule(step)), distribution="erk", spec=spec)
    assert jax.tree.map(lambda m: int(m.sum()), mask) == host, step
  assert host == sparsity.target_counts(params, 0.9, distribution="erk", spec=spec)
  assert len(traces) == 1


def test_bad_values_are_refused_with_the_argument_named(setup):
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
    sparsity.uniform_counts(setup["params"], 1.5, setup["spec"])
  with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
    growth.drop_and_grow(setup["sparse"], setup["params"], setup["params"], 1.5,
                         spec=setup["spec"])
