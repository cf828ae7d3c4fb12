r"""Runs one continual-learning experiment from a config file.

  python experiments/main.py --config=configs/packnet.py --workdir=/tmp/packnet
  python experiments/main.py --config=configs/packnet.py:runlocal --workdir=/tmp/pn \
      --config.epochs=3 --config.seed=1
  python experiments/main.py --config=configs/cpg.py:runlocal --workdir=/tmp/cpg_vgg \
      --config.model=vgg16_bn --config.model_kwargs.fc_layers=true --config.dataset=cifar10
  python experiments/main.py --config=configs/cpg.py:cifar100 --help   # every field and its value
  python experiments/main.py --config=configs/packnet.py --config.epochs=3 --print_config

--config.FIELD=VALUE sets any field of the config (--config.model_kwargs.FIELD=VALUE any field of
its model). Re-running with the same --workdir resumes an interrupted run; a finished run is
refused unless --overwrite (which moves it aside). The run writes WORKDIR/results.json,
WORKDIR/metrics.csv and WORKDIR/tensorboard/ (per epoch), WORKDIR/plots/*.png, and prints where.

Errors end with one line on stderr: exit status 2 for a command-line mistake (nothing ran), 1 for
a fault of the run: a diverging loss (--config.divergence_threshold), a --workdir another process
is using, no valid checkpoint left. A corrupt checkpoint is set aside
(WORKDIR/corrupt-checkpoints) and the run resumes from the newest valid one.
"""

from sparse_cl_jax import __main__ as launcher  # the flags and main of python -m sparse_cl_jax
from sparse_cl_jax import cli

if __name__ == "__main__":
  cli.run(launcher.main, required=("config", "workdir"))
