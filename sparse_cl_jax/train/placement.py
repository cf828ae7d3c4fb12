"""Device placement: the ``'data'`` mesh of a run, replicated state, and the stream on device.

With one device everything is a plain ``jax.device_put``. With ``config.num_devices`` > 1 (0 =
all local devices) the state and the stream are replicated over a one-axis ``'data'`` mesh and
the step bodies shard every gathered batch over it (:func:`steps.shard_batch`): plain data
parallelism by GSPMD. With several processes (:mod:`sparse_cl_jax.distributed`) the mesh holds
every process's devices: each process places the same stream on its own devices, and inside the
jitted step each device gathers only its rows of every batch (no process builds a global batch).
"""

from __future__ import annotations

import jax
import numpy as np

from sparse_cl_jax.train import state as state_lib


def make_mesh(num_devices: int, batch_size: int, eval_batch_size: int):
  """A one-axis ``'data'`` mesh over the run's devices (None for one device).

  One process: the first ``num_devices`` local devices (0 = all). Several processes
  (``sparse_cl_jax.distributed``): every device of every process, so ``num_devices`` must be 0 or
  the global count; each process computes its devices' share of every batch.
  """
  if jax.process_count() > 1:
    n_dev = int(num_devices) or jax.device_count()
    if n_dev != jax.device_count():
      raise ValueError(f"config.num_devices={num_devices}: this run spans {jax.process_count()} "
                       f"processes with {jax.device_count()} devices in all and uses every one "
                       "of them; set --config.num_devices=0")
    devices = jax.devices()
  else:
    n_dev = int(num_devices) or jax.local_device_count()
    if n_dev > jax.local_device_count():
      raise ValueError(f"config.num_devices={n_dev} but only {jax.local_device_count()} local "
                       "devices exist")
    devices = jax.local_devices()[:n_dev]
  if n_dev <= 1:
    return None
  if batch_size % n_dev or eval_batch_size % n_dev:
    raise ValueError(f"config.batch_size={batch_size} and eval_batch_size="
                     f"{eval_batch_size} must be divisible by the {n_dev} devices")
  return jax.sharding.Mesh(np.array(devices), ("data",))


def for_run(config, *, run_mesh: jax.sharding.Mesh | None = None) -> "Placement":
  """The placement of a run (its ``'data'`` mesh from ``config.num_devices``), or, given the
  sweep's ``run_mesh`` with several processes, of a sweep cell: replicated on every device of
  that mesh, its batched programs split over its ``'run'`` axis (train/lockstep.py), no
  ``'data'`` axis inside the cell."""
  if run_mesh is not None and jax.process_count() > 1:
    return Placement(None, jax.sharding.NamedSharding(run_mesh, jax.sharding.PartitionSpec()))
  return Placement(make_mesh(config.num_devices, int(config.batch_size),
                             int(config.eval_batch_size)))


class Placement:
  """Where a run's arrays live: ``put`` places any pytree (replicated over the mesh if any)."""

  def __init__(self, mesh: jax.sharding.Mesh | None,
               replicated: jax.sharding.NamedSharding | None = None):
    self.mesh = mesh
    if replicated is None and mesh is not None:
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.replicated = replicated

  def put(self, x):
    """``x`` (any pytree) placed on the run's device(s): replicated over the mesh if any."""
    if self.replicated is None:
      return jax.device_put(x)
    if self.replicated.is_fully_addressable:
      return jax.device_put(x, self.replicated)
    return jax.tree.map(self._put_everywhere, x)

  def _put_everywhere(self, a):
    """One leaf replicated over devices of several processes, from this process's copy.

    Each process places its own copy on its own devices (``jax.device_put`` with a sharding that
    spans processes would first compare the copies of all processes by a collective, which the
    threads of a sweep cannot order).
    """
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      if a.sharding == self.replicated:
        return a
      return jax.device_put(a, self.replicated)
    mine = self.replicated.addressable_devices
    local = [jax.device_put(a, d) for d in sorted(mine, key=lambda d: d.id)]
    return jax.make_array_from_single_device_arrays(local[0].shape, self.replicated, local)

  def split(self, stream, split: str, pad_to: int | None = None) -> state_lib.DeviceData:
    """One split of the stream (``[T, N_max, ...]``), its rows padded to ``pad_to``."""
    arrays = [np.asarray(getattr(stream, f"{p}_{split}")) for p in ("x", "y", "ids", "n")]
    if pad_to is not None and pad_to > arrays[0].shape[1]:
      extra = pad_to - arrays[0].shape[1]
      for i, fill in ((0, 0), (1, 0), (2, -1)):
        widths = [(0, 0), (0, extra)] + [(0, 0)] * (arrays[i].ndim - 2)
        arrays[i] = np.pad(arrays[i], widths, constant_values=fill)
    return state_lib.DeviceData(*(self.put(a) for a in arrays))

  def stream(self, stream) -> tuple[state_lib.DeviceData, ...]:
    """The stream's train, validation and test splits on the device(s).

    Validation and test are padded to one size so that evaluation compiles once for both.
    """
    n_eval = max(stream.x_val.shape[1], stream.x_test.shape[1])
    return (self.split(stream, "train"), self.split(stream, "val", pad_to=n_eval),
            self.split(stream, "test", pad_to=n_eval))
