"""Piggyback: straight-through mask gradients, bit-packed per-task masks, frozen backbone."""

import functools
import importlib.util
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import experiment
from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax.methods import piggyback

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

W = jnp.array([[1.0, -2.0], [3.0, 4.0]])
SPEC = {"d": {"kernel": True, "bias": False}}
X = jnp.array([[1.0, 2.0]])


def _params():
  return {"d": {"kernel": W, "bias": jnp.array([0.5, -0.5])}}


def _real_mask(values):
  return {"d": {"kernel": jnp.asarray(values, jnp.float32), "bias": jnp.zeros((), jnp.float32)}}


def _loss(real, bits, task, current, threshold=5e-3):
  p = piggyback.masked_params(_params(), real, bits, task, current, spec=SPEC,
                              threshold=threshold)
  return jnp.sum(X @ p["d"]["kernel"] + p["d"]["bias"][None, :])


def test_ste_gradient_matches_hand_computation():
  bits = piggyback.new_bits(_params(), SPEC, num_tasks=3)
  real = _real_mask([[0.01, 0.004], [0.01, 0.02]])  # binary [[1, 0], [1, 1]] at 5e-3
  value, grad = jax.jit(jax.value_and_grad(_loss), static_argnums=(4,))(real, bits, 1, 1, 5e-3)
  # Forward: x @ (W * B) + b = [1*1 + 2*3, 0 + 2*4] + [0.5, -0.5] -> sum = 7 + 8 + 0 = 15.
  assert float(value) == 15.0
  # d loss / d m_ij = (d loss / d W_eff_ij) * W_ij = x_i * W_ij, straight through the threshold
  # (also where the binary mask is 0).
  np.testing.assert_array_equal(grad["d"]["kernel"], [[1.0, -2.0], [6.0, 8.0]])
  assert float(grad["d"]["bias"]) == 0.0


def test_threshold_is_configurable():
  bits = piggyback.new_bits(_params(), SPEC, num_tasks=3)
  real = _real_mask([[0.01, 0.004], [0.01, 0.02]])
  # At 0.015 only m_11 = 0.02 survives: sum = 2 * 4 + 0 = 8.
  assert float(_loss(real, bits, 1, 1, threshold=0.015)) == 8.0


def test_stored_bits_and_view_rules():
  params = _params()
  bits = piggyback.new_bits(params, SPEC, num_tasks=40)  # two uint32 words per weight
  assert bits["d"]["kernel"].shape == (2, 2, 2)
  masks_by_task = {}
  store = jax.jit(lambda b, m, t: piggyback.set_bits(b, m, t, SPEC))
  for t in (1, 5, 31, 32, 39, 5):  # task 5 is overwritten: its bits are cleared first
    m = np.random.default_rng(t + len(masks_by_task)).random((2, 2)) > 0.5
    masks_by_task[t] = m
    bits = store(bits, {"d": {"kernel": jnp.asarray(m), "bias": jnp.zeros((), bool)}}, t)
  for t, m in masks_by_task.items():
    np.testing.assert_array_equal(piggyback.get_bits(bits, t, SPEC)["d"]["kernel"], m)
  real = _real_mask([[1.0, 1.0], [1.0, 1.0]])  # all ones if used live
  # A finished task (task < current) uses its stored bits, and no gradient reaches the real mask.
  p = piggyback.masked_params(params, real, bits, 5, 7, spec=SPEC, threshold=5e-3)
  np.testing.assert_array_equal(p["d"]["kernel"], W * masks_by_task[5])
  g = jax.grad(_loss)(real, bits, 5, 7)
  np.testing.assert_array_equal(g["d"]["kernel"], np.zeros((2, 2)))
  # Task 0 (the backbone's own task) and tasks not trained yet use the whole backbone.
  for task, current in ((0, 7), (0, 0), (9, 7)):
    p = piggyback.masked_params(params, _real_mask([[0.0, 0.0], [0.0, 0.0]]), bits, task,
                                current, spec=SPEC, threshold=5e-3)
    np.testing.assert_array_equal(p["d"]["kernel"], W)
  np.testing.assert_array_equal(p["d"]["bias"], params["d"]["bias"])


def _config():
  path = os.path.join(_REPO, "configs", "piggyback.py")
  spec = importlib.util.spec_from_file_location("config_piggyback", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.progress = False
  c.num_tasks = 2
  c.piggyback.mask_lr = 0.02  # large enough that masks flip within the tiny run
  return c


def _logits(trainer, state, task, current, x):
  fp = trainer.method.forward_params(state.params, state.aux, state.method, jnp.int32(task),
                                     jnp.int32(current))
  variables = {"params": fp}
  if trainer.has_batch_stats:
    variables["batch_stats"] = state.batch_stats
  return np.asarray(trainer.model.apply(variables, trainer.stream.normalize(x), task=task,
                                        train=False))


def test_backbone_frozen_and_first_task_exact_after_mask_training():
  trainer = experiment.build(_config())
  state = trainer.init_state()
  x = trainer.task_data(0, "test").x[:40]
  trainer.begin_task(0)
  state = trainer.method.run_task(trainer, state, 0)
  before = _logits(trainer, state, 0, 0, x)
  kernels = {k: np.asarray(v["kernel"]) for k, v in state.params.items() if k != "head"}
  trainer.begin_task(1)
  state = trainer.method.run_task(trainer, state, 1)
  np.testing.assert_array_equal(_logits(trainer, state, 0, 1, x), before)
  for k, v in kernels.items():
    np.testing.assert_array_equal(np.asarray(state.params[k]["kernel"]), v)
  rep = trainer.method.report(trainer.ctx, state)
  assert rep["density_per_task"][0] == 1.0
  assert 0.0 < rep["density_per_task"][1] < 1.0, rep  # the mask did pick a subset


class _State(NamedTuple):
  params: Any
  aux: Any
  method: Any


def test_start_and_finish_task_by_hand():
  params = {"d": {"kernel": W, "bias": jnp.array([0.5, -0.5])},
            "head": {"kernel": jnp.ones((3, 2, 2))}}
  spec = {"d": {"kernel": True, "bias": False}, "head": {"kernel": False}}
  rows = {"d": {"kernel": False, "bias": False}, "head": {"kernel": True}}
  state = _State(params=params, aux={}, method={"bits": piggyback.new_bits(params, spec, 3),
                                                "trainable": masks_lib.zeros(params)})
  start = jax.jit(functools.partial(piggyback.start_task, rows=rows, spec=spec, mask_init=0.01))
  mask = lambda values: {"mask": dict(_real_mask(values), head={"kernel": jnp.zeros(())})}
  finish = jax.jit(functools.partial(piggyback.finish_task, spec=spec, threshold=5e-3))
  # Task 1 trains the whole backbone and its head row; its stored mask is all ones.
  s0 = start(state, jnp.int32(0))
  tr = s0.method["trainable"]
  assert tr["d"]["kernel"].all() and tr["d"]["bias"].all()
  np.testing.assert_array_equal(tr["head"]["kernel"].any(axis=(1, 2)), [True, False, False])
  np.testing.assert_array_equal(s0.aux["mask"]["d"]["kernel"], np.full((2, 2), np.float32(0.01)))
  s0 = finish(s0._replace(aux=mask([[0.0, 0.0], [0.0, 0.0]])), jnp.int32(0))
  np.testing.assert_array_equal(piggyback.get_bits(s0.method["bits"], 0, spec)["d"]["kernel"],
                                np.ones((2, 2), bool))
  assert not any(x.any() for x in jax.tree.leaves(s0.method["trainable"]))
  # A later task trains only its head row (and its mask); it stores mask > 5e-3, strictly.
  s1 = start(s0, jnp.int32(2))
  tr = s1.method["trainable"]
  assert not tr["d"]["kernel"].any() and not tr["d"]["bias"].any()
  np.testing.assert_array_equal(tr["head"]["kernel"].any(axis=(1, 2)), [False, False, True])
  s1 = finish(s1._replace(aux=mask([[0.01, 0.004], [0.005, 0.0051]])), jnp.int32(2))
  np.testing.assert_array_equal(piggyback.get_bits(s1.method["bits"], 2, spec)["d"]["kernel"],
                                [[True, False], [False, True]])
  np.testing.assert_array_equal(piggyback.get_bits(s1.method["bits"], 0, spec)["d"]["kernel"],
                                np.ones((2, 2), bool))  # task 1's bits untouched


if __name__ == "__main__":
  pytest.main([__file__, "-q"])
