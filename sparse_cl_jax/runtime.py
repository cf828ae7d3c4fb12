"""Per-backend execution choices, decided in one place.

Each choice below was measured (``benchmarks/peer_pytorch.py``, ``docs/results.md``); none of
them changes what is computed, only how fast:

* :func:`fast_ops` -- whether models use :mod:`sparse_cl_jax.ops`' convolution and max-pooling
  (backward passes that XLA:CPU runs fast inside loop bodies) instead of the stock ``lax``/Flax
  ops. Default: on for the CPU backend, off for GPU/TPU. Override with
  ``SPARSE_CL_JAX_FAST_OPS=0/1`` or :func:`use_fast_ops` (also a context manager).
* :func:`epoch_loop` -- how :class:`~sparse_cl_jax.train.Trainer` runs the batches of an epoch:
  ``'device'`` (a ``lax.fori_loop`` inside one jitted call per chunk) or ``'host'`` (one jitted
  step per batch, called from Python). Default ``'device'`` everywhere (with the fast ops it is
  the fastest on CPU too, and it has no per-step dispatch cost); ``config.epoch_loop`` overrides.
* :func:`enable_compilation_cache` -- JAX's persistent compilation cache, so a second run of a
  sweep or a resumed run loads its executables instead of compiling them.
* XLA:CPU convolutions go to Eigen instead of YNNPACK (``XLA_FLAGS`` gets
  ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` when this module is first
  imported, before JAX starts its backends). Measured ~1.5x faster training steps for the
  convnets here, dots and reductions keep YNNPACK. Only for the jaxlib versions it was tested
  with (:data:`XLA_CPU_FLAG_VERSIONS`: an unknown flag would abort XLA); skipped when the user's
  ``XLA_FLAGS`` already sets it or ``SPARSE_CL_JAX_XLA_CPU_TUNING=0``.

The decision is read when a function is traced, so it is fixed per compiled executable.
"""

from __future__ import annotations

import os
import threading

import jax

EPOCH_LOOPS = ('auto', 'device', 'host')
XLA_CPU_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
XLA_CPU_FLAG_VERSIONS = ('0.10.',)  # jaxlib versions the flag was tested with

_state = threading.local()


def _env_flag(name: str) -> bool | None:
  v = os.environ.get(name)
  if v is None or v == '':
    return None
  if v.lower() in ('1', 'true', 'yes', 'on'):
    return True
  if v.lower() in ('0', 'false', 'no', 'off'):
    return False
  raise ValueError(f'{name}={v!r}: use 1 or 0.')


def fast_ops() -> bool:
  """Whether models use :mod:`sparse_cl_jax.ops` (see the module docstring)."""
  forced = getattr(_state, 'fast_ops', None)
  if forced is not None:
    return forced
  env = _env_flag('SPARSE_CL_JAX_FAST_OPS')
  if env is not None:
    return env
  return jax.default_backend() == 'cpu'


class use_fast_ops:  # pylint: disable=invalid-name
  """Forces :func:`fast_ops` on or off (``None``: back to the default); also a context manager.

  Example::

    with runtime.use_fast_ops(False):
      hvp = jax.jvp(jax.grad(loss), (params,), (v,))  # forward mode through stock convs
  """

  def __init__(self, enabled: bool | None):
    self._enabled = enabled
    self._saved = getattr(_state, 'fast_ops', None)
    _state.fast_ops = enabled

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    _state.fast_ops = self._saved
    return False


def epoch_loop(requested: str = 'auto') -> str:
  """``'device'`` or ``'host'``: how the trainer loops over an epoch's batches.

  ``'auto'`` picks ``'device'`` on every backend. Measured on the 2-core CPU machine with the
  fast ops (small convnet, batch 128): the in-loop step is as fast as a top-level one and saves
  the per-step dispatch; without the fast ops ``'host'`` would be several times faster there,
  which is why the fast ops and the device loop go together.
  """
  if requested not in EPOCH_LOOPS:
    raise ValueError(f'epoch_loop={requested!r}; valid: {", ".join(EPOCH_LOOPS)}.')
  if requested != 'auto':
    return requested
  return 'device'


DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'sparse_cl_jax', 'xla')
_cache_dir: list[str | None] = [None]


def compilation_cache_dir(requested: str | None = None) -> str | None:
  """The directory :func:`enable_compilation_cache` uses for ``requested``.

  ``None`` or ``''``: ``$SPARSE_CL_JAX_CACHE_DIR`` if set, else :data:`DEFAULT_CACHE_DIR`
  (``~/.cache/sparse_cl_jax/xla``); ``'none'`` (or ``SPARSE_CL_JAX_CACHE_DIR=none``): no cache.
  """
  path = requested or os.environ.get('SPARSE_CL_JAX_CACHE_DIR') or DEFAULT_CACHE_DIR
  if path.lower() in ('none', 'off', '0'):
    return None
  return os.path.abspath(os.path.expanduser(path))


def cache_min_compile_seconds() -> float:
  """Compile time from which an executable is cached: ``$SPARSE_CL_JAX_CACHE_MIN_SECONDS`` or 0.2.

  0 caches every executable (the test suite: its many small programs recompile in every
  process and every new trainer otherwise).
  """
  value = os.environ.get('SPARSE_CL_JAX_CACHE_MIN_SECONDS', '0.2')
  try:
    return max(0.0, float(value))
  except ValueError:
    raise ValueError(f'SPARSE_CL_JAX_CACHE_MIN_SECONDS={value!r} must be a number of seconds '
                     '(e.g. 0.2)') from None


def enable_compilation_cache(requested: str | None = None) -> str | None:
  """Turns JAX's persistent compilation cache on at :func:`compilation_cache_dir` (requested).

  Every executable that took at least 0.2 s (:func:`cache_min_compile_seconds`) to compile is
  written there and loaded instead of
  compiled by any later process that builds the same program (same shapes, same config, same
  jax/jaxlib and backend). Returns the directory, or ``None`` when turned off. Calling it again
  with another directory moves the cache; with ``'none'`` it turns the cache off.

  The cache is trusted code: do not point it at a directory others can write to.
  """
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  path = compilation_cache_dir(requested)
  if path == _cache_dir[0]:
    return path
  if path is None:
    jax.config.update('jax_compilation_cache_dir', None)
  else:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise ValueError(f'compilation cache directory {path!r} cannot be created ({e}); set '
                       'config.compilation_cache to a writable directory or to "none"') from e
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', cache_min_compile_seconds())
  cc.reset_cache()  # JAX decides once per process whether to use a cache: decide again
  _cache_dir[0] = path
  return path


def _configure_xla_cpu() -> bool:
  """Adds :data:`XLA_CPU_FLAG` to ``XLA_FLAGS`` if still possible (see the module docstring)."""
  if _env_flag('SPARSE_CL_JAX_XLA_CPU_TUNING') is False:
    return False
  flags_now = os.environ.get('XLA_FLAGS', '')
  if 'ynn_fusion_type' in flags_now:
    return False
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if not jaxlib.__version__.startswith(XLA_CPU_FLAG_VERSIONS):
      return False
    if xla_bridge.backends_are_initialized():
      return False
  except (ImportError, AttributeError):
    return False
  os.environ['XLA_FLAGS'] = (flags_now + ' ' + XLA_CPU_FLAG).strip()
  return True


XLA_CPU_TUNED = _configure_xla_cpu()
