"""Answer evaluation: does retrieval help, does a fine-tuned adapter help, or both?

One set of questions with reference answers is answered four ways through the same path as
``lorekeeper ask`` (``generation.answer_question``, temperature 0): the base model alone, the base
model with retrieval, the adapter alone and the adapter with retrieval. Each answer is scored:

- token F1 against the reference (SQuAD's rule: lower case, punctuation and articles dropped,
  the best over the question's references);
- exact-contains: a reference, normalised the same way, appears in the answer;
- for the retrieval configurations, citation precision (of the files the checked answer cites, the
  share that are the question's files) and recall (the share of questions whose file is cited),
  when the question names its files; and the share of answers the citation check found
  unsupported (said "not found", or replaced by a quoted passage);
- seconds per answer.

Questions come from a JSONL file (``question`` with ``answer`` or ``answers`` and optional
``files``; or any chat/Alpaca/prompt-completion record the fine-tuning data accepts, its last
answer being the reference) or are drafted from the index: the generator writes a question and its
answer from a sampled passage, the passage's file is the question's file, and a draft is kept only
when its answer's words come from the passage and its question does not copy a run of it.

The recommendation takes a configuration with more parts (retrieval, the adapter, both) only when
it answers clearly better than the simpler one: a mean answer score (F1 and contains, averaged)
higher by ``MIN_GAIN`` and more questions won than lost beyond chance (a sign test), so a few
lucky answers on a small set do not decide it.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .eval_files import EvalFileError
from .evaluation import relative_path

CONFIGS = ("base", "base + retrieval", "adapter", "adapter + retrieval")
ADAPTER_CONFIGS = ("adapter", "adapter + retrieval")
MIN_GAIN = 0.02  # a configuration with more parts must beat a simpler one by this much answer score
MAX_P = 0.1  # ... and win more questions than it loses with a sign-test p below this
DRAFT_MAX_ANSWER_WORDS = 30
DRAFT_MIN_GROUNDED = 0.6  # share of a drafted answer's content words that must be in its passage


@dataclass
class AnswerQuestion:
    qid: str
    question: str
    references: list[str]
    files: list[str] = field(default_factory=list)  # relative to the registered folder
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.qid, "question": self.question, "answers": self.references}
        if self.files:
            out["files"] = self.files
        out.update(self.extra)
        return out


# ------------------------------------------------------------------------------------------------
# Question files


def _question_of(obj: dict, where: str) -> tuple[str, list[str]]:
    """(question, references) of one JSONL record in any of the accepted shapes."""
    if "question" in obj:
        question = obj["question"]
        refs = obj.get("answers", obj.get("answer"))
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(question, str) or not question.strip():
            raise EvalFileError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise EvalFileError(
                f"{where}: give the reference as 'answer' (a string) or 'answers' (a list of strings)"
            )
        return question.strip(), [r.strip() for r in refs]
    if isinstance(obj.get("messages"), list):
        turns = [m for m in obj["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
        users = [m["content"] for m in turns if m.get("role") == "user"]
        answers = [m["content"] for m in turns if m.get("role") == "assistant"]
        pair = (users[-1], answers[-1]) if users and answers else None
    elif "instruction" in obj and "output" in obj:
        pair = (f"{obj['instruction']}\n\n{obj.get('input') or ''}".strip(), obj["output"])
    elif "prompt" in obj and "completion" in obj:
        pair = (obj["prompt"], obj["completion"])
    else:
        pair = None
    if pair is None or not all(isinstance(p, str) and p.strip() for p in pair):
        raise EvalFileError(
            f"{where}: give 'question' and 'answer', or a chat ('messages' with a user question and an "
            "assistant answer), Alpaca ('instruction', 'output') or 'prompt'/'completion' record"
        )
    return pair[0].strip(), [pair[1].strip()]


def read_questions(path: Path, roots: Sequence[str] = ()) -> list[AnswerQuestion]:
    """The questions of a JSONL file; errors name the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalFileError(f"{path}: cannot read the questions file ({exc})") from exc
    questions: list[AnswerQuestion] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalFileError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise EvalFileError(f"{where}: each line must be a JSON object")
        question, refs = _question_of(obj, where)
        files = obj.get("files", [])
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise EvalFileError(f"{where}: 'files' must be a list of paths")
        qid = str(obj.get("id", number))
        if qid in seen:
            raise EvalFileError(f"{where}: id {qid!r} is used twice")
        seen.add(qid)
        extra = {k: obj[k] for k in ("kind", "source") if k in obj}
        questions.append(AnswerQuestion(qid, question, refs, [relative_path(f, roots) for f in files], extra))
    if not questions:
        raise EvalFileError(f"{path}: no questions in the file")
    return questions


def write_questions(path: Path, questions: Iterable[AnswerQuestion]) -> None:
    Path(path).write_text("".join(json.dumps(q.to_json()) + "\n" for q in questions), encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Scores

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """Lower case, punctuation and articles dropped, spaces collapsed (SQuAD's answer normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def token_f1(answer: str, references: Sequence[str]) -> float:
    """The best token-overlap F1 of ``answer`` against any reference."""
    got = normalise(answer).split()
    best = 0.0
    for ref in references:
        want = normalise(ref).split()
        common = sum((Counter(got) & Counter(want)).values())
        if common:
            precision, recall = common / len(got), common / len(want)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains(answer: str, references: Sequence[str]) -> bool:
    """Whether a normalised reference appears, on word boundaries, in the normalised answer."""
    got = f" {normalise(answer)} "
    return any(normalise(ref) and f" {normalise(ref)} " in got for ref in references)


def summarize(rows: Sequence[dict], configs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per configuration: questions, mean F1, contains share, citation precision/recall (retrieval
    rows whose question names files), unsupported share (retrieval rows), seconds per answer."""
    out: dict[str, dict[str, Any]] = {}
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        if not mine:
            continue
        n = len(mine)
        judged = [r for r in mine if r["retrieval"] and r["files"]]
        cited = sum(len(r["cited_files"]) for r in judged)
        hits = sum(len(set(r["cited_files"]) & set(r["files"])) for r in judged)
        checked = [r for r in mine if r["retrieval"]]
        out[config] = {
            "questions": n,
            "f1": sum(r["f1"] for r in mine) / n,
            "contains": sum(r["contains"] for r in mine) / n,
            "citation_precision": hits / cited if cited else None,
            "citation_recall": sum(bool(set(r["cited_files"]) & set(r["files"])) for r in judged)
            / len(judged)
            if judged
            else None,
            "unsupported": sum(r["supported"] is False or r["fallback"] for r in checked) / len(checked)
            if checked
            else None,
            "seconds_per_answer": sum(r["seconds"] for r in mine) / n,
        }
    return out


def answer_score(row: dict) -> float:
    """One number per answer for comparisons: the mean of its token F1 and its exact-contains (F1
    alone punishes a right answer in a full sentence against a one-word reference)."""
    return (row["f1"] + float(row["contains"])) / 2


def sign_test(wins: int, losses: int) -> float:
    """One-sided sign test: the chance of ``wins`` or more out of ``wins + losses`` fair coin tosses."""
    n = wins + losses
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n if n else 1.0


def better(rows: Sequence[dict], config: str, than: str) -> tuple[bool, int, int]:
    """Whether ``config`` answers clearly better than ``than`` on the same questions: a mean answer
    score higher by ``MIN_GAIN`` and more questions won than lost beyond chance (sign test p < ``MAX_P``).
    Returns that and the questions won and lost."""
    mine = {r["id"]: answer_score(r) for r in rows if r["config"] == config}
    theirs = {r["id"]: answer_score(r) for r in rows if r["config"] == than}
    shared = mine.keys() & theirs.keys()
    wins = sum(mine[q] > theirs[q] + 1e-9 for q in shared)
    losses = sum(mine[q] < theirs[q] - 1e-9 for q in shared)
    gain = sum(mine[q] - theirs[q] for q in shared) / len(shared) if shared else 0.0
    return gain >= MIN_GAIN and sign_test(wins, losses) < MAX_P, wins, losses


ADVICE = {
    "base": "the base model alone (neither retrieval nor the adapter helps clearly on these questions)",
    "base + retrieval": "retrieval (answers that cite your files)",
    "adapter": "the adapter alone",
    "adapter + retrieval": "the adapter with retrieval",
}


def recommendation(summary: dict[str, dict[str, Any]], rows: Sequence[dict]) -> str:
    """One line: what retrieval, the adapter and both add over the base model (F1 and contains), and
    what to use: the simplest configuration that no configuration with more parts beats clearly."""
    base = summary.get("base")
    if base is None:
        return "no answers yet"

    def gain(config: str, key: str) -> float:
        return round(summary[config][key] - base[key], 2) + 0.0  # + 0.0: no "-0.00"

    parts = []
    for label, config in (("retrieval adds", "base + retrieval"), ("the adapter", "adapter"),
                          ("both", "adapter + retrieval")):  # fmt: skip
        if config in summary:
            parts.append(f"{label} {gain(config, 'f1'):+.2f} F1 / {gain(config, 'contains'):+.2f} contains")
    best, note = "base", ""
    for config in [c for c in CONFIGS[1:] if c in summary]:
        clearly, wins, losses = better(rows, config, best)
        if clearly:
            best, note = config, ""
        elif wins > losses and summary[config]["f1"] + summary[config]["contains"] > 0:
            note = f" ({config} answers {wins} questions better and {losses} worse than {best}: not clearly better)"
    text = f"on {base['questions']} questions " + ", ".join(parts)
    if "adapter" not in summary:
        text += " (no adapter measured: pass --adapter NAME)"
    return f"{text}: use {ADVICE[best]}{note}"


# ------------------------------------------------------------------------------------------------
# Drafted questions


def _content_words(text: str) -> list[str]:
    from .eval_queries import words

    return [w for w in words(text) if len(w) > 2 and w not in _STOP]


_STOP = frozenset(
    "the and for are was were with that this from what which who whom when where how why does did "
    "has have had not can its their there them they you your into about also than then".split()
)


ANSWER_PROMPT = (
    "Passage:\n{passage}\n\nAnswer the question in a few words, using only the passage. Question: {question}"
)


def keep_answer(answer: str, passage: str) -> str | None:
    """Why a drafted reference answer is dropped (None: keep it): empty, long, repeating itself, or
    not taken from the passage."""
    answer_words = _content_words(answer)
    if not answer_words or len(answer.split()) > DRAFT_MAX_ANSWER_WORDS:
        return "answer empty or too long"
    if max(Counter(answer_words).values()) > 2:
        return "answer repeats itself"
    passage_words = set(_content_words(passage))
    if sum(w in passage_words for w in answer_words) / len(answer_words) < DRAFT_MIN_GROUNDED:
        return "answer not from the passage"
    return None


def draft_questions(
    chunks: Iterable[Any],
    n: int,
    roots: Sequence[str],
    generator: Any,
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[AnswerQuestion], Counter]:
    """Questions with reference answers drafted by ``generator`` from ``n`` sampled passages: the
    question as ``eval retrieval`` drafts it (it must name what the passage is about and copy no run
    of it), then the model's short answer with the passage in front of it, kept only when its words
    come from the passage. Returns the kept ones and a count of the dropped ones by reason."""
    from lorekeeper.plugins.base import ChatMessage

    from .eval_queries import draft_question, draft_with, sample_chunks

    draft = draft_with(generator)
    picked = sample_chunks(chunks, n, seed=seed)
    kept: list[AnswerQuestion] = []
    dropped: Counter = Counter()
    for i, chunk in enumerate(picked, 1):
        question, _ = draft_question(draft, chunk.text)
        why = "no usable question"
        if question is not None:
            prompt = ANSWER_PROMPT.format(passage=chunk.text[:1500], question=question)
            answer = generator.generate(
                [ChatMessage("user", prompt)], max_tokens=40, temperature=0.0
            ).text.strip()
            why = keep_answer(answer, chunk.text)
        if why is None:
            path = relative_path(chunk.path, roots)
            extra = {"kind": "drafted", "source": f"{path}:{chunk.start_line or 1}"}
            kept.append(AnswerQuestion(f"d{i}", question, [answer], [path], extra))
        else:
            dropped[why] += 1
        if progress is not None:
            progress(i, len(picked))
    return kept, dropped


# ------------------------------------------------------------------------------------------------
# Answering


@dataclass
class Answerer:
    """What answering needs: the generator (the adapter's base model when there is an adapter), the
    index, the settings and the adapter's name and registry."""

    generator: Any
    store: Any
    embedder: Any
    settings: Any
    roots: Sequence[str]
    adapter: str | None = None
    registry: Any = None
    max_tokens: int = 128

    def configs(self) -> tuple[str, ...]:
        return CONFIGS if self.adapter else CONFIGS[:2]

    def answer(self, q: AnswerQuestion, config: str) -> dict[str, Any]:
        from .generation import answer_question

        retrieval = config.endswith("retrieval")
        adapter = self.adapter if config in ADAPTER_CONFIGS else None
        result = answer_question(
            q.question, generator=self.generator, store=self.store if retrieval else None,
            embedder=self.embedder if retrieval else None, use_context=retrieval, adapter=adapter,
            adapters=self.registry if adapter else None, temperature=0.0, max_tokens=self.max_tokens,
            settings=self.settings,
        )  # fmt: skip
        cited = list(dict.fromkeys(relative_path(s.path, self.roots) for s in result.cited_sources))
        return {
            "id": q.qid, "config": config, "question": q.question, "references": q.references,
            "answer": result.answer, "f1": round(token_f1(result.answer, q.references), 4),
            "contains": contains(result.answer, q.references), "retrieval": retrieval,
            "files": q.files, "cited_files": cited if retrieval else [],
            "supported": result.supported if retrieval else None, "fallback": result.fallback,
            "finish": result.finish_reason, "seconds": round(result.seconds, 3),
        }  # fmt: skip


def row_key(row: dict) -> tuple[str, str]:
    return str(row["id"]), row["config"]


def read_rows(path: Path) -> list[dict]:
    """Rows already written (for --resume); a line cut short by a crash is left out."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "config" in row and "id" in row:
            rows.append(row)
    return rows


def question_dicts(questions: Sequence[AnswerQuestion]) -> list[dict]:
    return [asdict(q) for q in questions]
