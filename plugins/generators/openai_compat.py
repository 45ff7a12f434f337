"""A generator that talks to any OpenAI-compatible ``/v1/chat/completions`` endpoint.

For users whose model lives on a bigger machine: llama.cpp's ``llama-server``, Ollama, vLLM and
most hosted APIs speak this protocol. Answers stream as server-sent events.

Settings (see ``lorekeeper config show``): ``openai_base_url`` (e.g. ``http://127.0.0.1:8080/v1``,
required), ``openai_model`` (the model name the server expects), ``openai_api_key`` (sent as a
bearer token when set), ``openai_context`` (the model's context window in tokens) and
``openai_timeout`` (seconds to wait for the server).

There is no tokenizer on this side of the wire, so token counts are estimates that err on the
high side (a token per three characters), which keeps grounded prompts inside the window.

LoRA adapters per request (``openai_adapters``), the two ways servers take them:

- ``llama-server``: llama.cpp's server loads adapter GGUFs at start (``--lora FILE``, repeatable,
  ``--lora-init-without-apply`` to keep them off) and lists them at ``GET /lora-adapters`` as
  ``{id, path, scale}``; a request picks scales with ``"lora": [{"id": 0, "scale": 1.0}, ...]``.
  A registered adapter is the server's adapter whose file is the registered GGUF, or is named
  ``NAME.gguf`` / ``NAME.lora.gguf`` (the export's own file). Every request sends every adapter's
  scale (the chosen one's, the others 0), so the server's global scales never leak into an answer.
- ``model-name``: vLLM (``--enable-lora --lora-modules NAME=PEFT_DIR``) and llama-cpp-python's
  server (a config file with one model entry per adapter) serve an adapter as a model of its own
  name; the request's ``model`` is the adapter's name. It must be listed at ``GET /v1/models``
  first: llama-cpp-python's server answers an unknown model name with its first model, silently.

The adapter must also be registered here (``lorekeeper adapters list``): its record supplies the
system prompt and sampling it was trained with. ``lorekeeper adapters serve-config NAME`` prints
the server commands that match.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lorekeeper.server.adapters import AdapterError, AdapterRegistry, UnknownAdapterError
from lorekeeper.server.settings import OPENAI_ADAPTER_MODES as ADAPTER_MODES
from lorekeeper.server.settings import Settings

from ..base import ChatMessage, Generator
from ..hookspecs import hookimpl

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 8192
DEFAULT_TIMEOUT = 120.0
CHARS_PER_TOKEN = 3.0  # deliberately pessimistic: most tokenizers average ~4 characters of English
MESSAGE_OVERHEAD = 6  # role markers and separators a chat template adds per message


class EndpointError(RuntimeError):
    """The OpenAI-compatible server could not be reached or answered with an error."""


def served_adapter_name(path: str) -> str:
    """The adapter name a llama-server adapter file stands for: ``notes`` for ``notes.gguf``, for the
    export's ``notes.lora.gguf`` and for the registered ``notes.1a2b3c4d.gguf``."""
    stem = re.sub(r"\.gguf$", "", Path(str(path).replace("\\", "/")).name, flags=re.IGNORECASE)
    stem = re.sub(r"\.[0-9a-f]{8}$", "", stem)
    return re.sub(r"\.lora$", "", stem)


def lora_field(server_adapters: Sequence[dict[str, Any]], chosen: int | None, scale: float) -> list[dict]:
    """llama-server's per-request ``lora`` list: every loaded adapter's scale, ``scale`` for the
    ``chosen`` id and 0 for the others (all 0 for the base model alone)."""
    return [
        {"id": int(a["id"]), "scale": float(scale) if a["id"] == chosen else 0.0} for a in server_adapters
    ]


class OpenAICompatGenerator(Generator):
    name = "openai"
    supports_adapters = False

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        context_window: int | None = None,
        timeout: float | None = None,
        adapters_mode: str = "none",
        adapters: AdapterRegistry | None = None,
    ) -> None:
        if adapters_mode not in ADAPTER_MODES:
            raise ValueError(f"openai_adapters={adapters_mode!r}: use one of {', '.join(ADAPTER_MODES)}")
        self._base_url = base_url
        self.model = model or "default"
        self._api_key = api_key
        self._context_window = context_window or DEFAULT_CONTEXT
        self._timeout = timeout or DEFAULT_TIMEOUT
        self.adapters_mode = adapters_mode
        self.supports_adapters = adapters_mode != "none"
        # llama-server scales each adapter per request; a server that serves adapters as models cannot
        self.sampling_options = ("adapter_scale",) if adapters_mode == "llama-server" else ()
        if adapters is None and self.supports_adapters:
            adapters = AdapterRegistry(Settings.load().adapters_dir)
        self._adapters = adapters
        self.model_id = f"openai:{self.model}"
        self.cache_key = (base_url, self.model, api_key, self._context_window, self._timeout, adapters_mode,
                          str(adapters.directory) if adapters else None)  # fmt: skip

    @classmethod
    def from_settings(cls, settings) -> OpenAICompatGenerator:
        return cls(
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            api_key=settings.openai_api_key,
            context_window=settings.openai_context,
            timeout=settings.openai_timeout,
            adapters_mode=settings.openai_adapters,
            adapters=AdapterRegistry(settings.adapters_dir) if settings.openai_adapters != "none" else None,
        )

    @property
    def base_url(self) -> str:
        if not self._base_url:
            raise EndpointError(
                "no endpoint configured for the openai generator: set it with "
                "`lorekeeper config set openai_base_url http://127.0.0.1:8080/v1` "
                "(or LOREKEEPER_OPENAI_BASE_URL)"
            )
        return self._base_url.rstrip("/")

    @property
    def server_root(self) -> str:
        """The server's own address: llama-server's ``/lora-adapters`` sits beside ``/v1``, not in it."""
        return re.sub(r"/v1$", "", self.base_url)

    @property
    def context_window(self) -> int:
        return self._context_window

    def _timeout_seconds(self) -> float:
        return self._timeout

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0

    def count_message_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(self.count_tokens(m.content) + MESSAGE_OVERHEAD for m in messages) + 3

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    # ------------------------------------------------------------------ adapters on the server

    def _get_json(self, url: str) -> Any:
        import httpx

        try:
            response = httpx.get(url, headers=self._headers() | {"Accept": "application/json"},
                                 timeout=min(self._timeout, 30.0))  # fmt: skip
        except httpx.HTTPError as exc:
            raise EndpointError(
                f"could not talk to {url}: {exc}. Is the server running, and is openai_base_url right?"
            ) from exc
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise EndpointError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            return response.json()
        except ValueError as exc:
            raise EndpointError(f"{url} did not answer JSON: {response.text[:200]!r}") from exc

    def _llama_server_adapters(self) -> list[dict[str, Any]]:
        url = f"{self.server_root}/lora-adapters"
        found = self._get_json(url)
        if found is None or not isinstance(found, list):
            raise AdapterError(
                f"{url} does not list LoRA adapters, so {self.server_root} is not llama.cpp's llama-server: "
                "for vLLM or llama-cpp-python's server set `lorekeeper config set openai_adapters model-name`"
            )
        return [a for a in found if isinstance(a, dict) and isinstance(a.get("id"), int)]

    def _served_models(self) -> list[str]:
        found = self._get_json(f"{self.base_url}/models") or {}
        return [m.get("id") for m in found.get("data") or [] if isinstance(m, dict) and m.get("id")]

    def _remote_target(self, name: str) -> tuple[list[dict[str, Any]], int | None]:
        """Where adapter ``name`` is on the server: (llama-server's adapter list, its id), or
        ([], None) for a server that serves it as model ``name``. Raises ``UnknownAdapterError``
        saying how to serve it when the server does not have it."""
        registered = self.check_registered(name)
        if self.adapters_mode == "model-name":
            models = self._served_models()
            if name in models:
                return [], None
            listing = ", ".join(models) or "none"
            raise UnknownAdapterError(
                f"adapter {name!r} is not served by {self.base_url} (its models: {listing}): serve it as a "
                f"model named {name!r} (vLLM: --lora-modules {name}=RUN/adapter); `lorekeeper adapters "
                f"serve-config {name}` prints the commands"
            )
        server_adapters = self._llama_server_adapters()
        for entry in server_adapters:
            path = str(entry.get("path", ""))
            if served_adapter_name(path) == name or _same_file(path, registered):
                return server_adapters, entry["id"]
        listing = ", ".join(f"{a['id']}: {a.get('path')}" for a in server_adapters) or "none"
        raise UnknownAdapterError(
            f"adapter {name!r} is not loaded by the llama-server at {self.server_root} (its adapters: "
            f"{listing}): restart it with --lora {registered} --lora-init-without-apply; `lorekeeper "
            f"adapters serve-config {name}` prints the command"
        )

    def check_registered(self, name: str) -> Path:
        """The registered adapter's GGUF; ``UnknownAdapterError`` listing the known ones if none."""
        if not self.supports_adapters or self._adapters is None:
            raise ValueError(
                f"the openai generator cannot apply adapter {name!r}: tell it how the server takes "
                "adapters with `lorekeeper config set openai_adapters llama-server` (or model-name), or "
                "use the llamacpp generator"
            )
        return self._adapters.gguf_path(name)

    def check_adapter(self, name: str) -> Path:
        """The registered adapter's GGUF, once the server is seen to serve it."""
        try:
            self._remote_target(name)
        except EndpointError as exc:
            raise AdapterError(f"cannot check adapter {name!r} on the server: {exc}") from exc
        return self.check_registered(name)

    # ------------------------------------------------------------------ generation

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = 256,
        temperature: float = 0.2,
        adapter: str | None = None,
        stop: Sequence[str] | None = None,
        adapter_scale: float = 1.0,
    ) -> Iterator[str]:
        import httpx

        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
        }
        if adapter is not None and not self.supports_adapters:
            self.check_registered(adapter)  # raises, saying which setting to change
        if self.adapters_mode == "llama-server":
            server_adapters, chosen = (
                self._remote_target(adapter) if adapter else (self._llama_server_adapters(), None)
            )
            body["lora"] = lora_field(server_adapters, chosen, adapter_scale)
        elif adapter is not None:
            self._remote_target(adapter)
            body["model"] = adapter
        if stop:
            # OpenAI's own API takes at most 4; lorekeeper also cuts the text at any of them itself
            body["stop"] = list(stop)[:4]
        url = f"{self.base_url}/chat/completions"
        try:
            with httpx.Client(timeout=self._timeout_seconds()) as client:
                with client.stream("POST", url, json=body, headers=self._headers()) as response:
                    if response.status_code >= 400:
                        detail = response.read().decode("utf-8", "replace")[:500]
                        raise EndpointError(f"{url} answered HTTP {response.status_code}: {detail}")
                    yield from _sse_pieces(response.iter_lines(), url)
        except httpx.HTTPError as exc:
            raise EndpointError(
                f"could not talk to {url}: {exc}. Is the server running, and is openai_base_url right?"
            ) from exc


def _same_file(server_path: str, registered: Path) -> bool:
    """Whether the server's adapter path is the registered file (a server on this machine)."""
    try:
        return Path(server_path).expanduser().resolve() == registered.resolve()
    except (OSError, ValueError):
        return False


def _sse_pieces(lines: Iterator[str], url: str) -> Iterator[str]:
    """Yield the text deltas from an OpenAI chat-completions event stream."""
    for line in lines:
        line = line.strip()
        if not line or line.startswith(":") or not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise EndpointError(f"{url} sent an event that is not JSON: {data[:200]!r}") from exc
        if "error" in event:
            raise EndpointError(f"{url} reported an error: {event['error']}")
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                yield text


@hookimpl
def register_generators(register, settings) -> None:
    register(OpenAICompatGenerator.from_settings(settings))
