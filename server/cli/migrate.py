"""``lorekeeper migrate --to postgresql://...``: copy an SQLite index into PostgreSQL."""

from __future__ import annotations

import time

import typer

from ..settings import is_database_url, redact_url
from . import console, fail, settings_of


def migrate(
    ctx: typer.Context,
    to: str = typer.Option(..., "--to", help="The PostgreSQL database to copy the index into: "
                           "postgresql://USER:PASSWORD@HOST:PORT/DATABASE (it must hold no index yet)."),
) -> None:  # fmt: skip
    """Copy the index (the --db file) into PostgreSQL with pgvector: chunks, vectors (no re-embedding),
    keywords, folders and settings. Then use it with --db URL from any machine."""
    from ..store import StoreError
    from ..store_pg import PgStore

    if not is_database_url(to):
        fail(f"--to {to!r} is not a PostgreSQL URL: give postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    settings = settings_of(ctx)
    if settings.db_url:
        fail(f"the index to copy from is already on PostgreSQL ({redact_url(settings.db_url)}): "
             "give the SQLite file with --db FILE")  # fmt: skip
    started = time.monotonic()
    try:
        with PgStore.open(to) as target:
            counts = target.import_sqlite(settings.db_path)
            problems = target.check_integrity()
    except StoreError as exc:
        fail(str(exc))
    if problems:
        fail(f"the copy in {redact_url(to)} is inconsistent: {'; '.join(problems)}")
    parts = ", ".join(f"{n} {table.replace('_', ' ')}" for table, n in counts.items())
    console.print(f"copied {settings.db_path} to {redact_url(to)} in {time.monotonic() - started:.1f} s: {parts}",
                  highlight=False, soft_wrap=True)  # fmt: skip
    console.print(
        f"use it with: lorekeeper --db '{redact_url(to)}' search ...", highlight=False, soft_wrap=True
    )


def register(app: typer.Typer) -> None:
    app.command()(migrate)
