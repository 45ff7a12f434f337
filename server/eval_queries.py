"""Judged queries drafted from the index, for users who have none: sample chunks, and from each make
up to three queries whose answer is the chunk's file:

- ``question``: a question the generator (the embedded SmolLM2 by default) drafts from the chunk;
- ``heading``: the chunk's section heading, when no other file has a section of that name;
- ``keywords``: the chunk's key sentence (the one with the rarest words) cut to its rarest words.

A query that copies a run of ``COPY_RUN`` words from its chunk is dropped: such a query is found by
its exact words alone and would flatter keyword search. The set is saved as JSONL for the user to
read, edit and reuse.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .evaluation import JudgedQuery, Judgement, relative_path

log = logging.getLogger(__name__)

COPY_RUN = 6  # a generated query sharing this many consecutive words with its chunk is dropped
MIN_CHUNK_WORDS = 40  # shorter chunks (a title, a table row) make poor questions
KEY_WORDS = 5  # words kept from a key sentence
KINDS = ("question", "heading", "keywords")
QUESTION_PROMPT = (  # of the phrasings tried, the one SmolLM2-135M most often answers with a question
    "Write a question that is answered by the following text. Reply with only the question, ending with a "
    "question mark.\n\nText:\n"
)
STOPWORDS = frozenset(
    "a an and are as at be been but by can do does for from had has have he her his how i if in into is it "
    "its may more most must no not of on or our she should so such than that the their them then there "
    "these they this those to too was we were what when where which while who why will with would you "
    "your all any each also only other over same some up out use used using one two see".split()
)


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def copies_run(query: str, chunk_text: str, n: int = COPY_RUN) -> bool:
    """Whether ``query`` has ``n`` consecutive words (case and punctuation aside) that ``chunk_text`` has."""
    q = words(query)
    if len(q) < n:
        return False
    c = words(chunk_text)
    runs = {tuple(c[i : i + n]) for i in range(len(c) - n + 1)}
    return any(tuple(q[i : i + n]) in runs for i in range(len(q) - n + 1))


def sample_chunks(chunks: Iterable[Any], n: int, seed: int = 0) -> list[Any]:
    """``n`` distinct chunks of at least ``MIN_CHUNK_WORDS`` words, drawn evenly (reservoir sampling)."""
    rng = random.Random(seed)
    picked: list[Any] = []
    seen_hashes: set[str] = set()
    seen = 0
    for chunk in chunks:
        if chunk.chunk_hash in seen_hashes or len(chunk.text.split()) < MIN_CHUNK_WORDS:
            continue
        seen_hashes.add(chunk.chunk_hash)
        seen += 1
        if len(picked) < n:
            picked.append(chunk)
        else:
            slot = rng.randrange(seen)
            if slot < n:
                picked[slot] = chunk
    return picked


def clean_question(reply: str) -> str | None:
    """The first question in a generator's reply (labels and quotes removed, up to its question mark),
    looking at the first few lines; None when they ask nothing (a small model sometimes describes the
    passage instead) or the question is too short or too long."""
    for line in [line for line in reply.strip().splitlines() if line.strip()][:4]:
        line = re.sub(
            r"^\s*(?:\**\s*)?(?:the question is|question|q)\s*[:.)-]\s*", "", line.strip(), flags=re.I
        )
        line = re.sub(r"<[^>]*>", "", line).strip().strip("\"'*` ")  # an HTML tag copied from the page
        if "?" not in line:
            continue
        line = line[: line.index("?") + 1].strip("\"'*` ")
        n = len(words(line))
        return line if 3 <= n <= 30 else None
    return None


def key_words(chunk_text: str, doc_freq: Counter, n_docs: int, skip: Iterable[str] = ()) -> str | None:
    """The rarest ``KEY_WORDS`` words of the chunk's key sentence, in their order, leaving out the
    words of ``skip`` (its heading, a query of its own) and Markdown heading lines; or None."""
    body = re.sub(r"(?m)^\s*#+\s.*$", "", chunk_text)
    skipped = set(skip)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", body) if len(words(s)) >= 6]
    if not sentences:
        return None

    def rarity(word: str) -> float:
        return math.log((n_docs + 1) / (doc_freq.get(word, 0) + 1))

    def content(sentence: str) -> list[str]:
        return [
            w
            for w in dict.fromkeys(words(sentence))
            if w not in STOPWORDS and w not in skipped and len(w) > 2 and not w.isdigit()
        ]

    best = max(sentences, key=lambda s: sum(rarity(w) for w in content(s)))
    chosen = sorted(content(best), key=rarity, reverse=True)[:KEY_WORDS]
    kept = [w for w in content(best) if w in chosen]
    return " ".join(kept) if len(kept) >= 3 else None


def generic_headings(chunks: Iterable[Any]) -> set[str]:
    """Headings that name sections in more than one file (``Installation``, ``Usage``): ambiguous."""
    files: dict[str, set[str]] = {}
    for chunk in chunks:
        for heading in chunk.heading_path:
            files.setdefault(heading.strip().lower(), set()).add(chunk.path)
    return {h for h, paths in files.items() if len(paths) > 1}


Draft = Callable[[str, float], str]
TEMPERATURES = (0.0, 0.7)  # a reply that asks nothing usable is drafted once more, sampled


def draft_with(generator: Any, max_tokens: int = 48) -> Draft:
    """A drafting function over a ``Generator`` plugin: (passage, temperature) in, the model's reply out."""
    from lorekeeper.plugins.base import ChatMessage

    def draft(passage: str, temperature: float) -> str:
        messages = [ChatMessage("user", QUESTION_PROMPT + passage[:1500])]
        return generator.generate(messages, max_tokens=max_tokens, temperature=temperature).text

    return draft


# a question about "the passage" or "the code above", or chatter, means nothing to search with
VAGUE = re.compile(
    r"\b(?:the|this|that|above|following|your|my)\s+(?:passage|text|question|code|article|document|snippet)\b"
    r"|\bready to help\b|\babove\b",
    re.I,
)


def about_chunk(question: str, chunk_text: str) -> bool:
    """Whether ``question`` stands on its own and names something its chunk is about (a content word)."""
    if VAGUE.search(question):
        return False
    own = {w for w in words(question) if w not in STOPWORDS and len(w) > 2}
    return bool(own & set(words(chunk_text)))


def draft_question(draft: Draft, chunk_text: str) -> tuple[str | None, bool]:
    """A drafted question about its chunk that copies no run of it, trying each of ``TEMPERATURES``;
    and whether a question was dropped for copying."""
    copied = False
    for temperature in TEMPERATURES:
        question = clean_question(draft(chunk_text, temperature))
        if question and copies_run(question, chunk_text):
            copied, question = True, None
        if question and about_chunk(question, chunk_text):
            return question, copied
    return None, copied


def generate_queries(
    chunks: Sequence[Any],
    n: int,
    roots: Sequence[str],
    draft: Draft | None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    kinds: Sequence[str] = KINDS,
) -> tuple[list[JudgedQuery], dict[str, int]]:
    """Queries of ``kinds`` drafted from ``n`` sampled chunks of ``chunks`` (``Store.iter_chunks``
    rows); ``draft`` None makes no questions. Returns the queries and how many of each
    kind were dropped for copying their chunk."""
    picked = sample_chunks(chunks, n, seed)
    doc_freq: Counter = Counter()
    for chunk in chunks:
        doc_freq.update(set(words(chunk.text)))
    ambiguous = generic_headings(chunks)
    queries: list[JudgedQuery] = []
    dropped: Counter = Counter()
    seen: set[str] = set()
    for done, chunk in enumerate(picked, 1):
        path = relative_path(chunk.path, roots)
        candidates = []
        if draft is not None and "question" in kinds:
            question, copied = draft_question(draft, chunk.text)
            dropped["question"] += copied
            candidates.append(("question", question))
        heading = chunk.heading_path[-1].strip() if chunk.heading_path else ""
        if "heading" in kinds and heading.lower() not in ambiguous and 2 <= len(words(heading)) <= 12:
            candidates.append(("heading", heading))
        if "keywords" in kinds:
            candidates.append(("keywords", key_words(chunk.text, doc_freq, len(chunks), words(heading))))
        for kind, text in candidates:
            if not text or text.lower() in seen:
                continue
            if copies_run(text, chunk.text):
                dropped[kind] += 1
                continue
            seen.add(text.lower())
            source = {"path": path, "lines": [chunk.start_line, chunk.end_line], "chunk": chunk.seq}
            queries.append(
                JudgedQuery(f"g{len(queries) + 1}", text, [Judgement(path)], {"kind": kind, "source": source})
            )
        if progress is not None:
            progress(done, len(picked))
    log.info(
        "drafted %d queries from %d chunks; dropped for copying: %s", len(queries), len(picked), dict(dropped)
    )
    return queries, {kind: n for kind, n in dropped.items() if n}
