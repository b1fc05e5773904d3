"""A griffe extension used only by the docs build: reads the package's Google-style docstrings as Napoleon does.

The package's docstrings follow Google style as Sphinx/Napoleon and the doctests read it; griffe (behind
mkdocstrings) differs in four places that this extension bridges without touching the package:

* ``Example:`` (singular) is an admonition for griffe, so the doctest lines below it would be rendered as
  Markdown (``>>>`` as block quotes, ``x[0]`` as broken cross-references); it is read as ``Examples:``.
* ``Methods:`` is griffe's section listing a class's methods; a ``Methods:`` block of bullet points (the
  penalty methods of ``ExplanationPenalty``) is renamed so that it renders as a titled block.
* Sphinx roles (``:class:`~pkg.Name```, ``:func:`name```) are turned into Markdown code spans, showing
  the last component when the target starts with ``~``, as Sphinx does.
* reStructuredText simple tables (the backend table of ``lightning_xai.loggers``), framed by ``====  ====``
  rules, would run together into one Markdown paragraph; they are fenced as preformatted text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_METHODS_BULLETS = re.compile(r"^(\s*)Methods:\s*\n(\s+[*-]\s)", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
_RST_RULE = re.compile(r"^[ \t]*=+(?:[ \t]+=+)+[ \t]*$")


def _role_to_code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _fence_rst_tables(text: str) -> str:
    """Wraps every reStructuredText simple table (header rule, header, rule, rows, closing rule) in a code fence."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        rules = [j for j in range(i, len(lines)) if _RST_RULE.match(lines[j])][:3]
        if rules[:1] == [i] and len(rules) == 3 and all(line.strip() for line in lines[i : rules[2] + 1]):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            out += [f"{indent}```text", *lines[i : rules[2] + 1], f"{indent}```"]
            i = rules[2] + 1
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def rewrite(text: str) -> str:
    """The docstring ``text`` with the four rewrites above applied.

    Example:
        >>> rewrite("Uses :class:`~a.b.Thing`.\\n\\nExample:\\n    >>> 1\\n    1")
        'Uses `Thing`.\\n\\nExamples:\\n    >>> 1\\n    1'
    """
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _METHODS_BULLETS.sub(r"\1Available methods:\n\2", text)
    text = _fence_rst_tables(text)
    return _ROLE.sub(_role_to_code, text)


class GoogleCompat(griffe.Extension):
    """Applies :func:`rewrite` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
