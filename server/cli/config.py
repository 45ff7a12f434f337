"""``config show|set|unset``: every setting, where its value comes from, and the config file."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from ..settings import SettingsError, default_value, write_config_value
from . import console, fail, settings_of

config_app = typer.Typer(
    help="Show and change settings (flag > LOREKEEPER_* environment > config.toml > default).",
    no_args_is_help=True,
)


@config_app.command("show")
def show(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every setting, its value and where the value comes from."""
    settings = settings_of(ctx)
    rows = settings.describe(as_text=not as_json)
    if as_json:
        payload = {key: {"value": value, "source": source} for key, value, source, _ in rows}
        console.print_json(json.dumps({"config_file": str(settings.config_path), "settings": payload}))
        return
    table = Table("key", "value", "from", "meaning", title=f"settings (config file: {settings.config_path})")
    for key, value, source, help_text in rows:
        table.add_row(key, value, source, help_text)
    console.print(table)


@config_app.command("set")
def set_value(
    ctx: typer.Context,
    key: str = typer.Argument(..., help="A setting, as `lorekeeper config show` lists it."),
    value: str = typer.Argument(..., help="Its new value."),
) -> None:
    """Write a setting to config.toml in the data directory."""
    settings = settings_of(ctx)
    try:
        path = write_config_value(settings.home, key, value)
    except SettingsError as exc:
        fail(str(exc))
    updated = settings_of(ctx)
    source = updated.sources.get(key, "default")
    note = "" if source == "config.toml" else f" (but {source} overrides it)"
    console.print(f"{key} = {getattr(updated, key)!r} in {path}{note}", highlight=False)


@config_app.command("unset")
def unset_value(
    ctx: typer.Context, key: str = typer.Argument(..., help="A setting to drop from config.toml.")
) -> None:
    """Remove a setting from config.toml, so the default (or the environment) applies again."""
    settings = settings_of(ctx)
    try:
        write_config_value(settings.home, key, None)
        default = default_value(key)
    except SettingsError as exc:
        fail(str(exc))
    console.print(f"{key} removed from {settings.config_path} (default: {default!r})", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
