"""A griffe extension for the docs build: turns the reStructuredText markup of mmexec's docstrings into Markdown.

mmexec's docstrings are numpy-style with Sphinx roles (``:class:`~mmexec.X```) and version directives
(``.. versionadded:: 0.1.0``). mkdocstrings renders docstrings as Markdown, where those would show as
raw text. This extension rewrites each docstring's text before it is parsed; the source files are not changed.

- ``:role:`target```, ``:role:`~a.b.target```: a link to the API page when the target is a public name of
  ``mmexec`` (``[`target`][mmexec.target]``), else inline code (the last component with ``~``).
- ``.. versionadded:: V`` / ``.. versionchanged:: V text``: a paragraph of its own, "*Added in version V.*" /
  "*Changed in version V:* text".
- RST's ``double backticks`` are left alone: Markdown renders them as code already.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|data|attr|mod|exc|obj):`(~?)([^`]+)`")
DIRECTIVE = re.compile(r"^([ \t]*)\.\. (versionadded|versionchanged|deprecated)::[ \t]*(\S+)[ \t]*(.*)$", re.MULTILINE)
WORDS = {"versionadded": "Added in version", "versionchanged": "Changed in version", "deprecated": "Deprecated since"}


def _public() -> set[str]:
    try:
        import mmexec

        return set(mmexec.__all__)
    except ImportError:
        return set()


PUBLIC = _public()


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    target = target.strip()
    short = target.rsplit(".", 1)[-1] if tilde else target
    name = target.removeprefix("mmexec.")
    if "." not in name and name in PUBLIC:
        return f"[`{short}`][mmexec.{name}]"
    return f"`{short}`"


def _directive(match: re.Match[str]) -> str:
    indent, kind, version, text = match.groups()
    line = f"*{WORDS[kind]} {version}:* {text}" if text else f"*{WORDS[kind]} {version}.*"
    return f"{indent}{line}\n"  # (a paragraph of its own: directives often come two in a row)


def convert(text: str) -> str:
    """The Markdown form of one docstring's text."""
    return DIRECTIVE.sub(_directive, ROLE.sub(_role, text))


class RstMarkup(griffe.Extension):
    """Rewrite every docstring griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
