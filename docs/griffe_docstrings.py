"""A griffe extension (mkdocs.yml, mkdocstrings ``extensions``): the docstrings' reST bits as Markdown.

The package's docstrings are Google style with two reST habits that Markdown reads differently:

* a literal block introduced by ``::`` and indented under it (a code example) becomes a fenced code
  block (Markdown would run its lines together and read ``x[t][idx]`` as a reference link);
* a Sphinx role, ``:func:`name``` (``:class:``, ``:data:`` ...), becomes the code span ``name``.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|data|attr|meth|mod|exc|obj|const):`~?([^`]+)`")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def markdown_literal_blocks(text: str) -> str:
  """``text`` with every ``::`` literal block as a fenced code block, roles as code spans."""
  lines = text.splitlines()
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    if not line.rstrip().endswith("::"):
      out.append(line)
      i += 1
      continue
    base = _indent(line)
    j = i + 1
    while j < len(lines) and not lines[j].strip():
      j += 1
    if j == len(lines) or _indent(lines[j]) <= base:  # no indented block follows
      out.append(line)
      i += 1
      continue
    head = line.rstrip()[:-2].rstrip()
    if head:
      out.append(head + ":")
    end = j
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
      end += 1
    block = lines[j:end]
    while block and not block[-1].strip():
      block.pop()
    cut = min(_indent(b) for b in block if b.strip())
    pad = " " * base
    out += ["", pad + "```"] + [pad + b[cut:] if b.strip() else "" for b in block] + [pad + "```"]
    if end < len(lines):
      out.append("")
    i = end
  result = "\n".join(out)
  return _ROLE.sub(lambda m: f"`{m.group(1)}`", result)


class ReSTBits(griffe.Extension):
  """Rewrites every docstring with :func:`markdown_literal_blocks` as its object is created."""

  def on_instance(self, *, obj, **kwargs) -> None:  # every object, the root package included
    del kwargs
    if obj.docstring is not None:
      obj.docstring.value = markdown_literal_blocks(obj.docstring.value)
