"""The README's python blocks run as written (the "own JAX code" snippet must stay <= 30 lines)."""

import os
import re
import warnings

from sparse_cl_jax import growth

_README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
  with open(_README) as f:
    text = f.read()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_transforms_snippet():
  blocks = _python_blocks()
  assert blocks, "README has no python block"
  snippet = blocks[0]
  assert len(snippet.strip().splitlines()) <= 30
  for needed in ("keep_sparse", "freeze", "adamw", "weight_decay", "drop_and_grow",
                 "multi_transform", "reset_moments", "loss_fn=loss"):
    assert needed in snippet
  imports = [line for line in snippet.splitlines() if "sparse_cl_jax" in line]
  assert imports and not any("train" in line or "experiment" in line for line in imports)
  # The RigL growth must not score candidates with a gradient taken through masks.apply (zero at
  # every inactive position), and the snippet must check that it grew the top-|grad| candidates.
  growth_call = next(line for line in snippet.splitlines() if "drop_and_grow" in line)
  assert "grads=" not in growth_call
  assert re.search(r"assert .*res\.grown.*\.min\(\) > .*\.max\(\)", snippet)


def test_readme_python_blocks_run():
  for block in _python_blocks():
    with warnings.catch_warnings():
      # A tied growth (all candidate scores equal) means the example grows by the tie rule.
      warnings.simplefilter("error", growth.TiedGrowthWarning)
      exec(compile(block, _README, "exec"), {"__name__": "readme"})  # pylint: disable=exec-used
