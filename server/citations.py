"""Checking an answer against its sources, sentence by sentence.

The model is asked to mark claims with ``[n]``. That mark proves nothing by itself, so every
sentence of the answer is checked against every source: a sentence is *supported* by a source when
three consecutive sentences of the source contain enough of the sentence's content words
(``support_score`` at least ``SUPPORT_THRESHOLD``) and every number the sentence states. Then:

- a source is ``cited`` when it supports a sentence of the answer (with the supporting span);
- a marker the model put on a sentence that its source does not support is *flagged*;
- a supported sentence without a right marker gets one added;
- a list of sources the model wrote itself (``Sources: [1] ...``) is removed, since the real
  sources are listed from the index;
- an answer none of whose sentences is supported is reported as such (the caller says "not found
  in your documents" instead of presenting it as sourced).

Why word containment rather than embedding similarity: a small model's answers copy or lightly
reword their source, so shared content words separate right from invented claims well, the
numbers rule catches the commonest invention (a changed figure), it costs microseconds, and the
span it finds is the one a person can check. The threshold was calibrated on the labelled pairs in
``tests/test_citations.py`` (see ``calibrate``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

SUPPORT_THRESHOLD = 0.7  # share of a sentence's content words a source must hold to support it
SUPPORT_WINDOW = 3  # consecutive source sentences that must hold a claim (see support_score)
MIN_CONTENT_WORDS = 2  # shorter sentences ("Sure!", "Yes.") make no checkable claim

STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each either else etc few for from
    further had has have having he her here hers herself him himself his how however i if in into is it
    its itself just let may me might more most must my myself no nor not now of off on once only or other
    our ours ourselves out over own per same shall she should so some such than that the their theirs them
    themselves then there these they this those through thus to too under until up upon us very via was we
    were what when where which while who whom whose why will with within without would yes yet you your
    yours yourself yourselves according answer based document documents source sources says said state
    states stated mentioned text given provided""".split()
)

_WORD = re.compile(r"[A-Za-z][A-Za-z'_-]*|\d+(?:[.,:/]\d+)*%?")
_NUMBER = re.compile(r"^\d")
_MARKER = re.compile(r"\[\s*(\d+(?:\s*(?:[,;]|-|–|and)\s*\d+)*)\s*\]")
_NUMBER_OR_RANGE = re.compile(r"(\d+)\s*(?:[-–]\s*(\d+))?")
_MAX_RANGE = 50  # "[1-100000]" is noise, not 100000 citations
# A line that starts a list of sources the model wrote itself ("Sources:", "References", "[1] path").
_SOURCE_LIST_HEAD = re.compile(r"^\s*(?:\*\*|#+\s*)?(sources?|references?|citations?|bibliography)\b[^\n]{0,40}$",
                               re.IGNORECASE | re.MULTILINE)  # fmt: skip
_SOURCE_LIST_ITEM = re.compile(r"^\s*(?:[-*]\s*)?\[\d+\]\s*(?:\S*[/\\.]\S*|[^.!?]{0,80})\s*$")


# ---------------------------------------------------------------------------- words


NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
} | {"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "hundred": "100", "thousand": "1000",
     "once": "1", "twice": "2", "first": "1", "second": "2", "third": "3"}  # fmt: skip
NEGATIONS = frozenset({"not", "no", "never", "cannot", "can't", "don't", "doesn't", "isn't", "aren't",
                       "won't", "neither", "nor", "without", "none"})  # fmt: skip


def _stem(word: str) -> str:
    """A light, deterministic stemmer: enough to match "days"/"day", "created"/"create"."""
    w = word.lower().strip("'-_")
    for suffix, keep in (("ies", "y"), ("sses", "ss"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: len(w) - len(suffix)] + keep
            break
    if len(w) > 3 and w.endswith("e"):  # "file" and "files" both give "fil"
        w = w[:-1]
    return w


def _normalise_number(token: str) -> str:
    return token.rstrip("%").replace(",", "")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(_MARKER.sub(" ", text))


def without_markers(text: str) -> str:
    """``text`` with its ``[n]`` markers taken out and its spacing normalised (to compare answers)."""
    return re.sub(r" ([.,:;!?])", r"\1", " ".join(_MARKER.sub(" ", text).split()))


def content_words(text: str) -> list[str]:
    """The words of ``text`` that carry its claim: stemmed, numbers normalised (``six`` is ``6``),
    stopwords and markers left out."""
    out = []
    for token in _tokens(text):
        lower = token.lower()
        if _NUMBER.match(token):
            out.append(_normalise_number(token))
        elif lower in NUMBER_WORDS:
            out.append(NUMBER_WORDS[lower])
        elif lower not in STOPWORDS and len(token) > 1:
            out.append(_stem(token))
    return out


def numbers_in(text: str) -> set[str]:
    out = set()
    for token in _tokens(text):
        if _NUMBER.match(token):
            out.add(_normalise_number(token))
        elif token.lower() in NUMBER_WORDS:
            out.add(NUMBER_WORDS[token.lower()])
    return out


def _negated(text: str) -> bool:
    return any(t.lower() in NEGATIONS or t.lower().endswith("n't") for t in re.findall(r"[A-Za-z']+", text))


# A term written as code: an option (-v, --with-editline), a call (open()), a dotted or slashed name
# (os.path, config.yaml, /etc/fstab), a constant (EEXIST, O_CREAT).
_CODE_TERM = re.compile(
    r"(?<![\w-])(?:--?[A-Za-z][\w-]*|\w+\(\)|/?[A-Za-z]\w*(?:[./]\w+)+|[A-Z][A-Z0-9_]{2,})"
)


def key_terms(text: str) -> set[str]:
    """Words a claim cannot change and stay true: names (a capital inside a sentence), constants
    (``ENOENT``, ``O_CREAT``), identifiers (``env_name``, ``x86``), terms written as code
    (``--with-editline``, ``config.yaml``), stemmed like content words."""
    out = set()
    text = _MARKER.sub(" ", text)
    for sentence in re.split(r"(?<=[.!?:;])\s+|\n", text):
        for i, token in enumerate(_WORD.findall(sentence)):
            if _NUMBER.match(token) or token.lower() in STOPWORDS or len(token) < 2:
                continue
            constant = token.isupper() or "_" in token or any(c.isdigit() for c in token)
            name = i > 0 and token[0].isupper()
            if constant or name:
                out.add(_stem(token))
    for term in _CODE_TERM.findall(text):  # --with-editline, config.yaml, open()
        out.update(content_words(term))
    return out


def paths_in(text: str) -> set[str]:
    """The slashed and dotted names of ``text`` (``/etc/motd``, ``debian/changelog``, ``os.path``),
    each part stemmed like a content word and the whole lower-cased, without a leading ``/`` or
    ``~/``: a name is one term, not the words it is made of."""
    out = set()
    for term in _CODE_TERM.findall(_MARKER.sub(" ", text)):
        parts = [part for part in re.split(r"([/.])", term.rstrip(".").lstrip("~/")) if part]
        names = [part for part in parts if part not in ("/", ".")]
        if len(names) < 2 or all(len(name) == 1 for name in names):
            continue  # one word, or an abbreviation (e.g., i.e., U.S.)
        out.add("".join(part if part in ("/", ".") else _stem(part.lower()) for part in parts))
    return out


def _holds_path(path: str, source_paths: set[str]) -> bool:
    """Whether a source names ``path``, or a longer name ending or going on with it whole parts at a
    time (``ssh/sshd_config`` in ``/etc/ssh/sshd_config``)."""
    wrapped = f"/{path}/".replace(".", "/")  # dots and slashes both part names
    return any(wrapped in f"/{held}/".replace(".", "/") for held in source_paths)


def support_score(claim: str, source: str) -> float:
    """How well ``source`` supports ``claim``, from 0 to 1: the share of the claim's content words
    held by the best ``SUPPORT_WINDOW`` consecutive sentences of the source. It is 0 when they do
    not hold a number, a name or a constant the claim states (a changed figure, day or error code
    is the commonest invention), and 0 when the claim and the source passage that matches it best
    disagree on a negation ("can be caught" against "cannot be caught").

    The window is what a claim drawn from the source looks like: a small model copies or rewords a
    sentence or two. Words from all over a long passage fit together claims it never makes; on
    real manual pages, "/etc/motd contains the text printed before the login prompt" against
    issue(5), whose only "motd" is in its SEE ALSO list (``scripts/bench_answers.py``: 18 of 84
    answers supported yet wrong with the whole passage, 13 with 3 sentences, none of the right
    ones lost)."""
    words = content_words(claim)
    if not words:
        return 0.0
    claim_terms = (words, numbers_in(claim), key_terms(claim), _negated(claim), paths_in(claim))
    whole = _support_in(claim_terms, source)
    sentences = source_sentences(source) if whole > 0 else []
    if len(sentences) <= SUPPORT_WINDOW:
        return whole
    return max(
        _support_in(claim_terms, source[sentences[i][0] : sentences[i + SUPPORT_WINDOW - 1][1]])
        for i in range(len(sentences) - SUPPORT_WINDOW + 1)
    )


def _support_in(claim_terms: tuple[list[str], set[str], set[str], bool, set[str]], source: str) -> float:
    """``support_score`` with all of ``source`` as the window; the claim comes analysed once
    (its content words, numbers, key terms and negation) for all the windows it is tried in."""
    words, numbers, keys, negated, paths = claim_terms
    if not numbers <= numbers_in(source):
        return 0.0
    vocabulary = set(content_words(source))
    if not keys <= vocabulary:
        return 0.0
    if paths:
        held = paths_in(source)
        if not all(_holds_path(path, held) for path in paths):
            return 0.0
    score = sum(1 for w in words if w in vocabulary) / len(words)
    if score > 0 and negated != _negated(_best_passage(words, source)):
        return 0.0
    return score


def _best_passage(words: list[str], source: str) -> str:
    """The source sentence sharing the most content words with ``words``."""
    wanted = set(words)
    best, top = source, -1
    for start, end in source_sentences(source):
        shared = len(wanted & set(content_words(source[start:end])))
        if shared > top:
            best, top = source[start:end], shared
    return best


# ---------------------------------------------------------------------------- sentences


@dataclass
class Span:
    """Where in a source the supporting text is (character offsets into the source's text)."""

    source: int
    start: int
    end: int
    text: str
    score: float


@dataclass
class SentenceCheck:
    text: str  # the sentence as the model wrote it, markers included
    claim: bool  # False for sentences too short to state anything checkable
    supported_by: list[int] = field(default_factory=list)  # sources that support it, best first
    markers: list[int] = field(default_factory=list)  # what the model cited on it
    flagged: list[int] = field(default_factory=list)  # markers whose source does not support it
    added: list[int] = field(default_factory=list)  # markers lorekeeper added
    span: Span | None = None  # the best supporting passage

    @property
    def supported(self) -> bool:
        return bool(self.supported_by)


@dataclass
class CheckedAnswer:
    text: str  # the answer with invented source lists removed and missing markers added
    sentences: list[SentenceCheck]
    cited: list[int]  # sources that support at least one sentence, in order of first use
    flagged: list[int]  # markers pointing at a source that supports nothing they are on
    invalid: list[int]  # markers pointing at no source at all
    stripped_source_list: bool = False
    unfinished: bool = False  # it ends on a line introducing something ("...options:") and stops

    @property
    def claims(self) -> list[SentenceCheck]:
        return [s for s in self.sentences if s.claim]

    @property
    def supported(self) -> bool:
        """Whether any claim of the answer is supported by a source."""
        return any(s.supported for s in self.claims)

    def spans(self) -> dict[int, Span]:
        """The best supporting span of each cited source."""
        best: dict[int, Span] = {}
        for sentence in self.sentences:
            span = sentence.span
            if span is not None and (span.source not in best or span.score > best[span.source].score):
                best[span.source] = span
        return best


def parse_markers(text: str) -> list[int]:
    """Every source number ``text`` cites (``[1]``, ``[2, 3]``, ``[4-5]``), in order of first use."""
    seen: list[int] = []
    for match in _MARKER.finditer(text):
        for num in _NUMBER_OR_RANGE.finditer(match.group(1)):
            start = int(num.group(1))
            end = int(num.group(2)) if num.group(2) else start
            if end < start or end - start > _MAX_RANGE:
                end = start
            for n in range(start, end + 1):
                if n not in seen:
                    seen.append(n)
    return seen


def split_sentences(text: str) -> list[str]:
    """Sentences and list items of an answer, markers kept with the sentence they follow."""
    pieces: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        # a sentence ends at . ! ? (with any closing quotes and markers right after), before
        # whitespace and a capital, digit, bracket or quote; "e.g." and "6.5" stay whole
        start = 0
        for end in _ANSWER_SENTENCE_END.finditer(line):
            pieces.append(line[start : end.start()] + end.group(1) + end.group(2))
            start = end.end()
        pieces.append(line[start:])
    return [p.strip() for p in pieces if p.strip()]


_ANSWER_SENTENCE_END = re.compile(r"(?<=[.!?])([\"'”’)]*)((?:\s*\[[^\]]{1,20}\])*)\s+(?=[A-Z0-9\"'(\[“‘])")


_BLOCK_START = re.compile(r"^[ \t]*(?:#{1,6}\s|[-*+]\s|\d+[.)]\s|\|)")
_RULE = re.compile(r"^\s*([-=*_~+^])\1{2,}\s*$")  # ----, ====, ***** on a line of their own


def _is_gap(line: str) -> bool:
    """A blank line, or a rule or heading underline (----, ****): a break between blocks, not text."""
    return not line.strip() or _RULE.match(line) is not None


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(\[])")


def source_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of a source text.

    Lines are joined into paragraphs first (a hard-wrapped sentence is one sentence); headings,
    list items, table rows, blank lines and rules (a heading's ---- underline) start new ones.
    """
    blocks: list[tuple[int, int]] = []
    start = None
    offset = 0
    for line in text.splitlines(keepends=True):
        heading = line.lstrip().startswith("#")
        gap = _is_gap(line)
        if gap or heading or _BLOCK_START.match(line):
            if start is not None:
                blocks.append((start, offset))
            start = None
            if heading:
                blocks.append((offset, offset + len(line)))  # a heading is a block of its own
            elif not gap:
                start = offset  # a list item or table row starts a block
        elif start is None:
            start = offset
        offset += len(line)
    if start is not None:
        blocks.append((start, offset))
    spans = []
    for b_start, b_end in blocks:
        block = text[b_start:b_end]
        cursor = 0
        for match in _SENTENCE_END.finditer(block):
            spans.append((b_start + cursor, b_start + match.start()))
            cursor = match.end()
        spans.append((b_start + cursor, b_end))
    out = []
    for a, b in spans:
        piece = text[a:b]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            out.append((a + lead, a + len(piece.rstrip())))
    return out


def best_span(claim: str, number: int, source_text: str) -> Span:
    """The source sentence (or two adjacent sentences) that best supports ``claim``."""
    sentences = source_sentences(source_text)
    best = Span(number, 0, len(source_text), source_text, support_score(claim, source_text))
    candidates = list(sentences) + [(a[0], b[1]) for a, b in zip(sentences, sentences[1:])]
    top = -1.0
    for start, end in candidates:
        score = support_score(claim, source_text[start:end])
        if score > top + 1e-9 or (abs(score - top) < 1e-9 and end - start < best.end - best.start):
            top = score
            best = Span(number, start, end, source_text[start:end].strip(), score)
    return best


# ---------------------------------------------------------------------------- the check


def strip_source_list(text: str) -> tuple[str, bool]:
    """Remove a list of sources the model wrote itself at the end of its answer."""
    lines = text.rstrip().splitlines()
    cut = len(lines)
    i = len(lines) - 1
    while i >= 0 and (not lines[i].strip() or _SOURCE_LIST_ITEM.match(lines[i])):
        i -= 1
    items_from = i + 1
    if i >= 0 and _SOURCE_LIST_HEAD.match(lines[i]):
        cut = i
    elif items_from < len(lines) and sum(1 for line in lines[items_from:] if line.strip()) >= 1:
        # bare "[1] path" lines after the prose: a source list without a heading
        cut = items_from if items_from > 0 else len(lines)
    if cut == len(lines):
        return text, False
    return "\n".join(lines[:cut]).rstrip(), True


def _is_claim(sentence: str) -> bool:
    """Whether ``sentence`` states something checkable: enough content words, a figure ("The answer
    is: 6", "It takes 3 days": a changed or invented number is the commonest error of a small model,
    and such sentences are short), or a term written as code ("It is EEXIST.", "--with-editline").
    A list number on its own ("2.") states nothing."""
    if len(content_words(sentence)) >= MIN_CONTENT_WORDS:
        return True
    tokens = _tokens(sentence)
    if len(tokens) >= 2 and any(_NUMBER.match(t) for t in tokens):
        return True
    return bool(tokens) and _CODE_TERM.search(_MARKER.sub(" ", sentence)) is not None


def restates(sentence: str, question: str) -> bool:
    """Whether ``sentence`` only repeats words of the question ("The error open() fails with if I pass
    O_CREAT and O_EXCL is [1]:"): every source that holds the question's words would "support" it, yet
    it answers nothing."""
    words = set(content_words(sentence))
    return bool(words) and words <= set(content_words(question))


def check_answer(
    answer: str, sources: Sequence[str], threshold: float = SUPPORT_THRESHOLD, question: str = ""
) -> CheckedAnswer:
    """Check every sentence of ``answer`` against ``sources`` (source ``n`` is ``sources[n-1]``); with
    ``question``, a sentence that only restates it is not a claim."""
    text, stripped = strip_source_list(answer)
    checks: list[SentenceCheck] = []
    invalid: list[int] = []
    pairs = _completed(split_sentences(text), text, question)
    # "...was built with the following configuration options:" and then nothing: the last line
    # introduces an answer the model never gave, so it claims nothing (even when a source says it)
    unfinished = bool(pairs) and pairs[-1][1] is None and without_markers(pairs[-1][0]).endswith(":")
    for i, (sentence, completion) in enumerate(pairs):
        markers = parse_markers(sentence)
        invalid += [n for n in markers if not 1 <= n <= len(sources) and n not in invalid]
        dangling = unfinished and i == len(pairs) - 1
        claim = _is_claim(sentence) and not (question and restates(sentence, question)) and not dangling
        check = SentenceCheck(text=sentence, claim=claim, markers=markers)
        if claim:
            # a completed restatement is held by a source only if its completion is: the question's
            # words it repeats are in every source that matched the question
            scored = sorted(
                (
                    (min(support_score(part, src) for part in (sentence, completion) if part), n)
                    for n, src in enumerate(sources, start=1)
                ),
                reverse=True,
            )
            check.supported_by = [n for score, n in scored if score >= threshold]
            check.flagged = [n for n in markers if 1 <= n <= len(sources) and n not in check.supported_by]
            if check.supported_by:
                chosen = next((n for n in markers if n in check.supported_by), check.supported_by[0])
                check.span = best_span(sentence, chosen, sources[chosen - 1])
                if not any(n in check.supported_by for n in markers):
                    check.added = [chosen]
        else:
            check.flagged = [n for n in markers if 1 <= n <= len(sources)]
        checks.append(check)
    cited: list[int] = []
    for check in checks:
        for n in [m for m in check.markers if m in check.supported_by] + check.added:
            if n not in cited:
                cited.append(n)
    flagged = sorted({n for c in checks for n in c.flagged})
    return CheckedAnswer(
        text=_with_added_markers(text, checks) if any(c.added for c in checks) else text,
        sentences=checks,
        cited=cited,
        flagged=flagged,
        invalid=invalid,
        stripped_source_list=stripped,
        unfinished=unfinished,
    )


def _completed(sentences: list[str], text: str, question: str) -> list[tuple[str, str | None]]:
    """``sentences``, each with None, except that a restatement of the question ending in a colon is
    joined to the line that completes it ("The option that makes bc use editline is:" and
    "--with-editline"), given as the second item: alone, the first answers nothing and the second
    is too short to read as an answer to anything. Only a line that is a claim of its own completes
    one ("```python" does not), and a list that follows such a line stays a list."""
    out: list[tuple[str, str | None]] = []
    for sentence in sentences:
        if out and question and out[-1][1] is None and out[-1][0].rstrip().endswith(":"):
            joined = f"{out[-1][0]}\n{sentence}"
            if (
                joined in text
                and not _BLOCK_START.match(sentence)
                and _is_claim(sentence)
                and restates(out[-1][0], question)
            ):
                out[-1] = (joined, sentence)
                continue
        out.append((sentence, None))
    return out


def _with_added_markers(text: str, checks: Iterable[SentenceCheck]) -> str:
    """``text`` with each added marker placed after its sentence's end."""
    out = text
    position = 0
    for check in checks:
        found = out.find(check.text, position)
        if found < 0:
            continue
        end = found + len(check.text)
        if check.added:
            insert = "".join(f"[{n}]" for n in check.added)
            body = check.text.rstrip()
            end_mark = body[-1] if body and body[-1] in ".!?:" else ""
            head = body[: len(body) - len(end_mark)].rstrip()
            new = head + ("" if head.endswith("]") else " ") + insert + end_mark
            out = out[:found] + new + out[end:]
            end = found + len(new)
        position = end
    return out


def rank_sentences(question: str, sources: Sequence[str], embedder: Any = None) -> list[Span]:
    """The sentences of ``sources`` that answer ``question``, best first.

    With an ``embedder`` (the index's own, already loaded), sentences are ranked by the meaning
    similarity of question and sentence, plus the share of the question's content words they hold;
    without one, by the shared words alone. Earlier sources (better retrieval ranks) win ties.
    Sentences that share nothing with the question are left out.
    """
    wanted = set(content_words(question))
    candidates: list[tuple[int, int, int, int, float]] = []  # (source, rank, start, end, overlap)
    for number, text in enumerate(sources, start=1):
        for rank, (start, end) in enumerate(source_sentences(text)):
            words = set(content_words(text[start:end]))
            if len(words) < MIN_CONTENT_WORDS or text[start:end].lstrip().startswith("#"):
                continue  # too short to answer anything, or a heading: a title, not an answer
            overlap = len(wanted & words) / len(wanted) if wanted else 0.0
            candidates.append((number, rank, start, end, overlap))
    if not candidates:
        return []
    similarity = _similarity(question, [sources[c[0] - 1][c[2] : c[3]] for c in candidates], embedder)
    ranked: list[Span] = []
    for (number, rank, start, end, overlap), sim in zip(candidates, similarity):
        if overlap == 0 and sim <= 0.3:
            continue
        score = sim + 0.5 * overlap - 0.01 * (number - 1) - 0.001 * rank
        ranked.append(Span(number, start, end, sources[number - 1][start:end].strip(), score))
    ranked.sort(key=lambda span: -span.score)
    return ranked


def _similarity(question: str, texts: Sequence[str], embedder: Any) -> list[float]:
    """Cosine similarity of each text to the question by the embedder (zeros without one)."""
    if embedder is None or not texts:
        return [0.0] * len(texts)
    import numpy as np

    vectors = np.asarray(embedder.embed(list(texts)), dtype=np.float32)
    query = np.asarray(embedder.embed_query(question), dtype=np.float32)
    return (vectors @ query).tolist()


def relevance(question: str, texts: Sequence[str], embedder: Any = None) -> list[float]:
    """How closely each text answers ``question``, on the scale ``rank_sentences`` ranks source
    sentences by (meaning similarity plus half the share of the question's content words held)."""
    wanted = set(content_words(question))
    similarity = _similarity(question, texts, embedder)
    out = []
    for text, sim in zip(texts, similarity):
        overlap = len(wanted & set(content_words(text))) / len(wanted) if wanted else 0.0
        out.append(sim + 0.5 * overlap)
    return out


def says_the_same(check: CheckedAnswer, question: str, passage: str) -> bool:
    """Whether every claim of a checked answer is supported and held by ``passage`` read with the
    question (the words an answer repeats from the question count as held): the answer then says
    what that passage says, in its own words ("A dangling link." for the sentence defining one)."""
    claims = check.claims
    if not claims or not all(c.supported for c in claims):
        return False
    context = f"{question}\n{passage}"
    return all(support_score(c.text, context) >= SUPPORT_THRESHOLD for c in claims)


def best_sentence_for(question: str, sources: Sequence[str], embedder: Any = None) -> Span | None:
    """The source sentence that best answers ``question`` (the extractive fallback's pick), or None
    when no sentence shares anything with it (see ``rank_sentences``)."""
    ranked = rank_sentences(question, sources, embedder)
    return with_what_it_introduces(ranked[0], sources[ranked[0].source - 1]) if ranked else None


LEAD_IN_LIMIT = 400  # characters of the block a sentence ending in a colon introduces, at most


def with_what_it_introduces(span: Span, source: str) -> Span:
    """``span`` and, when it ends in a colon ("...establish the tunnel by using the following
    command:", "Reporting bugs:"), the block of lines that follows it (up to the next blank line or
    rule, ``LEAD_IN_LIMIT`` characters at most): alone, it promises the answer without giving it."""
    if not span.text.rstrip().endswith(":"):
        return span
    first = last = None
    offset = span.end
    for line in source[span.end :].splitlines(keepends=True):
        gap = _is_gap(line)
        if gap and first is not None:
            break
        if not gap:
            if first is None:
                first = offset + len(line) - len(line.lstrip())
            elif offset + len(line.rstrip()) - first > LEAD_IN_LIMIT:
                break  # whole lines, as many as fit
            last = offset + len(line.rstrip())
        offset += len(line)
    if first is None:
        return span
    last = min(last, first + LEAD_IN_LIMIT)  # one long line is cut
    # the text leaves out the rule between them; the offsets cover both
    return Span(span.source, span.start, last, f"{span.text}\n{source[first:last]}", span.score)


def calibrate(examples: Sequence[tuple[str, str, bool]], thresholds: Iterable[float]) -> dict[float, float]:
    """Accuracy of ``support_score >= t`` on labelled (claim, source, supported) examples, per t."""
    out = {}
    for t in thresholds:
        right = sum((support_score(claim, source) >= t) == label for claim, source, label in examples)
        out[round(t, 3)] = right / len(examples)
    return out
