"""PackNet's prune: which weights a task keeps, checked against a brute-force numpy reference.

PackNet promises (Mallya & Lazebnik 2018, Sec. 3; ``methods/packnet.py``): in every maskable layer
the task keeps exactly ``round((1 - f) * n)`` of the ``n`` weights it trained (its free weights,
never an earlier task's), namely the largest ``|w|``, ties going to the earliest position; the
others are zeroed and released, and earlier tasks' weights are untouched.
"""

import functools
import importlib.util
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_cl_jax import experiment
from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax.methods import packnet

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class State(NamedTuple):
  """The two fields of a train state PackNet's state functions read and write."""
  params: Any
  method: Any


def reference_keep(w, candidates, fraction):
  """Brute force: the ``round((1 - fraction) * n)`` candidates of largest ``|w|`` (earliest first
  among equal ``|w|``), by a full sort of the layer."""
  w, candidates = np.asarray(w).ravel(), np.asarray(candidates).ravel()
  idx = np.flatnonzero(candidates)
  # The count in float32, as the promise is computed on the device; numpy rounds half to even.
  k = int(np.round(np.float32(1.0 - fraction) * np.float32(idx.size)))
  order = sorted(idx, key=lambda i: (-abs(float(w[i])), i))
  keep = np.zeros(w.shape, bool)
  keep[order[:k]] = True
  return keep


# --------------------------------------------------------------------------------------------------
# A hand-built layer: ties at the cut, negative weights, earlier tasks holding the largest |w|.


SPEC = {"a": {"kernel": True, "bias": False}, "b": {"kernel": True}, "head": {"kernel": False}}
ROWS = {"a": {"kernel": False, "bias": False}, "b": {"kernel": False}, "head": {"kernel": True}}


def _hand_state():
  # Layer a: 4x5 weights. Earlier tasks (owners 1 and 2) own the largest magnitudes, so a prune
  # that looked at them would keep them; the free weights tie in groups of equal |w|.
  a = np.array([[9.0, -3.0, 2.0, -2.0, 100.0],
                [2.0, -1.0, -100.0, 3.0, 0.5],
                [-2.0, 2.0, 1.0, -50.0, -3.0],
                [0.5, -0.5, 2.0, 60.0, 1.0]], np.float32)
  own_a = np.zeros((4, 5), np.int32)
  own_a[0, 4] = own_a[1, 2] = 1
  own_a[2, 3] = own_a[3, 3] = 2
  own_a[0, 0] = 1  # 9.0: the largest free-looking value belongs to task 1
  # Layer b: 3x3, no earlier owner, magnitudes 1..9 with signs.
  b = np.array([[-1.0, 5.0, -9.0], [4.0, -7.0, 2.0], [8.0, -3.0, 6.0]], np.float32)
  params = {"a": {"kernel": jnp.asarray(a), "bias": jnp.arange(5.0)},
            "b": {"kernel": jnp.asarray(b)},
            "head": {"kernel": jnp.arange(3 * 2 * 2, dtype=jnp.float32).reshape(3, 2, 2)}}
  own = {"a": {"kernel": jnp.asarray(own_a), "bias": jnp.ones(5, jnp.int32)},
         "b": {"kernel": jnp.zeros((3, 3), jnp.int32)},
         "head": {"kernel": jnp.zeros((3, 2, 2), jnp.int32)}}
  return State(params=params, method={"own": own, "trainable": masks_lib.zeros(params)})


def test_start_task_trains_free_weights_and_the_tasks_rows_only():
  state = packnet.start_task(_hand_state(), jnp.int32(2), rows=ROWS)
  tr = jax.device_get(state.method["trainable"])
  own = jax.device_get(state.method["own"])
  np.testing.assert_array_equal(tr["a"]["kernel"], own["a"]["kernel"] == 0)
  assert not tr["a"]["bias"].any()  # owned by task 1 (shared biases: the first task's)
  assert tr["b"]["kernel"].all()
  np.testing.assert_array_equal(tr["head"]["kernel"].any(axis=(1, 2)), [False, False, True])


def test_prune_keeps_the_largest_free_weights_per_layer_with_ties_to_the_earliest():
  t, fraction = 2, 0.5
  before = packnet.start_task(_hand_state(), jnp.int32(t), rows=ROWS)
  prune = jax.jit(functools.partial(packnet.prune, spec=SPEC, fraction=fraction))
  after = jax.device_get(prune(before, jnp.int32(t)))
  before = jax.device_get(before)
  a_free = before.method["own"]["a"]["kernel"] == 0
  # The hand-built layer a really has a tie at the cut: 15 free weights keep round(7.5) = 8, and
  # the 8th and 9th largest |w| are equal (2.0), so which 2.0s survive is the tie rule's choice.
  mags = np.sort(np.abs(before.params["a"]["kernel"][a_free]))[::-1]
  assert a_free.sum() == 15 and mags[7] == mags[8] == 2.0
  # By hand: the three 3.0s and the first five of the six free 2.0s in row-major order.
  want_a = np.zeros((4, 5), bool)
  for i, j in ((0, 1), (1, 3), (2, 4), (0, 2), (0, 3), (1, 0), (2, 0), (2, 1)):
    want_a[i, j] = True
  np.testing.assert_array_equal(after.method["own"]["a"]["kernel"] == t + 1, want_a)
  for layer, free in (("a", a_free), ("b", np.ones((3, 3), bool))):
    w0 = before.params[layer]["kernel"]
    keep = reference_keep(w0, free, fraction).reshape(w0.shape)
    own0, own1 = before.method["own"][layer]["kernel"], after.method["own"][layer]["kernel"]
    w1 = after.params[layer]["kernel"]
    np.testing.assert_array_equal(own1 == t + 1, keep, err_msg=layer)
    np.testing.assert_array_equal(w1[keep], w0[keep], err_msg=layer)  # kept: unchanged
    assert np.all(w1[free & ~keep] == 0), layer  # released: zero ...
    assert np.all(own1[free & ~keep] == 0), layer  # ... and free
    # Earlier tasks' weights and ownership are bit-identical.
    np.testing.assert_array_equal(w1[~free], w0[~free], err_msg=layer)
    np.testing.assert_array_equal(own1[~free], own0[~free], err_msg=layer)
    # Retraining trains exactly the kept weights.
    np.testing.assert_array_equal(after.method["trainable"][layer]["kernel"], keep)
  # By hand for layer b: |w| 1..9 keep round(4.5) = 4 (half to even): 9, 8, 7 and 6.
  np.testing.assert_array_equal(after.method["own"]["b"]["kernel"] == t + 1,
                                np.abs(before.params["b"]["kernel"]) >= 6)
  # Non-maskable leaves are not pruned: values and trainable flags as before.
  for layer, leaf in (("a", "bias"), ("head", "kernel")):
    np.testing.assert_array_equal(after.params[layer][leaf], before.params[layer][leaf])
    np.testing.assert_array_equal(after.method["trainable"][layer][leaf],
                                  before.method["trainable"][layer][leaf])


# --------------------------------------------------------------------------------------------------
# A real two-task run: the prune after real training, and task 1's weights after task 2.


def _config():
  path = os.path.join(_REPO, "configs", "packnet.py")
  spec = importlib.util.spec_from_file_location("config_packnet", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.progress = False
  c.num_tasks = 2
  c.class_order = "0,1,2,3"
  return c


class RecordingTrainer:
  """A real trainer whose ``apply`` operations keep host copies of the state before and after."""

  def __init__(self, trainer):
    self._trainer = trainer
    self.applied = []

  def __getattr__(self, name):
    return getattr(self._trainer, name)

  def apply(self, state, fn):
    before = jax.device_get(state)
    after = self._trainer.apply(state, fn)
    self.applied.append((before, jax.device_get(after)))
    return after


def test_prune_after_real_training_matches_the_reference_and_spares_earlier_tasks():
  c = _config()
  trainer = experiment.build(c)
  rec = RecordingTrainer(trainer)
  state = trainer.init_state()
  frac = float(c.packnet.prune_fraction)
  spec = trainer.ctx.spec
  for t in range(2):
    trainer.begin_task(t)
    state = trainer.method.run_task(rec, state, t)
  # apply operations per task: start, prune, finish.
  assert len(rec.applied) == 6
  after_task1 = rec.applied[2][1]
  before, after = rec.applied[4]  # task 2's prune
  n_checked = 0
  for path, s, w0, w1, o0, o1, o_t1, w_t1 in zip(
      masks_lib.paths(before.params), jax.tree.leaves(spec), jax.tree.leaves(before.params),
      jax.tree.leaves(after.params), jax.tree.leaves(before.method["own"]),
      jax.tree.leaves(after.method["own"]), jax.tree.leaves(after_task1.method["own"]),
      jax.tree.leaves(after_task1.params)):
    if not s:
      np.testing.assert_array_equal(w1, w0, err_msg=path)
      continue
    free = o0 == 0  # what task 2 trained: the weights task 1 released
    assert 0 < free.sum() < free.size, path
    keep = reference_keep(w0, free, frac).reshape(w0.shape)
    np.testing.assert_array_equal(o1 == 2, keep, err_msg=path)
    np.testing.assert_array_equal(w1[keep], w0[keep], err_msg=path)
    assert np.all(w1[free & ~keep] == 0), path
    # Task 1's weights: bit-identical through task 2's training and prune.
    mine = o_t1 == 1
    np.testing.assert_array_equal(o1[mine], 1, err_msg=path)
    np.testing.assert_array_equal(w1[mine], w_t1[mine], err_msg=path)
    np.testing.assert_array_equal(w0[mine], w_t1[mine], err_msg=path)
    n_checked += 1
  assert n_checked >= 1
  # Task 1's own prune, too: its candidates were every maskable weight.
  before1, after1 = rec.applied[1]
  for s, w0, o1 in zip(jax.tree.leaves(spec), jax.tree.leaves(before1.params),
                       jax.tree.leaves(after1.method["own"])):
    if s:
      np.testing.assert_array_equal(o1 == 1, reference_keep(w0, np.ones(w0.shape, bool),
                                                            frac).reshape(w0.shape))


def test_expected_density_by_hand():
  # Two layers of 10 and 4 weights, f = 0.6: task 1 keeps 4 + 2 (round(1.6) = 2) of 14; task 2
  # keeps round(0.4 * 6) = 2 and round(0.4 * 2) = 1 more.
  np.testing.assert_allclose(packnet.expected_density([10, 4], 0.6, 2), [6 / 14, 9 / 14])


def test_view_of_a_finished_task_is_exactly_the_weights_of_tasks_up_to_it():
  own = {"w": jnp.array([0, 1, 2, 3, 1, 2], jnp.int8)}
  # Task index 1 (owner 2) after task 2 was trained: owners 1 and 2, never free or later ones.
  np.testing.assert_array_equal(packnet.view(own, 1, 2)["w"], [0, 1, 1, 0, 1, 1])
  # The task being trained also computes with the free weights.
  np.testing.assert_array_equal(packnet.view(own, 1, 1)["w"], [1, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(packnet.view(own, 0, 2)["w"], [0, 1, 0, 0, 1, 0])
