"""The main job: PackNet and fine-tuning on 5-task Split-Digits (embedded data, no download).

  python experiments/demo.py --workdir=/tmp/sparse_cl_jax_demo

Prints both accuracy matrices with ACC and BWT, then a side-by-side summary. Each run writes its
own WORKDIR/<method>/results.json; an earlier demo in the same WORKDIR is moved aside.
"""

import os
import sys

from absl import app
from absl import flags

from sparse_cl_jax import experiment
from sparse_cl_jax import reliability

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/sparse_cl_jax_demo", "Output folder.")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, os.path.join(_REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv):
  del argv
  results = {}
  for name in ("finetune", "packnet"):
    config = _load_config(name)
    config.progress = False
    try:
      results[name] = experiment.run(config, os.path.join(_WORKDIR.value, name), overwrite=True)
    except reliability.FaultError as e:  # one line naming the fault and what to do
      sys.exit(f"error: {name}: {e}")
  print("\nSummary (5-task Split-Digits, task-IL, test split):")
  print(f"{'method':<10} {'ACC':>8} {'BWT':>8} {'density':>8} {'seconds':>8}")
  for name, r in results.items():
    print(f"{name:<10} {r['acc']:8.4f} {r['bwt']:8.4f} {r['density_per_task'][-1]:8.4f} "
          f"{r['train_seconds']:8.1f}")


if __name__ == "__main__":
  app.run(main)
