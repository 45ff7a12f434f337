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

    from lorekeeper.plugins.llama_open import open_llama

    kv_type = llama_cpp.GGML_TYPE_F32 if f32_kv_cache else None

    n = len(ids)
    llm = open_llama(
        model_path,
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


def gguf_tokenize(model_path: Path | str, text: str, add_bos: bool = True) -> list[int]:
    """Token ids llama.cpp produces for ``text`` the way it tokenizes a prompt (BOS per the GGUF)."""
    from lorekeeper.plugins.llama_open import open_llama

    llm = open_llama(model_path, vocab_only=True)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))
    finally:
        llm.close()


# Texts a converted tokenizer is checked on: words, digits, runs of spaces and newlines, code,
# accents and characters only byte fallback can spell. None starts with a space: SentencePiece and
# llama.cpp put a word-start marker before a leading space and Hugging Face does not, a difference
# that no GGUF setting removes and that prompts never meet (they start with the chat template).
PROBE_TEXTS = (
    "The meeting on 2024-05-17 moved to room 12B; budget: 3,450.75 EUR.",
    "def area(r):\n    return 3.14159 * r ** 2  # circle\n\n\tdone",
    "Résumé, déjà vu, naïve café – 東京 🚀 and  two  spaces.",
)
PROBE_CHATS = (
    [{"role": "user", "content": "What is 12 + 30? Answer in 2 words."}],
    [
        {"role": "user", "content": "Summarise:\n- item one\n- déjà vu 🚀"},
        {"role": "assistant", "content": "Two items."},
        {"role": "user", "content": "And the date 2024-05-17?"},
    ],
)


@dataclass(frozen=True)
class TokenizerMismatch:
    """One probe text that llama.cpp tokenizes differently from the Hugging Face tokenizer."""

    text: str
    position: int  # first differing token
    hf: list[int]
    gguf: list[int]

    def __str__(self) -> str:
        at = self.position
        return (
            f"{self.text[:60]!r}: token {at} differs (Hugging Face {self.hf[at : at + 4]}, "
            f"llama.cpp {self.gguf[at : at + 4]})"
        )


def probe_texts(tokenizer: Any) -> list[str]:
    """Plain probe texts plus, where the tokenizer has a chat template, probe chats rendered with it."""
    texts = list(PROBE_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        for chat in PROBE_CHATS:
            try:
                texts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
            except Exception:  # a template with its own rules (roles, system turns) may refuse a probe
                continue
    return texts


def tokenizer_mismatches(model_path: Path | str, tokenizer: Any) -> list[TokenizerMismatch]:
    """Tokenize the probe texts with llama.cpp (from the GGUF) and with ``tokenizer``; list the
    texts whose ids differ. Special tokens written in the text count as special on both sides,
    and BOS is added by each side's own rule, so a double BOS shows as a difference too."""
    from lorekeeper.plugins.llama_open import open_llama

    llm = open_llama(model_path, vocab_only=True)
    bos = tokenizer.bos_token
    found = []
    try:
        for text in probe_texts(tokenizer):
            starts_with_bos = bool(bos) and text.startswith(bos)
            hf_ids = list(tokenizer(text, add_special_tokens=not starts_with_bos)["input_ids"])
            gguf_ids = list(llm.tokenize(text.encode("utf-8"), add_bos=not starts_with_bos, special=True))
            if hf_ids != gguf_ids:
                at = next((i for i, (a, b) in enumerate(zip(hf_ids, gguf_ids)) if a != b), None)
                at = min(len(hf_ids), len(gguf_ids)) if at is None else at
                found.append(TokenizerMismatch(text, at, hf_ids, gguf_ids))
    finally:
        llm.close()
    return found
