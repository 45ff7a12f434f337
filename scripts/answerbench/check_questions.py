#!/usr/bin/env python3
"""Check questions.jsonl against a folder rendered by render_manpages.py.

Usage:  python3 check_questions.py RENDERED_DIR [--questions questions.jsonl] [-v]

Hard checks (any failure -> exit status 1):
  * every line is a JSON object with id, question, answers (non-empty list of
    non-empty strings), page, evidence; ids are unique;
  * the page file exists in RENDERED_DIR;
  * the evidence, whitespace-normalised, occurs verbatim in the whitespace-
    normalised page text;
  * the canonical answer (answers[0]) occurs in the evidence (case-insensitive);
    every other variant either occurs in the evidence too or is listed as a
    paraphrase variant in the summary (e.g. "nine" for "9", "2 hours");
  * no answer occurs in its own question;
  * the question does not copy a long span of the page: no run of
    MAX_COPIED_WORDS or more consecutive words shared with the evidence;
  * citation is meaningful: the canonical answer is found (case-insensitive
    substring, the way answers are scored) on at most MAX_PAGES_PER_ANSWER of
    the rendered pages, OR the answer is a short number/word that appears
    everywhere and the question is then only counted as "common-answer" (at
    most MAX_COMMON of those are allowed).

Prints a summary: counts per section and difficulty signals, variants not in
the evidence, and how many pages contain each canonical answer.
"""

import argparse
import collections
import json
import os
import re
import sys

MAX_COPIED_WORDS = 6
MAX_PAGES_PER_ANSWER = 12
MAX_COMMON = 8
REQUIRED = ("id", "question", "answers", "page", "evidence")


def norm(s):
    return " ".join(s.split())


def words(s):
    return re.findall(r"[a-z0-9_]+", s.lower())


def longest_shared_run(a, b):
    a, b = words(a), words(b)
    best = 0
    prev = [0] * (len(b) + 1)
    for i in range(1, len(a) + 1):
        cur = [0] * (len(b) + 1)
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


class Tally:
    """What the checks found over all questions."""

    def __init__(self):
        self.errors, self.paraphrase, self.common = [], [], []
        self.seen = set()
        self.per_section = collections.Counter()
        self.per_page = collections.Counter()
        self.spread = []  # (pages with the canonical answer, id, answer, page)
        self.n = 0


def parse_args():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--questions", default=os.path.join(here, "questions.jsonl"))
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args()


def load_pages(rendered):
    if not os.path.isdir(rendered):
        sys.exit(f"{rendered}: not a folder; render it first with render_manpages.py")
    pages = {}
    for fn in sorted(os.listdir(rendered)):
        if fn.endswith(".txt") and fn != "VERSIONS.txt":
            with open(os.path.join(rendered, fn), encoding="utf-8") as f:
                pages[fn] = f.read()
    return pages


def parse_question(lineno, line, pages, rendered, tally):
    """The question on this line if it is well formed and names a rendered page, else None (noted)."""
    try:
        q = json.loads(line)
    except json.JSONDecodeError as e:
        tally.errors.append(f"line {lineno}: bad JSON: {e}")
        return None
    missing = [k for k in REQUIRED if k not in q]
    if missing:
        tally.errors.append(f"line {lineno}: missing keys {missing}")
        return None
    qid = q["id"]
    if qid in tally.seen:
        tally.errors.append(f"{qid}: duplicate id")
    tally.seen.add(qid)
    ans = q["answers"]
    if not isinstance(ans, list) or not ans or not all(isinstance(a, str) and a.strip() for a in ans):
        tally.errors.append(f"{qid}: answers must be a non-empty list of non-empty strings")
        return None
    if q["page"] not in pages:
        tally.errors.append(f"{qid}: page {q['page']} not in {rendered}")
        return None
    return q


def check_question(q, normpages, lowpages, tally):
    qid, ans, page = q["id"], q["answers"], q["page"]
    errors = tally.errors
    tally.per_page[page] += 1
    tally.per_section[page.rsplit(".", 2)[-2]] += 1
    ev = norm(q["evidence"])
    if ev not in normpages[page]:
        errors.append(f"{qid}: evidence not found verbatim in {page}: {ev[:90]!r}")
    evl = ev.lower()
    if ans[0].lower() not in evl:
        errors.append(f"{qid}: canonical answer {ans[0]!r} not in evidence")
    for a in ans[1:]:
        if a.lower() not in evl:
            tally.paraphrase.append(f"{qid}: {a!r}")
    ql = q["question"].lower()
    for a in ans:
        if re.search(r"(?<![a-z0-9_])" + re.escape(a.lower()) + r"(?![a-z0-9_])", ql):
            errors.append(f"{qid}: answer {a!r} appears in the question")
    run = longest_shared_run(q["question"], ev)
    if run >= MAX_COPIED_WORDS:
        errors.append(f"{qid}: question copies {run} consecutive words of the evidence")
    # on how many pages can the canonical answer be found?
    hits = [p for p, t in lowpages.items() if ans[0].lower() in t]
    tally.spread.append((len(hits), qid, ans[0], page))
    if len(hits) > MAX_PAGES_PER_ANSWER:
        tally.common.append(f"{qid}: {ans[0]!r} on {len(hits)} pages")


def check_file(path, pages, rendered):
    normpages = {k: norm(v) for k, v in pages.items()}
    lowpages = {k: v.lower() for k, v in normpages.items()}
    tally = Tally()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            tally.n += 1
            q = parse_question(lineno, line, pages, rendered, tally)
            if q is not None:
                check_question(q, normpages, lowpages, tally)
    if len(tally.common) > MAX_COMMON:
        tally.errors.append(f"{len(tally.common)} questions have a common answer (max {MAX_COMMON})")
    return tally


def print_summary(tally, pages, verbose):
    spread, common = tally.spread, tally.common
    print(f"questions: {tally.n}   rendered pages: {len(pages)}   pages used: {len(tally.per_page)}")
    print("per section: " + ", ".join(f"{s}: {c}" for s, c in sorted(tally.per_section.items())))
    ones = sum(1 for h, *_ in spread if h == 1)
    few = sum(1 for h, *_ in spread if 2 <= h <= 3)
    print(
        f"canonical answer found on: exactly its page {ones}, 2-3 pages {few}, "
        f"4-{MAX_PAGES_PER_ANSWER} pages {sum(1 for h, *_ in spread if 4 <= h <= MAX_PAGES_PER_ANSWER)}, "
        f"more {len(common)} (allowed {MAX_COMMON})"
    )
    for c in common:
        print("  common-answer " + c)
    print(f"variants not literally in the evidence (paraphrase variants): {len(tally.paraphrase)}")
    if verbose:
        for p in tally.paraphrase:
            print("  " + p)
        for h, qid, a, page in sorted(spread, reverse=True):
            print(f"  {qid} {a!r:40} {page:22} on {h} page(s)")


def main():
    args = parse_args()
    pages = load_pages(args.rendered)
    tally = check_file(args.questions, pages, args.rendered)
    print_summary(tally, pages, args.verbose)
    if tally.errors:
        print(f"FAIL: {len(tally.errors)} problem(s)")
        for e in tally.errors:
            print("  " + e)
        sys.exit(1)
    print("OK: all checks passed")


if __name__ == "__main__":
    main()
