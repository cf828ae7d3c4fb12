"""mkdocs hooks of the documentation site (mkdocs.yml ``hooks:``): one source for every text.

* ``<!-- include FILE "HEADING" -->`` on a line of its own is replaced by the section of ``FILE``
  (a path relative to the page, e.g. ``../results.md`` or ``../README.md``) whose heading starts with
  ``HEADING``, up to the next heading of the same or a higher level; its headings are shifted so
  the section's own becomes level 2 (``level=N`` on the directive: level N). Without
  ``"HEADING"`` the whole file, headings kept. Relative links are rewritten for the page they
  land on; a link to a file outside ``docs/`` keeps its text and loses the link. A heading that is
  not found stops the build, so a renamed section cannot drop out of the site silently.
* The API reference: one generated page per public module of ``sparse_cl_jax`` (a
  ``::: sparse_cl_jax.MODULE`` block that mkdocstrings renders from the docstrings), grouped by
  the layers of ``tests/test_layers.py`` (``LAYERS``), appended to the nav.
* ``presets.md`` (generated): the docstring of every config file in ``configs/``.
"""

from __future__ import annotations

import ast
import logging
import pathlib
import posixpath
import re

from mkdocs import exceptions
from mkdocs.structure import files as files_lib

log = logging.getLogger("mkdocs.hooks.sparse_cl_jax")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparse_cl_jax"
API_TITLE = "API reference"

_DIRECTIVE = re.compile(r'^<!-- include (\S+)(?: "([^"]+)")?(?: level=(\d))? -->\s*$', re.M)
_HEADING = re.compile(r"^(#{1,6}) (.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)((?:\s+\"[^\"]*\")?)\)")


# --------------------------------------------------------------------------------------------------
# Sections of other files.


def _lines_outside_fences(lines: list[str]):
  """``(index, line, in_fence)`` for every line; a fence's own lines count as inside."""
  fence = None
  for i, line in enumerate(lines):
    m = _FENCE.match(line)
    if m and (fence is None or m.group(1) == fence):
      fence = m.group(1) if fence is None else None
      yield i, line, True
    else:
      yield i, line, fence is not None


def section(text: str, heading: str | None) -> tuple[list[str], int]:
  """The lines of ``text``'s section under the heading starting with ``heading`` and its level.

  Raises:
    KeyError: no heading of ``text`` starts with ``heading``.
  """
  lines = text.splitlines()
  if heading is None:
    return lines, 0
  start = level = None
  end = len(lines)
  for i, line, fenced in _lines_outside_fences(lines):
    m = None if fenced else _HEADING.match(line)
    if not m:
      continue
    if start is None:
      if m.group(2).strip().startswith(heading):
        start, level = i, len(m.group(1))
    elif len(m.group(1)) <= level:
      end = i
      break
  if start is None:
    raise KeyError(heading)
  return lines[start:end], level


def _rewrite_link(target: str, source: pathlib.Path, page: pathlib.Path, docs: pathlib.Path):
  """The link target as seen from ``page``; None: drop the link (a file outside ``docs/``)."""
  if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto: ...
    return target
  path, _, anchor = target.partition("#")
  resolved = (source.parent / path).resolve() if path else source.resolve()
  if docs not in resolved.parents:
    return None
  if resolved == page.resolve():
    rel = ""
  else:
    rel = posixpath.relpath(resolved.relative_to(docs).as_posix(),
                            page.parent.resolve().relative_to(docs).as_posix())
  return rel + (f"#{anchor}" if anchor else "") or "#"


def transplant(lines: list[str], shift: int, source: pathlib.Path, page: pathlib.Path,
               docs: pathlib.Path) -> str:
  """``lines`` of ``source`` made ready for ``page``: headings shifted, relative links rewritten."""
  out = []
  for _, line, fenced in _lines_outside_fences(lines):
    if not fenced:
      m = _HEADING.match(line)
      if m and shift:
        line = "#" * max(1, min(6, len(m.group(1)) + shift)) + " " + m.group(2)

      def relink(m):
        bang, label, target, title = m.groups()
        new = _rewrite_link(target, source, page, docs)
        return label if new is None else f"{bang}[{label}]({new}{title})"

      line = _LINK.sub(relink, line)
    out.append(line)
  return "\n".join(out)


def expand_includes(markdown: str, page_path: pathlib.Path, docs: pathlib.Path) -> str:
  """``markdown`` with every include directive replaced by the section it names."""

  def replace(m):
    name, heading, level = m.groups()
    source = (page_path.parent / name).resolve()
    if not source.is_file():
      raise exceptions.PluginError(f"{page_path.relative_to(docs)}: include {name}: no such file")
    try:
      lines, found = section(source.read_text(encoding="utf-8"), heading)
    except KeyError:
      raise exceptions.PluginError(
          f"{page_path.relative_to(docs)}: include {name}: no heading starts with {heading!r} "
          "(renamed? update the include)") from None
    shift = 0 if heading is None and level is None else int(level or 2) - found
    return transplant(lines, shift, source, page_path, docs)

  return _DIRECTIVE.sub(replace, markdown)


# --------------------------------------------------------------------------------------------------
# The API reference and the presets page.


def layers() -> list[tuple[str, tuple[str, ...]]]:
  """``[(layer, top-level names)]`` as ``tests/test_layers.py`` declares them (``LAYERS``)."""
  tree = ast.parse((ROOT / "tests" / "test_layers.py").read_text(encoding="utf-8"))
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LAYERS"
                                            for t in node.targets):
      merged: dict[str, list[str]] = {}
      for layer, names in ast.literal_eval(node.value):
        merged.setdefault(layer, []).extend(names)
      return [(layer, tuple(names)) for layer, names in merged.items()]
  raise exceptions.PluginError("tests/test_layers.py has no LAYERS = (...) literal")


def public_modules() -> list[str]:
  """Every public module of the package, dotted, the package itself first."""
  names = []
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    if any(p.startswith("_") for p in parts):
      continue
    names.append(".".join(["sparse_cl_jax", *parts]))
  return names


def api_pages() -> list[tuple[str, list[str]]]:
  """``[(group title, [dotted module])]``: the package, then each layer's modules."""
  modules = public_modules()
  groups = [("Package", ["sparse_cl_jax"])]
  placed = {"sparse_cl_jax"}
  for layer, tops in layers():
    members = [m for m in modules if m != "sparse_cl_jax" and m.split(".")[1] in tops]
    if members:
      groups.append((layer.capitalize(), members))
      placed.update(members)
  missing = sorted(set(modules) - placed)
  if missing:
    raise exceptions.PluginError(f"modules in no layer of tests/test_layers.py: {missing}")
  return groups


def api_uri(module: str) -> str:
  return f"api/{module}.md"


def api_markdown(module: str) -> str:
  return f"# {module}\n\n::: {module}\n"


def presets_markdown() -> str:
  """The presets page: every configs/*.py docstring (commands, runtime, expected result)."""
  out = ["# Presets", "",
         "Every config file of `configs/`, shipped in the package as `sparse_cl_jax.configs`: run "
         "one as `python -m sparse_cl_jax --config=NAME[:ARG] --workdir=DIR` from an installed "
         "package, or `python experiments/main.py --config=configs/NAME.py[:ARG] --workdir=DIR` in "
         "a checkout. Each file's docstring follows.", ""]
  for path in sorted((ROOT / "configs").glob("*.py")):
    if path.name.startswith("_"):
      continue
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "(no docstring)"
    out += [f"## `{path.stem}`", "", "```text", doc, "```", ""]
  return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# The hooks.


def on_config(config):
  nav = config.nav or []
  api = [{group: [{module: api_uri(module)} for module in modules]}
         for group, modules in api_pages()]
  config.nav = [entry for entry in nav if not (isinstance(entry, dict) and API_TITLE in entry)]
  config.nav.append({API_TITLE: api})
  return config


def on_files(files, config):
  for _, modules in api_pages():
    for module in modules:
      files.append(files_lib.File.generated(config, api_uri(module), content=api_markdown(module)))
  files.append(files_lib.File.generated(config, "presets.md", content=presets_markdown()))
  return files


def on_page_markdown(markdown, page, config, files):
  del files
  docs = pathlib.Path(config.docs_dir).resolve()
  return expand_includes(markdown, docs / page.file.src_uri, docs)


def on_post_build(config):
  """Lists (INFO) the sections of the measured results that no system page includes."""
  docs = pathlib.Path(config.docs_dir).resolve()
  included = set()
  for page in docs.rglob("*.md"):
    for name, heading, _ in _DIRECTIVE.findall(page.read_text(encoding="utf-8")):
      included.add(((page.parent / name).resolve(), heading))
  for name in ("results.md", "fidelity.md"):
    lines = (docs / name).read_text(encoding="utf-8").splitlines()
    for _, line, fenced in _lines_outside_fences(lines):
      m = None if fenced else _HEADING.match(line)
      if m and len(m.group(1)) == 2 and not any(
          path == docs / name and m.group(2).startswith(h) for path, h in included):
        log.info("%s: section %r is on no system page (only on %s)", name, m.group(2), name)
