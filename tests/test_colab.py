"""The Colab notebooks run top to bottom (shell/magic lines skipped, plots to a non-GUI backend)."""

import glob
import json
import os

import matplotlib
import pytest

_COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(_COLAB, "*.ipynb"))))
def test_notebook_runs(path, monkeypatch, tmp_path):
  matplotlib.use("Agg")
  monkeypatch.chdir(tmp_path)
  with open(path) as f:
    nb = json.load(f)
  env = {"__name__": "notebook"}
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    lines = [l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("!", "%"))]
    src = "\n".join(lines).replace("/tmp/colab_", str(tmp_path / "colab_"))
    exec(compile(src, path, "exec"), env)  # pylint: disable=exec-used
  if os.path.basename(path) == "quickstart.ipynb":
    assert env["results"]["packnet"]["bwt"] == 0.0
