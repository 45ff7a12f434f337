"""``serve`` (the MCP server) and ``mcp-config`` (the JSON that connects a client to it)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import typer

from ..settings import Settings, home_from_environment, is_database_url
from . import check_index_folder, err, fail, settings_of


def serve(
    ctx: typer.Context,
    http: bool = typer.Option(False, "--http", help="Serve Streamable HTTP instead of stdio."),
    host: str = typer.Option("127.0.0.1", "--host", help="HTTP address to bind (keep it local)."),
    port: int = typer.Option(None, "--port", help="HTTP port (default: the http_port setting, 8765)."),
    token: str = typer.Option(
        None,
        "--token",
        help="HTTP bearer token (default: the token setting, else one stored in the data dir).",
    ),
    watch: list[Path] = typer.Option(
        None, "--watch", help="Also register and watch this folder (repeatable)."
    ),
    allow_folder_tools: bool = typer.Option(
        False, "--allow-folder-tools", help="Let the assistant add and remove indexed folders."
    ),
    allow_origin: list[str] = typer.Option(
        None, "--allow-origin", help="An extra browser Origin allowed over HTTP (repeatable)."
    ),
    db: str = typer.Option(
        None, "--db", help="Index file or postgresql:// URL (default: the one given to lorekeeper --db)."
    ),
    model: str = typer.Option(None, "--model", help="GGUF model path (llamacpp) or model name (openai)."),
    generator: str = typer.Option(
        None, "--generator", help="Generator plugin: llamacpp (default) or openai."
    ),
    no_watcher: bool = typer.Option(
        False, "--no-watcher", help="Serve the index as it is; do not watch folders."
    ),
    n_ctx: int = typer.Option(None, "--n-ctx", help="llama.cpp context window in tokens (default 4096)."),
    threads: int = typer.Option(None, "--threads", help="llama.cpp CPU threads (default: its own choice)."),
) -> None:
    """Start the MCP server (stdio by default, as AI assistants launch it)."""
    from ..mcp import ServerOptions, create_server, load_or_create_token, run_http, run_stdio

    for folder in watch or []:
        if not folder.expanduser().is_dir():
            fail(f"--watch {folder}: no such folder")
    settings = model_settings(ctx, generator, model, n_ctx, threads, db=db, http_port=port, token=token)
    check_index_folder(settings)
    options = ServerOptions(
        settings=settings,
        watch=[f.expanduser().resolve() for f in watch or []],
        allow_folder_tools=allow_folder_tools,
        start_watcher=not no_watcher,
    )
    server = create_server(options)
    if http:
        secret = load_or_create_token(settings)
        port = settings.http_port
        err.print(f"lorekeeper MCP server: http://{host}:{port}/mcp (bearer token in {settings.token_path})")
        run_http(server, host=host, port=port, token=secret, allowed_origins=allow_origin or [])
    else:
        run_stdio(server)


def model_settings(
    ctx: typer.Context,
    generator: str | None,
    model: str | None,
    n_ctx: int | None = None,
    threads: int | None = None,
    **more: object,
) -> Settings:
    """Settings with the generator flags: ``--model`` is a GGUF file for llamacpp, a model name for
    the openai generator."""
    name = generator or settings_of(ctx).generator
    flags: dict[str, object] = {"generator": generator, "n_ctx": n_ctx, "threads": threads, **more}
    if model:
        if name == "openai":
            flags["openai_model"] = model
        else:
            from lorekeeper.plugins.generators.llamacpp import ModelLoadError, check_gguf

            path = Path(model).expanduser()
            if path.is_dir():
                fail(f"--model {model} is a folder; give the path of a .gguf model file")
            if not path.is_file():
                fail(f"--model {model}: no such file; give the path of a .gguf model")
            try:  # before any index or model loads: a wrong file is named at once
                check_gguf(path)
            except ModelLoadError as exc:
                fail(f"--model: {exc}")
            flags["model"] = str(path.resolve())
    return settings_of(ctx, **flags)


def _launcher(db: Path | str | None) -> tuple[str, list[str]]:
    exe = shutil.which("lorekeeper")
    command, args = (exe, []) if exe else (sys.executable, ["-m", "lorekeeper.server.cli"])
    if db is not None:
        args += ["--db", db if is_database_url(db) else str(Path(db).expanduser().resolve())]
    return command, args + ["serve"]


def config_snippets(
    db: Path | str | None = None, http: bool = False, port: int = 8765, token: str | None = None
) -> dict:
    """The JSON each client wants, keyed by client name. MCP clients pass only a few environment
    variables to the servers they start, so a ``LOREKEEPER_HOME`` the user set goes in the snippet."""
    home = home_from_environment()
    env = {"LOREKEEPER_HOME": home} if home else {}
    if http:
        url = f"http://127.0.0.1:{port}/mcp"
        headers = {"Authorization": f"Bearer {token or '<token>'}"}
        return {
            "claude_desktop": {
                "mcpServers": {"lorekeeper": {"command": "npx", "args": ["mcp-remote", url, "--header",
                                                                          f"Authorization:{headers['Authorization']}"]}}
            },
            "cursor": {"mcpServers": {"lorekeeper": {"url": url, "headers": headers}}},
            "vscode": {"servers": {"lorekeeper": {"type": "http", "url": url, "headers": headers}}},
        }  # fmt: skip
    command, args = _launcher(db)
    entry: dict = {"command": command, "args": args}
    if env:
        entry["env"] = env
    return {
        "claude_desktop": {"mcpServers": {"lorekeeper": entry}},
        "cursor": {"mcpServers": {"lorekeeper": entry}},
        "vscode": {"servers": {"lorekeeper": {"type": "stdio", **entry}}},
    }


WHERE = {
    "claude_desktop": "Claude Desktop: claude_desktop_config.json (Settings > Developer > Edit Config)",
    "cursor": "Cursor: ~/.cursor/mcp.json (or .cursor/mcp.json in a project)",
    "vscode": "VS Code: .vscode/mcp.json in a workspace (or the user mcp.json)",
}


def mcp_config(
    ctx: typer.Context,
    client: str = typer.Option("all", "--client", help="claude, cursor, vscode or all."),
    http: bool = typer.Option(False, "--http", help="Snippets for a running `lorekeeper serve --http`."),
    port: int = typer.Option(
        None, "--port", help="The HTTP port the server uses (default: the http_port setting)."
    ),
    show_token: bool = typer.Option(
        False, "--show-token", help="Put the real bearer token in HTTP snippets."
    ),
    db: str = typer.Option(None, "--db", help="Index file or postgresql:// URL the server should use."),
) -> None:
    """Print the JSON that connects Claude Desktop, Cursor or VS Code to lorekeeper."""
    names = {
        "claude": "claude_desktop",
        "claude_desktop": "claude_desktop",
        "cursor": "cursor",
        "vscode": "vscode",
    }
    if client != "all" and client not in names:
        fail(f"--client {client!r} is unknown: use claude, cursor, vscode or all")
    settings = settings_of(ctx, http_port=port)
    token = None
    if http and show_token:
        from ..mcp import load_or_create_token

        token = load_or_create_token(settings)
    root_db = (ctx.find_root().obj or {}).get("db")
    snippets = config_snippets(db or root_db, http=http, port=settings.http_port, token=token)
    chosen = list(snippets) if client == "all" else [names[client]]
    if len(chosen) == 1:
        sys.stdout.write(json.dumps(snippets[chosen[0]], indent=2) + "\n")
        return
    for name in chosen:
        sys.stdout.write(f"// {WHERE[name]}\n{json.dumps(snippets[name], indent=2)}\n\n")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("mcp-config")(mcp_config)
