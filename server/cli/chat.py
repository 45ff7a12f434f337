"""``chat``: a plain multi-turn conversation with the local model (and an adapter) in the terminal.

Lines come from stdin (typed, or piped: ``printf 'hi\\nand?\\n' | lorekeeper chat``); each one is a
user turn answered with the whole conversation so far. No retrieval unless ``--rag``: then each
turn is answered from the documents as ``ask`` does, with the earlier turns before it. An adapter
answers with the system prompt and sampling its record carries (see ``generation.adapter_turns``),
unless ``--system`` / ``--temperature`` say otherwise. ``/reset`` forgets the conversation; ``/exit``
or end of input ends it. When the conversation outgrows the context window, its oldest turns are
left out (said once on stderr).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import typer
from rich.markup import escape

from ..adapters import AdapterRegistry
from . import err
from .answer import (
    StreamPrinter,
    _generator,
    _index,
    _show,
    adapter_base_settings,
    check_adapter_scale,
    check_temperature,
)
from .serve import model_settings

SOURCE_ROOM = 0.5  # with --rag, the share of the window the conversation leaves for retrieved passages


def _lines(interactive: bool) -> Iterator[str]:
    """The user's lines until end of input (a prompt is shown only on a terminal)."""
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            return
        if not interactive and line == "":
            return
        yield line


def fit_history(generator, history: list, question: str, budget: int) -> tuple[list, int]:
    """The latest turns of ``history`` (whole user/assistant pairs) that fit ``budget`` tokens with
    ``question``, and how many turns were left out."""
    from lorekeeper.plugins.base import ChatMessage

    kept = list(history)
    while kept and generator.count_message_tokens([*kept, ChatMessage("user", question)]) > budget:
        kept = kept[2:]
    return kept, len(history) - len(kept)


def chat(
    ctx: typer.Context,
    adapter: str = typer.Option(None, "--adapter", help="A fine-tuned LoRA adapter (by name), on its own base model."),
    rag: bool = typer.Option(False, "--rag", help="Answer each turn from your documents, with sources."),
    system: str = typer.Option(None, "--system", help="The system prompt (default: the adapter's, else the model's)."),
    temperature: float = typer.Option(None, "--temperature", help="0 = deterministic (default: the adapter's record, else 0.2)."),
    adapter_scale: float = typer.Option(None, "--adapter-scale", help="How strongly the adapter applies (default 1.0)."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Longest answer per turn, in tokens (default 256)."),
    k: int = typer.Option(None, "-k", help="With --rag: passages retrieved per turn (default 8)."),
    db: str = typer.Option(None, "--db", help="With --rag: the index file or postgresql:// URL."),
    model: str = typer.Option(None, "--model", help="GGUF model path (llamacpp) or model name (openai)."),
    generator_name: str = typer.Option(None, "--generator", help="Generator plugin: llamacpp or openai."),
    n_ctx: int = typer.Option(None, "--n-ctx", help="llama.cpp context window in tokens (default 4096)."),
    threads: int = typer.Option(None, "--threads", help="llama.cpp CPU threads (default: its own choice)."),
) -> None:  # fmt: skip
    """Chat with the local model in the terminal (one line a turn; /reset, /exit or end of input)."""
    settings = model_settings(ctx, generator_name, model, n_ctx, threads, db=db, k=k,
                              max_tokens=max_tokens, temperature=temperature)  # fmt: skip
    check_temperature(settings)
    check_adapter_scale(adapter, adapter_scale)
    if adapter is not None:
        settings = adapter_base_settings(settings, adapter)
    generator = _generator(settings, adapter, adapter_scale)
    store, embedder = _index(settings) if rag else (None, None)
    registry = AdapterRegistry(settings.adapters_dir) if adapter else None
    options = dict(generator=generator, store=store, embedder=embedder, adapter=adapter, system=system,
                   use_context=rag, settings=settings, adapters=registry, adapter_scale=adapter_scale)  # fmt: skip
    try:
        _converse(options, sys.stdin.isatty())
    finally:
        if store is not None:
            store.close()


def _converse(options: dict, interactive: bool) -> None:
    """Answer line after line, keeping the conversation."""
    from lorekeeper.plugins.base import ChatMessage

    history: list = []
    said_trimmed = False
    generator, settings = options["generator"], options["settings"]
    budget = generator.context_window - settings.max_tokens - _system_tokens(options)
    if options["use_context"]:
        budget = int(budget * SOURCE_ROOM)
    for line in _lines(interactive):
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            continue
        kept, dropped = fit_history(generator, history, text, budget)
        if dropped and not said_trimmed:
            err.print("note: the conversation outgrew the context window; its oldest turns are left out")
            said_trimmed = True
        answer = _turn(text, kept, options)
        if answer is not None:
            history += [ChatMessage("user", text), ChatMessage("assistant", answer)]


def _system_tokens(options: dict) -> int:
    """Tokens the system turn takes (the adapter's prompt or --system, the retrieval instructions)."""
    from .. import generation

    generator, adapters = options["generator"], options["adapters"]
    record = adapters.read(options["adapter"]) if adapters is not None else None
    turns = generation.adapter_turns(record, options["system"])
    text = " ".join(t for t in (turns.persona, turns.system) if t)
    if options["use_context"]:
        text += " " + generation.GROUNDED_SYSTEM
    return generator.count_tokens(text) + 16 if text.strip() else 0


def _turn(text: str, history: list, options: dict) -> str | None:
    """One answer, streamed to stdout; None (the error said on stderr) when it failed."""
    from .. import generation
    from ..mcp.schemas import generate_result

    printer = StreamPrinter()
    try:
        answer = generation.answer_question(text, history=history, on_token=printer, **options)
    except (ValueError, LookupError, RuntimeError, OSError) as exc:
        printer.end_line()
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return None
    _show(generate_result(answer), printer.streamed, False)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return answer.answer


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
