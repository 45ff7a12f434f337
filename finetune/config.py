"""Every training setting and its default, in one place.

``TrainConfig`` is what a run directory's ``config.json`` holds; the CLI options are built from the
same fields, so a default changed here changes everywhere. Fields carry their help text in
``metadata["help"]`` and ``__post_init__`` rejects bad combinations before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

OVERLONG_CHOICES = ("truncate", "error")
SCHEDULER_CHOICES = ("cosine", "linear", "constant", "constant_with_warmup")
OPTIMIZER_CHOICES = ("auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "sgd")
PRECISION_CHOICES = ("auto", "bf16", "fp16", "fp32")
BASE_PRECISION_CHOICES = ("auto", "full", "nf4")
GOAL_CHOICES = ("facts", "style", "domain")


class ConfigError(ValueError):
    """A training setting is out of range; the message names the setting and the allowed values."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """Settings of one fine-tuning run (data, LoRA, optimisation, bookkeeping)."""

    # --- what to train on -------------------------------------------------------------------
    base: str | None = _f(
        None, "Base model: a .gguf file or a Hugging Face model directory (default: embedded SmolLM2)."
    )
    data: list[str] = _f(
        [],
        "JSONL files (chat 'messages' or 'conversations', Alpaca 'instruction'/'output', "
        "'question'/'answer', 'prompt'/'completion' or 'text' rows), .txt/.md files, or folders of them.",
    )
    from_index: bool = _f(False, "Also train on the chunks of the lorekeeper index (continued pretraining).")
    index_path_glob: str | None = _f(None, "With from_index: only chunks of files matching this glob.")
    index_qa_pairs: int = _f(
        0, "With from_index: draft this many question/answer pairs from chunks with the generator."
    )
    # --- how records become tokens ----------------------------------------------------------
    max_seq_len: int = _f(512, "Tokens per training sequence (the context used while training).")
    overlong: str = _f(
        "truncate", "A record longer than max_seq_len: 'truncate' (counted, warned) or 'error'."
    )
    chat_template: str | None = _f(
        None,
        "Render chat records with this chat template instead of the base model's own: a Jinja file, or "
        "'chatml'. The adapter's record keeps it, so answers are rendered the same way.",
    )
    packing: bool = _f(True, "Pack several records into each sequence (no padding wasted).")
    train_on_prompt: bool = _f(False, "Compute the loss on prompt/user tokens too (default: answers only).")
    eval_fraction: float = _f(0.1, "Share of records held out for evaluation and early stopping.")
    eval_max_records: int = _f(200, "At most this many held-out records.")
    eval_data: list[str] = _f(
        [], "Held-out records from these files or folders instead of a random share of the training data."
    )
    seed: int = _f(42, "Seed of the held-out split, shuffling and LoRA initialisation.")
    # --- LoRA ------------------------------------------------------------------------------
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA alpha (the adapter is scaled by alpha/r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = _f(
        [], "Module names to adapt (e.g. q_proj v_proj); empty = every attention and MLP projection."
    )
    use_rslora: bool = _f(
        False, "rsLoRA: scale the adapter by alpha/sqrt(r) instead of alpha/r (steadier at high ranks)."
    )
    use_dora: bool = _f(
        False,
        "DoRA: learn a magnitude per output row besides the LoRA matrices. llama.cpp cannot apply it, so "
        "a DoRA run cannot be exported to GGUF (`finetune eval` measures it in transformers).",
    )
    base_precision: str = _f(
        "auto",
        "How the base is held in training: 'full' = the dequantized GGUF weights as they are (fp32 on "
        "the CPU), exactly what llama.cpp runs; 'nf4' = QLoRA, re-quantized to 4-bit NF4 (less memory, "
        "but a different model from the one deployed); 'auto' = full up to "
        "finetune.precision.FULL_PRECISION_MAX_PARAMS parameters, nf4 above.",
    )
    quantize_4bit: bool | None = _f(
        None,
        "Whether the base was trained as NF4: written by training (base_precision resolved), read by "
        "eval and resume. Set by hand it is the old --4bit/--no-4bit switch.",
    )
    goal: str | None = _f(
        None,
        "A preset for what the adapter must learn (facts, style, domain): sets epochs, learning rate, "
        "rank/alpha, targets, loss and held-out behaviour; options given explicitly win.",
    )
    # --- optimisation -----------------------------------------------------------------------
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Stop after this many optimiser steps (-1: run the epochs).")
    batch_size: int = _f(4, "Sequences per forward pass.")
    grad_accum: int = _f(1, "Forward passes per optimiser step.")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    lr_scheduler: str = _f("cosine", f"Learning-rate schedule: {', '.join(SCHEDULER_CHOICES)}.")
    warmup_ratio: float = _f(0.03, "Share of steps spent warming the learning rate up.")
    weight_decay: float = _f(0.0, "Weight decay of the optimiser.")
    neftune_alpha: float = _f(
        0.0,
        "NEFTune: add uniform noise of this scale to the input embeddings while training (0: off; 5 is typical).",
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: off).")
    optimizer: str = _f(
        "auto", "Optimiser: auto = paged_adamw_8bit on CUDA with 4-bit, adamw_torch otherwise."
    )
    precision: str = _f("auto", "auto = bf16 where the GPU has it, fp16 on other GPUs, fp32 on the CPU.")
    gradient_checkpointing: bool = _f(
        True, "Recompute activations in the backward pass (less memory, ~30% slower)."
    )
    loss_chunk_tokens: int = _f(
        1024,
        "Compute the output layer and loss on labelled tokens only, this many at a time (no full "
        "logits kept: less memory); 0 = the model's own loss over every position.",
    )
    # --- bookkeeping ------------------------------------------------------------------------
    eval_steps: int = _f(50, "Evaluate on the held-out split every this many steps.")
    save_steps: int = _f(50, "Write a checkpoint every this many steps.")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints.")
    logging_steps: int = _f(1, "Write a metrics line every this many steps.")
    early_stopping_patience: int = _f(
        3, "Stop after this many evaluations without a better held-out loss (0: off)."
    )
    early_stopping_threshold: float = _f(0.0, "Smallest held-out loss improvement that counts.")

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        if self.max_seq_len < 16:
            raise bad("max_seq_len", "must be at least 16 tokens")
        if self.overlong not in OVERLONG_CHOICES:
            raise bad("overlong", f"choose one of {', '.join(OVERLONG_CHOICES)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise bad("eval_fraction", "must be in [0, 1)")
        if self.lora_r < 1:
            raise bad("lora_r", "must be a positive rank")
        if self.lora_alpha <= 0:
            raise bad("lora_alpha", "must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "must be in [0, 1)")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be at least 1")
        if self.loss_chunk_tokens < 0:
            raise bad("loss_chunk_tokens", "must be 0 (the model's own loss) or a positive number of tokens")
        if self.neftune_alpha < 0:
            raise bad("neftune_alpha", "must be 0 (off) or positive (5 is typical)")
        if self.learning_rate <= 0:
            raise bad("learning_rate", "must be positive")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise bad("warmup_ratio", "must be in [0, 1): it is a share of all steps")
        if self.lr_scheduler not in SCHEDULER_CHOICES:
            raise bad("lr_scheduler", f"choose one of {', '.join(SCHEDULER_CHOICES)}")
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise bad("optimizer", f"choose one of {', '.join(OPTIMIZER_CHOICES)}")
        if self.base_precision not in BASE_PRECISION_CHOICES:
            raise bad("base_precision", f"choose one of {', '.join(BASE_PRECISION_CHOICES)}")
        if self.goal is not None and self.goal not in GOAL_CHOICES:
            raise bad("goal", f"choose one of {', '.join(GOAL_CHOICES)}")
        if self.precision not in PRECISION_CHOICES:
            raise bad("precision", f"choose one of {', '.join(PRECISION_CHOICES)}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise ConfigError("give max_steps > 0 or epochs > 0: there is nothing to train otherwise")
        if self.index_qa_pairs < 0:
            raise bad("index_qa_pairs", "must be 0 or more")
        if self.index_qa_pairs and not self.from_index:
            raise ConfigError("index_qa_pairs needs from_index: the pairs are drafted from index chunks")
        for name in ("eval_steps", "save_steps", "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.early_stopping_patience < 0:
            raise bad("early_stopping_patience", "must be 0 (off) or more")
        if not self.data and not self.from_index:
            raise ConfigError("no training data: give --data FILE/FOLDER (repeatable) or --from-index")
        # absolute, so `--resume` (which reads config.json) works from any working directory
        self.data = [str(Path(p).expanduser().resolve()) for p in self.data]
        self.eval_data = [str(Path(p).expanduser().resolve()) for p in self.eval_data or []]
        from .prompt import NAMED as NAMED_TEMPLATES  # the templates --chat-template knows by name

        if self.chat_template and self.chat_template not in NAMED_TEMPLATES:
            template = Path(self.chat_template).expanduser().resolve()
            if not template.is_file():
                raise bad(
                    "chat_template",
                    f"no such file; give a Jinja template file or one of: {', '.join(NAMED_TEMPLATES)}",
                )
            self.chat_template = str(template)
        self.target_modules = list(self.target_modules)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        """A saved config; one written before base_precision existed trained as its quantize_4bit said."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def field_help(name: str) -> str:
    """The help text of one field, for CLI options."""
    for f in fields(TrainConfig):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def field_default(name: str) -> Any:
    for f in fields(TrainConfig):
        if f.name == name:
            return f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
    raise KeyError(name)
