"""Type aliases used across sparse_cl_jax (defined once, here).

A *mask tree* always has exactly the tree structure and leaf shapes of the params it masks: leaves
that are never masked (biases, norm parameters, task heads by default) carry an all-True mask, never
``None``. Binary masks are ``bool``; ownership trees are integer (0 = free, k = owned by task k).
"""

from typing import Any

import chex

Params = Any  # A pytree of arrays (a Flax ``params`` dict).
Masks = Any  # A bool pytree with the params' structure and shapes.
Ownership = Any  # An integer pytree with the params' structure: 0 free, k owned by task k.
Scores = Any  # A float pytree with the params' structure: higher = more important.
LeafSpec = Any  # A pytree with the params' structure and one Python/NumPy scalar per leaf.
PRNGKey = chex.PRNGKey
Array = chex.Array
