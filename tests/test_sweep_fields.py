"""sweep.DATA_FIELDS, checked on a sample: two values of a data field give the same compiled step.

Cells whose configs differ only in ``sweep.DATA_FIELDS`` share a program class. For a sample of
the fields (one or more per method family) the step and evaluation programs of two configs that
differ in the field are lowered and their StableHLO compared; a field that is a constant of the
step (weight decay) must give different programs, so the check can fail.
"""

import functools
import hashlib

import jax
import jax.numpy as jnp
import pytest

from sparse_cl_jax import cli
from sparse_cl_jax import experiment
from sparse_cl_jax import sweep
from sparse_cl_jax import train


def _config(name):
  c = cli.load_config_file(f"{name}:runlocal")
  c.progress = False
  return c


def _set(c, field, value):
  *parents, last = field.split(".")
  for p in parents:
    c = c[p]
  c[last] = value


def _programs_hash(config) -> str:
  trainer = experiment.build(config)
  state = trainer.init_state()
  trainer.begin_task(0)
  d = trainer.task_data(0)
  perm = trainer.programs.permutation(trainer.op_key(0), d.n, int(d.x.shape[0]))
  key = jax.random.key_data(jax.random.key(0))
  steps = jax.jit(functools.partial(train.steps.run_steps, trainer.env)).lower(
      trainer._consts, state, d, perm, jnp.int32(0), jnp.int32(1), jnp.int32(0),  # pylint: disable=protected-access
      jnp.float32(0.1), jnp.float32(0.0), key).as_text()
  evals = jax.jit(functools.partial(train.evaluation.eval_counts, trainer.env)).lower(
      trainer._consts, state, trainer.task_data(0, "test"), jnp.int32(0), jnp.int32(0),  # pylint: disable=protected-access
      jnp.int32(0), jnp.int32(0), jnp.bool_(True)).as_text()
  return hashlib.sha256((steps + evals).encode()).hexdigest()


@pytest.mark.parametrize("name,field,value", [
    ("packnet", "seed", 3),
    ("packnet", "learning_rate", 0.123),
    ("packnet", "packnet.prune_fraction", 0.6),
    ("dst_cl", "dst.sparsity", 0.7),
    ("llt", "llt.prune_fraction", 0.3),
])
def test_a_data_field_leaves_the_programs_unchanged(name, field, value):
  assert field in sweep.DATA_FIELDS
  changed = _config(name)
  _set(changed, field, value)
  assert _programs_hash(changed) == _programs_hash(_config(name))
  assert sweep.program_class(changed) == sweep.program_class(_config(name))


def test_weight_decay_is_a_constant_of_the_step_so_not_a_data_field():
  assert "weight_decay" not in sweep.DATA_FIELDS
  a, b = _config("packnet"), _config("packnet")
  a.weight_decay, b.weight_decay = 1e-4, 2e-4
  assert _programs_hash(a) != _programs_hash(b)
  assert sweep.program_class(a) != sweep.program_class(b)
