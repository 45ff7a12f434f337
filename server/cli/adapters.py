"""``adapters list|show|rm|serve-config``: the fine-tuned LoRA adapters registered by ``finetune export``."""

from __future__ import annotations

import json
from pathlib import Path

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


@app.command("serve-config")
def serve_config(
    ctx: typer.Context,
    names: list[str] = typer.Argument(..., help="The adapters to serve (all made for one base model)."),
    port: int = typer.Option(8080, "--port", help="The port the server listens on."),
    host: str = typer.Option("127.0.0.1", "--host", help="The address the server listens on."),
    n_ctx: int = typer.Option(
        None, "--n-ctx", help="The server's context window (default: the n_ctx setting)."
    ),
    write: Path = typer.Option(
        None,
        "--write",
        help="Write the llama-cpp-python server config into this folder instead of printing it.",
    ),
) -> None:
    """Print the commands that serve these adapters on llama-server, llama-cpp-python's server or vLLM,
    and the settings that make the openai generator pick one per request."""
    from ..adapter_serving import plan_for, render, write_config

    settings = settings_of(ctx)
    if not 1 <= port <= 65535:
        fail(f"--port {port} is not a port: use 1 to 65535")
    try:
        plan = plan_for(_registry(ctx), names, port=port, host=host, n_ctx=n_ctx or settings.n_ctx)
        config_file = write_config(plan, write) if write is not None else None
    except AdapterError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the config into {write}: {exc.strerror or exc}")
    typer.echo(render(plan, config_file))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="adapters")
