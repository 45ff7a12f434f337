"""``eval answers``: questions answered four ways (base, base + retrieval, adapter, adapter +
retrieval), scored, written to a report folder. A thin face over ``server.eval_answers`` and
``server.eval_report``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..settings import Settings
from . import console, err, fail, settings_of
from .eval import _index, eval_app
from .index import _progress


@eval_app.command("answers")
def answers(
    ctx: typer.Context,
    questions: Path = typer.Option(None, "--questions", help="JSONL: 'question' and 'answer' (or 'answers'), optional 'files'; or chat/Alpaca records as fine-tuning takes them."),
    adapter: str = typer.Option(None, "--adapter", help="A registered adapter (lorekeeper adapters list) for the adapter rows."),
    generate: int = typer.Option(20, "--generate", help="Without --questions: passages to draft questions and answers from."),
    out: Path = typer.Option(None, "--out", help="Report folder (default: eval/answers-INDEX in the data directory)."),
    limit: int = typer.Option(None, "--limit", help="Answer only the first N questions."),
    resume: bool = typer.Option(False, "--resume", help="Keep the answers already in the report folder and finish the rest."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Longest answer, in tokens."),
    k: int = typer.Option(None, "-k", help="Passages to retrieve (default: the k setting)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the passage sample for drafted questions."),
) -> None:  # fmt: skip
    """Token F1, exact-contains, citation precision/recall, unsupported share and seconds per answer
    for the base model and the adapter, each with and without retrieval, and which to use."""
    from .. import eval_answers as ea
    from ..eval_report import record_last, today, write_answers_report

    settings = settings_of(ctx, k=k)
    if limit is not None and limit < 1:
        fail("--limit must be at least 1")
    if max_tokens < 8:
        fail("--max-tokens must be at least 8")
    folder = out or settings.data_dir / "eval" / f"answers-{settings.db_path.stem}"
    store, embedder = _index(settings)
    with store:
        roots = [r.path for r in store.roots()]
        answerer = _answerer(settings, store, embedder, roots, adapter, max_tokens)
        try:
            qs, source = _questions(folder, resume, questions, answerer, generate, seed)
            rows = _answer_all(answerer, qs[:limit] if limit else qs, folder / "answers.jsonl", resume)
        finally:
            answerer.generator.close()
        summary = ea.summarize(rows, answerer.configs())
        advice = ea.recommendation(summary, rows)
        meta = {"date": today(), "model": answerer.generator.model_id, "adapter": adapter,
                "questions_file": source, "k": settings.k, "max_tokens": max_tokens}  # fmt: skip
        report = write_answers_report(folder, summary, advice, meta)
        record_last(store, "answers", report, advice, meta["date"])
    _print(summary, advice, folder)


def _answerer(
    settings: Settings, store: Any, embedder: Any, roots: list, adapter: str | None, max_tokens: int
):
    from lorekeeper import plugins

    from ..adapters import AdapterError, AdapterRegistry
    from ..eval_answers import Answerer
    from .answer import adapter_base_settings

    registry = AdapterRegistry(settings.adapters_dir)
    if adapter is not None:
        try:
            registry.read(adapter)
        except AdapterError as exc:
            fail(f"--adapter {adapter!r}: {exc} (see `lorekeeper adapters list`)")
        settings = adapter_base_settings(settings, adapter)  # both rows run on the adapter's base
    try:
        generator = plugins.get_generator(None, settings)
        if adapter is not None:
            if not generator.supports_adapters:
                fail(f"the {generator.name} generator cannot apply adapters: use --generator llamacpp")
            generator.check_adapter(adapter)
    except (LookupError, ValueError) as exc:
        fail(str(exc))
    return Answerer(generator, store, embedder, settings, roots, adapter, registry, max_tokens)


def _questions(folder: Path, resume: bool, given: Path | None, answerer, generate: int, seed: int):
    """The question set: the report folder's own copy when resuming, else the file given, else drafted
    from the index; the set used is always copied to the folder (questions.jsonl)."""
    from ..eval_answers import read_questions, write_questions
    from ..eval_files import EvalFileError

    saved = folder / "questions.jsonl"
    try:
        if resume and saved.is_file():
            if given is not None and given.resolve() != saved.resolve():
                err.print(f"--resume: using the questions saved in {saved}, not {given}")
            return read_questions(saved, answerer.roots), str(saved)
        if given is not None:
            qs, source = read_questions(given, answerer.roots), str(given)
        else:
            qs, source = _draft(answerer, generate, seed), f"drafted from the index ({saved})"
    except EvalFileError as exc:
        fail(str(exc))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_questions(saved, qs)
    except OSError as exc:
        fail(f"--out {folder}: cannot write the report folder ({exc})")
    return qs, source


def _draft(answerer, n: int, seed: int) -> list:
    from ..eval_answers import draft_questions

    if n < 1:
        fail("--generate must be at least 1")
    with _progress() as progress:
        task = progress.add_task("drafting questions", total=n, path="")
        tick = lambda done, total: progress.update(task, completed=done, total=total)  # noqa: E731
        qs, dropped = draft_questions(answerer.store.iter_chunks(), n, answerer.roots, answerer.generator,
                                      seed=seed, progress=tick)  # fmt: skip
    if dropped:
        err.print("dropped drafts: " + ", ".join(f"{n} {why}" for why, n in dropped.most_common()))
    if not qs:
        fail(
            "no usable question could be drafted from the index: write a questions file and pass --questions"
        )
    err.print(f"{len(qs)} drafted questions with reference answers: check them, then pass --questions FILE")
    return qs


def _answer_all(answerer, qs: list, path: Path, resume: bool) -> list[dict]:
    """Every (question, configuration) answered, each row appended to ``path`` as it finishes, so an
    interrupted run resumes where it stopped."""
    from ..eval_answers import read_rows, row_key

    wanted = {(q.qid, c) for q in qs for c in answerer.configs()}
    rows = [r for r in read_rows(path) if row_key(r) in wanted] if resume else []
    done = {row_key(r) for r in rows}
    if resume and done:
        err.print(f"--resume: {len(done)} answers kept from {path}")
    todo = [(q, c) for q in qs for c in answerer.configs() if (q.qid, c) not in done]
    kept = path.with_name(path.name + ".tmp")  # kept rows replace the file in one step
    kept.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(kept, path)
    with open(path, "a", encoding="utf-8") as handle:
        with _progress() as progress:
            task = progress.add_task("answering", total=len(wanted), completed=len(done), path="")
            for q, config in todo:
                progress.update(task, path=f"{config}: {q.question[:40]}")
                try:
                    row = answerer.answer(q, config)
                except (ValueError, LookupError, RuntimeError, OSError) as exc:
                    fail(f"question {q.qid} ({config}): {exc}; rerun with --resume to continue")
                rows.append(row)
                handle.write(json.dumps(row) + "\n")
                handle.flush()
                progress.advance(task)
    return rows


def _print(summary: dict, advice: str, folder: Path) -> None:
    from ..eval_report import ANSWER_COLUMNS, _cell

    table = Table("configuration", "questions", *(label for _, label in ANSWER_COLUMNS), title="answers")
    for config, s in summary.items():
        table.add_row(config, str(s["questions"]), *(_cell(s[key], key) for key, _ in ANSWER_COLUMNS))
    console.print(table)
    console.print(advice, highlight=False)
    console.print(f"report: {folder / 'report.md'} (chart.png, answers.jsonl)", highlight=False)
