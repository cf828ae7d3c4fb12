"""Datasets, continual-learning task streams, exemplar memory and jit-friendly batching.

Three layers, each usable alone, one concept per module:

1. **Sources**: a whole labelled image dataset as host numpy arrays, ``uint8`` NHWC images and
   ``int32`` labels, with a train and a test split. Nothing here ever downloads anything.

   * `source`: the `Source` type, `from_arrays` (uint8/label conversion), `resize_source`.
   * `catalog`: `load_source` and `SOURCE_NAMES` (digits, Fashion-MNIST, MNIST, CIFAR-10/100,
     ``tfds:<name>``, Tiny-ImageNet, miniImageNet) and their defaults.
   * `formats`: one reader per file format: `formats.idx` (`read_idx`), `formats.cifar` (the
     official python archives), `formats.safe_pickle` (the restricted unpickler every user
     pickle goes through), `formats.tfds` (a prepared TFDS tree; ``tensorflow-datasets`` is
     imported only when used), `formats.folders` (npz pair / image folders / miniImageNet
     pickles, and `save_npz`).
2. **Task streams** (`make_stream`): Split-X (disjoint class groups) or Permuted-X (all classes,
   one fixed pixel permutation per task), task- or class-incremental labels, a stratified
   validation split held out from the training data (the test split is never used for
   selection), and every task padded to the same shape and stacked, so one jitted step compiles
   once for all tasks.

   * `streams`: `Task`, `TaskStream`, `make_stream` and its phases (pixel permutations, stacking
     a split, output masks).
   * `selection`: class orders, the classes and source rows of each task, `stream_source_rows`
     and `unused_train_rows` (unlabeled pools drawn from what a capped stream leaves over).
   * `splits`: seeded stratified splits and subsampling, and the seed salts of the package.
   * `normalization`: `normalize` and the per-channel statistics of a stream.
3. **Exemplar memory and batching**.

   * `memory`: `select_exemplars` (random or iCaRL herding, Rebuffi et al. 2017, Alg. 4; used
     by Lifelong Lottery Tickets) and `ExemplarMemory`, a fixed-shape rehearsal buffer.
   * `batching`: device-side batching inside jit (`epoch_permutation`, `num_batches`,
     `batch_indices`).

The names below are re-exported, so ``data.NAME`` works for each.

Example::

  from sparse_cl_jax import data

  source = data.load_source('digits')
  stream = data.make_stream(source, scenario='split', num_tasks=5, incremental='task')
  x = jnp.asarray(stream.x_train)          # uint8 [T, N_max, 8, 8, 1], on device once
  perm = data.epoch_permutation(key, stream.n_train[t], stream.x_train.shape[1])
  idx, valid = data.batch_indices(perm, step, batch_size, stream.n_train[t])
  images = stream.normalize(x[t][idx])     # float32, inside jit
"""

from sparse_cl_jax.data.batching import batch_indices
from sparse_cl_jax.data.batching import epoch_permutation
from sparse_cl_jax.data.batching import num_batches
from sparse_cl_jax.data.catalog import DIGITS_TEST_FRACTION
from sparse_cl_jax.data.catalog import FASHION_MNIST_CLASSES
from sparse_cl_jax.data.catalog import FASHION_MNIST_DIR
from sparse_cl_jax.data.catalog import SOURCE_NAMES
from sparse_cl_jax.data.catalog import load_source
from sparse_cl_jax.data.formats.cifar import CIFAR_ARCHIVES
from sparse_cl_jax.data.formats.folders import MINI_IMAGENET_TEST_FRACTION
from sparse_cl_jax.data.formats.folders import save_npz
from sparse_cl_jax.data.formats.idx import read_idx
from sparse_cl_jax.data.formats.tfds import TFDS_PREPARE
from sparse_cl_jax.data.memory import ExemplarMemory
from sparse_cl_jax.data.memory import select_exemplars
from sparse_cl_jax.data.normalization import normalize
from sparse_cl_jax.data.selection import stream_source_rows
from sparse_cl_jax.data.selection import unused_train_rows
from sparse_cl_jax.data.source import Source
from sparse_cl_jax.data.source import from_arrays
from sparse_cl_jax.data.source import resize_source
from sparse_cl_jax.data.streams import INCREMENTAL
from sparse_cl_jax.data.streams import SCENARIOS
from sparse_cl_jax.data.streams import Task
from sparse_cl_jax.data.streams import TaskStream
from sparse_cl_jax.data.streams import make_stream

__all__ = [
    'CIFAR_ARCHIVES',
    'DIGITS_TEST_FRACTION',
    'ExemplarMemory',
    'FASHION_MNIST_CLASSES',
    'FASHION_MNIST_DIR',
    'INCREMENTAL',
    'MINI_IMAGENET_TEST_FRACTION',
    'SCENARIOS',
    'SOURCE_NAMES',
    'Source',
    'TFDS_PREPARE',
    'Task',
    'TaskStream',
    'batch_indices',
    'epoch_permutation',
    'from_arrays',
    'load_source',
    'make_stream',
    'normalize',
    'num_batches',
    'read_idx',
    'resize_source',
    'save_npz',
    'select_exemplars',
    'stream_source_rows',
    'unused_train_rows',
]
