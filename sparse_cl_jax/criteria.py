"""Pruning and growth criteria: plain functions with one shared signature returning score trees.

Layer 2 of the design. Every criterion is called as::

  scores = criterion(params, *, masks=None, grads=None, opt_state=None, key=None, loss_fn=None,
                     apply_fn=None, input_shape=None, activations=None)

and returns a float tree with the params' structure in which *higher means more important* (keep or
grow first). Each uses only the inputs it needs and raises ``ValueError`` naming the missing one.
Growth is a criterion evaluated over the inactive positions (see :mod:`sparse_cl_jax.growth`).
``masks`` (optional) is the current mask: data-dependent criteria are then evaluated on the masked
network, as iterative pruning requires.

Criteria (select by name with :func:`get`):

* ``magnitude``: ``|w|`` (Han et al. 2015; PackNet, CPG, IMP).
* ``random``: i.i.d. uniform scores from ``key`` (SET growth, random pruning baselines).
* ``gradient``: ``|dL/dw|`` (RigL growth, Evci et al. 2020).
* ``momentum``: ``|m|`` read from the first moment (Adam ``mu``) or momentum trace (SGD ``trace``)
  found in any optax state (SNFS growth, Dettmers & Zettlemoyer 2019).
* ``snip``: ``|w * dL/dw|`` (Lee et al. 2019, connection sensitivity).
* ``grasp``: ``w * (H g)``, the negated GraSP score -w*(Hg) of Wang et al. 2020 (eq. 8): GraSP
  removes the largest -w*(Hg), i.e. keeps the largest w*(Hg).
* ``synflow``: ``|w * dR/dw|`` with ``R = sum f(1; |w|)`` (Tanaka et al. 2020); data-free.
* ``activation``: per-unit mean activation (CLNP, Golkar et al. 2019). Returns per-unit scores keyed
  like ``activations`` (not a params-shaped tree); see :func:`activation`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sparse_cl_jax import masks as masks_lib
from sparse_cl_jax import types


def _need(value, name: str, criterion: str):
  if value is None:
    raise ValueError(f"criterion {criterion!r} needs `{name}`")
  return value


def _masked(params, masks):
  if masks is None:
    return params
  masks_lib.check_like(params, masks, what="masks")
  return masks_lib.apply(params, masks)


def magnitude(params, *, masks=None, grads=None, opt_state=None, key=None, loss_fn=None,
              apply_fn=None, input_shape=None, activations=None) -> types.Scores:
  """``|w|``. Example: ``criteria.magnitude({'w': jnp.array([-2., 1.])}) == {'w': [2., 1.]}``."""
  del masks, grads, opt_state, key, loss_fn, apply_fn, input_shape, activations
  return jax.tree.map(lambda p: jnp.abs(p).astype(jnp.float32), params)


def random(params, *, masks=None, grads=None, opt_state=None, key=None, loss_fn=None,
           apply_fn=None, input_shape=None, activations=None) -> types.Scores:
  """Uniform [0, 1) scores, an independent stream per leaf folded from ``key``."""
  del masks, grads, opt_state, loss_fn, apply_fn, input_shape, activations
  key = _need(key, "key", "random")
  leaves, treedef = jax.tree.flatten(params)
  out = [jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(p), jnp.float32)
         for i, p in enumerate(leaves)]
  return jax.tree.unflatten(treedef, out)


def _grads(params, masks, grads, loss_fn, name):
  if grads is not None:
    masks_lib.check_like(params, grads, what="grads")
    return grads
  loss_fn = _need(loss_fn, "grads or loss_fn", name)
  return jax.grad(loss_fn)(_masked(params, masks))


def gradient(params, *, masks=None, grads=None, opt_state=None, key=None, loss_fn=None,
             apply_fn=None, input_shape=None, activations=None) -> types.Scores:
  """``|dL/dw|`` from ``grads``, or from ``loss_fn(params)`` at the masked params."""
  del opt_state, key, apply_fn, input_shape, activations
  g = _grads(params, masks, grads, loss_fn, "gradient")
  return jax.tree.map(lambda x: jnp.abs(x).astype(jnp.float32), g)


def find_momentum(opt_state, params) -> types.Params:
  """The first-moment tree in an optax state: Adam's ``mu`` or SGD momentum's ``trace``.

  Searches by field name (no isinstance switch over optimiser classes) and returns the first match
  whose tree structure equals the params'. Failing that, the first one whose leaves match the
  params' by path and shape (:func:`masks.align`), rebuilt with the params' structure: e.g. the
  ``OptVariable``-wrapped state of an ``nnx.Optimizer`` for params ``nnx.state(model, nnx.Param)``.

  Raises:
    ValueError: if the state holds no such tree (e.g. plain SGD without momentum).
  """
  target = jax.tree.structure(params)
  found = [value for field in ("mu", "trace", "momentum")
           for _, value in optax.tree_utils.tree_get_all_with_path(opt_state, field)]
  for value in found:
    if jax.tree.structure(value) == target:
      return value
  p_leaves = jax.tree.leaves(params)
  for value in found:
    try:
      leaves = masks_lib.align(params, value)
    except ValueError:
      continue
    if all(jnp.shape(x) == jnp.shape(p) for x, p in zip(leaves, p_leaves)):
      return jax.tree.unflatten(target, leaves)
  raise ValueError("criterion 'momentum' found no first-moment tree ('mu' of Adam or 'trace' of "
                   "SGD with momentum) matching the params in the optimiser state")


def momentum(params, *, masks=None, grads=None, opt_state=None, key=None, loss_fn=None,
             apply_fn=None, input_shape=None, activations=None) -> types.Scores:
  """``|m|``, the magnitude of the optimiser's first moment (SNFS momentum growth)."""
  del masks, grads, key, loss_fn, apply_fn, input_shape, activations
  m = find_momentum(_need(opt_state, "opt_state", "momentum"), params)
  return jax.tree.map(lambda x: jnp.abs(x).astype(jnp.float32), m)


def snip(params, *, masks=None, grads=None, opt_state=None, key=None, loss_fn=None,
         apply_fn=None, input_shape=None, activations=None) -> types.Scores:
  """``|w * dL/dw|`` at the masked params (SNIP connection sensitivity, Lee et al. 2019, eq. 6)."""
  del opt_state, key, apply_fn, input_shape, activations
  w = _masked(params, masks)
  g = _grads(params, masks, grads, loss_fn, "snip")
  return jax.tree.map(lambda a, b: jnp.abs(a * b).astype(jnp.float32), w, g)


def grasp(params, *, masks=None, grads=None, opt_state=None, key=None, loss_fn=None,
          apply_fn=None, input_shape=None, activations=None) -> types.Scores:
  """``w * (H g)`` at the masked params (GraSP, Wang et al. 2020; keep the largest).

  ``H g`` is a Hessian-gradient product computed reverse-over-reverse, ``grad(<grad L, g>)``
  with ``g`` held constant, as in the paper. (Reverse-over-reverse works through the custom-VJP
  convolutions of :mod:`sparse_cl_jax.ops`, where forward mode is not defined.)
  """
  del grads, opt_state, key, apply_fn, input_shape, activations
  loss_fn = _need(loss_fn, "loss_fn", "grasp")
  w = _masked(params, masks)
  g = jax.lax.stop_gradient(jax.grad(loss_fn)(w))

  def grad_dot_g(p):
    gp = jax.grad(loss_fn)(p)
    return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(g)))

  hg = jax.grad(grad_dot_g)(w)
  return jax.tree.map(lambda a, b: (a * b).astype(jnp.float32), w, hg)


def synflow(params, *, masks=None, grads=None, opt_state=None, key=None, loss_fn=None,
            apply_fn=None, input_shape=None, activations=None) -> types.Scores:
  """``|w * dR/dw|`` with ``R = sum(apply_fn(|w|, ones(input_shape)))`` (SynFlow, eq. 3).

  ``apply_fn(params, x)`` must be the network's forward pass (normalisation layers in evaluation
  mode) and ``input_shape`` include the batch dimension (e.g. ``(1, 32, 32, 3)``). Deep networks
  can overflow float32; the score is computed in the params' dtype.
  """
  del grads, opt_state, key, loss_fn, activations
  apply_fn = _need(apply_fn, "apply_fn", "synflow")
  input_shape = _need(input_shape, "input_shape", "synflow")
  w = jax.tree.map(jnp.abs, _masked(params, masks))

  def r(p):
    return jnp.sum(apply_fn(p, jnp.ones(input_shape, jnp.float32)))

  g = jax.grad(r)(w)
  return jax.tree.map(lambda a, b: jnp.abs(a * b).astype(jnp.float32), w, g)


def activation(params, *, masks=None, grads=None, opt_state=None, key=None, loss_fn=None,
               apply_fn=None, input_shape=None, activations=None):
  """Mean activation per unit / channel (CLNP, Golkar et al. 2019, Sec. 3).

  Args:
    params: unused (kept for the shared signature).
    activations: ``{layer_name: array [..., units]}``, e.g. post-ReLU outputs gathered over a task's
      data (Flax ``sow`` intermediates); every axis but the last is averaged.

  Returns:
    ``{layer_name: float32 [units]}``.
  """
  del params, masks, grads, opt_state, key, loss_fn, apply_fn, input_shape
  acts = _need(activations, "activations", "activation")

  def mean_per_unit(a):
    a = jnp.asarray(a, jnp.float32)
    return jnp.mean(a.reshape(-1, a.shape[-1]), axis=0)

  return {name: mean_per_unit(a) for name, a in acts.items()}


CRITERIA: dict[str, Callable[..., types.Scores]] = {
    "magnitude": magnitude,
    "random": random,
    "gradient": gradient,
    "momentum": momentum,
    "snip": snip,
    "grasp": grasp,
    "synflow": synflow,
    "activation": activation,
}


def get(name: str) -> Callable[..., types.Scores]:
  """The criterion called ``name`` (see :data:`CRITERIA`)."""
  try:
    return CRITERIA[name]
  except KeyError:
    raise ValueError(f"unknown criterion {name!r}; choose from {sorted(CRITERIA)}") from None
