r"""Runs one continual-learning experiment: ``python -m sparse_cl_jax`` (an installed package).

  python -m sparse_cl_jax --config=packnet:runlocal --workdir=/tmp/pn
  python -m sparse_cl_jax --config=cpg:cifar100 --config.data_dir=/data --workdir=/tmp/cpg_c100
  python -m sparse_cl_jax --config=path/to/my_config.py:ARG --workdir=/tmp/mine
  python -m sparse_cl_jax --config=packnet --help   # every field and its value

--config=NAME[:ARG] is a preset shipped with the package (the checkout's configs/NAME.py; an
unknown NAME is refused with the list of them); --config=PATH.py[:ARG] any config file. The same launcher as experiments/main.py, with the same flags: --config.FIELD=VALUE
sets any field, re-running with the same --workdir resumes, a finished run is refused unless
--overwrite. The run writes WORKDIR/results.json, metrics.csv, tensorboard/ and plots/. Errors end
with one line on stderr: exit status 2 for a command-line mistake (nothing ran), 1 for a fault of
the run.
"""

from absl import flags

from sparse_cl_jax import cli
from sparse_cl_jax import experiment

_CONFIG = cli.define_config("config", None, "Packaged preset or config file, and its argument: "
                            "NAME[:ARG] (e.g. packnet:runlocal) or PATH.py[:ARG].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, plots, results.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Move a run in --workdir aside and start again.")
_STOP_AFTER = flags.DEFINE_integer("stop_after_task", None, "Stop after this many tasks.")


def main(argv):
  del argv
  experiment.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value,
                 stop_after_task=_STOP_AFTER.value)


if __name__ == "__main__":
  cli.run(main, required=("config", "workdir"))
