"""Did the adapter help? Held-out perplexity before and after, in transformers and in llama.cpp.

The held-out records are the ones training set aside (``heldout.jsonl`` in the run), tokenized the
same way, so the numbers compare with the held-out loss in ``metrics.jsonl``. Perplexity is
token-weighted over the positions that carried a loss in training (answers only, by default).

The two engines are two different things, and the report says which is which:

* ``transformers``: the model as trained - the base held exactly as training held it (the
  dequantized GGUF weights in full precision, or NF4 for a QLoRA run), with and without the adapter;
* ``llama_cpp``: the model as deployed - the base GGUF as shipped, alone and with the exported
  adapter (``export/*.lora.gguf``), and a merged ``export/*-merged-*.gguf`` when there is one.

Both read the very same token ids, so tokenization is never the gap. What is left between the
columns is the base each engine holds: for a full-precision run on a quantized GGUF it is llama.cpp's
own arithmetic (4-bit weights times 8-bit activations), a few hundredths of a nat; for a QLoRA run it
is also NF4 against the GGUF's quantization, larger (issue 11 measured 0.18 nats of base loss and
76% top-1 agreement on SmolLM2). The export itself is checked to 1e-4 logits by the parity tests.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .base_model import BaseRef
from .config import TrainConfig
from .data import IGNORE_INDEX, DataSummary, Example, Record, load_records, tokenize_all
from .parity import log_softmax
from .runs import RunDir

log = logging.getLogger(__name__)


def heldout_examples(run: RunDir, tokenizer: Any) -> tuple[list[Record], list[Example]]:
    """The run's held-out records and their token rows, cut exactly as in training."""
    config = TrainConfig.load(run.config)
    if not run.heldout.is_file():
        return [], []
    records = load_records(run.heldout)
    # always truncate: a held-out record too long for the window is still scored on what fits
    examples = tokenize_all(records, tokenizer, replace(config, overlong="truncate"), DataSummary())
    return records, examples


def _perplexity(total_nll: float, tokens: int) -> dict[str, float]:
    loss = total_nll / tokens if tokens else float("nan")
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": tokens}


def transformers_nll(model: Any, examples: Sequence[Example]) -> dict[str, float]:
    """Token-weighted mean negative log-likelihood over label positions."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids], device=device)
            labels = torch.tensor([example.labels], device=device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
            nll = torch.nn.functional.cross_entropy(
                shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += float(nll)
            count += int((shift_labels != IGNORE_INDEX).sum())
    return _perplexity(total, count)


def llama_cpp_nll(
    model_path: Path, examples: Sequence[Example], lora_path: Path | None = None, n_threads: int | None = None
) -> dict[str, float]:
    """The same measure in llama.cpp (``logits_all=True``), on the same token ids."""
    import numpy as np

    from lorekeeper.plugins.llama_open import open_llama

    n_ctx = max(len(e.input_ids) for e in examples) + 8
    llm = open_llama(
        model_path,
        lora_path=str(lora_path) if lora_path else None,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )
    total, count = 0.0, 0
    try:
        for example in examples:
            llm.reset()
            llm.eval(example.input_ids)
            log_probs = log_softmax(np.asarray(llm.scores[: len(example.input_ids)], dtype=np.float64))
            for t in range(len(example.input_ids) - 1):
                target = example.labels[t + 1]
                if target != IGNORE_INDEX:
                    total -= float(log_probs[t, target])
                    count += 1
    finally:
        llm.close()
    return _perplexity(total, count)


def exported_files(run: RunDir, ref: BaseRef) -> dict[str, Path]:
    """The GGUFs `lorekeeper finetune export` wrote for this run (adapter, base, merged), where present."""
    export = run.export
    found: dict[str, Path] = {}
    adapters = sorted(export.glob("*.lora.gguf"))
    if adapters:
        found["adapter"] = adapters[0]
    bases = sorted(export.glob("*-base-*.gguf"))
    if ref.gguf_path is not None and ref.gguf_path.is_file():
        found["base"] = ref.gguf_path
    elif bases:
        found["base"] = bases[0]
    merged = sorted(p for p in export.glob("*-merged-*.gguf") if "-merged-f" in p.name)
    if merged:
        found["merged"] = merged[0]
    return found


def _prompt_for(
    record: Record, tokenizer: Any, answer_tokens: int, max_prompt_tokens: int = 48
) -> tuple[list[int], str, str]:
    """(prompt ids, prompt text, reference answer) of a held-out record, for side-by-side answers."""
    if record.kind == "chat":
        messages = record.prompt_messages() or []
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids), messages[-1]["content"], record.reference_answer() or ""
    if record.kind == "completion":
        ids = tokenizer(record.prompt or "", add_special_tokens=False)["input_ids"]
        return list(ids), record.prompt or "", record.completion or ""
    all_ids = tokenizer(record.text or "", add_special_tokens=False)["input_ids"]
    cut = min(max_prompt_tokens, max(1, len(all_ids) // 2))
    return (
        list(all_ids[:cut]),
        tokenizer.decode(all_ids[:cut]),
        tokenizer.decode(all_ids[cut : cut + answer_tokens]),
    )


def side_by_side(
    model: Any, tokenizer: Any, records: Sequence[Record], n: int, max_new_tokens: int
) -> list[dict]:
    """Greedy answers of the base and of base+adapter to the first ``n`` held-out prompts."""
    import torch

    device = next(model.parameters()).device
    samples = []
    for record in list(records)[:n]:
        ids, prompt, reference = _prompt_for(record, tokenizer, max_new_tokens)
        inputs = torch.tensor([ids], device=device)
        answers = {}
        for label in ("base", "adapter"):
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            with torch.no_grad():
                if label == "base":
                    with model.disable_adapter():
                        out = model.generate(input_ids=inputs, **kwargs)
                else:
                    out = model.generate(input_ids=inputs, **kwargs)
            answers[label] = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
        samples.append({"source": record.source, "prompt": prompt, "reference": reference, **answers})
    return samples


def evaluate_run(
    run: RunDir,
    *,
    n_prompts: int = 3,
    max_new_tokens: int = 64,
    llama_cpp: bool = True,
    device: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Perplexity of base vs adapter (transformers, and llama.cpp when exported) plus sample answers.

    ``threads`` caps llama.cpp's threads (default: its own choice); on a busy machine one thread
    is several times faster than threads that wait on each other.
    """
    from .train import load_trained

    ref = BaseRef.load(run.base)
    model, tokenizer = load_trained(run, device=device)
    records, examples = heldout_examples(run, tokenizer)
    config = TrainConfig.load(run.config)
    trained_as = "4-bit NF4 (QLoRA)" if config.quantize_4bit else "full precision (dequantized GGUF)"
    report: dict[str, Any] = {
        "run": str(run.root),
        "base": ref.display_name,
        "columns": {
            "transformers": f"the model as trained: base in {trained_as}, without / with the adapter",
            "llama_cpp": "the model as deployed: the base GGUF as shipped, alone / with the exported adapter",
        },
        "heldout_records": len(records),
        "heldout_sequences": len(examples),
    }
    if not examples:
        report["note"] = "the run has no held-out records (eval_fraction was 0 or the data had one record)"
        return report
    with model.disable_adapter():
        base = transformers_nll(model, examples)
    report["transformers"] = {"base": base, "adapter": transformers_nll(model, examples)}
    report["samples"] = side_by_side(model, tokenizer, records, n_prompts, max_new_tokens)
    del model

    files = exported_files(run, ref)
    if not llama_cpp:
        report["llama_cpp"] = {"skipped": "--no-llama-cpp"}
    elif "adapter" not in files or "base" not in files:
        report["llama_cpp"] = {"skipped": f"no export yet: run `lorekeeper finetune export {run.name}`"}
    else:
        section: dict[str, Any] = {"base": llama_cpp_nll(files["base"], examples, n_threads=threads)}
        section["adapter"] = llama_cpp_nll(
            files["base"], examples, lora_path=files["adapter"], n_threads=threads
        )
        if "merged" in files:
            section["merged"] = llama_cpp_nll(files["merged"], examples, n_threads=threads)
        section["files"] = {k: str(v) for k, v in files.items()}
        report["llama_cpp"] = section
    run.eval_result.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def render_report(report: dict[str, Any], console: Any) -> None:
    """Tables for the terminal: perplexities, then the answers side by side."""
    from rich.table import Table

    if "note" in report:
        console.print(report["note"])
        return
    table = Table(title=f"held-out perplexity ({report['heldout_records']} records)")
    for col in ("engine", "model", "loss", "perplexity", "tokens"):
        table.add_column(col)
    for engine in ("transformers", "llama_cpp"):
        section = report.get(engine, {})
        if "skipped" in section:
            table.add_row(engine, "-", "-", "-", section["skipped"])
            continue
        for label in ("base", "adapter", "merged"):
            if label in section:
                r = section[label]
                table.add_row(engine, label, f"{r['loss']:.4f}", f"{r['perplexity']:.3f}", str(r["tokens"]))
    console.print(table)
    for engine, meaning in report.get("columns", {}).items():
        console.print(f"[bold]{engine}[/bold]: {meaning}")
    for sample in report.get("samples", []):
        answers = Table(title=sample["source"], show_lines=True)
        answers.add_column("prompt")
        answers.add_column("reference")
        answers.add_column("base")
        answers.add_column("adapter")
        answers.add_row(
            sample["prompt"][-300:], sample["reference"][:300], sample["base"][:300], sample["adapter"][:300]
        )
        console.print(answers)
