"""sparse_cl_jax: sparse continual learning in JAX.

The package import is light: it loads the mask-and-optimiser core only, for use inside any JAX
training code. The harness modules are imported on demand::

  from sparse_cl_jax import experiment, models, data, metrics, train, checkpoint

Core modules (layers 1-3 of the design): ``masks``, ``sparsity``, ``topk``, ``criteria``,
``growth``, ``transforms``, ``schedules``; the most used functions are re-exported below.
"""

from sparse_cl_jax import criteria
from sparse_cl_jax import growth
from sparse_cl_jax import masks
from sparse_cl_jax import schedules
from sparse_cl_jax import sparsity
from sparse_cl_jax import topk
from sparse_cl_jax import transforms
from sparse_cl_jax import types
from sparse_cl_jax.growth import TiedGrowthWarning
from sparse_cl_jax.growth import apply_topology
from sparse_cl_jax.growth import drop_and_grow
from sparse_cl_jax.growth import regrow
from sparse_cl_jax.growth import reset_moments
from sparse_cl_jax.masks import maskable
from sparse_cl_jax.sparsity import target_counts
from sparse_cl_jax.topk import topk_mask
from sparse_cl_jax.transforms import binarize_ste
from sparse_cl_jax.transforms import freeze
from sparse_cl_jax.transforms import keep_sparse
from sparse_cl_jax.transforms import mask_updates
from sparse_cl_jax.types import Masks
from sparse_cl_jax.types import Ownership
from sparse_cl_jax.types import Params
from sparse_cl_jax.types import Scores

# The one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic), the
# wheel's metadata carries it, CHANGELOG.md names it (tests/test_packaging.py checks all three).
__version__ = "0.1.1"
