"""Runs one continual-learning experiment from a config file.

  python experiments/main.py --config=configs/packnet.py --workdir=/tmp/packnet
  python experiments/main.py --config=configs/packnet.py:runlocal --workdir=/tmp/pn \
      --config.epochs=3 --config.seed=1

Re-running with the same --workdir resumes an interrupted run; a finished run is refused unless
--overwrite (which moves it aside). Results: WORKDIR/results.json.

Faults end with one line on stderr and exit status 1: a diverging loss
(--config.divergence_threshold), a --workdir another process is using, no valid checkpoint left.
A corrupt checkpoint is set aside (WORKDIR/corrupt-checkpoints) and the run resumes from the
newest valid one.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from sparse_cl_jax import experiment
from sparse_cl_jax import reliability

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<method>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and results.json go.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Move a finished run in --workdir aside.")
_STOP_AFTER = flags.DEFINE_integer("stop_after_task", None, "Stop after this many tasks.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  try:
    experiment.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value,
                   stop_after_task=_STOP_AFTER.value)
  except reliability.FaultError as e:  # already one line naming the fault and what to do
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
