"""Packaging: the version's one source, the presets shipped in the package, ``python -m``, the docs.

Building a wheel and installing it into a fresh venv needs PyPI and minutes, so it is not part of
the suite: ``make wheel-check`` does it (README, "Install as a package").
"""

import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

import sparse_cl_jax
from sparse_cl_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))


def _pyproject() -> dict:
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def launch(*args, cwd, launcher=("-m", "sparse_cl_jax")):
  return subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True,
                        cwd=cwd, timeout=120, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_version_has_one_source():
  assert re.fullmatch(r"\d+\.\d+\.\d+(\w+\d*)?", sparse_cl_jax.__version__)
  project = _pyproject()
  assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
  attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert attr == "sparse_cl_jax.__version__"
  # The installed distribution's metadata (what a wheel carries) is built from that attribute.
  installed = importlib.metadata.version("sparse_cl_jax")
  assert installed == sparse_cl_jax.__version__, (
      f"installed metadata says {installed}, sparse_cl_jax.__version__ {sparse_cl_jax.__version__}: "
      "reinstall (make install)")
  newest = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
  assert newest and newest.group(1) == sparse_cl_jax.__version__, "CHANGELOG.md's newest entry"


def test_metadata_has_license_classifiers_and_extras():
  # (No Project-URL: the public address is not recorded in the checkout; see pyproject.toml.)
  meta = importlib.metadata.metadata("sparse_cl_jax")
  assert meta["License-Expression"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
  assert meta.get_all("Classifier")
  extras = set(meta.get_all("Provides-Extra"))
  assert {"docs", "wandb", "dev", "tfds", "cuda12"} <= extras


def test_every_package_is_listed_and_configs_ship_as_a_subpackage():
  setuptools = _pyproject()["tool"]["setuptools"]
  on_disk = {".".join(("sparse_cl_jax", *p.parent.relative_to(ROOT / "sparse_cl_jax").parts))
             for p in (ROOT / "sparse_cl_jax").rglob("__init__.py")}
  assert set(setuptools["packages"]) == on_disk | {"sparse_cl_jax.configs"}
  assert setuptools["package-dir"] == {"sparse_cl_jax.configs": "configs"}
  assert (ROOT / "configs" / "__init__.py").is_file()


@pytest.mark.parametrize("name", PRESETS)
def test_every_config_file_is_a_packaged_preset(name, tmp_path, monkeypatch):
  assert {"packnet", "cpg", "pae", "piggyback", "dst"} <= set(PRESETS)
  monkeypatch.chdir(tmp_path)  # no reliance on the checkout being the working directory
  path, arg = cli.resolve_config_spec(f"{name}:runlocal")
  assert arg == "runlocal" and os.path.samefile(path, ROOT / "configs" / f"{name}.py")
  by_name = cli.load_config_file(f"{name}:runlocal")
  by_path = cli.load_config_file(f"{ROOT / 'configs' / name}.py:runlocal")
  assert by_name.to_dict() == by_path.to_dict()
  # Also importable as a module of the package (how it sits in a wheel): sibling files load too.
  module = importlib.import_module(f"sparse_cl_jax.configs.{name}")
  assert module.get_config("runlocal").to_dict() == by_path.to_dict()


def test_a_path_stays_a_path():
  assert cli.resolve_config_spec("configs/packnet.py:runlocal") == ("configs/packnet.py", "runlocal")
  assert cli.resolve_config_spec("my_config.py") == ("my_config.py", "")
  with pytest.raises(cli.UsageError, match=r"no such file nope/packnet.py"):
    cli.load_config_file("nope/packnet.py")


def test_an_unknown_preset_is_refused_in_one_line_listing_them():
  with pytest.raises(cli.UsageError) as info:
    cli.resolve_config_spec("packnt:runlocal")
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("--config=packnt:runlocal: no preset named 'packnt'; did you mean "
                            "packnet? the presets are ")
  assert ", ".join(PRESETS) in message


def test_python_m_refuses_an_unknown_preset_outside_the_checkout(tmp_path):
  out = launch("--config=nosuch:runlocal", f"--workdir={tmp_path}/w", cwd=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
  assert out.stderr.startswith("error: --config=nosuch:runlocal: no preset named 'nosuch'; the "
                               "presets are clnp, cpg,"), out.stderr
  assert not (tmp_path / "w").exists()  # nothing ran


def test_python_m_is_the_launcher_of_experiments_main(tmp_path):
  by_name = launch("--config=packnet:runlocal", "--config.epochs=3", "--print_config", cwd=tmp_path)
  by_path = launch(f"--config={ROOT / 'configs' / 'packnet.py'}:runlocal", "--config.epochs=3",
                   "--print_config", cwd=tmp_path, launcher=(str(ROOT / "experiments" / "main.py"),))
  assert by_name.returncode == 0 and by_path.returncode == 0, by_name.stderr + by_path.stderr
  config_lines = lambda out: [line for line in out.stdout.splitlines() if line.startswith("--")]
  assert config_lines(by_name) == config_lines(by_path) and "--config.epochs=3" in by_name.stdout
  flag_names = lambda out: re.findall(r"^  (--\w+):", out.stdout, flags=re.M)
  helps = [launch("--help", cwd=tmp_path),
           launch("--help", cwd=tmp_path, launcher=(str(ROOT / "experiments" / "main.py"),))]
  assert all(h.returncode == 0 for h in helps)
  assert flag_names(helps[0]) == flag_names(helps[1]) and "--workdir" in flag_names(helps[0])


def _docs_hooks():
  pytest.importorskip("mkdocs")
  spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_docs_includes_name_existing_sections():
  """Every ``<!-- include FILE "HEADING" -->`` of docs/ finds its section (as ``make docs`` does)."""
  hooks = _docs_hooks()
  docs = ROOT / "docs"
  pages = sorted(docs.rglob("*.md"))
  found = 0
  for page in pages:
    text = page.read_text()
    found += len(hooks._DIRECTIVE.findall(text))  # pylint: disable=protected-access
    expanded = hooks.expand_includes(text, page, docs)
    assert "<!-- include" not in expanded, page
  assert found >= 15
  systems = (docs / "systems" / "cpg.md").read_text()
  assert "| Per-task BatchNorm |" in hooks.expand_includes(systems, docs / "systems" / "cpg.md",
                                                            docs)


def test_docs_api_reference_covers_every_public_module():
  hooks = _docs_hooks()
  listed = [m for _, modules in hooks.api_pages() for m in modules]
  assert len(listed) == len(set(listed))
  assert {"sparse_cl_jax", "sparse_cl_jax.transforms", "sparse_cl_jax.experiment",
          "sparse_cl_jax.sweep", "sparse_cl_jax.methods.packnet", "sparse_cl_jax.train.trainer",
          "sparse_cl_jax.cli"} <= set(listed)
  assert set(listed) == set(hooks.public_modules())
  assert not any("__main__" in m for m in listed)


def test_docs_literal_blocks_become_fenced_code():
  spec = importlib.util.spec_from_file_location("griffe_docstrings",
                                                ROOT / "docs" / "griffe_docstrings.py")
  pytest.importorskip("griffe")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  text = "Use it::\n\n  x = a[t][idx]\n\n  y = 1\nAfter, :func:`run` and :class:`~a.B`."
  assert module.markdown_literal_blocks(text) == (
      "Use it:\n\n```\nx = a[t][idx]\n\ny = 1\n```\n\nAfter, `run` and `a.B`.")
