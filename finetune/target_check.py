"""LoRA target modules checked against the base's weight names before the model loads.

Loading a base takes seconds (dequantising a GGUF, more for larger models); a mistyped
``--target`` should fail at once. The weight names are read from the file headers alone: a GGUF's
tensor list (mapped back to transformers' module names with gguf's own name map) or a Hugging
Face folder's safetensors headers. When neither can be read the check is left to
``train.resolve_targets`` after loading, which looks at the loaded model itself.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# the transformers module names of the architectures export supports (llama, qwen2, phi3, gemma)
GGUF_CANDIDATES = tuple(
    f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
) + tuple(f"mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj", "gate_up_proj"))
SKIPPED = ("embed_tokens", "lm_head")  # not LoRA targets (the output head is excluded after loading too)


def _gguf_linear_names(path: Path, architecture: str | None) -> list[str] | None:
    import gguf

    from .gguf_arch import UnsupportedArchitecture, spec_for_gguf_arch

    try:
        spec = spec_for_gguf_arch(str(architecture))
        reader = gguf.GGUFReader(str(path), "r")
    except (UnsupportedArchitecture, ValueError, OSError):
        return None
    matrices = {t.name for t in reader.tensors if len(t.shape) == 2}
    blocks = {name.split(".")[1] for name in matrices if name.startswith("blk.")}
    name_map = gguf.get_tensor_name_map(spec.model_arch, max(len(blocks), 1))
    found = set()
    for module in GGUF_CANDIDATES:  # gguf's map has many aliases per tensor: ask for the usual names
        if name_map.get_name(f"model.layers.0.{module}.weight", try_suffixes=(".weight",)) is not None:
            if f"{name_map.get_name(f'model.layers.0.{module}')}.weight" in matrices:
                found.add(module.rsplit(".", 1)[-1])
    # up_proj and gate_up_proj share one GGUF name (ffn_up): fused (Phi-3) when there is no ffn_gate
    found.discard("gate_up_proj" if "gate_proj" in found else "up_proj")
    return sorted(found) or None


def _safetensors_linear_names(folder: Path) -> list[str] | None:
    from .base_model import safetensors_headers

    try:
        headers = safetensors_headers(folder)
    except (OSError, ValueError, struct.error):
        return None
    found = set()
    for header in headers:
        for name, info in header.items():
            if not name.endswith(".weight") or not isinstance(info, dict) or len(info.get("shape", ())) != 2:
                continue
            module = name.rsplit(".", 2)[-2]
            if module not in SKIPPED:
                found.add(module)
    return sorted(found) or None


def linear_names_from_files(ref: Any) -> list[str] | None:
    """Short names of the base's linear layers read from file headers (None: could not tell)."""
    try:
        if ref.kind == "gguf":
            return _gguf_linear_names(Path(ref.gguf_path), ref.architecture)
        return _safetensors_linear_names(Path(ref.path))
    except Exception as exc:  # a header this reader does not know: the check after loading decides
        log.debug("could not read the layer names of %s: %s", ref.path, exc)
        return None


def check_targets_before_loading(ref: Any, requested: list[str]) -> None:
    """A ``TargetModuleError`` for requested target modules the base's files show it does not have."""
    from .train import TargetModuleError

    if not requested:
        return
    available = linear_names_from_files(ref)
    if available is None:
        return
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise TargetModuleError(
            f"unknown LoRA target module(s): {', '.join(unknown)}. This model's linear modules are: "
            f"{', '.join(available)}"
        )
