"""CLI commands for the MCP face: ``serve``, ``mcp-config`` and ``ask``.

``register(app)`` adds them to the main ``lorekeeper`` Typer app. They take ``--db`` themselves and
otherwise use the one given to ``lorekeeper --db``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from . import config

err = Console(stderr=True, highlight=False)
logger = logging.getLogger(__name__)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def _db(ctx: typer.Context, db: Path | None) -> Path | None:
    if db is not None:
        return db
    root = ctx.find_root().obj or {}
    return root.get("db") if isinstance(root, dict) else None


def _configure_generator(
    generator: str | None, model: str | None, n_ctx: int | None = None, threads: int | None = None
) -> None:
    """Flags become the environment the generator plugins read, so every part sees one setting."""
    if n_ctx is not None:
        if n_ctx < 64:
            _fail(f"--n-ctx {n_ctx} is too small: the context window needs at least 64 tokens")
        os.environ["LOREKEEPER_N_CTX"] = str(n_ctx)
    if threads is not None:
        if threads < 1:
            _fail(f"--threads {threads}: use 1 or more")
        os.environ["LOREKEEPER_THREADS"] = str(threads)
    if generator:
        os.environ["LOREKEEPER_GENERATOR"] = generator
    if not model:
        return
    name = generator or os.environ.get("LOREKEEPER_GENERATOR") or "llamacpp"
    if name == "openai":
        os.environ["LOREKEEPER_OPENAI_MODEL"] = model
        return
    path = Path(model).expanduser()
    if not path.is_file():
        _fail(f"--model {model}: no such file; give the path of a .gguf model")
    os.environ["LOREKEEPER_MODEL"] = str(path.resolve())


def serve(
    ctx: typer.Context,
    http: bool = typer.Option(False, "--http", help="Serve Streamable HTTP instead of stdio."),
    host: str = typer.Option("127.0.0.1", "--host", help="HTTP address to bind (keep it local)."),
    port: int = typer.Option(config.DEFAULT_HTTP_PORT, "--port", help="HTTP port."),
    token: str = typer.Option(
        None,
        "--token",
        help="HTTP bearer token (default: LOREKEEPER_TOKEN, else one stored in the data dir).",
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
    db: Path = typer.Option(None, "--db", help="Index file (default: the one given to lorekeeper --db)."),
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
    from .mcp_server import ServerOptions, create_server, load_or_create_token, run_http, run_stdio

    for folder in watch or []:
        if not folder.expanduser().is_dir():
            _fail(f"--watch {folder}: no such folder")
    _configure_generator(generator, model, n_ctx, threads)
    options = ServerOptions(
        db_path=_db(ctx, db),
        watch=[f.expanduser().resolve() for f in watch or []],
        allow_folder_tools=allow_folder_tools,
        generator=generator,
        start_watcher=not no_watcher,
    )
    server = create_server(options)
    if http:
        secret = load_or_create_token(token)
        err.print(f"lorekeeper MCP server: http://{host}:{port}/mcp (bearer token in {config.token_path()})")
        run_http(server, host=host, port=port, token=secret, allowed_origins=allow_origin or [])
    else:
        run_stdio(server)


def _launcher(db: Path | None) -> tuple[str, list[str]]:
    exe = shutil.which("lorekeeper")
    command, args = (exe, []) if exe else (sys.executable, ["-m", "lorekeeper.server.cli"])
    if db is not None:
        args += ["--db", str(Path(db).expanduser().resolve())]
    return command, args + ["serve"]


def config_snippets(
    db: Path | None = None, http: bool = False, port: int = config.DEFAULT_HTTP_PORT, token: str | None = None
) -> dict:
    """The JSON each client wants, keyed by client name."""
    env = {"LOREKEEPER_HOME": os.environ["LOREKEEPER_HOME"]} if os.environ.get("LOREKEEPER_HOME") else {}
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
    port: int = typer.Option(config.DEFAULT_HTTP_PORT, "--port", help="The HTTP port the server uses."),
    show_token: bool = typer.Option(
        False, "--show-token", help="Put the real bearer token in HTTP snippets."
    ),
    db: Path = typer.Option(None, "--db", help="Index file the server should use."),
) -> None:
    """Print the JSON that connects Claude Desktop, Cursor or VS Code to lorekeeper."""
    names = {
        "claude": "claude_desktop",
        "claude_desktop": "claude_desktop",
        "cursor": "cursor",
        "vscode": "vscode",
    }
    if client != "all" and client not in names:
        _fail(f"--client {client!r} is unknown: use claude, cursor, vscode or all")
    token = None
    if http and show_token:
        from .mcp_server import load_or_create_token

        token = load_or_create_token()
    snippets = config_snippets(_db(ctx, db), http=http, port=port, token=token)
    chosen = list(snippets) if client == "all" else [names[client]]
    if len(chosen) == 1:
        sys.stdout.write(json.dumps(snippets[chosen[0]], indent=2) + "\n")
        return
    for name in chosen:
        sys.stdout.write(f"// {WHERE[name]}\n{json.dumps(snippets[name], indent=2)}\n\n")


def _adapter_base_model(adapter: str, generator_name: str | None) -> str | None:
    """The base model adapter ``adapter`` was exported for, when no model was chosen: a fine-tuned
    adapter answers on the model it was trained on, as Ollama pairs an adapter with its FROM model."""
    if (generator_name or os.environ.get("LOREKEEPER_GENERATOR") or "llamacpp") != "llamacpp":
        return None
    from lorekeeper.plugins.generators.llamacpp import adapter_base

    base = adapter_base(adapter)
    if base is None:
        return None
    from lorekeeper.plugins.models import ModelNotFound, default_gguf_path

    try:
        if base.resolve() == default_gguf_path().resolve():
            return None
    except ModelNotFound:
        pass
    if not base.is_file():
        typer.echo(
            f"adapter {adapter!r} was exported for {base}, which is gone; trying the default model",
            err=True,
        )
        return None
    typer.echo(f"using adapter {adapter!r} on its base model {base}", err=True)
    return str(base)


def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question to answer from your documents."),
    adapter: str = typer.Option(
        None,
        "--adapter",
        help="A fine-tuned LoRA adapter (name in the adapters dir); runs on its own base model "
        "unless --model or LOREKEEPER_MODEL says otherwise.",
    ),
    k: int = typer.Option(8, "-k", help="Passages to retrieve (1-200)."),
    no_context: bool = typer.Option(
        False, "--no-context", help="Ask the model alone, without your documents."
    ),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.2, "--temperature", help="0 = deterministic."),
    system: str = typer.Option(None, "--system", help="Extra instructions for the model."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    db: Path = typer.Option(None, "--db", help="Index file (default: the one given to lorekeeper --db)."),
    model: str = typer.Option(None, "--model", help="GGUF model path (llamacpp) or model name (openai)."),
    generator_name: str = typer.Option(None, "--generator", help="Generator plugin: llamacpp or openai."),
    n_ctx: int = typer.Option(None, "--n-ctx", help="llama.cpp context window in tokens (default 4096)."),
    threads: int = typer.Option(None, "--threads", help="llama.cpp CPU threads (default: its own choice)."),
) -> None:
    """Answer a question from your documents with the local model, citing its sources."""
    from lorekeeper import plugins

    from . import generation
    from .mcp_server import doc_uri
    from .search import MAX_K

    if not 1 <= k <= MAX_K:
        _fail(f"-k {k} is out of range: use 1 to {MAX_K}")
    if max_tokens < 1:
        _fail(f"--max-tokens {max_tokens}: must be at least 1")
    if not 0.0 <= temperature <= 2.0:
        _fail(f"--temperature {temperature}: use a value from 0 to 2")
    if adapter is not None and model is None and not os.environ.get("LOREKEEPER_MODEL"):
        model = _adapter_base_model(adapter, generator_name)
    _configure_generator(generator_name, model, n_ctx, threads)
    try:
        generator = plugins.get_generator(generator_name)
    except LookupError as exc:
        _fail(str(exc))
    if adapter is not None:
        if not generator.supports_adapters:
            _fail(f"the {generator.name} generator cannot apply adapters: use --generator llamacpp")
        check = getattr(generator, "check_adapter", None)
        if check is not None:
            try:
                check(adapter)
            except LookupError as exc:
                _fail(str(exc))

    store = None
    embedder = None
    if not no_context:
        from .store import Store, StoreError

        try:
            store = Store.open(_db(ctx, db))
        except StoreError as exc:
            _fail(str(exc))
        embedder = plugins.get_embedder()

    streamed = False

    def show(piece: str) -> None:
        nonlocal streamed
        streamed = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        result = generation.answer_question(
            question,
            generator=generator,
            store=store,
            embedder=embedder,
            k=k,
            max_tokens=max_tokens,
            temperature=temperature,
            adapter=adapter,
            system=system,
            use_context=not no_context,
            on_token=None if as_json else show,
        )
    except (ValueError, LookupError, RuntimeError, OSError) as exc:
        if streamed:
            sys.stdout.write("\n")
        _fail(str(exc))
    finally:
        if store is not None:
            store.close()

    if as_json:
        payload = {
            "answer": result.answer,
            "sources": [
                {**s.__dict__, "uri": doc_uri(s.path), "cited": s.number in result.cited}
                for s in result.sources
            ],
            "cited": result.cited,
            "invalid_citations": result.invalid_citations,
            "dropped": [d.__dict__ for d in result.dropped],
            "warnings": result.warnings,
            "model": result.model,
            "adapter": result.adapter,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "finish_reason": result.finish_reason,
            "seconds": round(result.seconds, 3),
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    sys.stdout.write("\n")
    if result.sources:
        sys.stdout.write("\nSources (* = cited):\n")
        cited = set(result.cited)
        for src in result.sources:
            mark = "*" if src.number in cited else " "
            where = f" ({src.location})" if src.location else ""
            sys.stdout.write(f"{mark}[{src.number}] {src.path}{where}\n")
    for warning in result.warnings:
        err.print(f"[yellow]note:[/yellow] {escape(warning)}")


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``mcp-config`` and ``ask`` to the main CLI."""
    app.command("serve")(serve)
    app.command("mcp-config")(mcp_config)
    app.command("ask")(ask)
