"""Tests for sparse_cl_jax.models: shapes, parameter layout, traced task ids, per-task BN."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sparse_cl_jax import models

# Threefry-based initialisers compile slowly on CPU; the RBG generator keeps the suite fast.
_KEY = jax.random.key(0, impl='rbg')

# name -> (create kwargs, input shape, top-level param names, head input size D).
_BLOCKS18 = {f'block_{i}' for i in range(8)}
_CASES = {
    'mlp': ({}, (2, 8, 8, 1), {'dense_0', 'dense_1', 'head'}, 256),
    'small_convnet': ({}, (2, 8, 8, 1), {'conv_0', 'conv_1', 'dense_0', 'head'}, 256),
    'clnp_convnet': ({}, (2, 32, 32, 3),
                     {'conv_0', 'conv_1', 'conv_2', 'conv_3', 'dense_0', 'head'}, 512),
    'clnp_wide_fcn': ({'width_multiplier': 0.125, 'num_heads': 1}, (2, 32, 32, 3),
                      {f'conv_{i}' for i in range(5)} | {f'norm_{i}' for i in range(5)} | {'head'},
                      9 * 256),
    'resnet18': ({'width_multiplier': 0.25}, (2, 32, 32, 3),
                 _BLOCKS18 | {'stem', 'norm_stem', 'head'}, 128),
    'preact_resnet18': ({'width_multiplier': 0.25}, (2, 32, 32, 3),
                        _BLOCKS18 | {'stem', 'head'}, 128),
    'resnet20': ({}, (2, 32, 32, 3),
                 {f'block_{i}' for i in range(9)} | {'stem', 'norm_stem', 'head'}, 64),
    'resnet56': ({}, (1, 32, 32, 3),
                 {f'block_{i}' for i in range(27)} | {'stem', 'norm_stem', 'head'}, 64),
    'vgg16_bn': ({'width_multiplier': 0.125}, (1, 32, 32, 3),
                 {f'conv_{i}' for i in range(13)} | {f'norm_{i}' for i in range(13)} | {'head'},
                 64),
}
_NUM_CLASSES = 5


def _create(name, **kwargs):
  kw, *_ = _CASES[name]
  return models.create(name, **{'num_heads': 3, 'num_classes': _NUM_CLASSES, **kw, **kwargs})


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _abstract_variables(model, shape):
  return jax.eval_shape(
      lambda k: model.init(k, jnp.zeros(shape, jnp.float32), task=0, train=False), _KEY)


def _abstract_params(model, shape):
  return _abstract_variables(model, shape)['params']


def _fake_variables(model, shape, seed=0):
  """Variables of the right structure filled from NumPy (compiling a model's init is slow on CPU).

  ``models.init`` itself is run on small models in ``test_create_and_init_api``; here the
  structure comes from the same ``model.init``, traced abstractly.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1] in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif len(leaf.shape) == 1 or path[-1] in ('bias', 'mean'):
      value = rng.normal(0.0, 0.1, leaf.shape)
    else:  # Kernels: He-normal over the fan-in (a head kernel [H, D, C] has fan-in D).
      fan_in = leaf.shape[1] if path[0] == 'params' and path[1] == 'head' else np.prod(
          leaf.shape[:-1])
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(
      lambda p, leaf: fill(tuple(k.key for k in p), leaf), _abstract_variables(model, shape))


def test_registry_covers_the_spec():
  assert set(models.MODEL_NAMES) == set(_CASES)


@pytest.mark.parametrize('name', list(_CASES))
def test_model_apply_traced_task(name):
  _, shape, top, d = _CASES[name]
  model = _create(name)
  num_heads = model.num_heads
  variables = _fake_variables(model, shape)
  params = variables['params']
  assert set(variables) <= {'params', 'batch_stats'}
  assert set(params) == top
  assert params['head']['kernel'].shape == (num_heads, d, _NUM_CLASSES)
  assert params['head']['bias'].shape == (num_heads, _NUM_CLASSES)

  traces = []

  @jax.jit
  def forward(v, x, task):
    traces.append(1)
    return model.apply(v, x, task=task, train=False, mutable=['intermediates'])

  x = _normal(1, shape)
  for task in range(3):
    logits, state = forward(variables, x, jnp.int32(task))
    assert logits.shape == (shape[0], _NUM_CLASSES)
    assert bool(jnp.all(jnp.isfinite(logits)))
  assert len(traces) == 1  # One compile for all task ids.

  # Sown post-ReLU activations, one per hidden layer, named by the producing module.
  acts = models.hidden_activations(state)
  names = models.hidden_layer_names(model, shape)
  assert set(acts) == set(names) and len(names) == len(acts) > 0
  flat_params = traverse_util.flatten_dict(params, sep='/')
  for path, a in acts.items():
    assert bool(jnp.all(a >= 0)), path
    assert a.shape[-1] == flat_params[f'{path}/kernel'].shape[-1], path


def test_param_layout_details():
  p18 = _abstract_params(models.create('resnet18', num_heads=2, num_classes=10), (1, 32, 32, 3))
  assert set(p18['block_0']) == {'conv_0', 'norm_0', 'conv_1', 'norm_1'}
  assert set(p18['block_2']) == {'conv_0', 'norm_0', 'conv_1', 'norm_1', 'shortcut',
                                 'norm_shortcut'}
  assert p18['block_2']['shortcut']['kernel'].shape == (1, 1, 64, 128)
  assert 'bias' not in p18['stem'] and 'bias' not in p18['block_0']['conv_0']
  pre = _abstract_params(models.create('preact_resnet18', num_heads=2, num_classes=10),
                         (1, 32, 32, 3))
  assert set(pre['block_2']) == {'conv_0', 'norm_0', 'conv_1', 'norm_1', 'shortcut'}
  assert pre['block_2']['norm_0']['scale'].shape == (64,)  # pre-activation: norm of the input.
  vgg = _abstract_params(models.create('vgg16_bn', num_heads=2, num_classes=5, fc_layers=True),
                         (1, 32, 32, 3))
  assert {'dense_0', 'dense_1'} <= set(vgg)
  assert vgg['dense_0']['kernel'].shape == (512, 4096)
  assert vgg['head']['kernel'].shape == (2, 4096, 5)
  clnp = _abstract_params(models.create('clnp_convnet', num_heads=6, num_classes=10),
                          (1, 32, 32, 3))
  assert clnp['dense_0']['kernel'].shape == (8 * 8 * 64, 512)  # Table 2: two 3x3/2 pad-1 pools.


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_parameter_counts_match_references():
  def count(name, **kw):
    return _count(_abstract_params(models.create(name, num_heads=1, num_classes=10, **kw),
                                   (1, 32, 32, 3)))

  assert 0.26e6 < count('resnet20') < 0.28e6  # 0.27M (He et al. 2016).
  assert 0.84e6 < count('resnet56') < 0.86e6  # 0.85M.
  assert 11.1e6 < count('resnet18') < 11.2e6  # 11.17M (CIFAR ResNet-18).
  assert 14.7e6 < count('vgg16_bn') < 14.8e6


def test_clnp_wide_fcn_follows_table3():
  model = models.create('clnp_wide_fcn', num_heads=1, num_classes=10)
  shape = (1, 32, 32, 3)
  params = _abstract_params(model, shape)

  def f(k):
    v = model.init(k, jnp.zeros(shape), task=0, train=False)
    return model.apply(v, jnp.zeros(shape), task=0, train=False, mutable=['intermediates'])

  logits, state = jax.eval_shape(f, _KEY)
  acts = models.hidden_activations(state)
  assert logits.shape == (1, 10)
  assert [acts[f'conv_{i}'].shape[1:] for i in range(5)] == [
      (32, 32, 128), (15, 15, 256), (13, 13, 512), (7, 7, 1024), (5, 5, 2048)]
  assert params['head']['kernel'].shape == (1, 9 * 2048, 10)
  assert 'bias' not in params['conv_0']  # Followed by BatchNorm.


def test_hidden_layer_names_forward_order():
  names = models.hidden_layer_names(models.create('resnet56', num_heads=1, num_classes=10),
                                    (1, 32, 32, 3))
  assert names[:3] == ('stem', 'block_0/conv_0', 'block_0/conv_1')
  assert names.index('block_2/conv_0') < names.index('block_10/conv_0')
  assert len(names) == 1 + 2 * 27
  assert models.hidden_layer_names(models.create('mlp', num_heads=1, num_classes=2),
                                   (1, 4)) == ('dense_0', 'dense_1')


def test_head_selection_by_traced_task():
  model = models.create('mlp', num_heads=3, num_classes=4, hidden=(6,))
  variables = models.init(model, _KEY, (2, 5))
  k1 = jnp.arange(6 * 4, dtype=jnp.float32).reshape(6, 4) / 10.0
  kernel = jnp.zeros((3, 6, 4)).at[1].set(k1)
  bias = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  params = dict(variables['params'], head={'kernel': kernel, 'bias': bias})
  x = _normal(2, (2, 5))

  @jax.jit
  def forward(p, task):
    return model.apply({'params': p}, x, task=task, mutable=['intermediates'])

  logits1, state = forward(params, jnp.int32(1))
  feats = models.hidden_activations(state)['dense_0']
  np.testing.assert_allclose(logits1, feats @ k1 + bias[1][None, :], rtol=1e-6, atol=1e-6)
  for t in (0, 2):
    logits, _ = forward(params, jnp.int32(t))
    np.testing.assert_array_equal(logits, jnp.broadcast_to(bias[t], (2, 4)))


def test_single_head_ignores_task():
  model = models.create('small_convnet', num_heads=1, num_classes=3)
  variables = _fake_variables(model, (2, 8, 8, 1))
  assert variables['params']['head']['kernel'].shape == (1, 256, 3)
  x = _normal(3, (2, 8, 8, 1))
  f = jax.jit(lambda t: model.apply(variables, x, task=t))
  np.testing.assert_array_equal(f(jnp.int32(0)), f(jnp.int32(2)))


def _randomise(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32),
                      tree)


def test_task_batch_norm_module():
  bn = models.TaskBatchNorm(num_tasks=3)
  x = _normal(4, (6, 2, 2, 4)) * 3.0 + 1.0
  variables = bn.init(_KEY, x, task=0, train=True)
  # Nothing is updated while initialising, even in train mode.
  np.testing.assert_array_equal(variables['batch_stats']['mean'], jnp.zeros((3, 4)))
  np.testing.assert_array_equal(variables['batch_stats']['var'], jnp.ones((3, 4)))
  variables = _randomise(variables, 5)

  @jax.jit
  def train(v, task):
    return bn.apply(v, x, task=task, train=True, mutable=['batch_stats'])

  y, new = train(variables, jnp.int32(2))
  old, upd = variables['batch_stats'], new['batch_stats']
  for k in ('mean', 'var'):
    np.testing.assert_array_equal(upd[k][:2], old[k][:2])  # Bit-identical untouched rows.
  bmean = jnp.mean(x, axis=(0, 1, 2), keepdims=True)
  bvar = jnp.var(x, axis=(0, 1, 2), keepdims=True)
  np.testing.assert_allclose(upd['mean'][2], 0.9 * old['mean'][2] + 0.1 * bmean.ravel(),
                             rtol=1e-5)
  np.testing.assert_allclose(upd['var'][2], 0.9 * old['var'][2] + 0.1 * bvar.ravel(), rtol=1e-5)
  p = jax.tree.map(lambda a: a.reshape(3, 1, 1, 1, 4), variables['params'])
  expected = (x - bmean) / jnp.sqrt(bvar + 1e-5) * p['scale'][2] + p['bias'][2]
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)

  evaluate = jax.jit(lambda v, t: bn.apply(v, x, task=t, train=False))
  for t in range(3):
    s = jax.tree.map(lambda a: a.reshape(3, 1, 1, 1, 4), variables['batch_stats'])
    expected = (x - s['mean'][t]) / jnp.sqrt(s['var'][t] + 1e-5) * p['scale'][t] + p['bias'][t]
    np.testing.assert_allclose(evaluate(variables, jnp.int32(t)), expected, rtol=1e-4, atol=1e-5)


def test_task_batch_norm_rows_independent_in_model():
  chex.clear_trace_counter()
  model = models.create('small_convnet', num_heads=3, num_classes=2, norm='task_batch')
  variables = _fake_variables(model, (4, 8, 8, 1), seed=6)
  assert variables['params']['norm_0']['scale'].shape == (3, 32)
  assert variables['batch_stats']['norm_1']['mean'].shape == (3, 64)
  assert 'bias' not in variables['params']['conv_0']
  x = _normal(7, (4, 8, 8, 1))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(v, task):
    def loss(p):
      logits, state = model.apply({'params': p, 'batch_stats': v['batch_stats']}, x, task=task,
                                  train=True, mutable=['batch_stats'])
      return jnp.sum(logits ** 2), state
    return jax.grad(loss, has_aux=True)(v['params'])

  for task in (2, 0):
    grads, state = step(variables, jnp.int32(task))
    others = [t for t in range(3) if t != task]
    for path, new in traverse_util.flatten_dict(state['batch_stats']).items():
      old = traverse_util.flatten_dict(variables['batch_stats'])[path]
      np.testing.assert_array_equal(np.asarray(new)[others], np.asarray(old)[others])
      assert not np.array_equal(new[task], old[task])
    for name in ('norm_0', 'norm_1'):
      for leaf in ('scale', 'bias'):
        np.testing.assert_array_equal(np.asarray(grads[name][leaf])[others], 0.0)
    np.testing.assert_array_equal(np.asarray(grads['head']['kernel'])[others], 0.0)


def test_task_batch_norm_needs_rows():
  model = models.create('mlp', num_heads=1, num_classes=2, norm='task_batch')
  with pytest.raises(ValueError, match='num_tasks'):
    models.init(model, _KEY, (2, 3))
  model = models.create('mlp', num_heads=1, num_classes=2, norm='task_batch', num_tasks=4)
  variables = models.init(model, _KEY, (2, 3))
  assert variables['batch_stats']['norm_0']['mean'].shape == (4, 256)
  with pytest.raises(ValueError, match='Unknown norm'):
    models.init(models.create('mlp', num_heads=1, num_classes=2, norm='layer'), _KEY, (2, 3))


def test_batch_stats_only_uses_batch_statistics_at_eval():
  model = models.create('mlp', num_heads=2, num_classes=3, hidden=(8,), norm='batch_stats_only')
  variables = models.init(model, _KEY, (4, 5))
  assert set(variables) == {'params'}
  assert set(variables['params']) == {'dense_0', 'head'}
  assert 'bias' not in variables['params']['dense_0']
  x = _normal(8, (4, 5)) * 2.0 + 3.0
  f = jax.jit(lambda v, x: model.apply(v, x, task=1, train=False, mutable=['intermediates']))
  logits, state = f(variables, x)
  train_logits = model.apply(variables, x, task=1, train=True)
  np.testing.assert_allclose(logits, train_logits, rtol=1e-5, atol=1e-6)
  # Pre-ReLU values are batch-normalised: reproduce them from the batch statistics.
  h = x @ variables['params']['dense_0']['kernel']
  expected = jax.nn.relu((h - h.mean(0, keepdims=True)) / jnp.sqrt(h.var(0, keepdims=True) + 1e-5))
  np.testing.assert_allclose(models.hidden_activations(state)['dense_0'], expected, rtol=1e-4,
                             atol=1e-5)
  # An example's output depends on its batch.
  alone, _ = f(variables, jnp.concatenate([x[:1], x[:1] * 0.5], axis=0))
  assert not np.allclose(alone[0], logits[0])

  norm = models.BatchStatsNorm()
  y = norm.apply({}, _normal(9, (8, 3, 3, 4)) * 5.0 + 2.0)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1.0, rtol=1e-3)


_NORM_MODELS = ('mlp', 'small_convnet', 'clnp_wide_fcn', 'resnet18', 'preact_resnet18',
                'vgg16_bn')


@pytest.mark.parametrize('norm', models.NORMS)
def test_every_norm_traces_without_rank_promotion(norm):
  # Eval mode with the default norms is covered by test_model_apply_traced_task.
  modes = (True, False) if norm in ('task_batch', 'batch_stats_only') else (True,)
  for name in _NORM_MODELS:
    kw, shape, _, _ = _CASES[name]
    model = models.create(name, **{'num_heads': 3, 'num_classes': 4, **kw, 'norm': norm,
                                   'num_tasks': 3})
    variables = _abstract_variables(model, shape)
    assert ('batch_stats' in variables) == (norm in ('batch', 'task_batch')), (name, norm)
    for train in modes:
      logits, state = jax.eval_shape(
          lambda v, t, m=model, s=shape, tr=train: m.apply(
              v, jnp.zeros(s), task=t, train=tr, mutable=['batch_stats', 'intermediates']),
          variables, jnp.int32(2))
      assert logits.shape == (shape[0], 4)
      if norm in ('batch', 'task_batch'):
        assert jax.tree.structure(state['batch_stats']) == jax.tree.structure(
            variables['batch_stats'])


def test_concrete_task_out_of_range_raises():
  model = models.create('mlp', num_heads=3, num_classes=2, hidden=(4,))
  with pytest.raises(ValueError, match='out of range'):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 3)), task=3),
                   _abstract_variables(model, (1, 3)))


def test_batch_norm_running_stats_momentum():
  model = models.create('mlp', num_heads=1, num_classes=2, hidden=(4,), norm='batch')
  variables = models.init(model, _KEY, (6, 3))
  x = _normal(10, (6, 3)) + 2.0
  _, state = model.apply(variables, x, task=0, train=True, mutable=['batch_stats'])
  h = x @ variables['params']['dense_0']['kernel']
  np.testing.assert_allclose(state['batch_stats']['norm_0']['mean'], 0.1 * h.mean(0), rtol=1e-5)


def test_option_a_shortcut():
  x = _normal(11, (2, 8, 8, 16))
  y = models.option_a_shortcut(x, 32, 2)
  assert y.shape == (2, 4, 4, 32)
  np.testing.assert_array_equal(y[..., :8], 0.0)
  np.testing.assert_array_equal(y[..., 24:], 0.0)
  np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(models.option_a_shortcut(x, 16, 1), x)
  params = _abstract_params(models.create('resnet20', num_heads=1, num_classes=10),
                            (1, 32, 32, 3))
  for i in range(9):  # No block has shortcut parameters, including the downsampling ones.
    assert set(params[f'block_{i}']) == {'conv_0', 'norm_0', 'conv_1', 'norm_1'}
  assert params['block_3']['conv_0']['kernel'].shape == (3, 3, 16, 32)
  block = models.BasicBlock(32, strides=2, norm='none', shortcut='a')
  block_params = jax.eval_shape(block.init, _KEY, x)['params']
  assert set(block_params) == {'conv_0', 'conv_1'}  # The downsampling shortcut has no params.
  assert jax.eval_shape(block.apply, {'params': block_params}, x).shape == (2, 4, 4, 32)


@pytest.mark.parametrize('name', list(_CASES))
def test_width_multiplier_keeps_structure(name):
  _, shape, _, _ = _CASES[name]
  base = _abstract_params(models.create(name, num_heads=2, num_classes=3), shape)
  wide = _abstract_params(models.create(name, num_heads=2, num_classes=3, width_multiplier=1.5),
                          shape)
  assert jax.tree.structure(base) == jax.tree.structure(wide)
  grew = False
  for b, w in zip(jax.tree.leaves(base), jax.tree.leaves(wide)):
    assert len(b.shape) == len(w.shape)
    assert all(wd >= bd for bd, wd in zip(b.shape, w.shape))
    grew |= b.shape != w.shape
  assert grew
  assert wide['head']['kernel'].shape[1] > base['head']['kernel'].shape[1]
  assert wide['head']['kernel'].shape[::2] == (2, 3)


def test_clnp_convnet_dropout():
  model = models.create('clnp_convnet', num_heads=2, num_classes=3, width_multiplier=0.25)
  variables = _fake_variables(model, (2, 8, 8, 3))
  x = _normal(12, (2, 8, 8, 3))
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(lambda v: model.apply(v, x, task=1, train=True), variables)
  train = jax.jit(lambda v, k: model.apply(v, x, task=1, train=True, rngs={'dropout': k}))
  a = train(variables, jax.random.key(0, impl='rbg'))
  b = train(variables, jax.random.key(1, impl='rbg'))
  assert not np.allclose(a, b)
  evaluate = jax.jit(lambda v: model.apply(v, x, task=1))
  no_drop = models.create('clnp_convnet', num_heads=2, num_classes=3, width_multiplier=0.25,
                          dropout=(0.0, 0.0, 0.0))
  # Without dropout, train and eval modes agree (no norm layers) and need no RNG.
  np.testing.assert_allclose(jax.jit(lambda v: no_drop.apply(v, x, task=1, train=True))(variables),
                             evaluate(variables), rtol=1e-5, atol=1e-6)


def test_create_and_init_api():
  with pytest.raises(ValueError, match='resnet18.*vgg16_bn|vgg16_bn.*resnet18'):
    models.create('resnet19', num_heads=1, num_classes=10)
  model = models.create('resnet56', num_heads=4, num_classes=10, norm='none')
  assert isinstance(model, models.ResNetCifar) and model.depth == 56 and model.norm == 'none'
  assert models.create('preact_resnet18', num_heads=1, num_classes=10).preact
  assert isinstance(models.create('mlp', num_heads=1, num_classes=2), nn.Module)
  variables = models.init(models.create('mlp', num_heads=2, num_classes=2, hidden=(3,)), _KEY,
                          (1, 4))
  assert set(variables) == {'params'}
  model = models.create('small_convnet', num_heads=2, num_classes=3, norm='batch')
  variables = models.init(model, _KEY, (1, 8, 8, 1))
  assert set(variables) == {'params', 'batch_stats'}
  assert jax.tree.structure(variables) == jax.tree.structure(
      _abstract_variables(model, (1, 8, 8, 1)))
  np.testing.assert_array_equal(variables['batch_stats']['norm_0']['mean'], 0.0)
  assert variables['params']['head']['kernel'].shape == (2, 256, 3)
  assert models.scaled_width(64, 1.5) == 96 and models.scaled_width(3, 0.1) == 1


def test_resnet18_stems_and_bias_free_head():
  """DST for CL's ResNet-18 (as coded): 7x7 stride-2 pad-3 stem, no max-pool, bias-free classifier."""
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  dst = models.create('resnet18', num_heads=3, num_classes=10, width_multiplier=0.125,
                      norm='batch_stats_only', stem='imagenet7x7_nopool', head_bias=False)
  # Params filled from NumPy (compiling ResNet-18's init is slow on CPU); one jitted apply.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.2, a.shape), jnp.float32),
                        _abstract_params(dst, (1, 16, 16, 3)))
  assert params['stem']['kernel'].shape == (7, 7, 3, 8) and 'bias' not in params['stem']
  assert set(params['head']) == {'kernel'}
  logits, state = jax.jit(lambda p, x: dst.apply({'params': p}, x, task=2, train=False,
                                                 mutable=['intermediates']))(params, x)
  assert logits.shape == (2, 10)
  acts = models.hidden_activations(state)
  # The stem alone halves 16x16 (no max-pool after it): exactly relu(norm(conv_7x7/2(x))).
  conv = jax.lax.conv_general_dilated(x, params['stem']['kernel'], (2, 2), ((3, 3), (3, 3)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  mean = conv.mean(axis=(0, 1, 2), keepdims=True)
  var = jnp.square(conv - mean).mean(axis=(0, 1, 2), keepdims=True)
  expected = jax.nn.relu((conv - mean) * jax.lax.rsqrt(var + 1e-5))
  assert acts['stem'].shape == (2, 8, 8, 8)
  np.testing.assert_allclose(acts['stem'], expected, rtol=1e-4, atol=1e-4)
  assert acts['block_7/conv_1'].shape == (2, 1, 1, 64)
  # A bias-free head is the features times the task's kernel row.
  feats = acts['block_7/conv_1'].mean(axis=(1, 2))
  np.testing.assert_allclose(logits, feats @ params['head']['kernel'][2], rtol=1e-4, atol=1e-5)
  # The default stays the CIFAR stem (3x3, stride 1), with a head bias; LLT's PreAct-ResNet18 too.
  for name in ('resnet18', 'preact_resnet18'):
    m = models.create(name, num_heads=1, num_classes=10, width_multiplier=0.25)
    p = _abstract_params(m, (1, 32, 32, 3))
    assert m.stem == 'cifar3x3' and p['stem']['kernel'].shape == (3, 3, 3, 16)
    assert set(p['head']) == {'kernel', 'bias'}
  with pytest.raises(ValueError, match='Unknown ResNet18 stem'):
    _abstract_params(models.create('resnet18', num_heads=1, num_classes=2, stem='7x7'),
                     (1, 32, 32, 3))
