"""Training data: read the formats people already have, turn them into masked, packed token rows.

Accepted inputs (a file, or a folder searched recursively for these suffixes):

- ``.jsonl`` with one record a line, in any of these shapes (detected per record)
    * chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``
      (OpenAI style) or ``{"conversations": [{"from": "human", "value": ...}, ...]}`` (ShareGPT)
    * Alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``
    * question/answer: ``{"question": ..., "answer": ..., "system": ... (optional)}`` (the shape
      of an ``eval answers`` question file), trained as one user turn and its answer
    * prompt/completion: ``{"prompt": ..., "completion": ...}`` (plain strings are concatenated
      as they are; lists of messages are treated as chat)
    * plain text for continued pretraining: ``{"text": ...}``
- ``.txt`` / ``.md`` files: plain text, cut into passages at blank lines.
- the lorekeeper index (``from_index``): its chunks as plain text, and optionally question/answer
  pairs drafted from chunks by the generator.

Chat records are rendered with the base model's own chat template, so the adapter learns the format
the model is prompted with at inference. By default only answer tokens carry a loss (labels are -100
on system/user/prompt tokens). Text longer than a sequence is cut into windows; a supervised record
longer than a sequence is truncated (counted and warned) or rejected, per ``overlong``. Records are
then packed whole into rows of ``max_seq_len`` tokens; position ids restart at each record so that
transformers keeps packed records from attending to each other.

The module stays one unit (over the ~500-line guide) because it is one pipeline, records -> tokens
-> packed rows, whose names cli, train, evaluate and the tests import from here; its "Reading
records" section is the seam to cut along (into a readers module) if it grows further.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
PASSAGE_CHARS = 1500  # a .txt/.md passage: about 350 tokens, so one file yields several held-out candidates
MAX_LISTED = 20  # bad lines (and warnings) listed in full; the rest are counted


class DataError(ValueError):
    """Training data is unusable; the message names the file and line, and what to fix."""


# What a record's parts are called in the formats that name them with fields of their own.
FIELD_NAMES = {
    "alpaca": {"user": "'instruction'", "assistant": "'output'", "system": "'system'"},
    "question/answer": {"user": "'question'", "assistant": "'answer'", "system": "'system'"},
}


@dataclass
class Record:
    """One training example before tokenization.

    ``kind`` is "chat" (``messages``), "completion" (``prompt`` + ``completion`` strings) or "text".
    ``source`` says where it came from ("file.jsonl:12"), for error messages and the held-out file.
    ``shape`` is the format the record was written in, when it differs from ``kind`` ("alpaca": an
    instruction/input/output row, "question/answer": a question/answer row, both trained as a
    chat), for the summary.
    """

    kind: str
    source: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    shape: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(**data)

    def prompt_messages(self) -> list[dict[str, str]] | None:
        """The conversation up to (not including) its last answer, for side-by-side evaluation."""
        if self.kind != "chat" or not self.messages:
            return None
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    def reference_answer(self) -> str | None:
        if self.kind == "chat" and self.messages:
            return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]
        return self.completion

    @property
    def format_name(self) -> str:
        """The format the summary reports: "chat", "alpaca", "question/answer", "prompt/completion"
        or "text"."""
        return self.shape or ("prompt/completion" if self.kind == "completion" else self.kind)

    def empty_parts(self) -> list[str]:
        """What in this record is empty (an answer with no text teaches the model to say nothing)."""
        if self.kind == "chat":
            if self.shape in FIELD_NAMES:
                names = FIELD_NAMES[self.shape]
                return [
                    f"{names[m['role']]} is empty" for m in self.messages or [] if not m["content"].strip()
                ]
            return [
                f"message {i} ({m['role']}) has an empty 'content'"
                for i, m in enumerate(self.messages or [])
                if not m["content"].strip()
            ]
        if self.kind == "completion":
            return [
                f"{name!r} is empty"
                for name in ("prompt", "completion")
                if not (getattr(self, name) or "").strip()
            ]
        return []


@dataclass
class Example:
    """A tokenized record: ``labels[i]`` is ``input_ids[i]`` where the loss applies, else -100."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""


@dataclass
class Row:
    """A packed training row: several examples; ``position_ids`` restart at 0 for each."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


@dataclass
class DataSummary:
    files: int = 0
    records: int = 0
    train_records: int = 0
    heldout_records: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    train_tokens: int = 0
    train_loss_tokens: int = 0
    heldout_tokens: int = 0
    heldout_loss_tokens: int = 0
    longest_record_tokens: int = 0
    truncated: int = 0
    split_into_windows: int = 0
    dropped_no_loss_tokens: int = 0
    records_with_empty_content: int = 0
    train_rows: int = 0
    heldout_rows: int = 0
    max_seq_len: int = 0
    row_fill: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BuiltData:
    train_rows: list[Row]
    heldout_rows: list[Row]
    train_examples: list[Example]
    heldout_examples: list[Example]
    heldout_records: list[Record]
    summary: DataSummary


# ------------------------------------------------------------------------------------------------
# Reading records


def _require_str(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _chat_messages(raw: Any, where: str, sharegpt: bool) -> list[dict[str, str]]:
    key = "conversations" if sharegpt else "messages"
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object, got {type(message).__name__}")
        if sharegpt:
            if "from" not in message or "value" not in message:
                raise DataError(f"{where}: {key}[{i}] needs 'from' and 'value' (ShareGPT format)")
            role = SHAREGPT_ROLES.get(str(message["from"]).lower())
            if role is None:
                raise DataError(
                    f"{where}: {key}[{i}] has from={message['from']!r}; use one of {', '.join(SHAREGPT_ROLES)}"
                )
            content = _require_str(message["value"], f"{key}[{i}].value", where)
        else:
            if "role" not in message or "content" not in message:
                raise DataError(f"{where}: {key}[{i}] needs 'role' and 'content'")
            role = message["role"]
            if role not in CHAT_ROLES:
                raise DataError(f"{where}: {key}[{i}] has role={role!r}; use one of {', '.join(CHAT_ROLES)}")
            content = _require_str(message["content"], f"{key}[{i}].content", where)
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so there is nothing to learn")
    return messages


def _question_answer(obj: dict, where: str) -> Record:
    """``{"question": ..., "answer": ...}`` (optionally ``system``) as a chat of one turn."""
    if "answer" not in obj and "answers" in obj:
        raise DataError(
            f"{where}: 'answers' lists the answers an evaluation accepts; to train on the row, give "
            "the one answer to learn as 'answer' (a string)"
        )
    if "question" not in obj or "answer" not in obj:
        raise DataError(f"{where}: a question/answer record needs both 'question' and 'answer'")
    question = _require_str(obj["question"], "'question'", where)
    return _one_turn(obj, where, question, "answer", "question/answer")


def _one_turn(obj: dict, where: str, user: str, answer_field: str, shape: str) -> Record:
    """A row naming its parts with fields of its own (Alpaca, question/answer) as a chat of one
    turn: ``user``, the answer in ``answer_field``, and ``system`` first when the row has one."""
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _require_str(obj[answer_field], f"'{answer_field}'", where)},
    ]
    if obj.get("system"):
        messages.insert(0, {"role": "system", "content": _require_str(obj["system"], "'system'", where)})
    return Record("chat", where, messages=messages, shape=shape)


def parse_record(obj: Any, where: str) -> Record:
    """Normalise one JSON record; ``where`` ("file:line") prefixes every error."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Record("chat", where, messages=_chat_messages(obj["messages"], where, sharegpt=False))
    if "conversations" in obj:
        return Record("chat", where, messages=_chat_messages(obj["conversations"], where, sharegpt=True))
    if "instruction" in obj or "output" in obj:
        if "instruction" not in obj or "output" not in obj:
            raise DataError(f"{where}: an Alpaca record needs both 'instruction' and 'output'")
        instruction = _require_str(obj["instruction"], "'instruction'", where)
        extra = obj.get("input") or ""
        extra = _require_str(extra, "'input'", where)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _one_turn(obj, where, user, "output", "alpaca")
    if "question" in obj or "answer" in obj or "answers" in obj:
        return _question_answer(obj, where)
    if "prompt" in obj or "completion" in obj:
        if "prompt" not in obj or "completion" not in obj:
            raise DataError(f"{where}: a prompt/completion record needs both 'prompt' and 'completion'")
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return Record("chat", where, messages=_chat_messages(prompt + completion, where, sharegpt=False))
        return Record(
            "completion",
            where,
            prompt=_require_str(prompt, "'prompt'", where),
            completion=_require_str(completion, "'completion'", where),
        )
    if "text" in obj:
        text = _require_str(obj["text"], "'text'", where)
        return Record("text", where, text=text)
    keys = ", ".join(sorted(obj)) or "none"
    raise DataError(
        f"{where}: unrecognised record (keys: {keys}); expected 'messages', 'conversations', "
        "'instruction'+'output', 'question'+'answer', 'prompt'+'completion' or 'text'"
    )


def read_jsonl(path: Path, problems: list[str] | None = None) -> Iterator[Record]:
    """The records of a JSONL file. With ``problems``, a bad line is added to it (as "file:line: what")
    and reading goes on, so every bad line is found in one pass; without, the first one raises."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                record = parse_record(obj, where)
            except UnicodeDecodeError as exc:
                error = DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)")
            except DataError as exc:
                error = exc
            else:
                if record.kind == "text" and not (record.text or "").strip():
                    continue
                yield record
                continue
            if problems is None:
                raise error
            problems.append(str(error))


def text_passages(text: str, source: Path, limit: int = PASSAGE_CHARS) -> Iterator[Record]:
    """Cut a text at blank lines into passages of up to ``limit`` characters (longer paragraphs whole)."""
    lines = text.splitlines()
    buffer: list[str] = []
    start_line = 1
    size = 0

    def flush() -> Record | None:
        body = "\n".join(buffer).strip()
        return Record("text", f"{source}:{start_line}", text=body) if body else None

    for number, line in enumerate(lines, start=1):
        if not buffer:
            start_line = number
        buffer.append(line)
        size += len(line) + 1
        if not line.strip() and size >= limit:
            record = flush()
            if record:
                yield record
            buffer, size = [], 0
    record = flush()
    if record:
        yield record


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.suffix.lower() in JSONL_SUFFIXES + TEXT_SUFFIXES
        ]
        return [p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() not in JSONL_SUFFIXES + TEXT_SUFFIXES:
        raise DataError(f"{path}: unsupported data file; use .jsonl, or plain text (.txt, .md)")
    return [path]


def listing(head: str, items: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``head``, then the first ``limit`` items one a line, then how many more were left out."""
    lines = [head, *(f"  {item}" for item in items[:limit])]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


def read_records(paths: Iterable[str | Path]) -> tuple[list[Record], int]:
    """Every record of the given files/folders, and how many files were read.

    Every bad line of every file is found before failing: the ``DataError`` lists them (the first
    ``MAX_LISTED``, then a count). Records with empty content are read, with a warning naming each.
    """
    records: list[Record] = []
    problems: list[str] = []
    n_files = 0
    for raw in paths:
        try:
            found = _data_files(Path(raw).expanduser())
        except DataError as exc:
            problems.append(str(exc))
            continue
        for path in found:
            n_files += 1
            if path.suffix.lower() in JSONL_SUFFIXES:
                records.extend(read_jsonl(path, problems))
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            records.extend(text_passages(text, path))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(
            listing(f"{len(problems)} problems in the training data; fix them and run again:", problems)
        )
    _warn_empty(records)
    return records, n_files


def _warn_empty(records: Sequence[Record]) -> None:
    empty = [f"{r.source}: {'; '.join(parts)}" for r in records if (parts := r.empty_parts())]
    if empty:
        log.warning(
            "%s",
            listing(
                f"{len(empty)} record(s) with empty content (trained as they are; fill or remove them):",
                empty,
            ),
        )


def records_from_index(
    path_glob: str | None = None,
    qa_pairs: int = 0,
    *,
    db_path: Path | None = None,
    generator: Any = None,
    seed: int = 42,
    max_tokens: int = 200,
) -> list[Record]:
    """The index's chunks as text records, plus ``qa_pairs`` question/answer pairs drafted from them."""
    from lorekeeper.server.stores import open_store

    store = open_store(db_path)
    try:
        chunks = list(store.iter_chunks(path_glob=path_glob))
    finally:
        store.close()
    records = [
        Record("text", f"{chunk.path}:{chunk.start_line or 1}", text=chunk.text)
        for chunk in chunks
        if chunk.text.strip()
    ]
    if qa_pairs and records:
        records.extend(
            draft_qa_pairs(records, qa_pairs, generator=generator, seed=seed, max_tokens=max_tokens)
        )
    return records


QA_INSTRUCTION = (
    "Read the passage and write one question a reader could ask about it, then its answer taken from "
    "the passage. Reply in exactly this form:\nQuestion: ...\nAnswer: ...\n\nPassage:\n"
)


def parse_qa(text: str) -> tuple[str, str] | None:
    """('question', 'answer') from a "Question: ... Answer: ..." reply, or None when it has neither."""
    lower = text.lower()
    q_at, a_at = lower.find("question:"), lower.find("answer:")
    if q_at < 0 or a_at < 0 or a_at < q_at:
        return None
    question = text[q_at + len("question:") : a_at].strip()
    answer = text[a_at + len("answer:") :].strip()
    return (question, answer) if question and answer else None


def draft_qa_pairs(
    chunks: Sequence[Record], n: int, *, generator: Any = None, seed: int = 42, max_tokens: int = 200
) -> list[Record]:
    """Ask the generator for question/answer pairs about ``n`` chunks; unparseable replies are skipped."""
    from lorekeeper.plugins.base import ChatMessage

    if generator is None:
        from lorekeeper.plugins import get_generator

        generator = get_generator()
    picks = random.Random(seed).sample(list(chunks), min(n, len(chunks)))
    drafted = []
    for chunk in picks:
        reply = generator.generate(
            [ChatMessage("user", QA_INSTRUCTION + (chunk.text or "")[:2000])],
            max_tokens=max_tokens,
            temperature=0.2,
        ).text
        pair = parse_qa(reply)
        if pair is None:
            log.info("skipped a drafted pair for %s: the reply had no 'Question:'/'Answer:'", chunk.source)
            continue
        question, answer = pair
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        drafted.append(Record("chat", f"{chunk.source} (drafted)", messages=messages))
    log.info("drafted %d question/answer pairs from %d chunks", len(drafted), len(picks))
    return drafted


# ------------------------------------------------------------------------------------------------
# Tokenizing


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets, never adding a BOS the text already starts with."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _chat_text_and_answer_spans(
    tokenizer: Any, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The chat-templated text, and the character spans of each assistant turn (its end marker included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: the base model has no chat template, so chat records cannot be formatted; use 'text' records"
        )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(through) or not through.startswith(before):
            raise DataError(
                f"{where}: this model's chat template renders earlier turns differently once later ones are added, "
                "so answer tokens cannot be located; train with --train-on-prompt"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_record(record: Record, tokenizer: Any, train_on_prompt: bool = False) -> Example:
    """Token ids with labels: -100 on tokens outside answers unless ``train_on_prompt``."""
    eos = tokenizer.eos_token_id
    if record.kind == "text":
        ids, _ = _encode(tokenizer, record.text or "")
        ids = ids + [eos]
        labels = list(ids)
    elif record.kind == "completion":
        prompt_ids, _ = _encode(tokenizer, record.prompt or "")
        completion_ids = tokenizer(record.completion or "", add_special_tokens=False)["input_ids"]
        ids = prompt_ids + list(completion_ids) + [eos]
        labels = (list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + ids[
            len(prompt_ids) :
        ]
    elif record.kind == "chat":
        text, spans = _chat_text_and_answer_spans(tokenizer, record.messages or [], record.source)
        ids, offsets = _encode(tokenizer, text)
        if train_on_prompt:
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(ids)
            for t, (start, end) in enumerate(offsets):
                if end > start and any(s <= start < e for s, e in spans):
                    labels[t] = ids[t]
    else:
        raise DataError(f"{record.source}: unknown record kind {record.kind!r}")
    # The first token is never a prediction target (nothing precedes it within its record); masking it
    # also keeps a packed row from teaching "the end of one record predicts the start of the next".
    labels[0] = IGNORE_INDEX
    return Example(ids, labels, record.source)


def fit_to_length(
    example: Example, kind: str, max_len: int, overlong: str
) -> tuple[list[Example], str | None]:
    """Make an example fit a row: text is cut into windows, supervised records truncated or rejected.

    Returns the pieces and what happened ("split", "truncated" or None).
    """
    n = len(example.input_ids)
    if n <= max_len:
        return [example], None
    if kind == "text":
        pieces = []
        for start in range(0, n, max_len):
            ids = example.input_ids[start : start + max_len]
            labels = list(ids)
            labels[0] = IGNORE_INDEX
            if len(ids) > 1:
                pieces.append(Example(ids, labels, example.source))
        return pieces, "split"
    if overlong == "error":
        raise DataError(
            f"{example.source}: the record is {n} tokens, longer than max_seq_len={max_len}; raise --max-seq-len, "
            "shorten the record, or pass --overlong truncate"
        )
    return [Example(example.input_ids[:max_len], example.labels[:max_len], example.source)], "truncated"


# ------------------------------------------------------------------------------------------------
# Splitting and packing


def split_heldout(
    records: list[Record], fraction: float, max_records: int, seed: int
) -> tuple[list[Record], list[Record]]:
    """Deterministic (seeded) held-out split; at least one record each side when there are two or more."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    n_heldout = min(max_records, max(1, round(len(records) * fraction)), len(records) - 1)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    heldout_ids = set(order[:n_heldout])
    train = [r for i, r in enumerate(records) if i not in heldout_ids]
    heldout = [r for i, r in enumerate(records) if i in heldout_ids]
    return train, heldout


def pack(examples: Sequence[Example], max_len: int, packing: bool = True) -> list[Row]:
    """First-fit-decreasing packing of whole examples into rows of at most ``max_len`` tokens."""
    rows: list[Row] = []
    if not packing:
        return [Row(list(e.input_ids), list(e.labels), list(range(len(e.input_ids)))) for e in examples]
    space: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(example.input_ids)
        for i, free in enumerate(space):
            if n <= free:
                row = rows[i]
                break
        else:
            row = Row([], [], [])
            rows.append(row)
            space.append(max_len)
            i = len(rows) - 1
        row.input_ids.extend(example.input_ids)
        row.labels.extend(example.labels)
        row.position_ids.extend(range(n))
        space[i] -= n
    return rows


class PackedCollator:
    """Pads rows of a batch to the same length without an attention mask.

    With no attention mask and position ids that restart per record, transformers builds a
    block-diagonal mask, so packed records never see each other. Padding forms its own block
    (positions restart at 0) with labels -100, so it never affects real tokens.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.tokens_seen = 0  # real (unpadded) tokens collated so far, for tokens/s

    def __call__(self, rows: Sequence[Row | dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        rows = [r if isinstance(r, dict) else asdict(r) for r in rows]
        longest = max(len(r["input_ids"]) for r in rows)
        self.tokens_seen += sum(len(r["input_ids"]) for r in rows)
        if self.multiple > 1:
            longest = -(-longest // self.multiple) * self.multiple
        ids, labels, positions = [], [], []
        for r in rows:
            pad = longest - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_token_id] * pad)
            labels.append(r["labels"] + [IGNORE_INDEX] * pad)
            positions.append(r["position_ids"] + list(range(pad)))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }


# ------------------------------------------------------------------------------------------------
# Everything together


def tokenize_all(
    records: Sequence[Record], tokenizer: Any, config: TrainConfig, summary: DataSummary
) -> list[Example]:
    """Token rows of ``records``, cut to ``config.max_seq_len`` as training cuts them; rows with no
    loss tokens are dropped. What was cut or dropped is counted in ``summary``."""
    examples: list[Example] = []
    for record in records:
        example = tokenize_record(record, tokenizer, config.train_on_prompt)
        summary.longest_record_tokens = max(summary.longest_record_tokens, len(example.input_ids))
        pieces, what = fit_to_length(example, record.kind, config.max_seq_len, config.overlong)
        if what == "truncated":
            summary.truncated += 1
        elif what == "split":
            summary.split_into_windows += 1
        for piece in pieces:
            if not any(label != IGNORE_INDEX for label in piece.labels):
                summary.dropped_no_loss_tokens += 1
                continue
            examples.append(piece)
    return examples


def gather_records(
    config: TrainConfig, *, extra_records: Sequence[Record] = (), generator: Any = None
) -> tuple[list[Record], int]:
    """The run's records (files, then the index, then ``extra_records``) and how many files were
    read; a missing, unreadable or empty file is a ``DataError`` naming it. Needs no tokenizer, so
    ``finetune data`` checks files before the training stack loads."""
    records, n_files = read_records(config.data)
    if config.from_index:
        records.extend(
            records_from_index(
                config.index_path_glob, config.index_qa_pairs, generator=generator, seed=config.seed
            )
        )
    records.extend(extra_records)
    if not records:
        where = ", ".join(config.data) or "the index"
        raise DataError(f"no training records in {where}: the files are empty (or hold only blank text)")
    return records, n_files


def build_datasets(
    config: TrainConfig,
    tokenizer: Any,
    *,
    extra_records: Sequence[Record] = (),
    generator: Any = None,
    gathered: tuple[list[Record], int] | None = None,
    heldout: Sequence[Record] | None = None,
) -> BuiltData:
    """Read, split, tokenize and pack the run's data; fails early with a clear error when unusable.
    ``gathered`` is what ``gather_records`` returned, when the caller read the records already;
    ``heldout``, the records of ``config.eval_data`` when the caller read them already."""
    if gathered is None:
        gathered = gather_records(config, extra_records=extra_records, generator=generator)
    records, n_files = gathered
    where = ", ".join(config.data) or "the index"
    summary = DataSummary(files=n_files, records=len(records), max_seq_len=config.max_seq_len)
    summary.formats = dict(Counter(r.format_name for r in records))
    summary.records_with_empty_content = sum(1 for r in records if r.empty_parts())
    if config.eval_data:  # a held-out file: every record of the data trains
        given = read_records(config.eval_data)[0] if heldout is None else heldout
        train_records, heldout_records = list(records), list(given)[: config.eval_max_records]
    else:
        train_records, heldout_records = split_heldout(
            records, config.eval_fraction, config.eval_max_records, config.seed
        )
    summary.train_records, summary.heldout_records = len(train_records), len(heldout_records)
    train_examples = tokenize_all(train_records, tokenizer, config, summary)
    heldout_examples = tokenize_all(heldout_records, tokenizer, config, summary)
    if not train_examples:
        raise DataError(
            f"no trainable tokens in {where}: every record lost its answer tokens (truncated away or empty); "
            "raise --max-seq-len or check the records"
        )
    if summary.truncated:
        log.warning(
            "%d record(s) were longer than max_seq_len=%d and were truncated (use --overlong error to reject them)",
            summary.truncated,
            config.max_seq_len,
        )
    train_rows = pack(train_examples, config.max_seq_len, config.packing)
    heldout_rows = pack(heldout_examples, config.max_seq_len, config.packing)
    summary.train_tokens = sum(len(e.input_ids) for e in train_examples)
    summary.train_loss_tokens = sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in train_examples)
    summary.heldout_tokens = sum(len(e.input_ids) for e in heldout_examples)
    summary.heldout_loss_tokens = sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in heldout_examples)
    summary.train_rows, summary.heldout_rows = len(train_rows), len(heldout_rows)
    capacity = len(train_rows) * config.max_seq_len
    summary.row_fill = round(summary.train_tokens / capacity, 4) if capacity else 0.0
    return BuiltData(train_rows, heldout_rows, train_examples, heldout_examples, heldout_records, summary)


def write_records(records: Sequence[Record], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")


def load_records(path: Path) -> list[Record]:
    with open(path, encoding="utf-8") as handle:
        return [Record.from_json(json.loads(line)) for line in handle if line.strip()]
