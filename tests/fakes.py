"""Deterministic stand-ins for the models, for tests of logic that does not depend on them.

``HashEmbedder`` maps words to vectors by hashing (texts sharing words are near each other), and
``ScriptedGenerator`` answers with a fixed text. They make the fast test loop fast; everything a
user relies on from the real models is tested with the real models in the tests marked ``slow``.
Registered as a plugin (``register_fakes``), they are picked by name like any third-party plugin.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence

import numpy as np

from lorekeeper.plugins.base import ChatMessage, Embedder, Generator
from lorekeeper.plugins.hookspecs import hookimpl


class HashEmbedder(Embedder):
    model_id = "test-hash-64"
    dimension = 64
    max_tokens = 128

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
                out[row, int.from_bytes(digest, "little") % self.dimension] += 1.0
            norm = np.linalg.norm(out[row])
            out[row] = out[row] / norm if norm else np.eye(1, self.dimension, 0, dtype=np.float32)[0]
        return out


class ScriptedGenerator(Generator):
    """Streams ``answer`` word by word (with the spaces), whatever it is asked."""

    name = "scripted"
    model_id = "scripted"

    def __init__(self, answer: str = "A scripted answer.", context_window: int = 2048) -> None:
        self.answer = answer
        self._window = context_window
        self.requests: list[list[ChatMessage]] = []

    @property
    def context_window(self) -> int:
        return self._window

    def stream(self, messages, *, max_tokens=256, temperature=0.2, adapter=None, stop=None) -> Iterator[str]:
        self.requests.append(list(messages))
        pieces = re.findall(r"\S+\s*", self.answer)
        yield from pieces[:max_tokens]


class _Plugin:
    @hookimpl
    def register_embedders(self, register) -> None:
        register(HashEmbedder())

    @hookimpl
    def register_generators(self, register) -> None:
        register(ScriptedGenerator())


def register_fakes() -> None:
    """Make the fakes selectable by name (``embedder = test-hash-64``, ``generator = scripted``)."""
    from lorekeeper import plugins

    plugins.load_plugins()
    if plugins.pm.get_plugin("lorekeeper-test-fakes") is None:
        plugins.pm.register(_Plugin(), name="lorekeeper-test-fakes")
