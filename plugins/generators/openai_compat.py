"""A generator that talks to any OpenAI-compatible ``/v1/chat/completions`` endpoint.

For users whose model lives on a bigger machine: llama.cpp's ``llama-server``, Ollama, vLLM and
most hosted APIs speak this protocol. Answers stream as server-sent events.

Settings (see ``lorekeeper config show``): ``openai_base_url`` (e.g. ``http://127.0.0.1:8080/v1``,
required), ``openai_model`` (the model name the server expects), ``openai_api_key`` (sent as a
bearer token when set), ``openai_context`` (the model's context window in tokens) and
``openai_timeout`` (seconds to wait for the server).

There is no tokenizer on this side of the wire, so token counts are estimates that err on the
high side (a token per three characters), which keeps grounded prompts inside the window.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

from ..base import ChatMessage, Generator
from ..hookspecs import hookimpl

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 8192
DEFAULT_TIMEOUT = 120.0
CHARS_PER_TOKEN = 3.0  # deliberately pessimistic: most tokenizers average ~4 characters of English
MESSAGE_OVERHEAD = 6  # role markers and separators a chat template adds per message


class EndpointError(RuntimeError):
    """The OpenAI-compatible server could not be reached or answered with an error."""


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
    ) -> None:
        self._base_url = base_url
        self.model = model or "default"
        self._api_key = api_key
        self._context_window = context_window or DEFAULT_CONTEXT
        self._timeout = timeout or DEFAULT_TIMEOUT
        self.model_id = f"openai:{self.model}"
        self.cache_key = (base_url, self.model, api_key, self._context_window, self._timeout)

    @classmethod
    def from_settings(cls, settings) -> OpenAICompatGenerator:
        return cls(
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            api_key=settings.openai_api_key,
            context_window=settings.openai_context,
            timeout=settings.openai_timeout,
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

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = 256,
        temperature: float = 0.2,
        adapter: str | None = None,
        stop: Sequence[str] | None = None,
    ) -> Iterator[str]:
        import httpx

        if adapter is not None:
            raise ValueError(
                f"adapter {adapter!r} cannot be applied by the openai generator: LoRA adapters are "
                "switched by the llamacpp generator; on a remote server, serve the adapter as a model "
                "and name it in the openai_model setting"
            )
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
        }
        if stop:
            body["stop"] = list(stop)
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
