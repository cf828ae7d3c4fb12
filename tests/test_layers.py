"""The package's layering contract, checked over the import graph, and its size bar.

Each layer may import its own layer and the layers before it, never a later one (every import in
every module counts, including imports inside functions). The README's "Layout" lists the same
layers; a test keeps the two equal. A module that belongs to no layer fails the check, so a new
module is placed on purpose.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparse_cl_jax"

# (layer, top-level names under sparse_cl_jax/): modules or packages. Core is split as DESIGN.md
# does: mask algebra, then criteria, then the optimiser plumbing.
LAYERS = (
    ("core", ("types", "masks", "topk", "sparsity")),
    ("core", ("criteria",)),
    ("core", ("growth", "transforms", "schedules")),
    ("harness", ("runtime", "reliability", "distributed", "ops", "models", "augment", "fields", "config", "data",
                 "protocol", "train", "metrics", "checkpoint", "trackers", "logs")),
    ("methods", ("methods",)),
    ("experiment", ("experiment", "sweep")),
    ("launchers", ("cli", "__main__")),
)
# The package's own __init__ re-exports the core only.
ROOT_RANK = 2


def _rank_of(name: str) -> int | None:
  """The position in LAYERS of module ``sparse_cl_jax.<name>...`` (None: in no layer)."""
  if name == "":
    return ROOT_RANK
  top = name.split(".")[0]
  for rank, (_, names) in enumerate(LAYERS):
    if top in names:
      return rank
  return None


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE).with_suffix("")
  parts = [p for p in rel.parts if p != "__init__"]
  return ".".join(parts)


def _is_module(dotted: str) -> bool:
  rel = pathlib.Path(*dotted.split(".")) if dotted else pathlib.Path()
  return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
  """The ``sparse_cl_jax`` modules ``source`` imports (names relative to the package)."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == "sparse_cl_jax" or alias.name.startswith("sparse_cl_jax."):
          found.add(alias.name[len("sparse_cl_jax."):] if "." in alias.name else "")
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".") if module else []
        if not is_package:
          base = base[:-1]
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        pkg = ".".join(base + ([node.module] if node.module else []))
      elif node.module == "sparse_cl_jax" or (node.module or "").startswith("sparse_cl_jax."):
        pkg = node.module[len("sparse_cl_jax."):] if "." in node.module else ""
      else:
        continue
      for alias in node.names:
        sub = f"{pkg}.{alias.name}" if pkg else alias.name
        found.add(sub if _is_module(sub) else pkg)
  return found


def violations(graph: dict[str, set[str]]) -> list[str]:
  """Every import that runs upward (or involves a module in no layer), one line each."""
  bad = []
  for module, targets in sorted(graph.items()):
    rank = _rank_of(module)
    if rank is None:
      bad.append(f"sparse_cl_jax.{module} is in no layer: add it to LAYERS and the README")
      continue
    for target in sorted(targets):
      t_rank = _rank_of(target)
      if t_rank is None:
        bad.append(f"sparse_cl_jax.{module} imports sparse_cl_jax.{target}, which is in no layer")
      elif t_rank > rank and LAYERS[t_rank][0] != LAYERS[rank][0]:
        bad.append(f"sparse_cl_jax.{module} ({LAYERS[rank][0]}) imports upward: "
                   f"sparse_cl_jax.{target} ({LAYERS[t_rank][0]})")
      elif t_rank > rank:
        bad.append(f"sparse_cl_jax.{module} imports sparse_cl_jax.{target}, a later part of "
                   f"{LAYERS[rank][0]}")
  return bad


def import_graph() -> dict[str, set[str]]:
  graph = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    name = _module_name(path)
    graph[name] = imports_of(path.read_text(), name, path.name == "__init__.py") - {name}
  return graph


def test_nothing_imports_upward():
  graph = import_graph()
  assert "train.trainer" in graph and "methods.base" in graph  # the walk sees the packages
  assert not violations(graph), "\n".join(violations(graph))


def test_the_check_catches_an_upward_import():
  source = "from sparse_cl_jax.methods import base\nfrom sparse_cl_jax import masks as m\n"
  found = imports_of(source, "train.trainer")
  assert found == {"methods.base", "masks"}
  bad = violations({"train.trainer": found})
  assert len(bad) == 1 and "imports upward" in bad[0] and "methods.base" in bad[0]
  # An import inside a function counts as well; so does a later part of the core.
  inner = "def f():\n  from sparse_cl_jax import experiment\n"
  assert violations({"methods.packnet": imports_of(inner, "methods.packnet")})
  assert violations({"masks": imports_of("from sparse_cl_jax import growth\n", "masks")})
  assert violations({"newthing": set()})  # a module in no layer


def test_readme_layout_lists_the_layers():
  text = (ROOT / "README.md").read_text()
  block = text.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
  listed, layer = {}, None
  for line in block.splitlines():
    m = re.match(r"\s+\d (core|harness|methods|experiment|launchers)\s+(.*)", line)
    if m:
      layer, line = m.group(1), m.group(2)
    elif not line.startswith(" "):
      layer = None
    if layer is not None:  # a layer's line and its continuation lines
      listed.setdefault(layer, set()).update(re.findall(r"[a-z_]+", line))
  for layer in dict.fromkeys(name for name, _ in LAYERS):
    want = {n for name, names in LAYERS if name == layer for n in names}
    assert layer in listed, f"README Layout has no line for the {layer} layer"
    assert want <= listed[layer], f"README Layout's {layer} line lacks {sorted(want - listed[layer])}"


MAX_MODULE_LINES = 1000
MAX_DEFINITION_LINES = 250


def test_no_module_over_1000_lines_and_no_function_or_class_over_250():
  too_long = []
  for path in sorted(PACKAGE.rglob("*.py")):
    source = path.read_text()
    rel = path.relative_to(ROOT)
    if source.count("\n") > MAX_MODULE_LINES:
      too_long.append(f"{rel}: {source.count(chr(10))} lines")
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        size = node.end_lineno - node.lineno + 1
        if size > MAX_DEFINITION_LINES:
          too_long.append(f"{rel}:{node.lineno} {node.name}: {size} lines")
  assert not too_long, "\n".join(too_long)


@pytest.mark.parametrize("top", sorted({n for _, names in LAYERS for n in names}))
def test_every_layer_entry_exists(top):
  assert _is_module(top), f"LAYERS names sparse_cl_jax.{top}, which does not exist"
