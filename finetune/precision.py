"""Train on the base you deploy: full-precision LoRA for bases that fit, QLoRA (NF4) above a size.

llama.cpp runs the GGUF's own weights. transformers dequantizes the same GGUF to fp32, so LoRA on
those weights trains the very model that is deployed; QLoRA re-quantizes them to NF4, a third set of
weights that neither the GGUF nor its dequantized copy holds. Measured on the embedded SmolLM2-135M
(Q4_1), 2 shared CPU cores (tests/test_finetune_deployed.py, scripts/bench_facts.py; README
"Fine-tuning recipes"):

* full precision: the trained model and the exported adapter on an F16 copy of the same weights agree
  on the top-1 token at 100% of 300 positions (mean KL 3e-6); on the shipped Q4_1 file at 97.3% (KL
  2.5e-3), the gap llama.cpp's 4-bit x 8-bit arithmetic gives the base alone (98.7%, KL 2.6e-3);
* NF4: 90.9% top-1 agreement with the deployed model (KL 0.11) after 50 steps of the facts preset
  (issue 11 measured 76%, KL 0.25, on its data); the NF4 base alone is 0.28 nats worse than the GGUF's
  own weights on held-out answers, and recalled 29% / 5% of trained / paraphrased facts where full
  precision recalled 43% / 29% at the same step;
* speed and memory on the CPU favour full precision too: 16.4 against 11.9 real tokens/s (both runs
  side by side under the same load; bitsandbytes dequantizes 4-bit weights on every matmul), peak
  RSS 1.76 against 1.90 GB (torch and transformers dominate at this size).

So memory is the only reason for NF4, and only for big bases: the frozen base costs ~4 bytes a
parameter in fp32 against ~0.6 in NF4. ``FULL_PRECISION_MAX_PARAMS`` is where fp32 base weights reach
8 GB (2e9 parameters; bf16 on a GPU halves it), the most a 16 GB machine can give the frozen base and
still hold activations, optimizer state and the OS; above it QLoRA stays the default, and
``base_precision`` picks either by hand.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .base_model import GGUF, BaseRef, safetensors_headers

FULL_PRECISION_MAX_PARAMS = 2_000_000_000


@dataclass(frozen=True)
class PrecisionChoice:
    """How the base is held in training, and the sentence saying why (printed and logged)."""

    quantize_4bit: bool
    reason: str

    @property
    def label(self) -> str:
        return "4-bit NF4 (QLoRA)" if self.quantize_4bit else "full precision (the deployed weights)"


def choose_base_precision(
    requested: str, n_params: int | None, *, quantize_4bit: bool | None = None
) -> PrecisionChoice:
    """Decide NF4 or full precision from what was asked and the base's parameter count.

    ``requested`` is ``base_precision`` (auto, full, nf4); ``quantize_4bit`` is a value saved by an
    earlier run or set by the old switch, which ``auto`` keeps so a resumed run loads as it trained.
    An unknown size (``n_params`` None) under ``auto`` trains in full precision.
    """
    if requested == "full":
        return PrecisionChoice(False, "asked for full precision (--base-precision full)")
    if requested == "nf4":
        return PrecisionChoice(True, "asked for QLoRA (--base-precision nf4)")
    if quantize_4bit is not None:
        how = "NF4" if quantize_4bit else "full precision"
        return PrecisionChoice(
            quantize_4bit, f"the run's saved setting (quantize_4bit={quantize_4bit}): {how}"
        )
    limit = f"{FULL_PRECISION_MAX_PARAMS / 1e9:g}B"
    if n_params is None:
        return PrecisionChoice(False, "auto: the base's size is unknown, so the deployed weights as they are")
    size = f"{n_params / 1e6:,.0f}M parameters"
    if n_params <= FULL_PRECISION_MAX_PARAMS:
        return PrecisionChoice(
            False, f"auto: {size} <= {limit}, so LoRA on the deployed (dequantized) weights"
        )
    return PrecisionChoice(True, f"auto: {size} > {limit}, so QLoRA (NF4) to fit in memory")


def base_parameter_count(ref: BaseRef) -> int | None:
    """Parameters of a base, read from file headers without loading weights (None if unreadable)."""
    try:
        if ref.kind == GGUF:
            return _gguf_parameter_count(Path(ref.path) / str(ref.gguf_file))
        return _safetensors_parameter_count(Path(ref.path))
    except (OSError, ValueError, KeyError, struct.error):
        return None


def _gguf_parameter_count(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path), "r").tensors)


def _safetensors_parameter_count(folder: Path) -> int | None:
    headers = safetensors_headers(folder)
    if not headers:
        return None
    total = 0
    for header in headers:
        for info in header.values():
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            total += count
    return total
