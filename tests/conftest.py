"""Test configuration shared by the whole suite.

* Every compiled program cached on disk (``SPARSE_CL_JAX_CACHE_MIN_SECONDS=0``).
* Four emulated CPU devices, so that sharding tests run on a laptop or CI (set before JAX loads),
  and XLA backend optimisation level 0 (compile time dominates the suite).
* ``jax_numpy_rank_promotion="raise"``: a mask broadcasting against the wrong axis is an error.
* Strict dtype promotion is switched on per test by the ``strict_dtypes`` fixture for our own pure
  functions. It cannot be global: optax's own Adam bias correction (``decay ** count`` with an int32
  count) is rejected under ``jax_numpy_dtype_promotion="strict"``.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
# The suite compiles far more than it runs: XLA's backend optimisation level 0 halves the time of
# the compile-bound tests (measured: 54 s -> 25 s for two of them) and the whole suite stays
# under CI's 10 minutes with a cold compilation cache. Benchmarks and real runs never set it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every executable goes to the persistent compilation cache (by default only those that took
# 0.2 s): the suite's many small programs are rebuilt by every xdist worker, notebook kernel and
# launcher subprocess, which then load them instead (measured: 14.3 s -> 11.3 s for LLT's runlocal
# run in a second process).
os.environ.setdefault("SPARSE_CL_JAX_CACHE_MIN_SECONDS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def strict_dtypes():
  with jax.numpy_dtype_promotion("strict"):
    yield
