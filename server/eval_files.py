"""Reading and writing judged query sets: the JSONL a user writes, TREC qrels and topics, TREC run files.

JSONL, one query a line::

    {"query": "how do I rotate logs?", "relevant": ["logrotate/README"]}
    {"id": "q2", "query": "...", "relevant": {"a.md": 2, "b.md": 1}}
    {"query": "...", "relevant": [{"path": "a.md", "grade": 2, "lines": [10, 24]}]}

Paths are relative to the registered folder that holds them (absolute paths are accepted). TREC
files: qrels are ``qid 0 docid grade`` lines; topics are ``qid<TAB>text`` lines or the classic
``<top><num>...<title>...</top>`` form; a run is ``qid Q0 docid rank score tag``. A document id is a
path (spaces written ``%20``) or ``path#L10-24`` for a line range.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from .evaluation import JudgedQuery, Judgement, Ranked, parse_key, relative_path


class EvalFileError(ValueError):
    """A query, qrels, topics or run file that cannot be read; the message names the file and line."""


def _read_lines(path: Path) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvalFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalFileError(f"{path} cannot be read: {exc}") from None


# ------------------------------------------------------------------------------------------------
# JSONL


def read_queries_jsonl(path: Path, roots: Sequence[str] = ()) -> list[JudgedQuery]:
    """The judged queries of a JSONL file; ids default to q1, q2... by line."""
    queries: list[JudgedQuery] = []
    seen: set[str] = set()
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise EvalFileError(f"{where}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise EvalFileError(f'{where}: expected an object like {{"query": "...", "relevant": ["file"]}}')
        text = record.get("query")
        if not isinstance(text, str) or not text.strip():
            raise EvalFileError(f'{where}: "query" must be the text of a query')
        qid = str(record.get("id") or f"q{len(queries) + 1}")
        if qid in seen or any(c.isspace() for c in qid):
            raise EvalFileError(
                f"{where}: id {qid!r} is used twice or has spaces; give each query its own id"
            )
        seen.add(qid)
        judgements = _judgements(record.get("relevant"), where, roots)
        extra = {k: v for k, v in record.items() if k not in ("id", "query", "relevant")}
        queries.append(JudgedQuery(qid, text.strip(), judgements, extra))
    if not queries:
        raise EvalFileError(f"{path} has no queries")
    return queries


def _judgements(value: Any, where: str, roots: Sequence[str]) -> list[Judgement]:
    items: list[tuple[Any, Any, Any]] = []
    if isinstance(value, str):
        items = [(value, 1, None)]
    elif isinstance(value, Mapping):
        items = [(path, grade, None) for path, grade in value.items()]
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping):
                items.append((item.get("path"), item.get("grade", 1), item.get("lines")))
            else:
                items.append((item, 1, None))
    else:
        raise EvalFileError(f'{where}: "relevant" must list the files that answer the query')
    out = []
    for path, grade, lines in items:
        if not isinstance(path, str) or not path.strip():
            raise EvalFileError(f"{where}: each relevant item needs a file path, got {path!r}")
        if isinstance(grade, bool) or not isinstance(grade, int) or grade < 0:
            raise EvalFileError(f"{where}: the grade of {path} must be a whole number, 0 or more")
        key_path, key_lines = parse_key(path)
        lines = _lines(lines, where, path) if lines is not None else key_lines
        out.append(Judgement(relative_path(key_path.strip(), roots), grade, lines))
    return out


def _lines(value: Any, where: str, path: str) -> tuple[int, int]:
    if (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
            for v in value) and 1 <= value[0] <= value[1]):  # fmt: skip
        return (value[0], value[1])
    raise EvalFileError(f'{where}: "lines" of {path} must be [first, last] line numbers, got {value!r}')


def write_queries_jsonl(path: Path, queries: Iterable[JudgedQuery]) -> None:
    """Write queries in the JSONL form ``read_queries_jsonl`` reads (for the user to edit and reuse)."""
    lines = []
    for q in queries:
        relevant: list[Any] = []
        for j in q.judgements:
            if j.grade == 1 and j.lines is None:
                relevant.append(j.path)
            else:
                item: dict[str, Any] = {"path": j.path, "grade": j.grade}
                if j.lines is not None:
                    item["lines"] = list(j.lines)
                relevant.append(item)
        lines.append(
            json.dumps({"id": q.qid, "query": q.text, "relevant": relevant, **q.extra}, ensure_ascii=False)
        )
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# TREC


def doc_id(key: str) -> str:
    """A document id as TREC files write it: no whitespace (``%20`` and friends)."""
    return quote(key, safe="/#-_.~:@+,=")


def read_qrels(path: Path, roots: Sequence[str] = ()) -> dict[str, list[Judgement]]:
    """``qid 0 docid grade`` lines -> query id -> judgements."""
    out: dict[str, list[Judgement]] = {}
    for number, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if not parts or line.lstrip().startswith("#"):
            continue
        if len(parts) != 4 or not re.fullmatch(r"-?\d+", parts[3]):
            raise EvalFileError(
                f"{path} line {number}: expected 'qid 0 docid grade', got {line.strip()[:80]!r}"
            )
        doc_path, lines = parse_key(unquote(parts[2]))
        grade = max(int(parts[3]), 0)  # trec_eval treats negative grades as not relevant
        out.setdefault(parts[0], []).append(Judgement(relative_path(doc_path, roots), grade, lines))
    if not out:
        raise EvalFileError(f"{path} has no judgements")
    return out


def read_topics(path: Path) -> dict[str, str]:
    """Query id -> text, from ``qid<TAB>text`` lines or ``<top>`` blocks (the ``<title>`` is the query)."""
    lines = _read_lines(path)
    text = "\n".join(lines)
    topics: dict[str, str] = {}
    if "<top>" in text:
        for block in re.findall(r"<top>(.*?)</top>", text, flags=re.S | re.I):
            num = re.search(r"<num>\s*(?:Number:)?\s*([^\s<]+)", block, flags=re.I)
            title = re.search(r"<title>\s*(?:Topic:)?\s*(.*?)\s*(?=<|$)", block, flags=re.S | re.I)
            if num and title and title.group(1).strip():
                topics[num.group(1)] = " ".join(title.group(1).split())
    else:
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            qid, _, query = line.strip().partition("\t") if "\t" in line else line.strip().partition(" ")
            if not query.strip():
                raise EvalFileError(f"{path} line {number}: expected 'qid<TAB>query text'")
            topics[qid] = query.strip()
    if not topics:
        raise EvalFileError(f"{path} has no topics: write 'qid<TAB>query' lines or <top> blocks")
    return topics


def queries_from_trec(qrels_path: Path, topics_path: Path, roots: Sequence[str] = ()) -> list[JudgedQuery]:
    """Judged queries from a qrels file and its topics; a judged query without a topic is an error."""
    qrels = read_qrels(qrels_path, roots)
    topics = read_topics(topics_path)
    missing = [qid for qid in qrels if qid not in topics]
    if missing:
        raise EvalFileError(f"{topics_path} has no text for the judged queries {', '.join(missing[:10])}")
    return [JudgedQuery(qid, topics[qid], qrels.get(qid, [])) for qid in topics]


def write_run(path: Path, runs: Mapping[str, Ranked], tag: str) -> None:
    """A trec_eval run file. Tied scores are written a hair apart (1e-9), so trec_eval, which breaks
    ties by document id, keeps the order lorekeeper ranked them in."""
    lines = []
    for qid, ranked in runs.items():
        previous = None
        for rank, (doc, score) in enumerate(zip(ranked.docs, ranked.scores), 1):
            if previous is not None and score >= previous:
                score = previous - 1e-9
            previous = score
            lines.append(f"{qid} Q0 {doc_id(doc)} {rank} {score:.12g} {tag}")
    Path(path).write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")


def read_run(path: Path) -> dict[str, dict[str, float]]:
    """A trec_eval run file -> query id -> document id -> score (the best when an id repeats)."""
    out: dict[str, dict[str, float]] = {}
    for number, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 6:
                raise ValueError
            score = float(parts[4])
            int(parts[3])
        except ValueError:
            raise EvalFileError(
                f"{path} line {number}: expected 'qid Q0 docid rank score tag', got {line.strip()[:80]!r}"
            ) from None
        docs = out.setdefault(parts[0], {})
        doc = unquote(parts[2])
        docs[doc] = max(score, docs.get(doc, score))
    if not out:
        raise EvalFileError(f"{path} has no results")
    return out
