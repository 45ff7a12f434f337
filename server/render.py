"""One way to show search hits, answers and locations, for the CLI, JSON output and MCP alike.

Locations are always written ``lines 12-30`` / ``line 4`` / ``page 3`` (``page 3, lines 5-9`` for
a page with line numbers), and a source as ``path (lines 12-30)``. The MCP tools and ``lorekeeper``
commands print the same text; ``ask --json`` prints the same object the MCP ``generate`` tool
returns as structured output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def describe_location(start_line: int | None, end_line: int | None, page: int | None) -> str:
    """Where in a file a chunk is, for people: ``line 4``, ``lines 3-9``, ``page 2``."""
    parts = []
    if page is not None:
        parts.append(f"page {page}")
    if start_line is not None:
        end = end_line if end_line is not None else start_line
        parts.append(f"line {start_line}" if end == start_line else f"lines {start_line}-{end}")
    return ", ".join(parts)


def cite(path: str, location: str) -> str:
    """``path (lines 12-30)``, or the bare path when the location is unknown."""
    return f"{path} ({location})" if location else path


def hits_text(query: str, hits: Sequence[Any], snippet: int | None = None) -> str:
    """Ranked hits as plain text: rank, file and location, score, section, then the passage
    (whole, or its first ``snippet`` characters on one line)."""
    if not hits:
        return f"No indexed passage matched {query!r}."
    blocks = []
    for hit in hits:
        heading = f"\n  section: {' > '.join(hit.heading_path)}" if hit.heading_path else ""
        text = hit.text.strip()
        if snippet is not None:
            flat = " ".join(text.split())
            text = "   " + flat[:snippet] + ("…" if len(flat) > snippet else "")
        blocks.append(f"[{hit.rank}] {cite(hit.path, hit.location)}  score {hit.score:.3f}{heading}\n{text}")
    return "\n\n".join(blocks)


def answer_text(result: Any) -> str:
    """A generate result (``mcp.schemas.GenerateResult``) as text: the answer, sources, notes."""
    lines = [result.answer or "(the model returned no text)"]
    if result.sources:
        lines.append("")
        lines.append("Sources (* = supports the answer):")
        for src in result.sources:
            mark = "*" if src.cited else " "
            lines.append(f"{mark}[{src.number}] {cite(src.path, src.location)}")
    for warning in result.warnings:
        lines.append(f"Note: {warning}")
    return "\n".join(lines)


def sources_text(result: Any) -> str:
    """Just the sources block of ``answer_text`` (the CLI streams the answer before it)."""
    if not result.sources:
        return ""
    lines = ["Sources (* = supports the answer):"]
    for src in result.sources:
        mark = "*" if src.cited else " "
        lines.append(f"{mark}[{src.number}] {cite(src.path, src.location)}")
    return "\n".join(lines)


def status_text(result: Any) -> str:
    """An index status (``mcp.schemas.IndexStatusOut``) as text."""
    lines = [f"{result.documents} documents, {result.chunks} chunks in {result.db_path}"]
    if not result.roots:
        lines.append("No folders are registered yet: run `lorekeeper add FOLDER`.")
    for r in result.roots:
        live = "watched" if r.watched else "not watched"
        lines.append(f"- {r.path}: {r.documents} documents, {r.chunks} chunks, {r.failed} failed ({live})")
    if result.pending:
        lines.append(f"{result.pending} changes waiting to be indexed")
    if result.watcher_error:
        lines.append(f"! {result.watcher_error}")
    for f in result.failed[:20]:
        lines.append(f"! {f.path}: {f.status}: {f.reason}")
    if len(result.failed) > 20:
        lines.append(f"... and {len(result.failed) - 20} more")
    for a in result.adapters:
        note = ", not this server's model" if a.runs_on_server_model is False else ""
        base = f" (base {a.base_model}{note})" if a.base_model else ""
        about = f": {a.description}" if getattr(a, "description", None) else ""
        lines.append(f"adapter {a.name}{base}{about}")
    for e in getattr(result, "evaluations", []):
        lines.append(f"last {e.kind} evaluation ({e.date}): {e.summary} [{e.uri}]")
    return "\n".join(lines)
