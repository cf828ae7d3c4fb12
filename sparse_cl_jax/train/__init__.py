"""The jitted continual-learning loop: steps, epoch loops, recorded operations, evaluation.

Harness layer of the design. One :class:`Trainer` serves a whole task stream; its rooms:

* :mod:`~sparse_cl_jax.train.state`: ``TrainState`` (everything that changes during a run) and
  the on-device data types (``TaskData``, ``DeviceData``, ``EpochStats``).
* :mod:`~sparse_cl_jax.train.sources`: ``Source`` for the multi-source step and its checks.
* :mod:`~sparse_cl_jax.train.optim`: the base optimiser of a config and the step-decay schedule.
* :mod:`~sparse_cl_jax.train.steps`: the pure step bodies (one cross-entropy step, the
  multi-source step, on-device batch gathering and augmentation, chunks of an epoch).
* :mod:`~sparse_cl_jax.train.evaluation`: accuracy counts and raw outputs in eval mode.
* :mod:`~sparse_cl_jax.train.loops`: the epochs of one training operation and their duties
  (divergence check, per-epoch log, early stop, checkpoints inside a task).
* :mod:`~sparse_cl_jax.train.oplog`: the operation log that replays a resumed run.
* :mod:`~sparse_cl_jax.train.trainer`: the :class:`Trainer` that orchestrates them.

Randomness is derived from (seed, task, operation, epoch), so a resumed run ends with the same
results as one that was never interrupted. With more than one device (``config.num_devices``),
batches are sharded over a ``jax.sharding`` mesh axis ``'data'`` and the state is replicated.
"""

from sparse_cl_jax.train import evaluation
from sparse_cl_jax.train import loops
from sparse_cl_jax.train import oplog
from sparse_cl_jax.train import optim
from sparse_cl_jax.train import sources
from sparse_cl_jax.train import state
from sparse_cl_jax.train import steps
from sparse_cl_jax.train import trainer
from sparse_cl_jax.train.oplog import Resume
from sparse_cl_jax.train.optim import lr_for_epoch
from sparse_cl_jax.train.optim import make_base_tx
from sparse_cl_jax.train.sources import SOURCE_ORDERS
from sparse_cl_jax.train.sources import Source
from sparse_cl_jax.train.state import DeviceData
from sparse_cl_jax.train.state import EpochStats
from sparse_cl_jax.train.state import TaskData
from sparse_cl_jax.train.state import TrainState
from sparse_cl_jax.train.steps import StepEnv
from sparse_cl_jax.train.trainer import Forward
from sparse_cl_jax.train.trainer import Trainer
