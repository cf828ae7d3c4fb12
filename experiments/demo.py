"""The main job: PackNet and fine-tuning on 5-task Split-Digits (embedded data, no download).

  python experiments/demo.py --workdir=/tmp/sparse_cl_jax_demo

Prints both accuracy matrices with ACC and BWT, then a side-by-side summary. Each run writes its
own WORKDIR/<method>/ (results.json, metrics.csv, tensorboard/, plots/); an earlier demo in the
same WORKDIR is moved aside. WORKDIR/compare.md and compare.png put the two runs side by side.
"""

import os

from absl import flags

from sparse_cl_jax import cli
from sparse_cl_jax import distributed
from sparse_cl_jax import experiment
from sparse_cl_jax import logs

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/sparse_cl_jax_demo", "Output folder.")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  del argv
  runs = {}
  for name in ("finetune", "packnet"):
    config = cli.load_config_file(os.path.join(_REPO, "configs", f"{name}.py"))
    config.progress = False
    runs[name] = os.path.join(_WORKDIR.value, name)
    experiment.run(config, runs[name], overwrite=True)
  if not distributed.is_primary():  # process 0 writes and prints a multi-process demo's summary
    return
  rows = logs.compare_rows(list(runs.values()))
  table = logs.compare_table(rows)
  logs.write_compare_files(rows, _WORKDIR.value, title="5-task Split-Digits, task-IL, test split")
  print(f"\nSummary (5-task Split-Digits, task-IL, test split):\n{table}")
  print(f"side by side: {os.path.join(_WORKDIR.value, 'compare.md')} and compare.png")


if __name__ == "__main__":
  cli.run(main)
