"""Tiny randomly initialised models and hand-made runs for the GGUF export and parity tests.

Each architecture is built from a transformers config (hidden 64, 2 layers) with the SmolLM2
tokenizer (read from the shipped GGUF, nothing downloaded), so the vocabulary is real and the
GGUF tokenizer can be checked against the Hugging Face one. The LoRA B matrices are random (peft
initialises them to zero), so an adapter that were dropped or mis-scaled would change the logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 49152  # the SmolLM2 tokenizer's size

ARCH_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def tiny_config(arch: str):
    """A two-layer config of ``arch`` with grouped-query attention and the SmolLM2 vocabulary."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if arch == "llama":  # SmolLM2-like: tied embeddings
        return transformers.LlamaConfig(**common, head_dim=16, tie_word_embeddings=True)
    if arch == "llama3":  # Llama 3 rope scaling, untied
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return transformers.LlamaConfig(
            **common, head_dim=16, tie_word_embeddings=False, rope_parameters=rope
        )
    if arch == "mistral":
        return transformers.MistralConfig(
            **common, head_dim=16, tie_word_embeddings=False, sliding_window=None
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "phi3":
        return transformers.Phi3Config(**common, tie_word_embeddings=False, sliding_window=None)
    if arch == "gemma":
        return transformers.GemmaConfig(**common, head_dim=16)
    raise ValueError(arch)


def smollm2_tokenizer_dir(root: Path) -> Path:
    """The SmolLM2 tokenizer (from the shipped GGUF) saved as a Hugging Face tokenizer directory."""
    from transformers import AutoTokenizer

    from lorekeeper.plugins.models import default_gguf_path

    target = root / "smollm2-tokenizer"
    if not (target / "tokenizer.json").is_file():
        gguf_path = default_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tok.save_pretrained(target)
    return target


def make_hf_base(root: Path, arch: str, tokenizer_dir: Path, seed: int = 0):
    """Save a tiny random ``arch`` model (weights + tokenizer) as a Hugging Face directory."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():  # norms start at exactly 1 (or 0 for Gemma): perturb so layouts matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model_dir = root / f"tiny-{arch}"
    model.save_pretrained(model_dir)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, model_dir / item.name)
    return model_dir, model


def add_random_lora(
    model, targets: list[str], r: int = 8, alpha: float = 16.0, rslora: bool = False, seed: int = 1, **extra
):
    """Wrap ``model`` in a peft LoRA whose B matrices are random, so the adapter changes the logits."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora, **extra
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    peft_model.eval()
    return peft_model


def write_run(root: Path, name: str, peft_model, base: dict, tokenizer_dir: Path) -> Path:
    """A run directory in the trainer's layout: config.json, base.json, adapter/, tokenizer/."""
    import shutil

    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"made_by": "tests/finetune_tiny.py"}), encoding="utf-8")
    (run / "base.json").write_text(json.dumps(base), encoding="utf-8")
    peft_model.save_pretrained(run / "adapter")
    if (run / "tokenizer").exists():
        shutil.rmtree(run / "tokenizer")
    # as the trainer does: the tokenizer transformers loads for the base, saved into the run
    from transformers import AutoTokenizer

    source = base["path"] if base.get("kind") == "hf" else tokenizer_dir
    AutoTokenizer.from_pretrained(source).save_pretrained(run / "tokenizer")
    return run
