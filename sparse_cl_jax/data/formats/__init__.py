"""Readers of dataset file formats, each returning a `data.source.Source`; nothing downloads.

* `idx`: IDX files (MNIST, Fashion-MNIST).
* `cifar`: the official CIFAR-10/100 python archives, read in place.
* `safe_pickle`: the restricted unpickler (numpy arrays, dicts, lists, strings only) that reads
  every user-supplied pickle (CIFAR batches, miniImageNet caches).
* `tfds`: a TFDS tree prepared in ``array_record`` format (imports ``tensorflow_datasets`` only
  when called).
* `folders`: the layouts of a prepared directory (``train.npz``/``test.npz``, image folders,
  miniImageNet cache pickles) and `folders.save_npz`, the writer of the first.
"""
