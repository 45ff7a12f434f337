"""Training throughput and peak memory: `lorekeeper finetune` against a plain transformers+peft loop.

Both sides get the same base (SmolLM2-135M from the embedded GGUF), held the same way
(``--base-precision nf4``: NF4 4-bit with double quantization, QLoRA, the default here; ``full``:
the dequantized weights in bf16 on a GPU, fp32 on the CPU), the same LoRA (r=8, alpha=16, every
attention and MLP projection), the same optimiser (paged 8-bit AdamW for NF4 on a GPU, AdamW
otherwise), batch size, sequence length and gradient checkpointing, and the same token sequences
(real text: the system's shared documentation, copied to a temporary folder). The plain loop is
what one writes from the transformers/peft docs: batches padded to their longest sequence, an
attention mask, the model's own loss. Each side runs in its own subprocess so peak memory is its
own (on a GPU: torch's peak allocated memory; on the CPU: peak RSS).

Tokens/s counts real (unpadded) training tokens, measured after warm-up steps. Run:

    python scripts/bench_finetune.py --steps 12 --warmup 2 --seq-len 256 --batch-size 4

``--sides`` adds variants, each compared with the first: ``plain`` and ``lorekeeper`` as above,
``:nogc`` without gradient checkpointing, ``:fullloss`` (lorekeeper) with the model's own loss over
full logits instead of its chunked loss (``loss_chunk_tokens=0``). It prints one JSON object with
every side and the ratios (target: >= 1.0x on the CPU, >= 1.5x on a GPU with no more memory).
Each side's figures go to stderr as it finishes, and to ``--out FILE`` (rewritten after each side);
stopped (Ctrl-C, SIGTERM from ``timeout``) it still prints the sides measured; a side that fails or
outlasts ``--side-timeout`` is recorded with the end of its log, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def copy_corpus(
    target: Path, max_files: int, max_bytes: int = 6000, source: Path = Path("/usr/share/doc")
) -> Path:
    """Plain-text READMEs and changelogs from /usr/share/doc (real text nobody here wrote), or the
    text files of ``source`` (``--corpus``: on a machine with no /usr/share/doc)."""
    target.mkdir(parents=True, exist_ok=True)
    n = 0
    pattern = "*/*" if source == Path("/usr/share/doc") else "**/*"
    for path in sorted(source.glob(pattern)):
        if n >= max_files:
            break
        if (
            not path.is_file()
            or path.suffix in (".gz", ".html", ".png", ".svg")
            or path.stat().st_size < 1500
        ):
            continue
        try:
            text = path.read_text(encoding="utf-8")[:max_bytes]
        except (UnicodeDecodeError, OSError):
            continue
        name = path.name if path.suffix == ".txt" else f"{path.parent.name}-{path.name}.txt"
        (target / name).write_text(text, encoding="utf-8")
        n += 1
    if n == 0:
        raise SystemExit(f"no text found under {source} to benchmark on (--corpus DIR names another folder)")
    return target


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_options(side: str) -> tuple[str, set[str]]:
    """'lorekeeper:nogc' -> ('lorekeeper', {'nogc'})."""
    which, *flags = side.split(":")
    return which, set(flags)


def config_for(args, data: Path, flags: set[str] = frozenset()):
    from lorekeeper.finetune.config import TrainConfig

    return TrainConfig(
        data=[str(data)],
        max_seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.steps,
        eval_fraction=0.0,
        learning_rate=2e-4,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        save_steps=10_000,
        eval_steps=10_000,
        early_stopping_patience=0,
        gradient_checkpointing=not (args.no_gc or "nogc" in flags),
        base_precision=args.base_precision,
        **({"loss_chunk_tokens": 0} if "fullloss" in flags else {}),
    )


def run_lorekeeper(args, data: Path, device: str, flags: set[str]) -> dict:
    from rich.console import Console

    from lorekeeper.finetune.plot import read_metrics
    from lorekeeper.finetune.runs import RunDir
    from lorekeeper.finetune.train import train_run

    run = RunDir(Path(tempfile.mkdtemp(prefix="bench-run-")))
    train_run(config_for(args, data, flags), run, device=device, console=Console(stderr=True, quiet=True))
    rows = read_metrics(run.metrics)
    steps = {r["step"]: r for r in rows if "loss" in r}
    start, end = steps[args.warmup], steps[args.steps]
    tokens = end["tokens"] - start["tokens"]
    seconds = end["elapsed_s"] - start["elapsed_s"]
    shutil.rmtree(run.root, ignore_errors=True)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "final_loss": end["loss"]}


def run_plain(args, data: Path, device: str, flags: set[str]) -> dict:
    """The baseline: transformers + peft (+ bitsandbytes for NF4), a padded batch loop."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lorekeeper.finetune.base_model import dequantized_dir, resolve_base
    from lorekeeper.finetune.data import build_datasets

    source = dequantized_dir(resolve_base(None))
    tokenizer = AutoTokenizer.from_pretrained(source)
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    nf4 = args.base_precision == "nf4"
    gc = not (args.no_gc or "nogc" in flags)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quant if nf4 else None, dtype=dtype, device_map={"": device}
    )
    model.config.use_cache = False
    if nf4:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    # The same token sequences lorekeeper trains on (before its packing), shuffled the same way each time.
    examples = build_datasets(config_for(args, data, flags), tokenizer).train_examples
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda" and nf4:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=2e-4)
    model.train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = 0
    started = None
    loss = None
    cursor = 0
    for step in range(1, args.steps + 1):
        batch = []
        for _ in range(args.batch_size):
            batch.append(examples[order[cursor % len(order)]])
            cursor += 1
        longest = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        labels = torch.full((len(batch), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
            mask[i, : len(e.input_ids)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step == args.warmup:
            started = time.perf_counter()
        elif step > args.warmup:
            tokens += int(mask.sum())
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "final_loss": float(loss)}


def ratios(side: dict, baseline: dict) -> dict:
    """Speed, real tokens per step and peak memory of ``side`` over ``baseline``."""
    return {
        "speedup_tokens_per_s": round(side["tokens_per_s"] / baseline["tokens_per_s"], 3),
        "real_tokens_per_step_ratio": round(
            side["real_tokens_per_step"] / baseline["real_tokens_per_step"], 3
        ),
        "memory_ratio": round(side["peak_memory_mb"] / baseline["peak_memory_mb"], 3),
    }


def child(args) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    data = Path(args.data)
    which, flags = side_options(args.which)
    result = (run_lorekeeper if which == "lorekeeper" else run_plain)(args, data, device, flags)
    result["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    result["device"] = device
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--files", type=int, default=40, help="text files copied from /usr/share/doc")
    parser.add_argument(
        "--corpus", type=Path, default=Path("/usr/share/doc"), help="where the text comes from"
    )
    parser.add_argument("--no-gc", action="store_true", help="both sides without gradient checkpointing")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument(
        "--base-precision", choices=["nf4", "full"], default="nf4", help="how both sides hold the base"
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        default=["plain", "lorekeeper"],
        help="sides to run; the first is the baseline (plain, lorekeeper, with :nogc or :fullloss)",
    )
    parser.add_argument(
        "--side-timeout", type=float, help="seconds one side may take; it is then recorded as failed"
    )
    parser.add_argument("--out", type=Path, help="also write the report here, updated after each side")
    parser.add_argument("--which", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.which:
        child(args)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for side in args.sides:
        which, flags = side_options(side)
        if which not in ("plain", "lorekeeper") or flags - {"nogc", "fullloss"}:
            raise SystemExit(f"--sides: unknown side {side!r} (plain or lorekeeper, with :nogc or :fullloss)")
    results: dict[str, dict] = {}
    # A stop (Ctrl-C, or `timeout` sending SIGTERM) still prints and saves the sides measured so far.
    signal.signal(signal.SIGTERM, _stop)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
            os.environ.setdefault("LOREKEEPER_HOME", str(Path(tmp) / "home"))
            data = copy_corpus(Path(tmp) / "corpus", args.files, source=args.corpus)
            from lorekeeper.finetune.base_model import dequantized_dir, resolve_base

            dequantized_dir(resolve_base(None))  # the cache both sides load from, built outside the timings
            passthrough = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--seq-len={args.seq_len}"]
            passthrough += [f"--batch-size={args.batch_size}", f"--base-precision={args.base_precision}"]
            passthrough += (["--no-gc"] if args.no_gc else []) + (["--cpu"] if args.cpu else [])
            for side in args.sides:
                cmd = [sys.executable, __file__, f"--which={side}", f"--data={data}", *passthrough]
                results[side] = run_side(side, cmd, args.side_timeout)
                report = build_report(args, results)
                progress(side, results[side])
                if args.out:
                    write_atomic(args.out, report)
    except KeyboardInterrupt:
        report = build_report(args, results, stopped=True)
        if args.out:
            write_atomic(args.out, report)
        print(json.dumps(report, indent=2), flush=True)
        raise SystemExit(130) from None
    print(json.dumps(report, indent=2))
    if any("error" in result for result in results.values()):
        raise SystemExit(1)


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def run_side(side: str, cmd: list[str], timeout: float | None) -> dict:
    """One side in its own process; a failure or a timeout is recorded with the end of its stderr, and
    the other sides still run."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        return {"error": f"no result after {timeout:g} s (--side-timeout)", "stderr_tail": stderr[-2000:]}
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}", "stderr_tail": stderr[-2000:]}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["side_wall_s"] = round(time.perf_counter() - started, 1)
    return result


def build_report(args, results: dict[str, dict], stopped: bool = False) -> dict:
    measured_steps = args.steps - args.warmup
    done = {side: dict(result) for side, result in results.items()}
    for result in done.values():
        if "tokens" in result:
            # Real tokens per optimiser step does not depend on how busy the machine was: on a shared
            # machine, read it next to tokens/s (equal step cost, so it is the expected speedup).
            result["real_tokens_per_step"] = round(result["tokens"] / measured_steps, 1)
    baseline = done.get(args.sides[0], {})
    for side in args.sides[1:]:
        if "tokens" in done.get(side, {}) and "tokens" in baseline:
            done[side]["vs_" + args.sides[0]] = ratios(done[side], baseline)
    settings = vars(args) | {"which": None, "data": None, "corpus": str(args.corpus), "out": None}
    report = {"settings": settings, **done}
    missing = [side for side in args.sides if side not in done]
    if missing:
        report["not_measured"] = missing
    if stopped:
        report["stopped"] = True
    if "tokens" in done.get("plain", {}) and "tokens" in done.get("lorekeeper", {}):  # what bench.py reads
        report |= ratios(done["lorekeeper"], done["plain"])
    return report


def progress(side: str, result: dict) -> None:
    if "error" in result:
        line = f"{side}: FAILED, {result['error']}"
    else:
        line = (
            f"{side}: {result['tokens_per_s']:.1f} real tokens/s, peak {result['peak_memory_mb']:.0f} MB "
            f"({result['device']}), final loss {result['final_loss']:.3f}, {result['side_wall_s']:.0f} s"
        )
    print(line, file=sys.stderr, flush=True)


def write_atomic(path: Path, report: dict) -> None:
    from lorekeeper.finetune.gguf_writer import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
