"""RAG, fine-tuning or both, measured on real documents: Debian's manual pages.

    python scripts/demo_rag_vs_ft.py --out /tmp/lk-demo [--questions 24] [--train-steps 30] [--json FILE]

Everything a user would type, in order, each as a ``lorekeeper`` command in a fresh data folder
(``OUT/home``, so nothing of yours is touched):

1. about 120 manual pages rendered to text (``scripts/answerbench/render_manpages.py``; the
   Debian packages ``manpages``, ``manpages-dev``, ``man-db`` and ``groff-base`` install offline
   from the distribution's archive, and nobody on this project wrote them);
2. ``lorekeeper add`` indexes them;
3. ``lorekeeper eval retrieval`` on the hand-written questions of ``scripts/answerbench/questions.jsonl``
   (each names the page that answers it), with the fusion sweep;
4. a short CPU fine-tune from the index (``lorekeeper finetune train --from-index``: the pages'
   text, continued pretraining, ``--train-steps`` steps) and ``lorekeeper finetune export``;
5. ``lorekeeper eval answers`` with that adapter: the same questions, with their accepted answers as
   references, answered by the base model and the adapter, each with and without retrieval.

The reports land in ``OUT/retrieval`` and ``OUT/answers`` (``report.md``, ``chart.png``,
``answers.jsonl``). About 25 minutes on two cores, most of it indexing and the answers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUESTIONS = HERE / "answerbench" / "questions.jsonl"


def step(title: str, args: list[str], env: dict[str, str]) -> None:
    print(f"\n$ {' '.join(args)}    # {title}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(args, env=env)
    if done.returncode != 0:
        sys.exit(f"step failed ({title}): exit code {done.returncode}")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def question_sets(out: Path, n: int, docs: Path) -> tuple[Path, Path]:
    """The answer bench's questions whose page is in ``docs``, spread evenly over the set, as judged
    retrieval queries and as answer questions (accepted answers as references, the page as the
    question's file)."""
    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if (docs / r["page"]).is_file()]
    if not rows:
        sys.exit(f"none of the pages the questions need is in {docs}")
    picked = rows[:: max(1, len(rows) // n)][:n]
    queries, answers = out / "retrieval-queries.jsonl", out / "answer-questions.jsonl"
    queries.write_text("".join(json.dumps({"id": r["id"], "query": r["question"], "relevant": [r["page"]]}) + "\n"
                               for r in picked), encoding="utf-8")  # fmt: skip
    answers.write_text("".join(json.dumps({"id": r["id"], "question": r["question"], "answers": r["answers"],
                                           "files": [r["page"]]}) + "\n" for r in picked), encoding="utf-8")  # fmt: skip
    return queries, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Work folder (created; reports go here).")
    parser.add_argument("--questions", type=int, default=24, help="Questions of the answer bench to use.")
    parser.add_argument("--train-steps", type=int, default=30, help="Fine-tuning steps (CPU).")
    parser.add_argument("--max-seq-len", type=int, default=256, help="Fine-tuning sequence length.")
    parser.add_argument("--batch-size", type=int, default=2, help="Fine-tuning batch size.")
    parser.add_argument("--max-tokens", type=int, default=128, help="Longest answer, in tokens.")
    parser.add_argument("--json", type=Path, help="Write both reports' figures to this file (for bench.py).")
    parser.add_argument("--pages-from", type=Path,
                        help="A scripts/bench_answers.py --workdir: start from its rendered pages and index "
                        "(bench.py passes it, so the same pages are not embedded twice); only the questions "
                        "whose page is among them are asked.")  # fmt: skip
    args = parser.parse_args()
    for name in ("questions", "train_steps", "max_seq_len", "batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    out = args.out.resolve()
    (out / "home").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOREKEEPER_HOME": str(out / "home")}
    lk = [sys.executable, "-m", "lorekeeper.server.cli"]
    docs = out / "docs"
    if args.pages_from is not None and (args.pages_from / "pages").is_dir():
        docs = args.pages_from.resolve() / "pages"
        index = args.pages_from / "index.db"
        if index.is_file() and not (out / "home" / "index.db").exists():
            for suffix in ("", "-wal"):  # `add` then finds every page indexed and unchanged
                if Path(f"{index}{suffix}").is_file():
                    shutil.copy2(f"{index}{suffix}", out / "home" / f"index.db{suffix}")
    if not any(docs.glob("*.txt")):
        step(
            "render the manual pages",
            [sys.executable, str(HERE / "answerbench" / "render_manpages.py"), str(docs)],
            env,
        )
        for extra in ("MANIFEST.tsv", "VERSIONS.txt"):  # the render's own records are not documents
            (docs / extra).replace(out / extra)
    queries, answers = question_sets(out, args.questions, docs)
    step("index them", [*lk, "add", str(docs)], env)
    step("retrieval: three modes and the fusion sweep",
         [*lk, "eval", "retrieval", "--queries", str(queries), "--report", str(out / "retrieval")], env)  # fmt: skip
    step("a short fine-tune on the indexed pages",
         [*lk, "finetune", "train", "--from-index", "--name", "manpages", "--max-steps", str(args.train_steps),
          "--max-seq-len", str(args.max_seq_len), "--batch-size", str(args.batch_size), "--eval-fraction", "0"],
         env)  # fmt: skip
    step("export it as a GGUF adapter", [*lk, "finetune", "export", "manpages"], env)
    step("answers: base and adapter, with and without retrieval",
         [*lk, "eval", "answers", "--questions", str(answers), "--adapter", "manpages", "--out", str(out / "answers"),
          "--max-tokens", str(args.max_tokens)], env)  # fmt: skip
    print(f"\nreports: {out / 'retrieval' / 'report.md'}, {out / 'answers' / 'report.md'} (chart.png)")
    if args.json:
        figures = {
            kind: json.loads((out / kind / "summary.json").read_text()) for kind in ("retrieval", "answers")
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
