"""The ``lorekeeper`` command: a thin face over the index, search, server and fine-tuning.

Every command takes ``--db`` (or ``LOREKEEPER_DB``) to use a specific index file; the default lives
in the data directory (``LOREKEEPER_HOME`` overrides it). Logs go to stderr.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import config

app = typer.Typer(
    name="lorekeeper",
    help="Make a small local model an expert on your own documents: index folders, search them, "
    "serve them to AI assistants over MCP, fine-tune on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


@app.callback()
def _main(
    ctx: typer.Context,
    db: Path = typer.Option(
        None, "--db", envvar=config.DB_ENV, help="Index file to use (default: in the data dir)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # a notice bitsandbytes prints on import on CPU-only machines; harmless (see the guide)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    ctx.obj = {"db": db}


def db_path(ctx: typer.Context) -> Path:
    obj = ctx.find_root().obj or {}
    return obj.get("db") or config.default_db_path()


def open_store(ctx: typer.Context):
    from .store import Store, StoreError

    try:
        return Store.open(db_path(ctx))
    except StoreError as exc:
        fail(str(exc))


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


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
    for name in ("moved", "removed", "failed", "skipped"):
        value = getattr(report, name)
        if value:
            parts.append(f"{value} {name}")
    parts.append(f"{report.embedded_chunks} chunks embedded ({report.cached_chunks} from cache)")
    return ", ".join(parts) + f" in {report.seconds:.1f} s"


@app.command()
def add(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(..., help="Folders to watch and index."),
) -> None:
    """Register folders and index them now."""
    from .indexer import Indexer

    with open_store(ctx) as store:
        indexer = Indexer(store)
        for path in paths:
            if not path.exists():
                fail(f"{path}: no such folder; give the path of a folder to index")
            if not path.is_dir():
                fail(f"{path} is a file; give the folder that contains it")
            with _progress() as progress:
                task = progress.add_task(f"indexing {path}", total=None, path="")
                report = indexer.add_root(path, progress=_ticker(progress, task))
            console.print(f"[green]{path.resolve()}[/green]: {_report_line(report)}")
            problems = [(p, o) for p, o in report.outcomes.items() if o in ("failed", "skipped")]
            if problems:
                console.print(f"  {len(problems)} files not indexed; `lorekeeper status` lists why")


@app.command()
def remove(ctx: typer.Context, path: Path = typer.Argument(..., help="A registered folder.")) -> None:
    """Stop watching a folder and drop what was indexed from it (the files are untouched)."""
    with open_store(ctx) as store:
        if not store.remove_root(path):
            known = ", ".join(r.path for r in store.roots()) or "none"
            fail(f"{path} is not a registered folder (registered: {known})")
        console.print(f"removed {path.resolve()} from the index")


@app.command()
def watch(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(None, help="Extra folders to register and watch."),
    polling: bool = typer.Option(False, "--polling", help="Poll instead of using native file events."),
) -> None:
    """Watch every registered folder in the foreground, indexing changes as they happen."""
    from .indexer import Indexer
    from .watcher import Watcher

    with open_store(ctx) as store:
        indexer = Indexer(store)
        watcher = Watcher(indexer, force_polling=polling or None)
        for path in paths or []:
            if not path.is_dir():
                fail(f"{path}: not a folder")
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


@app.command()
def search(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="Words or a question."),
    k: int = typer.Option(8, "-k", help="How many results (1-200)."),
    path: str = typer.Option(None, "--path", help="Only files matching this glob (e.g. 'notes/**/*.md')."),
    file_type: list[str] = typer.Option(
        None, "--type", help="Only these file types (e.g. --type md --type pdf)."
    ),
    since: str = typer.Option(None, "--since", help="Only files modified after this ISO date or time."),
    mode: str = typer.Option("hybrid", "--mode", help="hybrid, vector or keyword."),
    vector_weight: float = typer.Option(1.0, "--vector-weight", help="Weight of meaning in hybrid fusion."),
    keyword_weight: float = typer.Option(
        1.0, "--keyword-weight", help="Weight of keywords in hybrid fusion."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a readable list."),
) -> None:
    """Search the index by meaning and keywords."""
    from lorekeeper import plugins

    from .search import search as run_search

    modified_after = None
    if since:
        try:
            modified_after = dt.datetime.fromisoformat(since).timestamp()
        except ValueError:
            fail(f"--since {since!r} is not an ISO date such as 2026-01-31 or 2026-01-31T09:00")
    with open_store(ctx) as store:
        embedder = plugins.get_embedder(store.embed_model) if store.embed_model else plugins.get_embedder()
        try:
            hits = run_search(store, embedder, query, k=k, mode=mode, path_glob=path, file_types=file_type,
                              modified_after=modified_after, vector_weight=vector_weight,
                              keyword_weight=keyword_weight)  # fmt: skip
        except ValueError as exc:
            fail(str(exc))
    if as_json:
        console.print_json(json.dumps([asdict(h) | {"location": h.location} for h in hits]))
        return
    if not hits:
        console.print("no results")
        return
    for hit in hits:
        heading = " > ".join(hit.heading_path)
        console.print(f"[bold]{hit.rank}.[/bold] [cyan]{hit.location}[/cyan]  score {hit.score:.4f}"
                      + (f"  [dim]{heading}[/dim]" if heading else ""))  # fmt: skip
        snippet = " ".join(hit.text.split())
        console.print(f"   {snippet[:300]}{'…' if len(snippet) > 300 else ''}", highlight=False)


@app.command()
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Registered folders, counts, files that failed (with reasons) and the last change."""
    with open_store(ctx) as store:
        report = store.status()
    if as_json:
        console.print_json(json.dumps(asdict(report)))
        return
    console.print(f"index: {report.db_path}")
    console.print(f"embedder: {report.embed_model or 'none yet'} ({report.embed_dim or '-'} dims)")
    table = Table("folder", "documents", "chunks", "failed", "skipped")
    for root in report.roots:
        table.add_row(root.path, str(root.documents), str(root.chunks), str(root.failed), str(root.skipped))
    console.print(table)
    if report.last_change:
        console.print(f"last change: {dt.datetime.fromtimestamp(report.last_change):%Y-%m-%d %H:%M:%S}")
    if report.failed:
        console.print(f"[yellow]{len(report.failed)} files not indexed:[/yellow]")
        for item in report.failed:
            console.print(f"  {item.status:7} {item.path}: {item.error}", highlight=False)


@app.command()
def reindex(
    ctx: typer.Context,
    path: Path = typer.Argument(None, help="One registered folder (default: all)."),
    full: bool = typer.Option(
        False, "--full", help="Re-read and re-chunk every file, not only changed ones."
    ),
) -> None:
    """Look at every file again; vectors come from the cache unless the text changed."""
    from .indexer import Indexer

    with open_store(ctx) as store:
        root = None
        if path is not None:
            root = str(path.expanduser().resolve())
            if root not in [r.path for r in store.roots()]:
                fail(f"{path} is not a registered folder")
        store.forget_file_state(root, content=full)
        indexer = Indexer(store)
        with _progress() as progress:
            task = progress.add_task("reindexing", total=None, path="")
            report = indexer.reconcile(root, progress=_ticker(progress, task))
    console.print(_report_line(report))


@app.command("plugins")
def list_plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The loaded plugins and the loaders, embedders and generators they provide."""
    from lorekeeper import plugins

    info = {
        "plugins": plugins.plugin_names(),
        "loaders": [
            {"name": loader.name, "extensions": list(loader.extensions)} for loader in plugins.get_loaders()
        ],
        "embedders": [{"model_id": e.model_id, "dimension": e.dimension} for e in plugins.get_embedders()],
        "generators": [{"name": g.name, "model_id": g.model_id} for g in plugins.get_generators()],
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


def _mount_subcommands() -> None:
    # `finetune` is only imported here, by the command that starts it; its heavy imports wait
    # inside its commands. The MCP commands (serve, mcp-config, ask) live beside the server.
    from lorekeeper.finetune.cli import app as finetune_app

    from . import mcp_cli

    app.add_typer(
        finetune_app, name="finetune", help="Train QLoRA adapters on your data and export them as GGUF."
    )
    mcp_cli.register(app)


_mount_subcommands()


def calm_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin; must run before torch or llama.cpp load.

    The embedder (torch) and llama.cpp both use OpenMP. With its default busy-waiting, a desktop
    doing anything else turns a 20 ms query embedding into ~700 ms and cuts generation to a few
    tokens a second (measured on two loaded cores). ``OMP_WAIT_POLICY`` set by the user wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    calm_openmp()
    app()


if __name__ == "__main__":
    main()
