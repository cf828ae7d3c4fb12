"""The notebooks in colab/ run top to bottom in a fresh Python kernel (nbclient), as a user runs them.

Each notebook's first cell finds the checkout it sits in (the kernel starts in colab/) and installs
the package only where it is missing; its runs write under SPARSE_CL_JAX_NOTEBOOK_DIR. A failing
cell (including a notebook's own assertions about its numbers) fails the test with its traceback.
"""

import glob
import os

import nbclient
import nbformat
import pytest

_COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(_COLAB, "*.ipynb")))


def test_one_notebook_per_system():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "cpg.ipynb", "clnp.ipynb", "dst.ipynb", "llt.ipynb",
          "prac.ipynb"} <= names


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.xdist_group(
    f"notebook_{os.path.basename(p)}")) for p in NOTEBOOKS], ids=os.path.basename)
def test_notebook_runs_in_a_fresh_kernel(path, tmp_path, monkeypatch):
  monkeypatch.setenv("SPARSE_CL_JAX_NOTEBOOK_DIR", str(tmp_path))
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as on a user's machine
  nb = nbformat.read(path, as_version=4)
  first = "".join(nb.cells[1].source) if len(nb.cells) > 1 else ""
  assert "pip" in first and "install" in first and "git" in first  # installs; clones on Colab
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": _COLAB}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook shows no plot"
  assert not any(o.get("output_type") == "error" for o in outputs)
