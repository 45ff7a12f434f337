"""Tiny randomly initialised models and hand-made runs for the GGUF export and parity tests.

Each architecture is built from a transformers config (hidden 64, 2 layers) with the SmolLM2
tokenizer (read from the shipped GGUF, nothing downloaded), so the vocabulary is real and the
GGUF tokenizer can be checked against the Hugging Face one; SentencePiece tokenizers in the styles
of Llama 2 / Mistral, Phi-3 and Gemma are trained here on local text for the same check. The LoRA
B matrices are random (peft initialises them to zero), so an adapter that were dropped or
mis-scaled would change the logits.
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


def tiny_config(arch: str, vocab: int = VOCAB):
    """A two-layer config of ``arch`` with grouped-query attention (SmolLM2's vocabulary size by default)."""
    import transformers

    common = dict(
        vocab_size=vocab,
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


# SentencePiece tokenizers as Llama 2 / Mistral v0.1 (word-start marker before every text
# segment), Phi-3 (converted with legacy=False: marker at the very start only) and Gemma (no marker)
# ship them, each with a chat template in its model's style. Trained here on real text (standard
# library sources), so nothing is downloaded.
SPM_VOCAB = 1000
SPM_FLAVOURS = {
    "llama2": dict(
        dummy_prefix=True,
        legacy=True,
        add_bos=True,
        cls="LlamaTokenizer",
        extra=[],
        template=(
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
            "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
            "{% endif %}{% endfor %}"
        ),
    ),
    "phi3": dict(
        dummy_prefix=True,
        legacy=False,
        add_bos=False,
        cls="LlamaTokenizer",
        extra=["<|user|>", "<|assistant|>", "<|end|>"],
        template=(
            "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        ),
    ),
    "gemma": dict(
        dummy_prefix=False,
        legacy=False,
        add_bos=True,
        cls="GemmaTokenizer",
        extra=["<start_of_turn>", "<end_of_turn>"],
        template=(
            "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] "
            "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
            "{% endif %}"
        ),
    ),
}


def spm_tokenizer_dir(root: Path, flavour: str) -> Path:
    """A SentencePiece BPE tokenizer with byte fallback, converted by transformers as for a real
    model folder (tokenizer.json next to tokenizer.model), with ``flavour``'s chat template."""
    import glob
    import shutil
    import sysconfig

    import sentencepiece as spm
    from transformers import AutoTokenizer

    spec = SPM_FLAVOURS[flavour]
    target = root / f"spm-{flavour}"
    if (target / "tokenizer.json").is_file():
        return target
    source = root / f"spm-{flavour}-source"
    source.mkdir(parents=True, exist_ok=True)
    corpus = source / "corpus.txt"
    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:60]
    corpus.write_text(
        "\n".join(Path(f).read_text(encoding="utf-8", errors="ignore") for f in files)
        + "\nRésumé déjà vu naïve café 東京 🚀",
        encoding="utf-8",
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(source / "tokenizer"),
        vocab_size=SPM_VOCAB - len(spec["extra"]),
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=spec["dummy_prefix"],
        split_digits=True,
        character_coverage=1.0,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    config = {
        "tokenizer_class": spec["cls"],
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": spec["legacy"],
        "add_bos_token": spec["add_bos"],
    }
    (source / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if spec["extra"]:
        tokenizer.add_special_tokens({"additional_special_tokens": spec["extra"]})
    tokenizer.chat_template = spec["template"]
    tokenizer.save_pretrained(target)
    shutil.copy(source / "tokenizer.model", target / "tokenizer.model")
    saved = json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8"))
    # save_pretrained drops these; real Llama 2 / Phi-3 / Gemma folders carry them
    saved["legacy"] = spec["legacy"]
    saved["add_bos_token"] = spec["add_bos"]
    (target / "tokenizer_config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
    return target


def make_hf_base(root: Path, arch: str, tokenizer_dir: Path, seed: int = 0, vocab: int = VOCAB):
    """Save a tiny random ``arch`` model (weights + tokenizer) as a Hugging Face directory."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab), dtype=torch.float32)
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
