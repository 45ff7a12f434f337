"""``eval retrieval``: how well search finds the files that answer judged queries, per search mode,
and which fusion settings find them best. A thin face over ``server.evaluation`` (metrics, runs,
sweep), ``server.eval_files`` (JSONL and TREC files) and ``server.eval_queries`` (drafted queries).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..settings import Settings, SettingsError, write_config_value
from . import console, err, fail, settings_of
from .index import _progress

eval_app = typer.Typer(help="Measure retrieval and answers on your own documents.", no_args_is_help=True)


def _floats(text: str | None, name: str, default: tuple) -> tuple:
    if not text:
        return default
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{name} {text!r}: give comma-separated numbers, e.g. 0.5,1,2")
    if not values or any(v < 0 for v in values):
        fail(f"{name} {text!r}: give comma-separated numbers of 0 or more")
    return values


@eval_app.command("retrieval")
def retrieval(
    ctx: typer.Context,
    queries: Path = typer.Option(None, "--queries", help="JSONL of judged queries: each line a query and the files that answer it (see the README)."),
    qrels: Path = typer.Option(None, "--qrels", help="TREC qrels file (qid 0 docid grade); needs --topics."),
    topics: Path = typer.Option(None, "--topics", help="TREC topics: 'qid<TAB>text' lines or <top> blocks."),
    generate: int = typer.Option(20, "--generate", help="Without judged queries: chunks to draft queries from."),
    kinds: str = typer.Option("question,heading,keywords", "--kinds", help="Kinds of query to draft: question (by the model), heading, keywords."),
    save_queries: Path = typer.Option(None, "--save-queries", help="Where drafted queries go (default: eval/ in the data directory)."),
    modes: list[str] = typer.Option(None, "--mode", help="Search modes to measure (default: keyword, vector, hybrid)."),
    do_sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="Try fusion settings for hybrid search."),
    weights: str = typer.Option(None, "--vector-weights", help="Vector weights to try, e.g. 0.5,1,2 (default 0.25,0.5,1,2,4)."),
    keyword_weights: str = typer.Option(None, "--keyword-weights", help="Keyword weights to try (default 1)."),
    rrf_ks: str = typer.Option(None, "--rrf-ks", help="RRF constants to try (default 10,30,60,100)."),
    apply: bool = typer.Option(False, "--apply", help="Write the best fusion settings to config.toml."),
    run_in: list[Path] = typer.Option(None, "--run", help="A TREC run file (another tool's) to score too."),
    run_out: Path = typer.Option(None, "--run-out", help="Write each mode's run in trec_eval format (FILE, or FILE.MODE for several)."),
    json_out: Path = typer.Option(None, "--json", help="Write every figure (and per-query scores) to this JSON file."),
    seed: int = typer.Option(0, "--seed", help="Seed of the chunk sample for drafted queries."),
    chunk_sizes: str = typer.Option(None, "--chunk-sizes", help="Chunk sizes in tokens to try, e.g. 64,128,254: a sample of files is indexed again at each size in a temporary index (the index is left alone)."),
    n_sample: int = typer.Option(40, "--sample-files", help="Files in the chunk-size sample: every judged file, then others at random."),
    report_dir: Path = typer.Option(None, "--report", help="Report folder (default: eval/retrieval-INDEX in the data directory)."),
) -> None:  # fmt: skip
    """Recall@1/5/10, MRR@10 and nDCG@10 of keyword, vector and hybrid search on judged queries,
    and a sweep of the fusion settings."""
    from .. import evaluation as ev

    settings = settings_of(ctx)
    modes = list(modes or ("keyword", "vector", "hybrid"))
    for mode in modes:
        if mode not in ("keyword", "vector", "hybrid"):
            fail(f"--mode {mode!r}: use keyword, vector or hybrid")
    vector_weights = _floats(weights, "--vector-weights", ev.DEFAULT_VECTOR_WEIGHTS)
    kw_weights = _floats(keyword_weights, "--keyword-weights", (1.0,))
    rrf_values = tuple(int(v) for v in _floats(rrf_ks, "--rrf-ks", ev.DEFAULT_RRF_KS))
    if any(v < 1 for v in rrf_values):
        fail("--rrf-ks: each RRF constant must be at least 1")
    if (qrels is None) != (topics is None):
        fail("--qrels and --topics go together: give both")
    sizes = tuple(int(v) for v in _floats(chunk_sizes, "--chunk-sizes", ()))
    if any(v < 16 for v in sizes) or n_sample < 1:
        fail("--chunk-sizes: each size must be at least 16 tokens; --sample-files at least 1")
    if apply and not (do_sweep and "hybrid" in modes) and not sizes and len(set(modes)) < 2:
        fail("--apply writes the best settings measured: measure two modes or more, hybrid search without "
             "--no-sweep, or give --chunk-sizes")  # fmt: skip
    store, embedder = _index(settings)
    with store:
        roots = [r.path for r in store.roots()]
        judged = _judged_queries(settings, store, roots, queries, qrels, topics, generate, kinds,
                                 save_queries, seed)  # fmt: skip
        _warn_missing(store, roots, judged)
        search = functools.partial(_search, store, ev.QueryCache(embedder))
        current = ev.Fusion(settings.vector_weight, settings.keyword_weight, settings.rrf_k)
        report = _measure(search, judged, roots, modes, current, run_in)
        _print_scores(report["scores"], judged)
        sweep_rows = []
        if do_sweep and "hybrid" in modes:
            sweep_rows = ev.sweep(
                search, judged, roots, vector_weights, rrf_values, kw_weights, current=current
            )
            _print_sweep(sweep_rows, current)
        best = sweep_rows[0].fusion if sweep_rows else None
        chunks = _chunk_sweep(
            settings, store, embedder, judged, sizes, modes, best or current, n_sample, seed
        )
    if run_out is not None:
        _write_runs(run_out, report["runs"])
    mode = _best_mode(report["scores"], sweep_rows, settings.search_mode)
    applied = apply and best is not None and best != current
    if applied:
        _write_settings(settings, best.as_dict(), "a running `lorekeeper serve` uses them once restarted")
    elif apply and best is not None:
        console.print("--apply: the current fusion settings score best; config.toml is left as it is")
    if apply and mode is not None and mode != settings.search_mode:
        _write_settings(
            settings, {"search_mode": mode}, "`search`, `ask` and the MCP tools search this way by default"
        )
    if apply and chunks:
        _apply_chunks(settings, chunks)
    if json_out is not None:
        _write_json(json_out, judged, report["scores"], sweep_rows, current, best, applied, chunks, mode)
    folder = report_dir or settings.data_dir / "eval" / f"retrieval-{settings.db_path.stem}"
    _write_report(settings, folder, judged, report["scores"], sweep_rows, best, queries or qrels, chunks)


def _search(store: Any, embedder: Any, **args: Any) -> list:
    from ..search import search

    return search(store, embedder, **args)


def _index(settings: Settings):
    """The index and its embedder (as ``ask`` opens them), refusing an index with no chunks."""
    from .answer import _index as open_index

    store, embedder = open_index(settings)
    if not store.chunk_count():
        store.close()
        fail(f"the index {settings.db_path} has no chunks: run `lorekeeper add FOLDER` first")
    return store, embedder


def _judged_queries(settings, store, roots, queries, qrels, topics, generate, kinds, save, seed) -> list:
    from ..eval_files import EvalFileError, queries_from_trec, read_queries_jsonl, write_queries_jsonl

    try:
        if queries is not None:
            judged = read_queries_jsonl(queries, roots)
        elif qrels is not None:
            judged = queries_from_trec(qrels, topics, roots)
        else:
            judged = _draft(settings, store, roots, generate, kinds, seed)
            path = save or settings.data_dir / "eval" / f"queries-{settings.db_path.stem}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_queries_jsonl(path, judged)
            kinds = Counter(q.extra.get("kind") for q in judged)
            err.print(f"{len(judged)} drafted queries ({', '.join(f'{n} {k}' for k, n in kinds.items())}) saved "
                      f"to {path}: edit them and pass --queries {path}")  # fmt: skip
    except EvalFileError as exc:
        fail(str(exc))
    if not judged:
        fail("no queries to evaluate: the index has too few passages of 40 words or more to draft from")
    return judged


def _draft(settings: Settings, store: Any, roots: list[str], n: int, kinds_text: str, seed: int) -> list:
    from ..eval_queries import KINDS, draft_with, generate_queries

    if n < 1:
        fail("--generate must be at least 1")
    kinds = [k.strip() for k in kinds_text.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        fail(f"--kinds {kinds_text!r}: use one or more of {','.join(KINDS)}")
    generator = None
    if "question" in kinds:
        from lorekeeper import plugins

        try:
            generator = plugins.get_generator(None, settings)
        except (LookupError, ValueError) as exc:
            fail(f"{exc} (or pass --kinds heading,keywords to draft without the model)")
    chunks = list(store.iter_chunks())
    try:
        with _progress() as progress:
            task = progress.add_task("drafting queries", total=n, path="")
            tick = lambda done, total: progress.update(task, completed=done, total=total)  # noqa: E731
            draft = draft_with(generator) if generator is not None else None
            judged, dropped = generate_queries(chunks, n, roots, draft, seed=seed, progress=tick, kinds=kinds)
    finally:
        if generator is not None:
            generator.close()
    if dropped:
        err.print("dropped for copying 6 words of their passage: "
                  + ", ".join(f"{n} {kind}" for kind, n in dropped.items()))  # fmt: skip
    return judged


def _warn_missing(store: Any, roots: list[str], judged: list) -> None:
    from ..evaluation import relative_path

    indexed = {relative_path(d.path, roots) for d in store.documents()}
    missing = sorted({j.path for q in judged for j in q.judgements if j.path not in indexed})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        err.print(f"[yellow]warning:[/yellow] {len(missing)} judged files are not in the index: {shown} "
                  "(paths are relative to the registered folder)")  # fmt: skip


def _measure(search, judged, roots, modes, current, run_files) -> dict:
    from .. import evaluation as ev
    from ..eval_files import EvalFileError, read_run

    scores: dict[str, ev.Scores] = {}
    runs: dict[str, dict] = {}
    for mode in modes:
        try:
            runs[mode] = ev.run_queries(search, judged, mode, current, roots)
        except ValueError as exc:
            fail(str(exc))
        scores[mode] = ev.score_runs(runs[mode], judged)
    for path in run_files or []:
        try:
            external = read_run(path)
        except EvalFileError as exc:
            fail(str(exc))
        rankings = {qid: ev.ranking_from_scores(docs) for qid, docs in external.items()}
        scores[f"run {path.name}"] = ev.evaluate(rankings, ev.qrels_of(judged))
    return {"scores": scores, "runs": runs}


LABELS = {"recall@1": "R@1", "recall@5": "R@5", "recall@10": "R@10", "mrr@10": "MRR@10", "ndcg@10": "nDCG@10"}
METRICS_SHOWN = ("recall@10", "mrr@10", "ndcg@10")


def _print_scores(scores: dict, judged: list) -> None:
    from ..evaluation import METRICS, means_by_group

    first = next(iter(scores.values()))
    title = f"retrieval on {first.judged} judged queries"
    if first.unjudged:
        title += f" ({len(first.unjudged)} without a relevant file left out)"
    table = Table("mode", *(LABELS[m] for m in METRICS), title=title)
    for name, s in scores.items():
        table.add_row(name, *(f"{s.means[m]:.3f}" for m in METRICS))
    console.print(table)
    kinds = _kinds(judged)
    if kinds:
        by_mode = {name: means_by_group(s, kinds) for name, s in scores.items()}
        table = Table("kind of drafted query", *scores, title="nDCG@10 by kind of drafted query")
        for kind, (n, _) in next(iter(by_mode.values())).items():
            table.add_row(f"{kind} ({n})", *(f"{by_mode[name][kind][1]:.3f}" for name in scores))
        console.print(table)


def _kinds(judged: list) -> dict[str, str]:
    """Query id -> kind (question, heading, keywords) of drafted queries; {} for a user's own set."""
    return {q.qid: q.extra["kind"] for q in judged if isinstance(q.extra.get("kind"), str)}


def _print_sweep(rows: list, current) -> None:
    from ..evaluation import METRICS

    table = Table("", "vector", "keyword", "rrf_k", *(LABELS[m] for m in METRICS),
                  title="hybrid fusion sweep: weights and RRF constant (best first; * = current)")  # fmt: skip
    for row in rows:
        f = row.fusion
        table.add_row("*" if f == current else "", f"{f.vector_weight:g}", f"{f.keyword_weight:g}", str(f.rrf_k),
                      *(f"{row.scores.means[m]:.3f}" for m in METRICS))  # fmt: skip
    console.print(table)
    best = rows[0]
    now = next(r for r in rows if r.fusion == current)
    if best.fusion == current:
        console.print("best: the current settings (no other setting scores higher)")
        return
    gain = best.scores.means["ndcg@10"] - now.scores.means["ndcg@10"]
    settings_text = " ".join(f"{k}={v:g}" for k, v in best.fusion.as_dict().items())
    console.print(f"best: {settings_text} (nDCG@10 {best.scores.means['ndcg@10']:.3f}, {gain:+.3f} over the "
                  "current settings); --apply writes them to config.toml", highlight=False)  # fmt: skip


def _best_mode(scores: dict, sweep_rows: list, current: str) -> str | None:
    """The search mode to use by default: the best nDCG@10 (hybrid at its best fusion settings), but the
    current default unless another beats it by 0.01; None when the current mode was not measured."""
    from ..eval_chunks import MIN_GAIN

    ndcg = {m: s.means["ndcg@10"] for m, s in scores.items() if m in ("keyword", "vector", "hybrid")}
    if sweep_rows and "hybrid" in ndcg:
        ndcg["hybrid"] = max(ndcg["hybrid"], sweep_rows[0].scores.means["ndcg@10"])
    if current not in ndcg or len(ndcg) < 2:
        return None
    best = max(ndcg, key=lambda m: (ndcg[m], m == current))
    if best == current or ndcg[best] - ndcg[current] < MIN_GAIN:
        console.print(
            f"best search mode: {current} (the current default; no other gains {MIN_GAIN:g} nDCG@10)"
        )
        return current
    console.print(f"best search mode: {best} (nDCG@10 {ndcg[best]:.3f} against {ndcg[current]:.3f} for the "
                  f"current default, {current}); --apply writes search_mode={best}", highlight=False)  # fmt: skip
    return best


def _write_settings(settings: Settings, values: dict[str, Any], what: str) -> None:
    """Write ``values`` to config.toml, say so, and note any that an environment variable overrides."""
    try:
        for key, value in values.items():
            path = write_config_value(settings.home, key, value)
        updated = Settings.load()
    except (SettingsError, OSError) as exc:
        fail(f"could not write the settings: {exc}")
    shown = " ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in values.items())
    console.print(f"applied {shown} to {path} ({what})", highlight=False)
    overridden = [f"{k} ({updated.sources[k]})" for k in values if updated.sources.get(k) != "config.toml"]
    if overridden:
        err.print(f"[yellow]note:[/yellow] overridden where search runs: {', '.join(overridden)}")


def _chunk_sweep(settings, store, embedder, judged, sizes, modes, fusion, n_files, seed) -> dict | None:
    """The chunk-size rows on a sample (printed), with the best and the current size; None without sizes."""
    if not sizes:
        return None
    from ..eval_chunks import MIN_GAIN, best_size, chunk_sweep
    from ..prepare import chunk_size

    current = chunk_size(settings, embedder)
    sizes = tuple(dict.fromkeys((*sizes, current)))
    mode = "hybrid" if "hybrid" in modes else modes[0]
    with _progress() as progress:
        task = progress.add_task("chunk sizes", total=len(sizes), path="")
        tick = lambda done, total: progress.update(task, completed=done)  # noqa: E731
        rows = chunk_sweep(settings, store, embedder, judged, sizes, mode=mode, fusion=fusion, n_files=n_files,
                           seed=seed, progress=tick)  # fmt: skip
    best = best_size(rows, current)
    table = Table("", "tokens", "chunks", *(LABELS[m] for m in METRICS_SHOWN), "seconds",
                  title=f"chunk size on a sample of {rows[0].files} files, {mode} search (* = current)")  # fmt: skip
    for row in rows:
        table.add_row("*" if row.size == current else "", str(row.size), str(row.chunks),
                      *(f"{row.scores.means[m]:.3f}" for m in METRICS_SHOWN), f"{row.seconds:.0f}")  # fmt: skip
    console.print(table)
    now = next(r for r in rows if r.size == current)
    gain = best.scores.means["ndcg@10"] - now.scores.means["ndcg@10"]
    console.print(f"best chunk size: {best.size} tokens" + (f" (the current size: no other gains {MIN_GAIN:g} nDCG@10)" if best.size == current else
                  f" (nDCG@10 {gain:+.3f} on the sample); --apply writes chunk_tokens={best.size}"), highlight=False)  # fmt: skip
    return {"rows": rows, "best": best.size, "current": current}


def _apply_chunks(settings: Settings, chunks: dict) -> None:
    if chunks["best"] == chunks["current"]:
        console.print("--apply: the current chunk size scores best; config.toml is left as it is")
        return
    _write_settings(settings, {"chunk_tokens": chunks["best"]},
                    "run `lorekeeper reindex` to re-chunk the index at that size: every file is embedded again")  # fmt: skip


def _chunk_records(chunks: dict | None) -> list[dict]:
    if not chunks:
        return []
    return [{"chunk_tokens": r.size, "files": r.files, "chunks": r.chunks, "seconds": round(r.seconds, 1),
             "current": r.size == chunks["current"], **r.scores.means} for r in chunks["rows"]]  # fmt: skip


def _write_runs(path: Path, runs: dict) -> None:
    from ..eval_files import write_run

    for mode, run in runs.items():
        target = path if len(runs) == 1 else path.with_name(f"{path.name}.{mode}")
        try:
            write_run(target, run, f"lorekeeper-{mode}")
        except OSError as exc:
            fail(f"--run-out {target}: {exc}")
        err.print(f"{mode} run written to {target}")


def _write_json(path: Path, judged: list, scores: dict, rows: list, current, best, applied: bool,
                chunks: dict | None = None, mode: str | None = None) -> None:  # fmt: skip
    from ..evaluation import means_by_group

    kinds = _kinds(judged)
    payload = {
        "queries": len(judged),
        "modes": {
            name: {"means": s.means, "judged": s.judged, "unjudged": s.unjudged, "per_query": s.per_query}
            for name, s in scores.items()
        },  # fmt: skip
        "ndcg_by_kind": {
            name: {k: {"queries": n, "ndcg@10": v} for k, (n, v) in means_by_group(s, kinds).items()}
            for name, s in scores.items()
        }
        if kinds
        else {},  # fmt: skip
        "sweep": [{**r.fusion.as_dict(), **r.scores.means} for r in rows],
        "current": current.as_dict(),
        "best": best.as_dict() if best is not None else None,
        "applied": applied,
        "best_mode": mode,
        "chunk_sizes": _chunk_records(chunks),
        "best_chunk_tokens": chunks["best"] if chunks else None,
    }
    try:
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        fail(f"--json {path}: {exc}")


def _write_report(
    settings: Settings, folder: Path, judged: list, scores: dict, rows: list, best, given, chunks=None
) -> None:
    """The Markdown report and summary in ``folder``, noted in the index for index_status and MCP."""
    from ..eval_report import record_last, today, write_retrieval_report
    from . import open_store

    means = {name: dict(s.means) for name, s in scores.items()}
    modes = {name: m["ndcg@10"] for name, m in means.items() if not name.startswith("run ")}
    headline = f"{len(judged)} queries, nDCG@10 " + ", ".join(f"{n} {v:.3f}" for n, v in modes.items())
    if best is not None:
        headline += "; best fusion " + " ".join(f"{k}={v:g}" for k, v in best.as_dict().items())
    date = today()
    if chunks:
        headline += f"; best chunk size {chunks['best']} tokens"
    meta = {"date": date, "queries": len(judged), "source": str(given) if given else "drafted from the index",
            "chunk_sizes": _chunk_records(chunks)}  # fmt: skip
    sweep = [{**r.fusion.as_dict(), **r.scores.means} for r in rows]
    try:
        report = write_retrieval_report(
            folder, means, sweep, best.as_dict() if best else None, headline, meta
        )
    except OSError as exc:
        fail(f"--report {folder}: cannot write the report ({exc})")
    with open_store(settings, create=False) as store:
        record_last(store, "retrieval", report, headline, date)
    console.print(f"report: {report}", highlight=False)


def register(app: typer.Typer) -> None:
    from . import eval_answers  # noqa: F401  (adds `eval answers` to eval_app)

    app.add_typer(eval_app, name="eval")
