"""Is the model llama.cpp runs the model that was trained? Logit parity after a short real training run.

Trains a LoRA adapter for a few steps with the default settings (LoRA on the embedded SmolLM2 base's
dequantized weights) on real text nobody on the project wrote (README and changelog files from
/usr/share/doc, as chat rows), exports it as GGUF, and feeds the same token ids to transformers
(base + peft adapter) and to llama.cpp. Reported, as top-1 agreement and mean KL over the positions:

* the adapter's effect (trained model against its base, both in transformers): how much there is
  to get right;
* F16 base + adapter GGUF against the trained model (target >= 99% top-1);
* the shipped Q4_1 base alone against the base in transformers: the baseline, what 4-bit weights
  cost before any adapter;
* the shipped Q4_1 base + adapter GGUF against the trained model (target: within 2 points of the
  baseline).

    python scripts/bench_parity.py --steps 6 --positions 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def chat_rows(path: Path, limit: int) -> Path:
    """Question/answer chats cut from real documentation: the file's name asks, a paragraph answers."""
    rows = []
    for doc in sorted(Path("/usr/share/doc").glob("*/README*")):
        if not doc.is_file() or doc.suffix in (".gz", ".html"):
            continue
        try:
            text = doc.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        paragraphs = [p.strip() for p in text.split("\n\n") if 80 < len(p.strip()) < 600]
        if paragraphs:
            question = f"What does the {doc.parent.name} documentation say first?"
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": paragraphs[0]}]})  # fmt: skip
        if len(rows) >= limit:
            break
    if len(rows) < 8:  # no system documentation on this machine: a small invented set
        rows = [{"messages": [{"role": "user", "content": f"What is rule {i} of the harbour?"},
                              {"role": "assistant", "content": f"Rule {i}: ferries leave at {i + 6} o'clock."}]}
                for i in range(24)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def measure(args: argparse.Namespace, work: Path) -> dict:
    import gguf
    import torch

    from lorekeeper.finetune.base_model import BaseRef
    from lorekeeper.finetune.config import TrainConfig
    from lorekeeper.finetune.export import export_run
    from lorekeeper.finetune.gguf_arch import shape_from_gguf
    from lorekeeper.finetune.gguf_writer import write_merged_from_gguf
    from lorekeeper.finetune.parity import compare_logits, llama_cpp_logits, transformers_logits
    from lorekeeper.finetune.runs import RunDir
    from lorekeeper.finetune.train import load_trained, train_run

    torch.set_num_threads(args.threads)
    data = chat_rows(work / "chats.jsonl", args.rows)
    config = TrainConfig(data=[str(data)], max_steps=args.steps, learning_rate=3e-3, max_seq_len=128,
                         eval_fraction=0.0, warmup_ratio=0.0)  # fmt: skip
    run = RunDir(work / "run")
    train_run(config, run)
    adapter = export_run(run.root, register=False).adapter_gguf
    shipped = BaseRef.load(run.base).gguf_path
    shape = shape_from_gguf(gguf.GGUFReader(str(shipped)), str(shipped))
    f16 = write_merged_from_gguf(work / "base-f16.gguf", shipped, shape, None, "f16", "smollm2")
    model, tokenizer = load_trained(run)
    text = "\n".join(json.loads(line)["messages"][1]["content"] for line in data.read_text().splitlines())
    ids = tokenizer(text)["input_ids"][: args.positions]
    trained = transformers_logits(model, ids)
    with model.disable_adapter():
        base = transformers_logits(model, ids)
    figures = {
        "adapter_effect": compare_logits(trained, base),
        "f16_plus_adapter": compare_logits(
            trained, llama_cpp_logits(f16, ids, adapter, threads=args.threads)
        ),
        "q4_base_alone": compare_logits(base, llama_cpp_logits(shipped, ids, threads=args.threads)),
        "q4_plus_adapter": compare_logits(
            trained, llama_cpp_logits(shipped, ids, adapter, threads=args.threads)
        ),
    }
    out = {name: {"top1": r.top1_agreement, "mean_kl": r.mean_kl, "positions": r.positions}
           for name, r in figures.items()}  # fmt: skip
    out["steps"], out["rows"] = args.steps, sum(1 for _ in data.open())
    for name, r in figures.items():
        print(f"{name:18} {r}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps (default 6)")
    parser.add_argument("--rows", type=int, default=40, help="chat rows cut from /usr/share/doc (default 40)")
    parser.add_argument("--positions", type=int, default=300, help="token positions compared (default 300)")
    parser.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if min(args.steps, args.rows, args.positions, args.threads) < 1:
        parser.error("--steps, --rows, --positions and --threads must be at least 1")
    with tempfile.TemporaryDirectory(prefix="lorekeeper-bench-parity-") as tmp:
        os.environ["LOREKEEPER_HOME"] = str(Path(tmp) / "home")  # never touch the user's own adapters
        figures = measure(args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
