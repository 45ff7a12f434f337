"""Train a LoRA adapter with transformers' Trainer, writing everything into a run directory.

The Trainer does the loop (schedules, accumulation, checkpoints and exact resume); what lorekeeper
adds is around it: data summary before the first step, target-module checks that name the model's
real layers, a rich progress bar with tokens/s, metrics as JSONL, early stopping on held-out loss,
the best adapter kept as ``adapter/`` and a loss plot.

The module stays one unit (over the ~500-line guide): the callbacks, the Trainer subclass and
``train_run`` share the run directory's layout and the lazily imported transformers classes, and each
piece is small; split off the callbacks first if it grows further.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base_model import BaseRef, default_device, load_base, resolve_base
from .config import ConfigError, TrainConfig
from .data import BuiltData, PackedCollator, build_datasets, gather_records, read_records, write_records
from .plot import plot_loss
from .precision import PrecisionChoice, base_parameter_count, choose_base_precision
from .prompt import apply_chat_template, write_training_prompt
from .runs import RunDir
from .target_check import check_targets_before_loading

log = logging.getLogger(__name__)


class TargetModuleError(ValueError):
    """A LoRA target module name matches no layer; the message lists the model's linear layers."""


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    eval_loss: float | None
    first_eval_loss: float | None
    best_eval_loss: float | None
    stopped_early: bool
    seconds: float
    tokens: int

    @property
    def eval_loss_text(self) -> str:
        if self.first_eval_loss is None or self.best_eval_loss is None:
            return "n/a (no held-out records)"
        return f"{self.first_eval_loss:.4f} -> {self.best_eval_loss:.4f}"


# ------------------------------------------------------------------------------------------------
# Model preparation


def linear_module_names(model: Any) -> list[str]:
    """Short names of the model's linear layers (q_proj, gate_up_proj, ...), the output head excluded."""
    import torch

    names = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for full_name, module in model.named_modules():
        if module is output:
            continue
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        )
        if is_linear:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model: Any, requested: list[str]) -> list[str]:
    """The requested targets, checked against the model; empty = every attention and MLP projection."""
    available = linear_module_names(model)
    if not requested:
        if not available:
            raise TargetModuleError("the model has no linear layers to put LoRA adapters on")
        return available
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise TargetModuleError(
            f"unknown LoRA target module(s): {', '.join(unknown)}. This model's linear modules are: "
            f"{', '.join(available)}"
        )
    return list(requested)


def resolve_precision(config: TrainConfig, device: str) -> str:
    import torch

    if config.precision != "auto":
        if config.precision == "fp16" and not device.startswith("cuda"):
            raise ConfigError("precision=fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        return config.precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def resolve_optimizer(config: TrainConfig, device: str) -> str:
    if config.optimizer == "auto":
        four_bit = config.quantize_4bit or config.base_precision == "nf4"
        return "paged_adamw_8bit" if device.startswith("cuda") and four_bit else "adamw_torch"
    if config.optimizer.startswith("paged_") and not device.startswith("cuda"):
        raise ConfigError(f"optimizer={config.optimizer!r} is CUDA-only; use adamw_torch on the CPU")
    return config.optimizer


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def keep_4bit_layers_trainable_on_cpu(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during held-out evaluation.

    On CPUs with AVX512-BF16, the first no-grad forward in eval mode converts each Linear4bit to
    an inference-only layout for good; every later training step then runs a kernel without an
    autograd formula (wrong input gradients, and several times slower). Evaluation inside training
    must leave the weights as they are.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@contextmanager
def _quiet_checkpointing_renames() -> Iterator[None]:
    """transformers 5 renamed gradient checkpointing to activation checkpointing; peft and the
    Trainer still call the old names, whose FutureWarnings tell a user nothing they can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning
        )
        yield


def _enable_checkpointing(model: Any) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_model(model: Any, config: TrainConfig) -> tuple[Any, list[str]]:
    """Wrap the base in a LoRA adapter (peft), after readying a 4-bit base for training."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = resolve_targets(model, config.target_modules)
    model.config.use_cache = False
    keep_4bit_layers_trainable_on_cpu(model)
    if config.quantize_4bit:
        with _quiet_checkpointing_renames():
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=config.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    elif config.gradient_checkpointing:
        _enable_checkpointing(model)
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _quiet_checkpointing_renames():
        return get_peft_model(model, lora), targets


# ------------------------------------------------------------------------------------------------
# Callbacks


@dataclass
class EarlyStopper:
    """Decides, one held-out loss at a time, whether it improved and whether to stop.

    ``patience`` evaluations in a row without an improvement larger than ``threshold`` stop the
    run; 0 never stops.
    """

    patience: int
    threshold: float = 0.0
    best: float | None = None
    misses: int = 0

    def update(self, loss: float) -> tuple[bool, bool]:
        """(improved, stop) after this evaluation."""
        if self.best is None or loss < self.best - self.threshold:
            self.best, self.misses = loss, 0
            return True, False
        self.misses += 1
        return False, bool(self.patience) and self.misses >= self.patience


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def make_callbacks(
    run: RunDir, config: TrainConfig, collator: PackedCollator, console: Any, total_steps: int
):
    """Progress bar, metrics writer and early stopping, as Trainer callbacks."""
    base = _trainer_callback_base()
    return (
        _metrics_callback(base, run, collator),
        _early_stop_callback(base, run, config),
        _progress_callback(base, console, total_steps),
    )


def _metrics_callback(base: type, run: RunDir, collator: PackedCollator) -> type:
    """The callback class writing run.metrics; counts tokens/s from the training collator."""

    class Metrics(base):
        """Appends one JSON line per log event (training loss, learning rate, held-out loss, tokens/s)."""

        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.start_tokens = collator.tokens_seen
            self.last_eval: float | None = None
            self.last_loss: float | None = None

        def tokens_per_second(self) -> float:
            elapsed = time.perf_counter() - self.start
            return (collator.tokens_seen - self.start_tokens) / elapsed if elapsed > 0 else 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if key in logs and logs[key] is not None:
                    row[key] = float(logs[key])
            if "train_loss" in logs:
                row["train_loss_mean"] = float(logs["train_loss"])
            if len(row) == 2:
                return
            if "loss" in row:
                self.last_loss = row["loss"]
            if "eval_loss" in row:
                self.last_eval = row["eval_loss"]
                row["eval_perplexity"] = math.exp(min(row["eval_loss"], 50.0))
            row["tokens"] = collator.tokens_seen
            row["tokens_per_s"] = round(self.tokens_per_second(), 2)
            row["elapsed_s"] = round(time.perf_counter() - self.start, 3)
            with open(run.metrics, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")

    return Metrics


def _early_stop_callback(base: type, run: RunDir, config: TrainConfig) -> type:
    """The callback class keeping the best adapter and stopping on config's patience."""

    class EarlyStopAndKeepBest(base):
        """Keeps the adapter with the lowest held-out loss as adapter/; stops after `patience` misses."""

        def __init__(self, model_ref: list) -> None:
            self.model_ref = model_ref
            self.stopper = EarlyStopper(config.early_stopping_patience, config.early_stopping_threshold)
            self.stopped_early = False

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            improved, stop = self.stopper.update(float(loss))
            if improved and state.global_step > 0 and self.model_ref:
                save_adapter(self.model_ref[0], run, state.global_step)
            if stop:
                log.info("held-out loss has not improved for %d evaluations: stopping", self.stopper.misses)
                self.stopped_early = True
                control.should_training_stop = True

    return EarlyStopAndKeepBest


def _progress_callback(base: type, console: Any, total_steps: int) -> type:
    """The callback class drawing the rich progress bar on `console`."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class RichProgress(base):
        """A progress bar with loss, tokens/s and ETA, on stderr."""

        def __init__(self, metrics: Any) -> None:
            self.metrics = metrics
            self.progress = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("held-out {task.fields[eval]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.task = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress.start()
            self.task = self.progress.add_task(
                "train",
                total=state.max_steps or total_steps,
                completed=state.global_step,
                loss="-",
                eval="-",
                tps="-",
            )

        def on_step_end(self, args, state, control, **kwargs):
            m = self.metrics
            self.progress.update(
                self.task,
                completed=state.global_step,
                loss=f"{m.last_loss:.4f}" if m.last_loss is not None else "-",
                eval=f"{m.last_eval:.4f}" if m.last_eval is not None else "-",
                tps=f"{m.tokens_per_second():.0f}",
            )

        def on_evaluate(self, args, state, control, **kwargs):
            # the held-out loss after the last step comes after training ends: show it too
            if self.task is not None and self.metrics.last_eval is not None:
                self.progress.update(self.task, eval=f"{self.metrics.last_eval:.4f}")

        def finish(self) -> None:
            """Stop the bar (after the last held-out evaluation, so its last line is current)."""
            self.progress.stop()

    return RichProgress


def trainer_class():
    """Trainer whose evaluation batches go through their own collator, so tokens/s counts training only."""
    from transformers import Trainer

    class LorekeeperTrainer(Trainer):
        eval_collator: PackedCollator | None = None
        loss_chunk_tokens: int = 0  # > 0: training loss from finetune.loss, no full logits

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from .loss import causal_lm_loss, supports

            unwrapped = self.accelerator.unwrap_model(model)
            plain = (
                self.loss_chunk_tokens <= 0
                or return_outputs
                or not model.training
                or "labels" not in inputs
                or self.label_smoother is not None
                or getattr(self, "compute_loss_func", None) is not None
                or self.accelerator.num_processes != 1
                or not supports(unwrapped)
            )
            if plain:
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            # the reduction the model itself would use: a sum over num_items_in_batch when the Trainer
            # hands the model that count (so its gradient-accumulation scaling stays right), else a mean
            count = num_items_in_batch if self.model_accepts_loss_kwargs else None
            return causal_lm_loss(unwrapped, inputs, count, self.loss_chunk_tokens)

        def get_eval_dataloader(self, eval_dataset=None):
            if self.eval_collator is None:
                return super().get_eval_dataloader(eval_dataset)
            train_collator = self.data_collator
            self.data_collator = self.eval_collator
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = train_collator

    return LorekeeperTrainer


def save_adapter(model: Any, run: RunDir, step: int) -> None:
    """The adapter alone (peft save_pretrained), written aside and renamed into adapter/; the
    training step it comes from goes beside it in adapter_step.txt."""
    import shutil

    tmp = run.root / "adapter.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if run.adapter.exists():
        shutil.rmtree(run.adapter)
    tmp.replace(run.adapter)
    (run.root / "adapter_step.txt").write_text(str(step), encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# The run


class RowDataset:
    """A list of packed rows in the shape the Trainer's dataloader wants."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        row = self.rows[i]
        return {"input_ids": row.input_ids, "labels": row.labels, "position_ids": row.position_ids}


def summary_table(data: BuiltData):
    from rich.table import Table

    table = Table(title="training data")
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in data.summary.to_json().items():
        table.add_row(key.replace("_", " "), str(value))
    return table


def train_run(
    config: TrainConfig,
    run: RunDir,
    *,
    resume: bool = False,
    console: Any = None,
    device: str | None = None,
    generator: Any = None,
) -> TrainResult:
    """Train ``config`` into ``run`` (a fresh run, or ``resume`` from its latest checkpoint)."""
    gathered = gather_records(config, generator=generator)  # bad data fails before anything loads
    heldout = read_records(config.eval_data)[0] if config.eval_data else None
    from rich.console import Console
    from transformers import set_seed

    console = console or Console(stderr=True)
    started = time.perf_counter()
    device = device or default_device()
    precision = resolve_precision(config, device)
    checkpoint, ref, choice = _prepare_run_dir(config, run, resume)
    optimizer = resolve_optimizer(config, device)
    check_targets_before_loading(ref, config.target_modules)  # a typo fails before the model loads
    log.info("base held in %s: %s", choice.label, choice.reason)
    console.print(f"base: {choice.label}; {choice.reason}")

    set_seed(config.seed)
    model, tokenizer = load_base(
        ref, quantize_4bit=choice.quantize_4bit, dtype=_dtype(precision), device=device
    )
    apply_chat_template(tokenizer, config.chat_template)
    data = build_datasets(config, tokenizer, generator=generator, gathered=gathered, heldout=heldout)
    write_training_prompt(run.root, gathered[0], getattr(tokenizer, "chat_template", None))
    (run.data_summary).write_text(json.dumps(data.summary.to_json(), indent=2) + "\n", encoding="utf-8")
    write_records(data.heldout_records, run.heldout)
    console.print(summary_table(data))
    tokenizer.save_pretrained(run.tokenizer)

    model, targets = prepare_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    console.print(
        f"LoRA r={config.lora_r} alpha={config.lora_alpha} on {', '.join(targets)}: "
        f"{trainable:,} trainable of {total:,} parameters; {choice.label} base, "
        f"{precision}, {optimizer}, device {device}"
    )

    collator = PackedCollator(tokenizer.pad_token_id)
    steps_per_epoch = max(1, math.ceil(len(data.train_rows) / (config.batch_size * config.grad_accum)))
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.epochs)
    has_heldout = bool(data.heldout_rows)
    args = _training_arguments(config, run, precision, optimizer, device, has_heldout)
    Metrics, EarlyStop, Progress = make_callbacks(run, config, collator, console, total_steps)
    metrics_cb = Metrics()
    model_ref: list = []
    early_cb = EarlyStop(model_ref)
    progress_cb = Progress(metrics_cb)
    trainer = _make_trainer(
        model,
        tokenizer,
        args,
        data,
        collator,
        [metrics_cb, early_cb, progress_cb],
        has_heldout,
        loss_chunk_tokens=config.loss_chunk_tokens,
    )
    model_ref.append(trainer.model)

    try:
        output = _train_and_keep_adapter(trainer, config, run, checkpoint, early_cb, has_heldout)
    finally:
        progress_cb.finish()
    plot_loss(run.metrics, run.loss_plot, title=f"{run.name}: {ref.display_name}")
    losses = _eval_losses(run)
    return TrainResult(
        steps=trainer.state.global_step,
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
        eval_loss=metrics_cb.last_eval,
        first_eval_loss=losses[0] if losses else None,
        best_eval_loss=min(losses, default=None),
        stopped_early=early_cb.stopped_early,
        seconds=time.perf_counter() - started,
        tokens=collator.tokens_seen,
    )


def _prepare_run_dir(
    config: TrainConfig, run: RunDir, resume: bool
) -> tuple[Path | None, BaseRef, PrecisionChoice]:
    """(checkpoint to resume from or None, base model, how the base is held), with config.json
    (its quantize_4bit set to the choice, for eval and resume) and base.json written."""
    run.root.mkdir(parents=True, exist_ok=True)
    checkpoint = run.latest_checkpoint() if resume else None
    if resume and checkpoint is None:
        log.warning("no checkpoint in %s: starting from step 0", run.checkpoints)

    if resume and run.base.is_file():
        ref = BaseRef.load(run.base)
    else:
        ref = resolve_base(config.base)
    choice = choose_base_precision(
        config.base_precision, base_parameter_count(ref), quantize_4bit=config.quantize_4bit
    )
    config.quantize_4bit = choice.quantize_4bit
    config.save(run.config)
    ref.save(run.base)
    if checkpoint is None and run.adapter.exists():
        import shutil

        shutil.rmtree(
            run.adapter
        )  # a fresh start: an adapter left from an earlier attempt must not pass as this one
    return checkpoint, ref, choice


def _training_arguments(
    config: TrainConfig, run: RunDir, precision: str, optimizer: str, device: str, has_heldout: bool
) -> Any:
    """The Trainer's TrainingArguments for ``config``: checkpoints under run.checkpoints, no tqdm."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers reads a value below 1 as a share of all steps
        weight_decay=config.weight_decay,
        neftune_noise_alpha=config.neftune_alpha or None,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else 0.0,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        optim=optimizer,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_heldout else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        # checkpointing is switched on by prepare_model, before peft wraps the model; the
        # Trainer's own switch stays at its default, off
    )


def _make_trainer(
    model: Any,
    tokenizer: Any,
    args: Any,
    data: BuiltData,
    collator: PackedCollator,
    callbacks: list,
    has_heldout: bool,
    loss_chunk_tokens: int = 0,
) -> Any:
    """The Trainer with our callbacks in place of its printer and tqdm bar."""
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=RowDataset(data.train_rows),
        eval_dataset=RowDataset(data.heldout_rows) if has_heldout else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.eval_collator = PackedCollator(tokenizer.pad_token_id)
    trainer.loss_chunk_tokens = loss_chunk_tokens
    return trainer


def _train_and_keep_adapter(
    trainer: Any, config: TrainConfig, run: RunDir, checkpoint: Path | None, early_cb: Any, has_heldout: bool
) -> Any:
    """Run the Trainer (held-out loss before and after) and make sure adapter/ holds a result."""
    if has_heldout and checkpoint is None:
        trainer.evaluate()  # the base model's held-out loss, logged as step 0: the bar to beat
    elif has_heldout:
        early_cb.stopper.best = min(_eval_losses(run), default=None)
    with _quiet_checkpointing_renames():
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if has_heldout and not _evaluated_at(run, trainer.state.global_step):
        trainer.evaluate()  # the last step's held-out loss, unless the Trainer measured it already
    if not has_heldout or not run.is_trained():
        save_adapter(trainer.model, run, trainer.state.global_step)
    return output


def _evaluated_at(run: RunDir, step: int) -> bool:
    from .plot import read_metrics

    return any(row.get("step") == step and "eval_loss" in row for row in read_metrics(run.metrics))


def _eval_losses(run: RunDir) -> list[float]:
    from .plot import read_metrics

    return [row["eval_loss"] for row in read_metrics(run.metrics) if "eval_loss" in row]


def load_trained(
    run: RunDir, *, quantize_4bit: bool | None = None, device: str | None = None
) -> tuple[Any, Any]:
    """Base + the run's adapter, for evaluation or export: (peft model, tokenizer)."""
    from peft import PeftModel

    config = TrainConfig.load(run.config)
    ref = BaseRef.load(run.base)
    if quantize_4bit is None:
        # as trained: the saved choice, or (a config that never trained) the same decision again
        quantize_4bit = choose_base_precision(
            config.base_precision, base_parameter_count(ref), quantize_4bit=config.quantize_4bit
        ).quantize_4bit
    use_4bit = quantize_4bit
    model, tokenizer = load_base(ref, quantize_4bit=use_4bit, device=device)
    apply_chat_template(tokenizer, config.chat_template)
    with _quiet_checkpointing_renames():
        model = PeftModel.from_pretrained(model, str(run.adapter))
    model.eval()
    return model, tokenizer
