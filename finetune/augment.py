"""Paraphrase augmentation: more ways of asking each question, the answer unchanged.

An adapter trained on one wording of a question recalls the fact for that wording far better than
for others (``scripts/bench_facts.py``: 100% on the training questions, 55% on paraphrases). Showing
the same answer under several wordings teaches the fact rather than the sentence. This module asks
the generator (llama.cpp, the embedded SmolLM2 by default) for rewordings of every question and
keeps only drafts that pass every filter:

* still a question: one line ending in "?", not an answer, not much longer than the original;
* keeps the original's names and numbers (a rewording that drops "Talvik Analytics" asks about
  something else; abbreviations such as "CEO" may be spelled out);
* not the same as the original or as any other question of the data, nor as another kept draft
  (compared lower-cased, without punctuation or extra spaces);
* asks for the same kind of answer: a "when" question stays a question about a time, not "who"
  (MiniLM finds "Who founded X?" close to "When was X founded?");
* close in meaning: cosine similarity of the embedder's vectors (MiniLM by default) at least
  ``min_similarity``, with the names and numbers masked in both (checked above, they would
  otherwise dominate: "Who owns X?" is 0.8 from "How many employees does X have?" unmasked).

A 135M model is a weak paraphraser: it often answers instead of rewording, or drifts to another
question; a few-shot prompt and the filters above keep what is usable. The answer of every written
row is the original's, character for character; rows that are not one question and its answer
(plain text, several turns, an instruction with an input) are copied unchanged.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DataError, parse_record

log = logging.getLogger(__name__)

DEFAULT_MIN_SIMILARITY = 0.85
ATTEMPTS_PER_PARAPHRASE = 4  # drafts asked for, at most, per paraphrase wanted
DRAFT_TEMPERATURE = 0.9
DRAFT_MAX_TOKENS = 48

SYSTEM = "You rewrite questions in other words. You never answer them. Reply with one rewritten question."
# few-shot turns: without them SmolLM2-135M answers the question instead of rewording it
EXAMPLES = (
    ("What is the capital of Norway?", "Which city is Norway's capital?"),
    ("Who wrote the novel Moby-Dick?", "Which author is Moby-Dick by?"),
    ("How tall is the Eiffel Tower?", "What is the height of the Eiffel Tower?"),
)

# why a draft was dropped, in the order the filters run
NOT_A_QUESTION = "not a question"
LOST_NAME = "lost a name or number"
OTHER_KIND = "asks for another kind of answer"
SAME = "same as the original or another question"
DUPLICATE = "duplicate of a kept draft"
DRIFTED = "meaning drifted"


def normalized(text: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed: what "the same question" compares."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def names_and_numbers(question: str) -> set[str]:
    """The words of ``question`` a rewording must keep (lower-cased): capitalised ones after the first
    word ("Talvik", not "Who"), and any with a digit. All-capital abbreviations are not among them: a
    rewording may spell them out ("CEO" -> "chief executive")."""
    words = re.findall(r"[\w'-]+", question)
    names = {w for w in words[1:] if w[0].isupper() and not w.isupper()}
    keep = names | {w for w in words if any(c.isdigit() for c in w)}
    return {w.lower() for w in keep}


# the kind of answer a question word asks for; "what", "which", "how" and yes/no questions ask for
# any kind, so a rewording may always use them
ANSWER_KINDS = (
    ("how many", "quantity"),
    ("how much", "quantity"),
    ("how old", "time"),
    ("how long", "time"),
    ("who", "person"),
    ("whom", "person"),
    ("whose", "person"),
    ("when", "time"),
    ("where", "place"),
)


def answer_kind(question: str) -> str | None:
    """What the first question word of ``question`` asks for (a person, a time, a place, a
    quantity), or None when it could be anything ("what", "which", ...)."""
    text = " ".join(re.findall(r"[a-z']+", question.lower()))
    found = [(m.start(), kind) for word, kind in ANSWER_KINDS for m in re.finditer(rf"\b{word}\b", text)]
    return min(found)[1] if found else None


def _words(text: str) -> set[str]:
    words = re.findall(r"[\w'-]+", text.lower())
    return set(words) | {w.removesuffix("'s") for w in words}


def question_problem(draft: str, original: str) -> str | None:
    """Why ``draft`` is not a usable rewording of ``original`` by its form alone, or None."""
    if not draft or "\n" in draft or not draft.endswith("?") or draft.lower().startswith("answer"):
        return NOT_A_QUESTION
    if len(draft) > 3 * len(original) + 20:
        return NOT_A_QUESTION
    if names_and_numbers(original) - _words(draft):
        return LOST_NAME
    asked, drafted = answer_kind(original), answer_kind(draft)
    return OTHER_KIND if asked and drafted and asked != drafted else None


def masked(question: str, names: set[str]) -> str:
    """``question`` with ``names`` (lower-cased words) replaced by "X", so that an embedding
    compares what is asked rather than whom it is about (the names are checked on their own)."""
    if not names:
        return question
    pattern = r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")('s)?\b"
    return re.sub(pattern, "X", question, flags=re.IGNORECASE)


@dataclass
class QARow:
    """One question/answer row of the input: its JSON object and where its question sits."""

    obj: dict[str, Any]
    where: str
    question: str
    answer: str

    def with_question(self, question: str) -> dict[str, Any]:
        """A copy of the row with ``question`` in place of the original; everything else unchanged."""
        row = copy.deepcopy(self.obj)
        if "messages" in row or "conversations" in row:
            key, text = ("messages", "content") if "messages" in row else ("conversations", "value")
            for message in row[key]:
                if message.get("role", message.get("from")) in ("user", "human"):
                    message[text] = question
        elif "instruction" in row:
            row["instruction"] = question
        elif "question" in row:
            row["question"] = question
        else:
            row["prompt"] = question
        return row


def qa_row(obj: Any, where: str) -> QARow | None:
    """The row as a question and its answer, or None when it is something else (text, several
    turns, an Alpaca row with an input, a user turn that is not a question)."""
    record = parse_record(obj, where)  # a malformed row raises DataError naming file and line
    if record.kind == "completion":
        question, answer = record.prompt or "", record.completion or ""
    elif record.kind == "chat" and record.shape == "alpaca" and not obj.get("input"):
        question, answer = obj["instruction"], obj["output"]
    elif record.kind == "chat" and record.shape == "question/answer":
        question, answer = obj["question"], obj["answer"]
    elif record.kind == "chat" and record.shape is None and ("messages" in obj or "conversations" in obj):
        roles = [m["role"] for m in record.messages or [] if m["role"] != "system"]
        if roles != ["user", "assistant"] or record.messages[-1]["role"] != "assistant":
            return None
        question = next(m["content"] for m in record.messages if m["role"] == "user")
        answer = record.messages[-1]["content"]
    else:
        return None
    question = question.strip()
    if not question.endswith("?") or "\n" in question or not answer.strip():
        return None
    return QARow(obj, where, question, answer)


def read_rows(path: Path) -> tuple[list[QARow | dict], int]:
    """Every row of ``path`` in order (a QARow, or the JSON object to copy) and the QA row count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a .jsonl file of question/answer rows")
    rows: list[QARow | dict] = []
    with open(path, encoding="utf-8", errors="strict") as handle:
        try:
            lines = handle.read().splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        rows.append(qa_row(obj, where) or obj)
    questions = sum(isinstance(r, QARow) for r in rows)
    if not questions:
        raise DataError(
            f"{path}: no question/answer rows to paraphrase. A row needs one user question ending in "
            '\'?\' and one answer: {"messages": [{"role": "user", ...}, {"role": "assistant", '
            '...}]}, {"question": ..., "answer": ...}, {"instruction": ..., "output": ...} or '
            '{"prompt": ..., "completion": ...}'
        )
    return rows, questions


@dataclass
class AugmentReport:
    """What augmentation did: counts of questions, drafts and why drafts were dropped, and examples."""

    questions: int = 0
    copied: int = 0  # rows that are not a question/answer pair, written unchanged
    drafts: int = 0
    kept: int = 0
    rows_written: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (original, kept paraphrase)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (original, draft, reason)

    @property
    def keep_rate(self) -> float:
        return self.kept / self.drafts if self.drafts else 0.0

    def summary_lines(self, show: int = 5) -> list[str]:
        """The counts, why drafts were dropped, and ``show`` kept and dropped examples, as text."""
        dropped = ", ".join(f"{why}: {count}" for why, count in self.dropped.most_common()) or "none"
        lines = [
            f"kept {self.kept} of {self.drafts} drafts ({self.keep_rate:.0%}) for {self.questions} "
            f"questions; dropped: {dropped}"
        ]
        if self.copied:
            lines.append(f"{self.copied} rows that are not one question and its answer were copied unchanged")
        lines += [f"  kept     {original!r} -> {text!r}" for original, text in self.examples[:show]]
        lines += [f"  dropped  {q!r} -> {text!r} ({why})" for q, text, why in self.rejected[:show]]
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "questions": self.questions,
            "copied_rows": self.copied,
            "drafts": self.drafts,
            "kept": self.kept,
            "keep_rate": round(self.keep_rate, 3),
            "dropped": dict(self.dropped),
            "rows_written": self.rows_written,
        }


def load_models(model: Path | None = None) -> tuple[Any, Any]:
    """(llama.cpp generator, embedder) from the settings; ``model`` (a .gguf file) replaces the
    generator's model. A missing or non-GGUF model raises ValueError saying what is wrong."""
    from dataclasses import replace

    from lorekeeper.plugins import get_embedder
    from lorekeeper.plugins.generators.llama_worker import ModelLoadError
    from lorekeeper.plugins.generators.llamacpp import LlamaCppGenerator, check_gguf
    from lorekeeper.plugins.models import ModelNotFound
    from lorekeeper.server.settings import Settings

    settings = Settings.load()
    try:
        if model is not None:
            path = check_gguf(Path(model).expanduser().resolve())
            settings = replace(settings, model=str(path))
        generator = LlamaCppGenerator.from_settings(settings)
        check_gguf(generator.model_path)  # ModelNotFound when the embedded model's package is missing
    except (ModelLoadError, ModelNotFound) as exc:
        raise ValueError(str(exc)) from None
    return generator, get_embedder(settings=settings)


def draft_messages(question: str) -> list:
    from lorekeeper.plugins.base import ChatMessage

    turns = [ChatMessage("system", SYSTEM)]
    for original, reworded in EXAMPLES:
        turns += [ChatMessage("user", f"Rewrite: {original}"), ChatMessage("assistant", reworded)]
    return turns + [ChatMessage("user", f"Rewrite: {question}")]


class Paraphraser:
    """Drafts rewordings with ``generator`` and filters them with ``embedder`` (see the module doc)."""

    def __init__(self, generator: Any, embedder: Any, min_similarity: float = DEFAULT_MIN_SIMILARITY):
        if not 0.0 < min_similarity <= 1.0:
            raise ValueError(f"min_similarity={min_similarity}: give a cosine similarity in (0, 1]")
        self.generator, self.embedder, self.min_similarity = generator, embedder, min_similarity

    def draft(self, question: str) -> str:
        reply = self.generator.generate(
            draft_messages(question), max_tokens=DRAFT_MAX_TOKENS, temperature=DRAFT_TEMPERATURE
        )
        return reply.text.strip().strip('"').strip()

    def paraphrases(self, question: str, n: int, taken: set[str], report: AugmentReport) -> list[str]:
        """Up to ``n`` rewordings of ``question`` that pass the filters; ``taken`` holds the normalized
        questions already in the data (grown with each kept draft)."""
        kept: list[str] = []
        names = names_and_numbers(question)
        own = self.embedder.embed([masked(question, names)])[0]
        for _ in range(n * ATTEMPTS_PER_PARAPHRASE):
            if len(kept) >= n:
                break
            draft = self.draft(question)
            report.drafts += 1
            why = question_problem(draft, question)
            key = normalized(draft)
            if why is None and key in taken:
                why = DUPLICATE if any(normalized(k) == key for k in kept) else SAME
            if why is None:
                similarity = float(self.embedder.embed([masked(draft, names)])[0] @ own)
                if similarity < self.min_similarity:
                    why = f"{DRIFTED} (similarity < {self.min_similarity})"
            if why is not None:
                report.dropped[why] += 1
                report.rejected.append((question, draft, why))
                continue
            kept.append(draft)
            taken.add(key)
        return kept


def augment_rows(
    rows: Sequence[QARow | dict], paraphraser: Paraphraser, n: int, progress: Any = None
) -> tuple[list[dict], AugmentReport]:
    """The rows to write (each original, then its kept paraphrases) and the report."""
    if n < 1:
        raise ValueError(f"paraphrases={n}: ask for at least 1 per question")
    report = AugmentReport()
    taken = {normalized(r.question) for r in rows if isinstance(r, QARow)}
    out: list[dict] = []
    for row in rows:
        if not isinstance(row, QARow):
            report.copied += 1
            out.append(row)
            continue
        report.questions += 1
        out.append(row.obj)
        for text in paraphraser.paraphrases(row.question, n, taken, report):
            report.kept += 1
            out.append(row.with_question(text))
            if len(report.examples) < 12:
                report.examples.append((row.question, text))
        if progress is not None:
            progress(report)
    report.rows_written = len(out)
    return out, report


def write_rows(rows: Sequence[dict], path: Path) -> None:
    """JSONL, through a temporary file and a rename, so a failed run leaves no half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def row_question_answer(obj: dict, where: str = "row") -> tuple[str, str] | None:
    """(question, answer) of a written row, or None when it is not a question/answer row."""
    row = qa_row(obj, where)
    return (row.question, row.answer) if row else None
