"""Puts finished runs side by side: one table (ACC, BWT, forgetting, density, time) and one plot.

  python experiments/compare.py /tmp/packnet /tmp/finetune /tmp/cpg
  python experiments/compare.py /tmp/dst_sweep/*_seed0 --out=/tmp/dst_compare

Reads each run directory's results.json. Prints the table (Markdown) and writes OUT/compare.md,
OUT/compare.csv and OUT/compare.png (average accuracy over the tasks seen, after each task, one
line per run); OUT defaults to the current folder.
"""

from absl import flags

from sparse_cl_jax import cli
from sparse_cl_jax import logs

_OUT = flags.DEFINE_string("out", ".", "Folder for compare.md, compare.csv and compare.png.")
_TITLE = flags.DEFINE_string("title", "", "Title of the plot.")


def main(argv):
  if len(argv) < 2:
    raise cli.UsageError("name the run directories to compare, e.g. compare.py /tmp/pn /tmp/ft")
  rows = logs.compare_rows(argv[1:])
  print(logs.compare_table(rows))
  paths = logs.write_compare_files(rows, _OUT.value, title=_TITLE.value)
  print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
  cli.run(main, positional=True)
