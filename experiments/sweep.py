r"""Runs a sweep: a grid of runs over config fields, together, sharing compiled programs.

  python experiments/sweep.py --config=configs/packnet.py:runlocal --workdir=/tmp/pn_sweep \
      --sweep.seed=0,1 --sweep.learning_rate=0.05,0.1
  python experiments/sweep.py --config=configs/dst_cl.py:fashion_mnist --workdir=/tmp/dst \
      --sweep.dst.sparsity=0.8,0.9 --sweep.seed=0,1,2 --config.epochs=2 --max_parallel=4
  python experiments/sweep.py --config=configs/packnet.py --workdir=/tmp/pn_hidden \
      --sweep.hidden='64,64;128' --sweep.packnet.prune_fraction=0.5,0.75

The grid is the product of the listed values (the last --sweep flag varies fastest). --sweep.FIELD
takes any field of the config, nested ones too (--sweep.packnet.prune_fraction=0.5,0.75,
--sweep.model_kwargs.NAME=...); its values are parsed by the type of the field's value, like
--config overrides, and separated by ',' -- or by ';' when the field holds a tuple
(--sweep.hidden='64,64;128': two cells, hidden=(64, 64) and hidden=(128,); '()' is the empty
tuple) or when a value has commas in it (--sweep.class_order='natural;4,3,2,1,0,9,8,7,6,5').
--config.FIELD=VALUE overrides apply first; each cell's values then override them. Without any
--sweep flag the sweep has one cell, 'base'. method, progress, compilation_cache, num_devices and
data_dir cannot vary (one sweep per config file; a cell runs on one device).

Every cell is a normal run (as experiments/main.py would do it) in WORKDIR/<cell>/, named
FIELD-VALUE for each swept field joined by '_' (e.g. seed-0_learning_rate-0.05): results.json,
metrics.csv, tensorboard/, plots/, checkpoints/. The cells run at once, one thread each, and the
calls of cells whose programs are the same computation (cells that differ in seed, learning rate
and other data-valued fields) run as one vmapped program. --max_parallel=N runs at most N cells at
a time, in waves (the next N start once the whole wave has ended).

Writes WORKDIR/sweep.json (the grid, the command, per cell: its values, folder, program class and
how many cells share it, which cells its program calls were batched with, status done / diverged /
failed / pending, a one-line error, ACC, BWT; rewritten as cells end), WORKDIR/summary.md (one
row per combination of the fields other than seed: ACC and BWT as mean +- sample sd over the seeds,
with n; also printed) and WORKDIR/compare.{md,csv,png} over the finished cells.

Re-running the same command continues the sweep: finished cells are read back, unfinished ones
resume from their checkpoints. A WORKDIR holding a sweep of another grid or config is refused
unless --overwrite (which moves its content to WORKDIR/previous-<time>/, nothing is deleted).

Errors end with one line on stderr: exit status 2 for a command-line mistake (an unknown or fixed
field, a bad, empty or repeated value, a field given twice, a cell whose config is invalid; nothing
ran), 1 for a fault: a refused WORKDIR, or cells that diverged or failed (named; every other cell
finished and every file is written).
"""

from absl import flags

from sparse_cl_jax import cli
from sparse_cl_jax import sweep

_CONFIG = cli.define_config("config", None, "Config file and preset: configs/<method>.py[:<preset>]"
                            " (the presets are in the file's docstring).")
_SWEEP = cli.define_sweep("sweep", _CONFIG,
                          "the values of one config field in the grid, separated by ',' (by ';' "
                          "for a tuple-valued field, e.g. --sweep.hidden='64,64;128'); repeat the "
                          "flag for each field.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: sweep.json, summary.md, compare.*"
                               " and one run directory per cell.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Move the content of --workdir aside "
                               "(previous-<time>/) and start the sweep again.")
_MAX_PARALLEL = flags.DEFINE_integer("max_parallel", 0, "Run at most this many cells at a time, "
                                     "in waves (0 = every cell at once).")
_STOP_AFTER = flags.DEFINE_integer("stop_after_task", None, "Stop every cell after this many "
                                   "tasks (rerun the command to continue).")


def main(argv):
  del argv
  if _MAX_PARALLEL.value < 0:
    raise cli.UsageError(f"--max_parallel={_MAX_PARALLEL.value} must be >= 0 (0 = every cell at "
                         "once)")
  try:
    sweep.run(_CONFIG.value, _SWEEP.grid, _WORKDIR.value,
              base_overrides=dict(_CONFIG.overrides), overwrite=_OVERWRITE.value,
              max_parallel=_MAX_PARALLEL.value, stop_after_task=_STOP_AFTER.value)
  except sweep.GridError as e:
    raise cli.UsageError(cli.as_flags(cli.one_line(e))) from e


if __name__ == "__main__":
  cli.run(main, required=("config", "workdir"))
