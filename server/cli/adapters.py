"""``adapters list|show|rm``: the fine-tuned LoRA adapters registered by ``finetune export``."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from ..adapters import AdapterError, AdapterRegistry
from . import console, fail, settings_of

app = typer.Typer(help="List, show and remove the fine-tuned LoRA adapters.", no_args_is_help=True)


def _registry(ctx: typer.Context) -> AdapterRegistry:
    return AdapterRegistry(settings_of(ctx).adapters_dir)


@app.command("list")
def list_adapters(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print the records as JSON.")
) -> None:
    """Every registered adapter: name, base model, rank, when it was made, description."""
    registry = _registry(ctx)
    records = [registry.read(name) for name in registry.names()]
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2))
        return
    if not records:
        typer.echo(f"no adapters in {registry.directory} (train one with `lorekeeper finetune`)")
        return
    table = Table(title=str(registry.directory))
    for column in ("name", "base", "rank", "created", "description"):
        table.add_column(column, overflow="fold")
    for r in records:
        base = r.base_path.name if r.base_path else "-"
        table.add_row(r.name, base, str(r.rank or "-"), r.created or "-", r.description or "-")
    console.print(table)


@app.command("show")
def show_adapter(ctx: typer.Context, name: str = typer.Argument(..., help="The adapter's name.")) -> None:
    """The whole record of one adapter (JSON): base, LoRA shape, system prompt, sampling, files."""
    registry = _registry(ctx)
    try:
        record = registry.read(name)
    except AdapterError as exc:
        fail(str(exc))
    data = record.to_dict() | {"adapter_path": str(registry.directory / record.adapter_file)}
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


@app.command("rm")
def remove_adapter(ctx: typer.Context, name: str = typer.Argument(..., help="The adapter's name.")) -> None:
    """Unregister an adapter: its record and its GGUF, as a pair."""
    registry = _registry(ctx)
    try:
        removed = registry.remove(name)
    except AdapterError as exc:
        fail(str(exc))
    typer.echo(f"removed adapter {name!r} ({', '.join(p.name for p in removed)})")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="adapters")
