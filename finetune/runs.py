"""The layout of a fine-tuning run directory, shared by training, evaluation and export.

A run lives in ``<data dir>/runs/<name>`` (or wherever ``--output`` points)::

    config.json         the full TrainConfig
    base.json           the BaseRef the adapter was trained on
    data_summary.json   records, tokens, truncations, held-out size
    adapter/            peft save_pretrained of the final adapter (adapter_config.json, adapter_model.safetensors)
    tokenizer/          tokenizer.save_pretrained, chat template included
    checkpoints/        Trainer checkpoints (checkpoint-<step>/), for --resume
    metrics.jsonl       one JSON object per logged step / evaluation
    loss.png            training and held-out loss against steps
    eval.json           the last `lorekeeper finetune eval` result
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path


class RunNotFound(FileNotFoundError):
    """A run name or path does not point at a run directory."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def base(self) -> Path:
        return self.root / "base.json"

    @property
    def data_summary(self) -> Path:
        return self.root / "data_summary.json"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def export(self) -> Path:
        """Where `lorekeeper finetune export` writes the run's GGUF files by default."""
        return self.root / "export"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def eval_result(self) -> Path:
        return self.root / "eval.json"

    @property
    def heldout(self) -> Path:
        """The held-out records as JSONL (normalised), so evaluation uses exactly the same split."""
        return self.root / "heldout.jsonl"

    def latest_checkpoint(self) -> Path | None:
        found = []
        for path in self.checkpoints.glob("checkpoint-*"):
            match = re.fullmatch(r"checkpoint-(\d+)", path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return max(found)[1] if found else None

    def is_trained(self) -> bool:
        return (self.adapter / "adapter_config.json").is_file()


def default_run_name() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


def new_run_dir(name: str | None = None, output: Path | None = None) -> RunDir:
    """Where a new (or resumed) run writes: ``output`` if given, else the runs folder of the data directory."""
    if output is not None:
        return RunDir(Path(output).expanduser().resolve())
    from lorekeeper.server.settings import Settings

    return RunDir(Settings.load().runs_dir / (name or default_run_name()))


def find_run(spec: str | Path) -> RunDir:
    """A run by path, or by name in the runs folder of the data directory."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        from lorekeeper.server.settings import Settings

        path = Settings.load().runs_dir / str(spec)
    if not (path / "config.json").is_file():
        raise RunNotFound(
            f"no fine-tuning run at {str(spec)!r} (looked for config.json in {path}): "
            "give a run directory or a name listed by `lorekeeper finetune runs`"
        )
    return RunDir(path.resolve())
