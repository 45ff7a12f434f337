"""What differs between model architectures when weights move from transformers to GGUF.

transformers and llama.cpp lay out the same model differently: llama-style Q/K projections are
stored with their rotary halves interleaved in GGUF, Gemma's RMSNorm weights are stored with the
``+1`` folded in, tied embeddings have no ``output.weight``, and each architecture reads its own
hyper-parameter keys. Everything architecture-specific lives here so the writers stay generic and
so adding an architecture means adding one :class:`ArchSpec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np


class UnsupportedArchitecture(ValueError):
    """The model's architecture is not one the exporter knows how to lay out for llama.cpp."""


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers architecture maps onto one llama.cpp (GGUF) architecture."""

    name: str  # GGUF ``general.architecture``
    model_arch: gguf.MODEL_ARCH
    hf_model_types: tuple[str, ...]
    # llama.cpp's "normal" rope wants Q/K rows interleaved (transformers un-permutes them on load)
    permute_qk: bool = False
    # Gemma's RMSNorm multiplies by (1 + w); GGUF stores (1 + w)
    norm_offset: float = 0.0
    # Gemma always ties the output projection to the embeddings
    always_tied: bool = False


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, ("llama", "mistral"), permute_qk=True),
    ArchSpec("qwen2", gguf.MODEL_ARCH.QWEN2, ("qwen2",)),
    ArchSpec("phi3", gguf.MODEL_ARCH.PHI3, ("phi3",)),
    ArchSpec("gemma", gguf.MODEL_ARCH.GEMMA, ("gemma",), norm_offset=1.0, always_tied=True),
)


def supported_text() -> str:
    """One line naming what is supported, for error messages."""
    hf = sorted({t for spec in ARCHITECTURES for t in spec.hf_model_types})
    return (
        f"supported: transformers model types {', '.join(hf)}; "
        f"GGUF architectures {', '.join(s.name for s in ARCHITECTURES)}"
    )


def spec_for_hf_type(model_type: str, where: str = "the model") -> ArchSpec:
    """The spec for a transformers ``config.model_type``, or a clear error naming it."""
    for spec in ARCHITECTURES:
        if model_type in spec.hf_model_types:
            return spec
    raise UnsupportedArchitecture(
        f"{where} has architecture {model_type!r}, which GGUF export does not support ({supported_text()})"
    )


def spec_for_gguf_arch(arch: str, where: str = "the GGUF file") -> ArchSpec:
    """The spec for a GGUF ``general.architecture``, or a clear error naming it."""
    for spec in ARCHITECTURES:
        if spec.name == arch:
            return spec
    raise UnsupportedArchitecture(
        f"{where} has architecture {arch!r}, which GGUF export does not support ({supported_text()})"
    )


@dataclass(frozen=True)
class ModelShape:
    """The few numbers the LoRA and weight transforms need, whether the base is HF or GGUF."""

    spec: ArchSpec
    n_blocks: int
    n_head: int
    n_head_kv: int
    tied_embeddings: bool

    def tensor_name(self, hf_name: str) -> str:
        """GGUF tensor name for a transformers parameter name (``model.layers.0.mlp.up_proj.weight``)."""
        name_map = gguf.get_tensor_name_map(self.spec.model_arch, self.n_blocks)
        mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UnsupportedArchitecture(
                f"parameter {hf_name!r} has no GGUF name for architecture {self.spec.name!r}"
            )
        return mapped


def shape_from_hf_config(config: dict[str, Any]) -> ModelShape:
    spec = spec_for_hf_type(str(config.get("model_type")), "the base model's config.json")
    n_head = int(config["num_attention_heads"])
    tied = bool(config.get("tie_word_embeddings", spec.always_tied)) or spec.always_tied
    return ModelShape(
        spec=spec,
        n_blocks=int(config["num_hidden_layers"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        tied_embeddings=tied,
    )


def shape_from_gguf(reader: gguf.GGUFReader, where: str) -> ModelShape:
    arch = gguf_field(reader, "general.architecture")
    spec = spec_for_gguf_arch(str(arch), where)
    n_head = int(gguf_field(reader, f"{arch}.attention.head_count"))
    n_head_kv = gguf_field(reader, f"{arch}.attention.head_count_kv", n_head)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return ModelShape(
        spec=spec,
        n_blocks=int(gguf_field(reader, f"{arch}.block_count")),
        n_head=n_head,
        n_head_kv=int(n_head_kv),
        tied_embeddings=tied,
    )


def gguf_field(reader: gguf.GGUFReader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"the GGUF file has no {key!r} metadata; is it a complete model file?")
        return default
    return field.contents()


# --- weight transforms ---------------------------------------------------------------------------


def permute_rows_for_rope(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Interleave each head's two rotary halves, the order llama.cpp's normal rope expects.

    transformers rotates ``(x[:d/2], x[d/2:])`` pairs; GGUF's llama rope rotates ``(x[2i], x[2i+1])``
    pairs. Reordering the output rows of W_q/W_k (and of a LoRA B matrix, whose rows are the same
    outputs) makes the two agree. ``rows`` is ``(out_features, ...)``.
    """
    out = rows.shape[0]
    head_dim = out // n_head
    return rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def qk_heads(shape: ModelShape, hf_name: str) -> int | None:
    """Head count to permute with, when ``hf_name`` is a Q or K projection that needs it."""
    if not shape.spec.permute_qk:
        return None
    if ".q_proj." in hf_name:
        return shape.n_head
    if ".k_proj." in hf_name:
        return shape.n_head_kv
    return None


def hf_weight_to_gguf(shape: ModelShape, hf_name: str, value: np.ndarray) -> np.ndarray:
    """A transformers parameter in the layout and values llama.cpp expects."""
    heads = qk_heads(shape, hf_name)
    if heads is not None:
        value = permute_rows_for_rope(value, heads)
    if shape.spec.norm_offset and hf_name.endswith("norm.weight"):
        value = value + shape.spec.norm_offset
    return value


# --- hyper-parameters ----------------------------------------------------------------------------


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings across transformers versions (``rope_parameters`` in v5, ``rope_scaling`` before)."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def llama3_rope_factors(config: dict[str, Any], rope: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies for Llama 3 rope scaling (``rope_freqs.weight``)."""
    dim = head_dim(config)
    base = float(rope["rope_theta"])
    factor = float(rope["factor"])
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    divisors = []
    for i in range(0, dim, 2):
        freq = 1.0 / (base ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            divisors.append(1.0)
        elif wavelen > low_wavelen:
            divisors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)


def write_hparams(
    writer: gguf.GGUFWriter, shape: ModelShape, config: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Write the architecture's hyper-parameters; return extra tensors llama.cpp needs (rope factors)."""
    spec = shape.spec
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type") or "default"
    extra: dict[str, np.ndarray] = {}
    hd = head_dim(config)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(shape.n_blocks)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    if hd * shape.n_head != int(config["hidden_size"]) or spec.name == "gemma":
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0)
    writer.add_rope_dimension_count(int(hd * partial))

    if spec.name == "phi3":
        window = config.get("sliding_window")
        writer.add_sliding_window(int(window) if window else 0)
        orig = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        writer.add_rope_scaling_orig_ctx_len(int(orig or config.get("max_position_embeddings", 2048)))

    if rope_type in ("default", None):
        pass
    elif rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "llama3" and spec.name == "llama":
        extra["rope_freqs.weight"] = llama3_rope_factors(config, rope)
    else:
        raise UnsupportedArchitecture(
            f"rope scaling {rope_type!r} of this {spec.name} model is not supported by the GGUF exporter "
            "(supported: none, linear, llama3 for llama); export from a GGUF base instead"
        )
    return extra
