"""A peft LoRA adapter read back as plain matrices, with the scale each module really uses.

peft scales a module's update by ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA, and
per-module values from ``rank_pattern`` / ``alpha_pattern``). llama.cpp knows only one
``adapter.lora.alpha`` per file and divides it by each module's rank. Reading the adapter here,
with the effective scale per module, lets the GGUF writer reproduce peft's arithmetic exactly and
lets the merge compute ``W + scale * B @ A`` without peft or the base model in memory.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class AdapterFormatError(ValueError):
    """The adapter directory is missing, unreadable, or uses a peft feature GGUF cannot express."""


@dataclass
class LoraModule:
    """One adapted linear layer: ``delta W = scale * B @ A``; A is (r, in), B is (out, r)."""

    module: str  # transformers module path, e.g. "model.layers.0.self_attn.q_proj"
    a: np.ndarray
    b: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    def delta(self) -> np.ndarray:
        return (self.scale * (self.b.astype(np.float64) @ self.a.astype(np.float64))).astype(np.float32)


@dataclass
class LoraAdapter:
    """The whole adapter: modules plus the config values that describe it."""

    modules: dict[str, LoraModule]
    rank: int
    alpha: float
    use_rslora: bool
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def default_scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


_REFUSED = {
    "use_dora": (
        "DoRA (use_dora, `train --dora`) adds a magnitude vector that llama.cpp cannot apply, as an adapter "
        "or merged by this exporter; `finetune eval RUN --no-llama-cpp` still measures the run in "
        "transformers"
    ),
    "lora_bias": "LoRA bias terms (lora_bias) have no place in a GGUF LoRA adapter",
}


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank/alpha pattern lookup: a key matches when it is a suffix of the module path."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module) or module.endswith(key):
            return value
    return default


def _module_name(tensor_name: str) -> tuple[str, str]:
    """(module path without the peft wrapper prefix, "A" or "B") for a saved tensor name."""
    match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", tensor_name)
    if not match:
        raise AdapterFormatError(f"unexpected tensor {tensor_name!r} in the adapter")
    return match.group(1), match.group(2)


def load_adapter(adapter_dir: Path) -> LoraAdapter:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` as saved by peft."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterFormatError(
            f"{adapter_dir} is not a trained adapter: it needs adapter_config.json and "
            "adapter_model.safetensors (train the run first, or give the run's directory)"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LoRA")
    for key, why in _REFUSED.items():
        value = config.get(key)
        if value and value != "none":
            raise AdapterFormatError(f"{config_path}: {why}; train without {key} to export to GGUF")
    if config.get("modules_to_save"):
        raise AdapterFormatError(
            f"{config_path}: modules_to_save={config['modules_to_save']} are fully trained copies, not "
            "LoRA matrices; a GGUF LoRA adapter cannot carry them (export a merged model instead)"
        )

    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise AdapterFormatError(f"cannot read {weights_path}: {exc}") from exc

    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", rank))
    rslora = bool(config.get("use_rslora", False))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        if "lora_embedding" in name:
            raise AdapterFormatError(
                f"{weights_path}: tensor {name!r} adapts an embedding layer; GGUF export supports LoRA "
                "on linear layers only (leave embed_tokens out of target_modules)"
            )
        if name.endswith(".base_layer.weight"):
            # peft saves a copy of a tied layer's base weight next to its LoRA; the base model has it
            log.debug("skipping %s: a copy of a base weight, not part of the LoRA", name)
            continue
        module, which = _module_name(name)
        pairs.setdefault(module, {})[which] = value.astype(np.float32)

    modules: dict[str, LoraModule] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(f"{weights_path}: module {module!r} lacks lora_A or lora_B")
        r = int(_pattern_value(config.get("rank_pattern"), module, rank))
        a_module = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
        if pair["A"].shape[0] != r or pair["B"].shape[1] != r:
            r = int(pair["A"].shape[0])
        scale = a_module / math.sqrt(r) if rslora else a_module / r
        modules[module] = LoraModule(module=module, a=pair["A"], b=pair["B"], scale=scale)
    if not modules:
        raise AdapterFormatError(f"{weights_path} holds no LoRA matrices")
    return LoraAdapter(modules=modules, rank=rank, alpha=alpha, use_rslora=rslora, config=config)
