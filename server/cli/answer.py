"""``ask``: a grounded answer from the local model, streamed, then its sources."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from ..adapters import AdapterError, AdapterRegistry
from ..settings import Settings
from . import err, fail, open_store
from .serve import model_settings


def adapter_base_settings(settings: Settings, adapter: str) -> Settings:
    """Run adapter ``adapter`` on the base model its record names, unless a model was chosen
    (flag, environment or config): a fine-tuned adapter answers on the model it was trained on, as
    Ollama pairs an adapter with its FROM model."""
    if settings.generator != "llamacpp" or settings.sources.get("model", "default") != "default":
        return settings
    try:
        base = AdapterRegistry(settings.adapters_dir).read(adapter).base_path
    except AdapterError:
        return settings  # the generator names the problem
    if base is None:
        return settings
    from lorekeeper.plugins.models import ModelNotFound, default_gguf_path

    try:
        if base.resolve() == default_gguf_path().resolve():
            return settings
    except ModelNotFound:
        pass
    if not base.is_file():
        err.print(f"adapter {adapter!r} was exported for {base}, which is gone; trying the default model")
        return settings
    err.print(f"using adapter {adapter!r} on its base model {base}")
    return settings.with_flags(model=str(base))


def _generator(settings: Settings, adapter: str | None, adapter_scale: float | None = None):
    """The generator the settings name, checked against ``adapter`` before any model time."""
    from lorekeeper import plugins

    try:
        generator = plugins.get_generator(None, settings)
        if adapter is not None:
            if not generator.supports_adapters:
                fail(f"the {generator.name} generator cannot apply adapters: use --generator llamacpp, or for "
                     "the openai generator say how its server takes them (`lorekeeper config set "
                     "openai_adapters llama-server` or model-name)")  # fmt: skip
            generator.check_adapter(adapter)
    except (LookupError, ValueError) as exc:
        fail(str(exc))
    if adapter_scale is not None and "adapter_scale" not in generator.sampling_options:
        fail(f"--adapter-scale: the {generator.name} generator applies adapters at their trained strength only "
             "(a server that serves an adapter as a model cannot scale it); leave it out")  # fmt: skip
    return generator


def _index(settings: Settings):
    """The index and the embedder it was built with (refusing a mix of two embedders)."""
    from ..indexer import check_search_embedder, embedder_for

    store = open_store(settings, create=False)
    try:
        embedder = embedder_for(store, settings)
        check_search_embedder(store, embedder)
    except (LookupError, ValueError) as exc:
        store.close()
        fail(str(exc))
    return store, embedder


def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question to answer from your documents."),
    adapter: str = typer.Option(
        None,
        "--adapter",
        help="A fine-tuned LoRA adapter (by name); runs on its own base model unless a model is chosen.",
    ),
    k: int = typer.Option(None, "-k", help="Passages to retrieve (1-200; default: the k setting, 8)."),
    no_context: bool = typer.Option(
        False, "--no-context", help="Ask the model alone, without your documents."
    ),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Longest answer, in tokens (default 256)."),
    temperature: float = typer.Option(
        None,
        "--temperature",
        help="0 = deterministic (default: the adapter's record, else the setting, 0.2).",
    ),
    system: str = typer.Option(
        None,
        "--system",
        help="Extra instructions for the model (with --adapter: replaces its system prompt).",
    ),
    adapter_scale: float = typer.Option(
        None, "--adapter-scale", help="How strongly the adapter applies (default 1.0; 0 = the base alone)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    db: str = typer.Option(
        None, "--db", help="Index file or postgresql:// URL (default: the one given to lorekeeper --db)."
    ),
    model: str = typer.Option(None, "--model", help="GGUF model path (llamacpp) or model name (openai)."),
    generator_name: str = typer.Option(None, "--generator", help="Generator plugin: llamacpp or openai."),
    n_ctx: int = typer.Option(None, "--n-ctx", help="llama.cpp context window in tokens (default 4096)."),
    threads: int = typer.Option(None, "--threads", help="llama.cpp CPU threads (default: its own choice)."),
) -> None:
    """Answer a question from your documents with the local model, citing its sources."""
    from ..hits import MAX_K

    settings = model_settings(ctx, generator_name, model, n_ctx, threads, db=db, k=k,
                              max_tokens=max_tokens, temperature=temperature)  # fmt: skip
    if not 1 <= settings.k <= MAX_K:
        fail(f"-k {settings.k} is out of range: use 1 to {MAX_K}")
    check_temperature(settings)
    check_adapter_scale(adapter, adapter_scale)
    if _ask_server(settings, question, adapter, no_context, system, as_json, adapter_scale):
        return
    from .. import generation
    from ..mcp.schemas import generate_result

    if adapter is not None:
        settings = adapter_base_settings(settings, adapter)
    generator = _generator(settings, adapter, adapter_scale)
    store, embedder = _index(settings) if not no_context else (None, None)

    printer = StreamPrinter()
    try:
        answer = generation.answer_question(
            question, generator=generator, store=store, embedder=embedder, adapter=adapter, system=system,
            use_context=not no_context, on_token=None if as_json else printer, settings=settings,
            adapters=AdapterRegistry(settings.adapters_dir) if adapter else None, adapter_scale=adapter_scale,
        )  # fmt: skip
    except (ValueError, LookupError, RuntimeError, OSError) as exc:
        printer.end_line()
        fail(str(exc))
    finally:
        if store is not None:
            store.close()

    _show(generate_result(answer), printer.streamed, as_json)


class StreamPrinter:
    """Writes an answer's pieces to stdout as they come (an ``on_token`` callback) and remembers
    whether any came, so an error after some text starts on a line of its own. Whitespace at the
    end is held back until more text follows: the answer's last line ends where its text does."""

    def __init__(self) -> None:
        self.streamed = False
        self._held = ""

    def __call__(self, piece: str) -> None:
        self.streamed = True
        text = self._held + piece
        shown = text.rstrip()
        self._held = text[len(shown) :]
        if shown:
            sys.stdout.write(shown)
            sys.stdout.flush()

    def end_line(self) -> None:
        if self.streamed:
            sys.stdout.write("\n")


def check_temperature(settings: Settings) -> None:
    if not 0.0 <= settings.temperature <= 2.0:
        fail(f"--temperature {settings.temperature}: use a value from 0 to 2")


def _show(result, streamed: bool, as_json: bool) -> None:
    """After the streamed tokens: the checked answer when it differs, the sources, the notes."""
    from ..citations import without_markers
    from ..render import sources_text

    if as_json:
        text = result.model_dump_json(indent=2) if hasattr(result, "model_dump_json") else result.json
        sys.stdout.write(text + "\n")
        return
    if streamed and without_markers(result.answer) != without_markers(result.generated or ""):
        # the check replaced what streamed (an unsupported answer, a stripped source list); markers it
        # only added are not worth a second copy: the sources list marks what supports the answer
        sys.stdout.write("\n\n")
        if result.fallback or result.supported is False:
            # what streamed first reads as the answer: say at once that it is not the one given
            sys.stdout.flush()
            err.print(
                "[yellow]not used:[/yellow] the text above did not pass the check against your documents "
                "(why: see the note below); the checked answer:"
            )
        sys.stdout.write(result.answer)
    sys.stdout.write("\n")
    block = sources_text(result)
    if block:
        sys.stdout.write("\n" + block + "\n")
    for warning in result.warnings:
        err.print(f"[yellow]note:[/yellow] {escape(warning)}")


MODEL_KEYS = ("generator", "model", "openai_model", "n_ctx", "threads")


def check_adapter_scale(adapter: str | None, scale: float | None) -> None:
    """``--adapter-scale`` needs ``--adapter`` and a value from 0 to 4."""
    if scale is None:
        return
    if adapter is None:
        fail("--adapter-scale needs --adapter NAME: it scales that adapter")
    if not 0.0 <= scale <= 4.0:
        fail(f"--adapter-scale {scale}: use a value from 0 (the base model alone) to 4 (1 = as trained)")


def _ask_server(settings: Settings, question: str, adapter: str | None, no_context: bool,
                system: str | None, as_json: bool, adapter_scale: float | None = None) -> bool:  # fmt: skip
    """Answer through a running ``serve --http`` (its model is loaded) unless a flag chose another
    model; True when it answered."""
    from . import remote

    if any(settings.sources.get(key) == "flag" for key in MODEL_KEYS):
        return False
    show = StreamPrinter()

    try:
        # a temperature only when given here: otherwise the adapter's record (or the settings) decide
        temperature = settings.temperature if settings.sources.get("temperature") == "flag" else None
        result = remote.ask(settings, None if as_json else show, question=question, adapter=adapter,
                            use_context=not no_context, system=system, k=settings.k,
                            max_tokens=settings.max_tokens, temperature=temperature,
                            adapter_scale=adapter_scale)  # fmt: skip
    except remote.RemoteError as exc:
        show.end_line()
        fail(str(exc))
    if result is None:
        return False
    _show(_fields(result), show.streamed, as_json)
    return True


def _fields(data: dict):
    """A ``GenerateResult`` as JSON, with attribute access for ``_show`` (pydantic and the MCP
    package stay unimported: they cost seconds of a command that only prints)."""
    import json
    from types import SimpleNamespace

    def wrap(value):
        if isinstance(value, dict):
            return SimpleNamespace(**{k: wrap(v) for k, v in value.items()})
        return [wrap(v) for v in value] if isinstance(value, list) else value

    result = wrap(data)
    result.json = json.dumps(data, indent=2, ensure_ascii=False)
    return result


def register(app: typer.Typer) -> None:
    app.command("ask")(ask)
