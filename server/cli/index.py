"""Index commands: ``add``, ``remove``, ``watch``, ``search``, ``status``, ``files``, ``reindex``, ``plugins``."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import console, err, fail, open_store, settings_of


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[path]}", style="dim"),
        console=err,
        transient=True,
    )


def _ticker(progress: Progress, task) -> Callable[[int, int, str], None]:
    """The indexer's progress callback, drawn on a rich progress bar."""

    def tick(done: int, total: int, current: str) -> None:
        progress.update(task, completed=done, total=total, path=os.path.basename(current))

    return tick


def _report_line(report) -> str:
    parts = [f"{report.indexed} indexed", f"{report.unchanged} unchanged"]
    for name in ("moved", "removed", "failed", "skipped", "ignored"):
        value = getattr(report, name)
        if value:
            parts.append(f"{value} {name}")
    parts.append(f"{report.embedded_chunks} chunks embedded ({report.cached_chunks} from cache)")
    return ", ".join(parts) + f" in {report.seconds:.1f} s"


def add(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(..., help="Folders to watch and index."),
) -> None:
    """Register folders and index them now."""
    from ..indexer import Indexer

    settings = settings_of(ctx)
    for path in paths:  # before the index is opened: a mistyped folder creates nothing
        if not path.exists():
            fail(f"{path}: no such folder; give the path of a folder to index")
        if not path.is_dir():
            fail(f"{path} is a file; give the folder that contains it")
    with open_store(settings) as store:
        indexer = Indexer(store, settings=settings)
        for path in paths:
            with _progress() as progress:
                task = progress.add_task(f"indexing {path}", total=None, path="")
                report = indexer.add_root(path, progress=_ticker(progress, task))
            console.print(f"[green]{path.resolve()}[/green]: {_report_line(report)}")
            if report.failed or report.skipped:
                console.print(f"  {report.failed + report.skipped} files not indexed: `lorekeeper files --failed` "
                              "lists them with the reason")  # fmt: skip
            if report.ignored:
                console.print(f"  {report.ignored} files and folders left out on purpose: `lorekeeper files "
                              "--ignored` lists them with the reason")  # fmt: skip
        ready_for_search(store)


def ready_for_search(store) -> None:
    """From 100k chunks, bring the keyword ranker (Tantivy beside the index) up to date before the
    command ends, so the next search, in any process, finds it ready (a search only starts it in
    the background, and a one-shot search stops it when it exits)."""
    ready = getattr(store, "keyword_index_ready", None)  # SQLite only
    if ready is None:
        return
    began = time.perf_counter()
    if ready() is not None and time.perf_counter() - began >= 1.0:
        console.print(f"keyword ranker brought up to date in {time.perf_counter() - began:.1f} s")


def remove(ctx: typer.Context, path: Path = typer.Argument(..., help="A registered folder.")) -> None:
    """Stop watching a folder and drop what was indexed from it (the files are untouched)."""
    with open_store(settings_of(ctx), create=False) as store:
        if not store.remove_root(path):
            known = ", ".join(r.path for r in store.roots()) or "none"
            fail(f"{path} is not a registered folder (registered: {known})")
        console.print(f"removed {path.resolve()} from the index")


def watch(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(None, help="Extra folders to register and watch."),
    polling: bool = typer.Option(False, "--polling", help="Poll instead of using native file events."),
) -> None:
    """Watch every registered folder in the foreground, indexing changes as they happen."""
    from ..indexer import Indexer, warm_up
    from ..watcher import Watcher

    settings = settings_of(ctx, polling=polling or None)
    for path in paths or []:
        if not path.is_dir():
            fail(f"{path}: not a folder")
    # only folders given here make a new index; without them, there must be one with folders in it
    with open_store(settings, create=bool(paths)) as store:
        indexer = Indexer(store, settings=settings)
        warm_up(indexer.embedder)  # the first change after start waits for no model load
        watcher = Watcher(indexer, settings=settings)
        for path in paths or []:
            store.add_root(path)
        if not store.roots():
            fail("no folders registered: run `lorekeeper add FOLDER` or pass one to `watch`")

        def show(event: str, path: str) -> None:
            stamp = dt.datetime.now().strftime("%H:%M:%S")
            console.print(f"[dim]{stamp}[/dim] {event:8} {path}")

        store.add_listener(show)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        watcher.start()
        for root, mode in watcher.modes.items():
            err.print(f"watching {root} ({mode} events); Ctrl-C to stop")
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            watcher.stop()


def search(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="Words or a question."),
    k: int = typer.Option(8, "-k", help="How many results (1-200)."),
    path: str = typer.Option(None, "--path", help="Only files matching this glob (e.g. 'notes/**/*.md')."),
    file_type: list[str] = typer.Option(
        None, "--type", help="Only these file types (e.g. --type md --type pdf)."
    ),
    since: str = typer.Option(
        None,
        "--since",
        help="Only files modified after this ISO date or time (local time unless it says Z or +hh:mm).",
    ),
    mode: str = typer.Option(
        None, "--mode", help="hybrid, vector or keyword (default: the search_mode setting)."
    ),
    vector_weight: float = typer.Option(None, "--vector-weight", help="Weight of meaning in hybrid fusion."),
    keyword_weight: float = typer.Option(
        None, "--keyword-weight", help="Weight of keywords in hybrid fusion."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a readable list."),
) -> None:
    """Search the index by meaning and keywords."""
    from ..hits import parse_since
    from ..render import hits_text
    from . import remote

    settings = settings_of(ctx, search_mode=mode, vector_weight=vector_weight, keyword_weight=keyword_weight)
    try:
        modified_after = parse_since(since)
    except ValueError as exc:
        fail(f"--since {exc}")
    args = dict(query=query, k=k, mode=settings.search_mode, path_glob=path, file_types=file_type,
                modified_after=modified_after, vector_weight=settings.vector_weight,
                keyword_weight=settings.keyword_weight, rrf_k=settings.rrf_k)  # fmt: skip
    try:
        hits = remote.search(settings, **args)  # a running `serve --http` has the model loaded
    except remote.RemoteError as exc:
        fail(str(exc))
    if hits is None:
        hits = _search_here(settings, args)
    if as_json:
        console.print_json(json.dumps([asdict(h) | {"location": h.location} for h in hits]))
        return
    if not hits:
        console.print("no results")
        return
    console.print(hits_text(query, hits, snippet=300), highlight=False, markup=False)


def _search_here(settings, args: dict) -> list:
    """Search in this process: open the index and its embedder (``search`` without a server)."""
    from ..indexer import check_search_embedder, embedder_for
    from ..search import search as run_search

    with open_store(settings, create=False) as store:
        try:
            embedder = embedder_for(store, settings)
            check_search_embedder(store, embedder)
            return run_search(store, embedder, **args)
        except (ValueError, LookupError) as exc:
            fail(str(exc))


def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Registered folders, counts, files not indexed (with reasons) and the last change."""
    from ..indexer import ACTIVITY_KEY

    with open_store(settings_of(ctx), create=False) as store:
        report = store.status()
        activity = store.get_meta(ACTIVITY_KEY)
    if as_json:
        console.print_json(json.dumps(asdict(report)))
        return
    console.print(f"index: {report.db_path}")
    console.print(f"embedder: {report.embed_model or 'none yet'} ({report.embed_dim or '-'} dims)")
    table = Table("folder", "indexed", "chunks", "failed", "skipped", "ignored")
    for root in report.roots:
        table.add_row(root.path, str(root.documents), str(root.chunks), str(root.failed), str(root.skipped),
                      str(root.ignored))  # fmt: skip
    console.print(table)
    if report.last_change:
        console.print(f"last change: {dt.datetime.fromtimestamp(report.last_change):%Y-%m-%d %H:%M:%S}")
    _print_activity(activity)
    if report.failed:
        console.print(f"[yellow]{len(report.failed)} files not indexed:[/yellow]")
        for item in report.failed:
            console.print(f"  {item.status:7} {item.path}: {item.error}", highlight=False)
    if report.ignored:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(report.ignored.items(), key=lambda kv: -kv[1]))
        console.print(f"{sum(report.ignored.values())} files and folders left out on purpose ({counts}); "
                      "`lorekeeper files --ignored` lists them with the reason", highlight=False)  # fmt: skip


def _print_activity(activity: str | None) -> None:
    """The large file a running watcher or `add` is embedding, if it said so in the last minute."""
    if not activity:
        return
    try:
        info = json.loads(activity)
    except ValueError:
        return
    if time.time() - float(info.get("at", 0)) < 60:
        console.print(
            f"indexing now: {info['path']} ({info['done']}/{info['total']} chunks embedded)", highlight=False
        )


def files(
    ctx: typer.Context,
    folder: Path = typer.Argument(None, help="One registered folder (default: all)."),
    ignored: bool = typer.Option(
        False, "--ignored", help="Files and folders left out on purpose, with the reason."
    ),
    failed: bool = typer.Option(
        False, "--failed", help="Files that failed or were skipped, with the reason."
    ),
    show_all: bool = typer.Option(False, "--all", help="Every file the index knows of, with its status."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the files of the watched folders: indexed ones (the default), or those not indexed and why."""
    if sum([ignored, failed, show_all]) > 1:
        fail("give one of --ignored, --failed, --all")
    which = "all" if show_all else "ignored" if ignored else "problems" if failed else "indexed"
    with open_store(settings_of(ctx), create=False) as store:
        root = None
        if folder is not None:
            root = str(folder.expanduser().resolve())
            if root not in [r.path for r in store.roots()]:
                fail(f"{folder} is not a registered folder")
        entries = store.files(which, root)
    if as_json:
        console.print_json(json.dumps([asdict(e) for e in entries]))
        return
    if not entries:
        console.print({"indexed": "no files indexed", "ignored": "no files ignored",
                       "problems": "no files failed or skipped"}.get(which, "no files"))  # fmt: skip
        return
    for entry in entries:
        name = entry.path + ("/" if entry.is_dir else "")
        if entry.status == "indexed":
            note = f" ({entry.reason})" if entry.reason and which == "all" else ""
            line = (
                f"{entry.chunks:6} chunks  {name}{note}" if which == "indexed" else f"indexed  {name}{note}"
            )
        else:
            line = f"{entry.status:7}  {name}: {entry.reason}"
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.status] = counts.get(entry.status, 0) + 1
    err.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))


def reindex(
    ctx: typer.Context,
    path: Path = typer.Argument(None, help="One registered folder (default: all)."),
    full: bool = typer.Option(
        False, "--full", help="Re-read and re-chunk every file, not only changed ones."
    ),
) -> None:
    """Look at every file again; vectors come from the cache unless the text changed (or the
    embedder setting names a new embedder: then every chunk is re-embedded)."""
    from ..indexer import Indexer

    settings = settings_of(ctx)
    with open_store(settings, create=False) as store:
        root = None
        if path is not None:
            root = str(path.expanduser().resolve())
            if root not in [r.path for r in store.roots()]:
                fail(f"{path} is not a registered folder")
        indexer = Indexer(store, settings=settings)
        with _progress() as progress:
            task = progress.add_task("reindexing", total=None, path="")
            report = indexer.reindex(root, full=full, progress=_ticker(progress, task))
        ready_for_search(store)
    console.print(_report_line(report))


def list_plugins(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")
) -> None:
    """The loaded plugins and the loaders, embedders and generators they provide."""
    from lorekeeper import plugins

    settings = settings_of(ctx)
    info = {
        "plugins": plugins.plugin_names(settings),
        "loaders": [
            {"name": loader.name, "extensions": list(loader.extensions)}
            for loader in plugins.get_loaders(settings)
        ],
        "embedders": [
            {"model_id": e.model_id, "dimension": e.dimension} for e in plugins.get_embedders(settings)
        ],
        "generators": [{"name": g.name, "model_id": g.model_id} for g in plugins.get_generators(settings)],
    }
    if as_json:
        console.print_json(json.dumps(info))
        return
    console.print("[bold]plugins[/bold]: " + ", ".join(info["plugins"]))
    for loader in info["loaders"]:
        console.print(f"  loader    {loader['name']:10} {' '.join(loader['extensions'])}", highlight=False)
    for emb in info["embedders"]:
        console.print(f"  embedder  {emb['model_id']} ({emb['dimension']} dims)")
    for gen in info["generators"]:
        console.print(f"  generator {gen['name']:10} {gen['model_id']}")


def register(app: typer.Typer) -> None:
    app.command()(add)
    app.command()(remove)
    app.command()(watch)
    app.command()(search)
    app.command()(status)
    app.command()(files)
    app.command()(reindex)
    app.command("plugins")(list_plugins)
