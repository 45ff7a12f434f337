"""The ``lorekeeper`` command: a thin face over the index, search, server and fine-tuning.

Each command resolves the settings once (``settings_of``: its own flags, then the environment,
then ``config.toml``, then the defaults) and passes them down. Every command takes ``--db`` (or
the ``db`` setting) to use a specific index file. Logs go to stderr.

Commands live by subject: ``index.py`` (add, remove, watch, search, status, reindex, plugins),
``answer.py`` (ask), ``chat.py`` (chat), ``adapters.py`` (adapters list/show/rm/serve-config), ``serve.py`` (serve, mcp-config), ``config.py`` (config show/set/unset), ``eval.py`` (eval retrieval), ``migrate.py`` (migrate) and
``lorekeeper.finetune.cli`` (finetune ...).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ..settings import Settings, SettingsError, process_environment

app = typer.Typer(
    name="lorekeeper",
    help="Make a small local model an expert on your own documents: index folders, search them, "
    "serve them to AI assistants over MCP, fine-tune on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)  # messages stay whole lines


@app.callback()
def _main(
    ctx: typer.Context,
    db: str = typer.Option(
        None,
        "--db",
        help="Index file to use (default: the db setting, else in the data dir), or a "
        "postgresql://USER:PASSWORD@HOST/DB URL for an index on PostgreSQL.",
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
    # transformers' kernels hub says it skips a trust check because the hub is offline (lorekeeper
    # never downloads at run time): noise on the first run, when the embedder is exported to ONNX
    logging.getLogger("kernels").setLevel(logging.INFO if verbose else logging.ERROR)
    ctx.obj = {"db": db, "verbose": verbose}


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit; the one way every command reports a failure."""
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def settings_of(ctx: typer.Context, **flags: Any) -> Settings:
    """The settings for this command: its flags (None = not given) over the environment, the config
    file and the defaults. ``--db`` given to the command wins over ``lorekeeper --db``."""
    root = ctx.find_root().obj or {}
    if flags.get("db") is None and root.get("db") is not None:
        flags["db"] = root["db"]
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
    try:
        return Settings.load(flags)
    except SettingsError as exc:
        fail(str(exc))


def check_index_folder(settings: Settings) -> None:
    """Fail when the index was named (``--db``, LOREKEEPER_DB, the db setting) inside a folder that does
    not exist: a mistyped path must not leave a new empty index (and its folders) behind. The default
    index's data directory is made as needed."""
    parent = settings.db_path.parent
    if settings.db and not settings.db_url and not parent.is_dir():
        fail(f"the folder of the index {settings.db_path} does not exist: create it first (mkdir -p {parent}) "
             "or point --db at an existing index")  # fmt: skip


def open_store(settings: Settings, *, create: bool = True) -> Any:
    """The index the settings name; a clear error (never a traceback) if it cannot be opened."""
    from ..store import StoreError
    from ..stores import open_store as open_index

    if create:
        check_index_folder(settings)
    try:
        return open_index(settings.db_target, create=create)
    except StoreError as exc:
        fail(str(exc))


def _mount_subcommands() -> None:
    # `finetune` is only imported here, by the command that starts it; its heavy imports wait
    # inside its commands.
    from lorekeeper.finetune.cli import app as finetune_app

    from . import adapters, answer, chat, config, eval, index, migrate, serve

    index.register(app)
    answer.register(app)
    chat.register(app)
    adapters.register(app)
    serve.register(app)
    config.register(app)
    eval.register(app)
    migrate.register(app)
    app.add_typer(
        finetune_app, name="finetune", help="Train LoRA adapters on your data and export them as GGUF."
    )


_mount_subcommands()


def main() -> None:
    process_environment()  # before torch or llama.cpp load: see its docstring
    from ..store import StoreError

    try:
        app()
    except StoreError as exc:  # a full or read-only disk under any command: say so, no traceback
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(1)


if __name__ == "__main__":
    main()
