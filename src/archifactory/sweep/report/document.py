"""The report as one document: a tree of blocks (sections, paragraphs, lists, tables, figures, code,
collapsible details), rendered to HTML by a Jinja2 template with autoescaping
(``archifactory/sweep/templates/report.html.j2`` and ``report.css``) and to Markdown by
:func:`render_markdown`. Both walk the same tree; a section builder never writes HTML or Markdown.

Every string in a block is plain text shown as written: the HTML renderer escapes it (Jinja2 autoescape),
the Markdown renderer escapes Markdown punctuation and HTML (or puts it in a code span or fence).
Inline content is a string or a list of strings, :class:`Code`, :class:`Strong` and :class:`Mark` parts.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Union

import jinja2
import markupsafe

# ------------------------------------------------------------------------------------------ inline


@dataclass(frozen=True)
class Code:
    """Inline code (``<code>`` / a backtick span)."""

    text: str
    kind: Literal["code"] = "code"


@dataclass(frozen=True)
class Strong:
    text: str
    kind: Literal["strong"] = "strong"


@dataclass(frozen=True)
class Mark:
    """A check's outcome: ✓ (``True``), ✗ (``False``) or ○ (``None``: for information)."""

    ok: bool | None
    kind: Literal["mark"] = "mark"

    @property
    def symbol(self) -> str:
        return {True: "✓", False: "✗", None: "○"}[self.ok]

    @property
    def css_class(self) -> str:
        return {True: "ok", False: "warn", None: "info"}[self.ok]


Inline = Union[str, Code, Strong, Mark]
Content = Union[str, list[Inline]]


def _parts(content: Content) -> list[Inline]:
    return [content] if isinstance(content, str) else list(content)


# ------------------------------------------------------------------------------------------ blocks


@dataclass
class Paragraph:
    content: Content
    css_class: str = ""
    """``legend`` (muted small print under a table), ``meta`` (muted), or empty."""
    kind: Literal["paragraph"] = "paragraph"

    @property
    def parts(self) -> list[Inline]:
        return _parts(self.content)


@dataclass
class BulletList:
    items: list[Content]
    css_class: str = ""
    """``summary`` (boxed), ``checks`` (no bullets: each item starts with a :class:`Mark`), ``overrides``."""
    kind: Literal["list"] = "list"

    @property
    def item_parts(self) -> list[list[Inline]]:
        return [_parts(item) for item in self.items]


@dataclass
class Table:
    """A table as plain strings (not yet escaped); a ``\\n`` in a cell is a line break (HTML) or a space
    (Markdown), and a numeric cell's further lines are muted in HTML."""

    header: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)
    """Right-aligned columns."""
    row_classes: list[str] = field(default_factory=list)
    """Per-row CSS classes (``baseline``, ``better``, ``worse``, ``chosen``)."""
    notes_header: str | None = None
    """With ``notes``: a second, smaller line under each row's first cell in HTML, and a column of its own
    (after the first) in Markdown."""
    notes: list[str] = field(default_factory=list)
    cell_class: dict[int, str] = field(default_factory=dict)
    """Per-column CSS classes of the body cells (``changes``: monospace, wrapped)."""
    fit: bool = False
    """As wide as its content (key/value tables), not the page."""
    kind: Literal["table"] = "table"


@dataclass
class Figure:
    """A PNG image; ``name`` names its file next to the Markdown and its HTML anchor (``fig-NAME``)."""

    name: str
    title: str
    caption: str
    png: bytes
    kind: Literal["figure"] = "figure"

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class CodeBlock:
    text: str
    lang: str = ""
    kind: Literal["code_block"] = "code_block"


@dataclass
class Details:
    """Collapsed in HTML (``<details>``); a subsection headed ``summary`` in Markdown."""

    summary: str
    blocks: list[Block]
    kind: Literal["details"] = "details"


@dataclass
class Section:
    """A heading and its blocks; nested sections are one heading level deeper (``h2`` at the top)."""

    title: str
    blocks: list[Block]
    badge: str | None = None
    """A red label after the title (``failed``); `` (failed)`` in Markdown."""
    css_class: str = ""
    """Wraps the section in a ``<div>`` of this class in HTML (``variant-diff``)."""
    kind: Literal["section"] = "section"


Block = Union[Paragraph, BulletList, Table, Figure, CodeBlock, Details, Section]


@dataclass
class Document:
    title: str
    """The page title and top heading."""
    blocks: list[Block]
    footer: str = ""

    def figures(self) -> list[Figure]:
        """Every figure, in document order."""
        out: list[Figure] = []

        def walk(blocks: list[Block]) -> None:
            for block in blocks:
                if isinstance(block, Figure):
                    out.append(block)
                elif isinstance(block, (Section, Details)):
                    walk(block.blocks)

        walk(self.blocks)
        return out


# -------------------------------------------------------------------------------------------- HTML


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("archifactory.sweep", "templates"),
        autoescape=True,  # every {{ value }} is HTML-escaped unless it is markupsafe.Markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["break_dots"] = _break_dots
    return env


def _break_dots(text: str) -> markupsafe.Markup:
    """Escaped text with a ``<wbr>`` after every dot (dotted config keys may wrap there)."""
    return markupsafe.escape(text).replace(".", markupsafe.Markup(".<wbr>"))


BLOCK_TYPES = (Paragraph, BulletList, Table, Figure, CodeBlock, Details, Section)


def _check_blocks(blocks: list[Block]) -> None:
    for block in blocks:
        if not isinstance(block, BLOCK_TYPES):
            raise TypeError(f"not a report block: {block!r} (one of {', '.join(t.__name__ for t in BLOCK_TYPES)})")
        if isinstance(block, (Section, Details)):
            _check_blocks(block.blocks)


def render_html(document: Document) -> str:
    """A self-contained page: inline CSS (the package's ``report.css``), images as ``data:`` URIs, no script."""
    _check_blocks(document.blocks)
    return _environment().get_template("report.html.j2").render(doc=document)


# ---------------------------------------------------------------------------------------- Markdown


MD_PUNCTUATION = re.compile(r"([\\`*_\[\]#|~$])")
"""ASCII punctuation that Markdown (CommonMark, GitHub's tables, strikethrough and math) may read as syntax
inside a line (``(`` and ``!`` only matter after ``]`` or before ``[``, escaped here); a backslash before
any ASCII punctuation shows it literally (CommonMark 0.31, section 2.4)."""

MD_LIST_MARKER = re.compile(r"^(\s*\d{0,9})([-+.)])(?=\s|$)")


def md_cell(value: Any) -> str:
    """Text shown literally on one line (a table cell, a heading, a list item): Markdown punctuation
    backslash-escaped, HTML-escaped (Markdown passes raw HTML through), a leading list or quote marker
    escaped, line breaks turned into spaces."""
    text = ("" if value is None else str(value)).replace("\r", " ").replace("\n", " ").replace("\u00a0", " ")
    text = MD_PUNCTUATION.sub(r"\\\1", text)
    text = MD_LIST_MARKER.sub(r"\1\\\2", text)  # "- x", "1. x" would start a nested list
    return html.escape(text, quote=False)


def _longest_backtick_run(text: str) -> int:
    run = best = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best


def md_code(text: str, lang: str = "") -> str:
    """A fenced block whose fence is longer than any backtick run inside ``text``."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}\n"


def md_inline_code(text: Any) -> str:
    """An inline code span outside tables (its content is shown literally, so it needs no HTML escaping)."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_inline(parts: list[Inline]) -> str:
    out = []
    for part in parts:
        if isinstance(part, Code):
            out.append(md_inline_code(part.text))
        elif isinstance(part, Strong):
            out.append(f"**{md_cell(part.text)}**")
        elif isinstance(part, Mark):
            out.append(part.symbol)
        else:
            out.append(md_cell(part))
    return "".join(out)


def md_table(table: Table) -> str:
    if table.notes_header is not None:
        table = Table([table.header[0], table.notes_header, *table.header[1:]],
                      [[row[0], table.notes[r] if r < len(table.notes) else "", *row[1:]]
                       for r, row in enumerate(table.rows)],
                      numeric={i + 1 for i in table.numeric if i > 0} | ({0} if 0 in table.numeric else set()))
    align = ["---:" if i in table.numeric else "---" for i in range(len(table.header))]
    lines = ["| " + " | ".join(md_cell(h) for h in table.header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def render_markdown(document: Document, image_paths: dict[str, str]) -> str:
    """Markdown (CommonMark + GitHub tables); ``image_paths``: figure name -> the PNG's relative path."""
    _check_blocks(document.blocks)
    out = [f"# {md_cell(document.title)}\n\n"]

    def walk(blocks: list[Block], level: int) -> None:
        for block in blocks:
            if isinstance(block, Section):
                badge = f" ({block.badge})" if block.badge else ""
                out.append(f"{'#' * level} {md_cell(block.title)}{md_cell(badge)}\n\n")
                walk(block.blocks, level + 1)
            elif isinstance(block, Details):
                out.append(f"{'#' * level} {md_cell(block.summary)}\n\n")
                walk(block.blocks, level + 1)
            elif isinstance(block, Paragraph):
                out.append(md_inline(block.parts) + "\n\n")
            elif isinstance(block, BulletList):
                out.append("".join(f"- {md_inline(item)}\n" for item in block.item_parts) + "\n")
            elif isinstance(block, Table):
                out.append(md_table(block) + "\n")
            elif isinstance(block, Figure):
                out.append(f"![{md_cell(block.title)}]({image_paths[block.name]})\n\n"
                           f"*{md_cell(block.title)}. {md_cell(block.caption)}*\n\n")
            elif isinstance(block, CodeBlock):
                out.append(md_code(block.text, block.lang) + "\n")
            else:
                _check_blocks([block])

    walk(document.blocks, 2)
    if document.footer:
        out.append(md_cell(document.footer) + "\n")
    return "".join(out)
