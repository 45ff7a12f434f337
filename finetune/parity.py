"""Is the exported GGUF the model that was trained? Compare logits position by position.

The same token ids go through the transformers model (adapter applied) and through llama.cpp
(base GGUF + exported adapter, or the merged GGUF). Agreement of the arg-max token and the mean
KL divergence between the two next-token distributions say whether the export is faithful; any
layout mistake (un-permuted Q/K, wrong scale, missing tensor) shows up as a collapse of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ParityReport:
    positions: int
    top1_agreement: float  # fraction of positions whose arg-max token is the same
    mean_kl: float  # mean KL(reference || candidate) in nats
    max_kl: float
    max_abs_logit_diff: float

    def __str__(self) -> str:
        return (
            f"{self.positions} positions: top-1 agreement {self.top1_agreement:.2%}, "
            f"mean KL {self.mean_kl:.2e}, max KL {self.max_kl:.2e}, max |dlogit| {self.max_abs_logit_diff:.3g}"
        )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> ParityReport:
    """Compare two (positions, vocab) logit matrices; extra padded vocab columns are ignored."""
    vocab = min(reference.shape[-1], candidate.shape[-1])
    ref = np.asarray(reference[:, :vocab], dtype=np.float64)
    cand = np.asarray(candidate[:, :vocab], dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {candidate.shape}")
    log_p = log_softmax(ref)
    log_q = log_softmax(cand)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return ParityReport(
        positions=int(ref.shape[0]),
        top1_agreement=float((ref.argmax(-1) == cand.argmax(-1)).mean()),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        max_abs_logit_diff=float(np.abs(ref - cand).max()),
    )


def transformers_logits(model: Any, ids: Sequence[int]) -> np.ndarray:
    """(positions, vocab) float32 logits of a transformers (or peft) causal LM for one sequence."""
    import torch

    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([list(ids)], device=device))
    return out.logits[0].float().cpu().numpy()


def llama_cpp_logits(
    model_path: Path | str,
    ids: Sequence[int],
    lora_path: Path | str | None = None,
    threads: int | None = None,
    f32_kv_cache: bool = True,
) -> np.ndarray:
    """(positions, vocab) float32 logits from llama.cpp, all positions evaluated in one batch.

    The KV cache is F32 by default here (llama.cpp's default is F16): the comparison is about the
    exported weights, and an F16 cache adds rounding that no export choice can remove.
    """
    import llama_cpp
    from llama_cpp import Llama

    kv_type = llama_cpp.GGML_TYPE_F32 if f32_kv_cache else None

    n = len(ids)
    llm = Llama(
        model_path=str(model_path),
        lora_path=str(lora_path) if lora_path else None,
        n_ctx=max(n, 64),
        n_batch=max(n, 64),
        n_ubatch=max(n, 64),
        logits_all=True,
        n_threads=threads,
        type_k=kv_type,
        type_v=kv_type,
        verbose=False,
    )
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()


def gguf_tokenize(model_path: Path | str, text: str) -> list[int]:
    """Token ids llama.cpp produces for ``text`` the way it tokenizes a prompt (BOS per the GGUF)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
    finally:
        llm.close()
