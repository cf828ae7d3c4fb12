"""The core on Flax NNX: nnx.State trees, nnx.Optimizer state and updates, under nnx.jit.

A small NNX CNN (two ``nnx.Conv``, ``nnx.BatchNorm``, an ``nnx.Linear`` head) is trained a few
steps with a sparsity mask (``masks.maskable`` + ``topk``), frozen positions, a drop-and-grow update
and a moment reset on the state ``nnx.Optimizer`` keeps. Wherever it is meaningful the result is
compared with the same computation on the Linen-style plain dict of the same arrays.
"""

import os
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_cl_jax import criteria
from sparse_cl_jax import growth
from sparse_cl_jax import masks
from sparse_cl_jax import sparsity
from sparse_cl_jax import topk
from sparse_cl_jax import transforms

_README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
KERNELS = ["conv1/kernel", "conv2/kernel"]


class CNN(nnx.Module):
  """Two convolutions (BatchNorm after the first) and a linear head."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv1(x)))
    x = nnx.relu(self.conv2(x))
    return self.head(x.mean(axis=(1, 2)))


def _data():
  kx, _ = jax.random.split(jax.random.key(1))
  return jax.random.normal(kx, (16, 6, 6, 1)), jnp.arange(16) % 4


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _copy(tree):
  """A snapshot (``nnx.state`` returns the model's live variables)."""
  return jax.tree.map(jnp.array, tree)


def _pure(tree):
  """The Linen-style plain dict of the same arrays."""
  return nnx.to_pure_dict(tree)


def _as_nnx(plain, like):
  """A plain dict back into ``like``'s nnx.State structure (the leaf orders agree)."""
  return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(plain))


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint32) if x.dtype == np.float32 else x


def _assert_trees_identical(a, b):
  """Same paths, bit-identical leaves."""
  assert masks.paths(a) == masks.paths(b)
  for p, x, y in zip(masks.paths(a), jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=p)


@pytest.fixture(scope="module")
def setup():
  model = CNN(nnx.Rngs(0))
  params = _copy(nnx.state(model, nnx.Param))
  spec = masks.maskable(params)
  counts = sparsity.target_counts(params, 0.7, spec=spec)
  sparse = topk.topk_mask(criteria.random(params, key=jax.random.key(2)), counts, spec=spec)
  rng = np.random.default_rng(3)
  frozen = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) < 0.4), params)
  return {"model": model, "params": params, "spec": spec, "counts": counts, "sparse": sparse,
          "frozen": frozen}


def _tx():
  return optax.chain(transforms.mask_updates(), optax.adamw(1e-2, weight_decay=1e-2),
                     transforms.keep_sparse(), transforms.freeze())


def _train(setup, steps, sparse_of=lambda s: s, frozen_of=lambda f: f):
  """``steps`` nnx.jit steps through nnx.Optimizer; returns (model, optimizer, number of traces)."""
  model = nnx.clone(setup["model"])
  opt = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  x, y = _data()
  traces = []

  @nnx.jit
  def step(model, opt, sparse, frozen, trainable):
    traces.append(1)
    grads = nnx.grad(_loss)(model, x, y)
    opt.update(model, grads, sparse_mask=sparse, frozen=frozen, trainable=trainable)

  trainable = masks.ones(setup["params"])
  for _ in range(steps):
    step(model, opt, sparse_of(setup["sparse"]), frozen_of(setup["frozen"]), trainable)
  return model, opt, len(traces)


# --------------------------------------------------------------------------------------------------
# Paths and maskable leaves.


def test_maskable_recognises_nnx_kernels_and_never_batch_stats(setup):
  model, params = setup["model"], setup["params"]
  plain = _pure(params)
  assert masks.paths(params) == masks.paths(plain)  # 'conv1/kernel', not 'conv1/kernel/value'
  assert "conv1/kernel" in masks.paths(params)
  spec = masks.maskable(params)
  assert jax.tree.structure(spec) == jax.tree.structure(params)  # Param wrappers kept
  assert masks.maskable_paths(spec) == KERNELS == masks.maskable_paths(masks.maskable(plain))
  assert masks.maskable_paths(masks.maskable(nnx.as_pure(params))) == KERNELS
  whole = nnx.state(model)  # BatchStat leaves too
  assert {"bn/mean", "bn/var"} <= set(masks.paths(whole))
  assert masks.maskable_paths(masks.maskable(whole)) == KERNELS
  # Whatever the patterns ask for, running statistics stay unmaskable (the plain dict of the
  # same arrays has no variable types, so the patterns alone decide there).
  everything = masks.maskable(whole, include=(r".*",), exclude=())
  assert set(masks.paths(whole)) - set(masks.maskable_paths(everything)) == {"bn/mean", "bn/var"}
  assert "bn/mean" in masks.maskable_paths(masks.maskable(_pure(whole), include=(r".*",),
                                                         exclude=()))
  heads = masks.maskable(params, include=(r"kernel$",), exclude=())
  assert masks.maskable_paths(heads) == KERNELS + ["head/kernel"]
  norms = masks.maskable(whole, include=(r"^bn/",), exclude=())
  assert masks.maskable_paths(norms) == ["bn/bias", "bn/scale"]
  # Counts over the whole state: only the kernels are sparse; BatchStat leaves stay dense.
  counts = sparsity.target_counts(whole, 0.5)
  sizes = masks.size_per_leaf(whole)
  for p, c, n in zip(masks.paths(whole), jax.tree.leaves(counts), jax.tree.leaves(sizes)):
    assert (c < n) == (p in KERNELS), p


def test_pack_and_unpack_nnx_masks(setup):
  sparse = setup["sparse"]
  packed = masks.pack(sparse)
  assert set(packed) == set(masks.pack(_pure(sparse)))
  back = masks.unpack(packed, setup["params"])
  assert jax.tree.structure(back) == jax.tree.structure(setup["params"])
  _assert_trees_identical(back, sparse)


# --------------------------------------------------------------------------------------------------
# Mask algebra, criteria and growth on nnx.State agree with the plain dict.


def test_core_functions_on_nnx_state_equal_the_plain_dict(setup):
  params, spec = setup["params"], setup["spec"]
  plain = _pure(params)
  key = jax.random.key(4)
  graphdef, _, rest = nnx.split(setup["model"], nnx.Param, ...)
  x, y = _data()

  def nnx_loss(p):
    model = nnx.merge(graphdef, p, rest)
    model.eval()
    return _loss(model, x, y)

  def plain_loss(d):
    return nnx_loss(_as_nnx(d, params))

  def plain_of(a):
    if isinstance(a, growth.DropGrowResult):
      return growth.DropGrowResult(*map(_pure, a))
    return _pure(a) if isinstance(a, nnx.State) else a

  def both(fn, *args, **kwargs):
    """``fn`` on the NNX trees and on their plain dicts; checks structure and bits agree."""
    out = fn(*args, **kwargs)
    ref = fn(*map(plain_of, args), **{k: plain_of(v) for k, v in kwargs.items()})
    assert jax.tree.structure(out) == jax.tree.structure(params)
    _assert_trees_identical(_pure(out), ref)
    return out

  counts = both(sparsity.target_counts, params, 0.7, distribution="erk", spec=spec)
  both(sparsity.densities, params, 0.7, distribution="er")
  scores = both(criteria.magnitude, params)
  both(criteria.random, params, key=key)
  sparse = both(topk.topk_mask, scores, counts, spec=spec)
  both(topk.topk_mask, scores, 300, scope="global", spec=spec)
  for p, m, c, s in zip(masks.paths(sparse), *map(jax.tree.leaves, (sparse, counts, spec))):
    assert int(m.sum()) == (c if s else m.size), p  # exact count per maskable kernel
  grow = criteria.gradient(params, masks=sparse, loss_fn=nnx_loss)
  _assert_trees_identical(_pure(grow), criteria.gradient(plain, masks=_pure(sparse),
                                                         loss_fn=plain_loss))
  snip = criteria.snip(params, masks=sparse, loss_fn=nnx_loss)
  _assert_trees_identical(_pure(snip), criteria.snip(plain, masks=_pure(sparse),
                                                     loss_fn=plain_loss))
  res = growth.drop_and_grow(sparse, scores, grow, 0.3, spec=spec)
  ref = growth.drop_and_grow(_pure(sparse), _pure(scores), _pure(grow), 0.3, spec=_pure(spec))
  for a, b in zip(res[:3], ref[:3]):
    assert jax.tree.structure(a) == jax.tree.structure(params)
    _assert_trees_identical(_pure(a), b)
  assert int(masks.count(res.masks, spec)) == int(masks.count(sparse, spec))
  assert int(masks.count(res.grown)) > 0
  both(growth.apply_topology, params, res, mode="init", init_params=scores)
  both(masks.apply, params, sparse)
  masks.check_like(params, res.masks)
  with pytest.raises(ValueError, match="nnx.Variable-wrapped vs plain"):
    masks.check_like(params, nnx.as_pure(sparse))


# --------------------------------------------------------------------------------------------------
# Transforms through nnx.Optimizer under nnx.jit.


def test_sparse_and_frozen_training_under_nnx_jit(setup):
  p0, sparse, frozen, counts = setup["params"], setup["sparse"], setup["frozen"], setup["counts"]
  model, _, n_traces = _train(setup, 3)
  p1 = nnx.state(model, nnx.Param)
  changed_any = 0
  for path, w0, w1, m, f, c, s in zip(masks.paths(p0), *map(jax.tree.leaves, (
      p0, p1, sparse, frozen, counts, setup["spec"]))):
    w0, w1, m, f = map(np.asarray, (w0, w1, m, f))
    if s:
      assert int(m.sum()) == c < m.size, path  # each maskable kernel keeps exactly its count
    off = ~m & ~f  # frozen wins over keep_sparse (freeze is last)
    assert (w1[off] == 0).all() and not np.signbit(w1[off]).any(), path  # exact +0.0
    np.testing.assert_array_equal(_bits(w1[f]), _bits(w0[f]), err_msg=path)  # bit-identical
    changed_any += int((w1[m & ~f] != w0[m & ~f]).sum())
  assert changed_any > 0.9 * sum(int((np.asarray(m) & ~np.asarray(f)).sum())
                                 for m, f in zip(jax.tree.leaves(sparse), jax.tree.leaves(frozen)))
  assert n_traces == 1
  # BatchNorm running statistics trained (not frozen, not masked: no mask covers them).
  stats = nnx.state(model, nnx.BatchStat)
  assert float(jnp.abs(stats["bn"]["mean"][...]).max()) > 0
  assert masks.paths(stats) == ["bn/mean", "bn/var"]


def test_masks_are_data_and_any_container_works_through_nnx_optimizer(setup):
  """A new mask does not retrace; plain-dict or pure masks give bit-identical weights."""
  model, _, _ = _train(setup, 2)
  for convert in (_pure, nnx.as_pure):
    other, _, n_traces = _train(setup, 2, sparse_of=convert, frozen_of=convert)
    assert n_traces == 1
    _assert_trees_identical(nnx.state(other, nnx.Param), nnx.state(model, nnx.Param))
  # Two different masks, one compiled step.
  model = nnx.clone(setup["model"])
  opt = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  x, y = _data()
  traces = []

  @nnx.jit
  def step(model, opt, sparse, frozen, trainable):
    traces.append(1)
    opt.update(model, nnx.grad(_loss)(model, x, y), sparse_mask=sparse, frozen=frozen,
               trainable=trainable)

  ones = masks.ones(setup["params"])
  step(model, opt, setup["sparse"], setup["frozen"], ones)
  step(model, opt, masks.logical_not(setup["sparse"]), masks.logical_not(setup["frozen"]), ones)
  assert len(traces) == 1
  bad = _pure(setup["sparse"])
  del bad["head"]
  with pytest.raises(ValueError, match="keep_sparse mask 'sparse_mask' .*missing leaves.*head"):
    step(model, opt, bad, setup["frozen"], ones)


def test_nnx_optimizer_update_equals_the_plain_optax_update(setup):
  """nnx.Optimizer.update with plain-dict masks (matched to its nnx.State updates by path) gives
  bit-for-bit the weights and state of the plain optax update on the Linen-style dicts."""
  model = nnx.clone(setup["model"])
  opt = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  x, y = _data()
  grads = nnx.grad(_loss)(model, x, y)
  params = _pure(_copy(nnx.state(model, nnx.Param)))
  kwargs = {"sparse_mask": _pure(setup["sparse"]), "frozen": _pure(setup["frozen"]),
            "trainable": _pure(masks.logical_not(setup["frozen"]))}
  tx = _tx()
  state = tx.init(params)
  for _ in range(2):
    nnx.jit(lambda m, o, g, kw: o.update(m, g, **kw))(model, opt, grads, kwargs)
    updates, state = jax.jit(tx.update)(_pure(grads), state, params, **kwargs)
    params = optax.apply_updates(params, updates)
  _assert_trees_identical(_pure(nnx.state(model, nnx.Param)), params)
  _assert_leaves_identical(jax.tree.leaves(nnx.as_pure(opt.opt_state)), jax.tree.leaves(state))


def test_binarize_ste_in_an_nnx_module():
  """Piggyback: a learnable real-valued mask over a frozen kernel, straight-through gradient."""

  class Piggyback(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(6, 3, rngs=rngs)
      self.mask_real = nnx.Param(jax.random.uniform(rngs.params(), (6, 3)) * 1e-2)

    def __call__(self, x):
      w = self.dense.kernel[...] * transforms.binarize_ste(self.mask_real[...], 5e-3)
      return x @ w + self.dense.bias[...][None, :]

  model = Piggyback(nnx.Rngs(0))
  x, y = jax.random.normal(jax.random.key(5), (8, 6)), jnp.arange(8) % 3
  w, real = model.dense.kernel[...], model.mask_real[...]
  grads = nnx.grad(_loss)(model, x, y)
  binary = (real > 5e-3).astype(jnp.float32)
  g_eff = jax.grad(lambda we: optax.softmax_cross_entropy_with_integer_labels(
      x @ we + model.dense.bias[...][None, :], y).mean())(w * binary)
  np.testing.assert_allclose(grads["mask_real"][...], g_eff * w, rtol=1e-6)
  # Only the real-valued mask trains; the kernel stays bit-identical (freeze on the kernel).
  frozen = masks.map_with_path(lambda p, x: jnp.full(x.shape, p != "mask_real"),
                               nnx.state(model, nnx.Param))
  opt = nnx.Optimizer(model, optax.chain(optax.adam(1e-2), transforms.freeze()), wrt=nnx.Param)
  nnx.jit(lambda m, o, f: o.update(m, nnx.grad(_loss)(m, x, y), frozen=f))(model, opt, frozen)
  np.testing.assert_array_equal(_bits(model.dense.kernel[...]), _bits(w))
  assert not np.array_equal(model.mask_real[...], real)


# --------------------------------------------------------------------------------------------------
# Drop-and-grow and moment reset on the state nnx.Optimizer keeps.


def _moments(opt_state) -> dict[str, np.ndarray]:
  """Every params-shaped float leaf of an optimiser state by its path (brute force)."""
  return {p: np.asarray(x) for p, x in masks.leaves_with_paths(opt_state)
          if np.ndim(x) > 0}


def test_drop_and_grow_and_reset_moments_on_the_nnx_optimizer_state(setup):
  spec = setup["spec"]
  model, opt, _ = _train(setup, 3)
  params = nnx.state(model, nnx.Param)
  sparse = setup["sparse"]
  before = _moments(opt.opt_state)
  assert all(any(p.endswith("/mu/" + k) for p in before) for k in KERNELS)
  # SNFS growth from the optimiser's first moment, read from the nnx.Optimizer state.
  mom = criteria.momentum(params, opt_state=opt.opt_state)
  assert jax.tree.structure(mom) == jax.tree.structure(params)
  for p, m in zip(masks.paths(mom), jax.tree.leaves(mom)):
    mu = [v for k, v in before.items() if k.endswith("/mu/" + p)]
    assert len(mu) == 1, p
    np.testing.assert_array_equal(np.asarray(m), np.abs(mu[0]), err_msg=p)
  res = growth.drop_and_grow(sparse, criteria.magnitude(params), mom, 0.3, spec=spec)
  for p, a, b, s in zip(masks.paths(sparse), *map(jax.tree.leaves, (sparse, res.masks, spec))):
    assert int(a.sum()) == int(b.sum()), p
    assert not s or int((a != b).sum()) > 0, p
  state_before = opt.opt_state

  @nnx.jit
  def regrow(model, opt, res):
    nnx.update(model, growth.apply_topology(nnx.state(model, nnx.Param), res))
    opt.opt_state = growth.reset_moments(opt.tx, opt.opt_state, res.changed)

  regrow(model, opt, res)
  after = _moments(opt.opt_state)
  assert set(after) == set(before)
  changed = dict(masks.leaves_with_paths(res.changed))
  n_zeroed = 0
  for path, x0 in before.items():
    leaf = next(p for p in changed if path.endswith("/" + p))
    c = np.asarray(changed[leaf])
    expected = np.where(c, np.zeros_like(x0), x0)  # brute force
    np.testing.assert_array_equal(_bits(after[path]), _bits(expected), err_msg=path)
    n_zeroed += int(c.sum())
  assert n_zeroed > 0
  # Scalars (Adam's count) untouched, wrappers kept: the state can be assigned back.
  assert jax.tree.structure(opt.opt_state) == jax.tree.structure(state_before)
  assert int(opt.opt_state[1][0].count[...]) == 3
  # Weights: dropped and grown positions are exactly zero.
  for p, w, d, g in zip(masks.paths(res.masks), *map(jax.tree.leaves, (
      nnx.state(model, nnx.Param), res.dropped, res.grown))):
    assert (np.asarray(w)[np.asarray(d) | np.asarray(g)] == 0).all(), p
  # The same reset on the Linen-style optax state of the same arrays, and with a plain-dict mask.
  plain_state = jax.tree.unflatten(jax.tree.structure(opt.tx.init(_pure(params))),
                                   jax.tree.leaves(state_before))
  ref = growth.reset_moments(opt.tx, plain_state, _pure(res.changed))
  _assert_leaves_identical(jax.tree.leaves(ref), jax.tree.leaves(opt.opt_state))
  again = growth.reset_moments(opt.tx, state_before, _pure(res.changed))
  _assert_leaves_identical(jax.tree.leaves(again), jax.tree.leaves(opt.opt_state))


def _assert_leaves_identical(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(_bits(x), _bits(y))


def test_reset_moments_with_optax_masked_inside_nnx_optimizer(setup):
  """``optax.masked(adam, masks.maskable)``: MaskedNode inside OptVariable wrappers is kept."""
  model = nnx.clone(setup["model"])
  tx = optax.chain(optax.masked(optax.adam(1e-2), masks.maskable), transforms.keep_sparse())
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _data()
  nnx.jit(lambda m, o, s: o.update(m, nnx.grad(_loss)(m, x, y), sparse_mask=s))(
      model, opt, setup["sparse"])
  before = _moments(opt.opt_state)
  assert {p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in before} == set(KERNELS)
  changed = masks.logical_not(setup["sparse"])
  new = growth.reset_moments(opt.tx, opt.opt_state, changed)
  assert jax.tree.structure(new) == jax.tree.structure(opt.opt_state)
  by_path = dict(masks.leaves_with_paths(changed))
  for path, x0 in before.items():
    c = np.asarray(by_path[next(p for p in by_path if path.endswith("/" + p))])
    np.testing.assert_array_equal(_moments(new)[path], np.where(c, 0.0, x0), err_msg=path)


# --------------------------------------------------------------------------------------------------
# The README's NNX example.


def _readme_nnx_block() -> str:
  with open(_README) as f:
    text = f.read()
  section = text.split("### With Flax NNX", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def test_readme_nnx_example_runs():
  block = _readme_nnx_block()
  assert "nnx.Optimizer" in block and "reset_moments" in block and "nnx.jit" in block
  scope = {"__name__": "readme_nnx"}
  exec(compile(block, _README, "exec"), scope)  # pylint: disable=exec-used
