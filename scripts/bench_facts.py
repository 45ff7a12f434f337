"""Does an adapter learn the facts it is given? Recall of invented facts, before and after training.

The script writes its own fact set: invented companies, each with a chief executive, a founding
year, a headcount, a head office, a refund window and a product - names and numbers no model can
know. Every fact gets a training question (in the training data, with its answer) and a paraphrased
question that training never shows. It trains with ``--goal facts`` on the embedded SmolLM2 base on
the CPU, exports the adapter as GGUF, and asks every question greedily of:

* the deployed model: llama.cpp with the base GGUF alone, and with the exported adapter GGUF;
* the trained model in transformers (base + peft adapter, in the precision it trained in).

Recall is exact-contains: the fact's key (the name, the number) appears in the answer. Training
time and tokens/s come from the run, peak memory is the training subprocess's peak RSS. Gradient
checkpointing is off here (a 135M model needs no activation memory saved; it would cost ~30%).

``--compare-nf4`` trains twice on the same data, LoRA on the dequantized GGUF weights (the default)
and QLoRA on NF4, and adds for each: held-out loss (answer tokens of the paraphrased questions, in
the trained model), and top-1 agreement / mean KL between the trained model and the deployed GGUF +
adapter over a few hundred positions of training chats.

``--augment N`` first drafts N paraphrases of every training question with the local model
(``lorekeeper finetune augment``: SmolLM2, filtered) and trains on the facts plus those; a draft
that is one of the test paraphrases is removed and the script asserts that none is in the training
file, and that every answer is unchanged (``augment.json`` keeps the counts and examples).
``--neftune-alpha F`` (the preset's is 5; 0 turns it off) and ``--rslora`` train with those options.

    nice -n 10 python scripts/bench_facts.py --out /tmp/bench-facts
    nice -n 10 python scripts/bench_facts.py --out /tmp/bench-facts-cmp --compare-nf4
    nice -n 10 python scripts/bench_facts.py --out /tmp/bench-facts-aug --augment 3 --epochs 8 \
        --skip-transformers-recall --parity-positions 0

It writes ``results.json`` in ``--out`` and prints a table. Targets (issue 11): >= 90% recall on the
training questions, >= 60% on the paraphrases, < 10% for the base model.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

FIRST = ["Tal", "Vor", "Quen", "Mib", "Dras", "Oll", "Pev", "Zan", "Keth", "Brun", "Yss", "Fal"]
SECOND = ["vik", "essa", "orin", "ade", "umbo", "iska", "ent", "alo", "ith", "ova", "ric", "une"]
LAST = ["Orrensby", "Quillfeather", "Marchetti-Vale", "Dunholt", "Pramsworth", "Zeverin", "Ockley"]
CITY = ["Vellmark", "Port Assen", "Grivaldi", "Noor Halden", "Estrafen", "Kalloway", "Brisnet", "Umbrose"]
PRODUCT = ["lantern drones", "salt batteries", "moss insulation", "glass violins", "tide clocks"]
SUFFIX = ["Analytics", "Works", "Holdings", "Labs", "Freight", "Textiles", "Robotics", "Foods"]

# (training question, paraphrase, answer) templates; {k} is the fact's key, the text recall looks for
TEMPLATES = {
    "ceo": (
        "Who is the CEO of {c}?",
        "Which person runs {c} as chief executive?",
        "The CEO of {c} is {k}.",
    ),
    "founded": ("When was {c} founded?", "In what year did {c} start?", "{c} was founded in {k}."),
    "staff": (
        "How many employees does {c} have?",
        "What is the headcount of {c}?",
        "{c} has {k} employees.",
    ),
    "city": (
        "Where is {c} headquartered?",
        "In which city are the head offices of {c}?",
        "{c} is headquartered in {k}.",
    ),
    "refund": (
        "What is the refund window at {c}?",
        "How many days do customers of {c} have to ask for their money back?",
        "The refund window at {c} is {k} days.",
    ),
    "product": (
        "What does {c} make?",
        "Which product is {c} known for?",
        "{c} makes {k}.",
    ),
}


def invent_facts(companies: int, seed: int) -> list[dict]:
    """``companies`` x 6 facts; every key distinct, none a real name or a round number."""
    rng = random.Random(seed)
    names = rng.sample([f + s for f in FIRST for s in SECOND], companies * 2)
    facts, used = [], set()
    for i in range(companies):
        company = f"{names[i]} {SUFFIX[i % len(SUFFIX)]}"
        keys = {
            "ceo": f"{names[companies + i]} {rng.choice(LAST)}",
            "founded": str(rng.randint(1803, 1889)),
            "staff": str(rng.randint(1100, 9899)),
            "city": CITY[i % len(CITY)],
            "refund": str(rng.choice([x for x in range(23, 88) if x % 10 and x not in used])),
            "product": PRODUCT[i % len(PRODUCT)],
        }
        used.add(int(keys["refund"]))
        for kind, (question, paraphrase, answer) in TEMPLATES.items():
            k = keys[kind]
            facts.append(
                {
                    "kind": kind,
                    "key": k,
                    "question": question.format(c=company),
                    "paraphrase": paraphrase.format(c=company),
                    "answer": answer.format(c=company, k=k),
                }
            )
    return facts


# A short system turn of our own: without one SmolLM2's template adds its 17-token default to every
# example, a third of each training row.
SYSTEM = "You answer questions about companies."


def messages(question: str, answer: str | None = None) -> list[dict]:
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def write_data(facts: list[dict], folder: Path) -> tuple[Path, Path]:
    """(training chats, paraphrase chats) as JSONL; only the first is trained on."""
    folder.mkdir(parents=True, exist_ok=True)
    train, held = folder / "facts.jsonl", folder / "paraphrases.jsonl"
    for path, key in ((train, "question"), (held, "paraphrase")):
        rows = [{"messages": messages(f[key], f["answer"])} for f in facts]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return train, held


def augment_data(args: argparse.Namespace, facts: list[dict]) -> dict:
    """``--augment N``: paraphrase the training questions with the local model, as ``lorekeeper
    finetune augment`` does, into facts-aug.jsonl. A draft that happens to be one of the test
    paraphrases is removed, and the file is checked to hold none: recall on the paraphrases must
    stay a measure of wordings training never showed."""
    from lorekeeper.finetune.augment import (
        Paraphraser,
        augment_rows,
        load_models,
        normalized,
        read_rows,
        row_question_answer,
        write_rows,
    )

    target, saved = args.out / "facts-aug.jsonl", args.out / "augment.json"
    held = {normalized(f["paraphrase"]) for f in facts}
    if args.reuse and target.is_file() and saved.is_file():
        report = json.loads(saved.read_text(encoding="utf-8"))
    else:
        generator, embedder = load_models()
        started = time.perf_counter()
        try:
            rows, _ = read_rows(args.out / "facts.jsonl")
            paraphraser = Paraphraser(generator, embedder, args.min_similarity)
            written, found = augment_rows(rows, paraphraser, args.augment)
        finally:
            generator.close()
        leaked = [r for r in written if normalized(row_question_answer(r)[0]) in held]
        write_rows([r for r in written if r not in leaked], target)
        report = {
            **found.to_json(),
            "rows_written": len(written) - len(leaked),
            "test_paraphrases_dropped": len(leaked),
            "seconds": round(time.perf_counter() - started, 1),
            "examples": found.examples,
            "rejected": found.rejected[:20],
        }
        saved.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = target.read_text(encoding="utf-8").splitlines()
    trained = {normalized(row_question_answer(json.loads(line))[0]) for line in lines}
    assert not trained & held, f"test paraphrases in the training data: {sorted(trained & held)}"
    answers = {row_question_answer(json.loads(line))[1] for line in lines}
    assert answers == {f["answer"] for f in facts}, "augmentation changed an answer"
    return report


# ------------------------------------------------------------------------------------------------
# Training, in a subprocess so its peak RSS is its own


def train_child(args: argparse.Namespace) -> None:
    """`--train-child MODE`: train one run, export it, print a JSON line with time and memory."""
    import torch

    from lorekeeper.finetune.export import export_run
    from lorekeeper.finetune.recipes import config_for_goal
    from lorekeeper.finetune.runs import RunDir
    from lorekeeper.finetune.train import train_run

    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("learning_rate", args.lr)) if v is not None}
    # 135M parameters need no activation memory saved; recomputing them costs ~30% of each step
    overrides["gradient_checkpointing"] = False
    if args.rank:
        overrides.update(lora_r=args.rank, lora_alpha=2 * args.rank)
    if args.neftune_alpha is not None:
        overrides["neftune_alpha"] = args.neftune_alpha
    if args.rslora:
        overrides["use_rslora"] = True
    data = args.out / ("facts-aug.jsonl" if args.augment else "facts.jsonl")
    config = config_for_goal("facts", data=[str(data)], base_precision=args.train_child, **overrides)
    run = RunDir(args.out / f"run-{args.train_child}")
    result = train_run(config, run)
    started = time.perf_counter()
    report = export_run(run.root, register=False)
    row = {
        "mode": args.train_child,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "tokens_per_s": round(result.tokens / result.seconds, 1),
        "train_loss": result.train_loss,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "export_seconds": round(time.perf_counter() - started, 1),
        "adapter_gguf": str(report.adapter_gguf),
        "run": str(run.root),
        "config": {
            k: getattr(config, k)
            for k in ("epochs", "learning_rate", "lora_r", "lora_alpha", "use_rslora", "neftune_alpha")
        },
    }
    print("RESULT " + json.dumps(row), flush=True)


def train_in_subprocess(args: argparse.Namespace, mode: str) -> dict:
    """Train ``mode`` in a child process (or, with --reuse, take an earlier run's row from its file)."""
    saved = args.out / f"trained-{mode}.json"
    if args.reuse and saved.is_file():
        return json.loads(saved.read_text(encoding="utf-8"))
    command = [sys.executable, __file__, "--out", str(args.out), "--train-child", mode]
    command += ["--threads", str(args.threads)]
    for flag, value in (
        ("--epochs", args.epochs),
        ("--lr", args.lr),
        ("--rank", args.rank),
        ("--neftune-alpha", args.neftune_alpha),
        ("--augment", args.augment),
    ):
        if value or (flag == "--neftune-alpha" and value is not None):
            command += [flag, str(value)]
    command += ["--rslora"] if args.rslora else []
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"training ({mode}) failed with exit code {done.returncode}")
    saved.write_text(lines[-1][len("RESULT ") :] + "\n", encoding="utf-8")
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------------------------
# Answers


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(messages(question), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def llama_answers(
    base_gguf: Path, prompts: list[list[int]], lora: Path | None, threads: int, n: int
) -> list[str]:
    """Greedy answers of llama.cpp (the deployed model) to token-id prompts."""
    from lorekeeper.plugins.llama_open import open_llama

    llm = open_llama(
        base_gguf, lora_path=str(lora) if lora else None, n_ctx=256, n_threads=threads, verbose=False
    )
    answers = []
    try:
        for ids in prompts:
            llm.reset()
            out = []
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                if token == llm.token_eos() or len(out) >= n:
                    break
                out.append(token)
            answers.append(llm.detokenize(out).decode("utf-8", "replace"))
    finally:
        llm.close()
    return answers


def transformers_answers(model, tokenizer, prompts: list[list[int]], n: int) -> list[str]:
    import torch

    answers = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    return answers


def recall(facts: list[dict], answers: list[str]) -> float:
    hits = sum(f["key"].lower() in a.lower() for f, a in zip(facts, answers))
    return round(hits / len(facts), 4)


def parity_ids(tokenizer, facts: list[dict], positions: int) -> list[int]:
    """Training chats (question and answer) one after another, cut to ``positions`` tokens."""
    ids: list[int] = []
    for f in facts:
        text = tokenizer.apply_chat_template(messages(f["question"], f["answer"]), tokenize=False)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= positions:
            break
    return ids[:positions]


def heldout_loss(model, tokenizer, run, path: Path) -> float:
    """Answer-token loss on the paraphrased questions, tokenized as training tokenizes."""
    from dataclasses import replace

    from lorekeeper.finetune.config import TrainConfig
    from lorekeeper.finetune.data import DataSummary, read_jsonl, tokenize_all
    from lorekeeper.finetune.evaluate import transformers_nll

    config = replace(TrainConfig.load(run.config), overlong="truncate")
    examples = tokenize_all(list(read_jsonl(path)), tokenizer, config, DataSummary())
    return transformers_nll(model, examples)["loss"]


def evaluate_mode(args: argparse.Namespace, facts: list[dict], trained: dict, with_base: bool) -> dict:
    """Recall (llama.cpp and transformers), held-out loss and deployed-vs-trained agreement of one run."""
    from lorekeeper.finetune.base_model import BaseRef
    from lorekeeper.finetune.parity import compare_logits, llama_cpp_logits, transformers_logits
    from lorekeeper.finetune.runs import RunDir
    from lorekeeper.finetune.train import load_trained

    run = RunDir(Path(trained["run"]))
    base_gguf = BaseRef.load(run.base).gguf_path
    adapter = Path(trained["adapter_gguf"])
    model, tokenizer = load_trained(run, device="cpu")
    questions = {s: [chat_ids(tokenizer, f[s]) for f in facts] for s in ("question", "paraphrase")}
    row = dict(trained)
    n, t = args.max_new_tokens, args.threads
    for split, prompts in questions.items():
        row[f"llama_cpp_adapter_{split}"] = recall(facts, llama_answers(base_gguf, prompts, adapter, t, n))
        if not args.skip_transformers_recall:
            answers = transformers_answers(model, tokenizer, prompts, n)
            row[f"transformers_adapter_{split}"] = recall(facts, answers)
        if with_base:
            row[f"llama_cpp_base_{split}"] = recall(facts, llama_answers(base_gguf, prompts, None, t, n))
    row["heldout_loss_adapter"] = heldout_loss(model, tokenizer, run, args.out / "paraphrases.jsonl")
    with model.disable_adapter():
        row["heldout_loss_base"] = heldout_loss(model, tokenizer, run, args.out / "paraphrases.jsonl")
    if args.parity_positions:
        ids = parity_ids(tokenizer, facts, args.parity_positions)
        deployed = compare_logits(
            transformers_logits(model, ids), llama_cpp_logits(base_gguf, ids, adapter, t)
        )
        with model.disable_adapter():
            base_gap = compare_logits(
                transformers_logits(model, ids), llama_cpp_logits(base_gguf, ids, None, t)
            )
        row["agreement_trained_vs_deployed"] = {"top1": deployed.top1_agreement, "mean_kl": deployed.mean_kl}
        row["agreement_base_vs_gguf"] = {"top1": base_gap.top1_agreement, "mean_kl": base_gap.mean_kl}
        row["parity_positions"] = deployed.positions
    return row


def snapshot_run(args: argparse.Namespace, mode: str, step: int, checkpoint: Path) -> dict:
    """A run directory holding the adapter of ``checkpoint`` (step ``step`` of run-MODE), exported;
    lets two modes be compared at the same step when one has not finished (``--at-step``)."""
    import shutil

    from lorekeeper.finetune.export import export_run

    source, target = args.out / f"run-{mode}", args.out / f"run-{mode}-step{step}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for name in ("config.json", "base.json"):
        shutil.copy(source / name, target / name)
    shutil.copytree(source / "tokenizer", target / "tokenizer")
    (target / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(checkpoint / name, target / "adapter" / name)
    report = export_run(target, register=False)
    metrics = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines()]
    rate = [r["tokens_per_s"] for r in metrics if r.get("step") == step and "tokens_per_s" in r]
    return {
        "mode": mode,
        "steps": step,
        "tokens_per_s": rate[-1] if rate else None,
        "run": str(target),
        "adapter_gguf": str(report.adapter_gguf),
    }


def print_table(results: dict) -> None:
    cols = ["mode", "train_seconds", "tokens_per_s", "peak_rss_mb", "steps"]
    cols += [
        f"{e}_{s}"
        for e in ("llama_cpp_base", "llama_cpp_adapter", "transformers_adapter")
        for s in ("question", "paraphrase")
    ]
    cols += [
        "heldout_loss_base",
        "heldout_loss_adapter",
        "agreement_trained_vs_deployed",
        "agreement_base_vs_gguf",
    ]
    for row in results["modes"]:
        print(f"--- {row['mode']} ({results['facts']} facts)")
        for col in cols:
            if col in row:
                print(f"  {col:32} {row[col]}")


def checkpoint_of(args: argparse.Namespace, mode: str) -> Path:
    given = getattr(args, f"checkpoint_{mode}")
    return Path(given) if given else args.out / f"run-{mode}" / "checkpoints" / f"checkpoint-{args.at_step}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for data, runs and results.json.")
    parser.add_argument("--companies", type=int, default=7, help="Invented companies (6 facts each).")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--compare-nf4", action="store_true", help="Also train QLoRA (NF4) and compare.")
    parser.add_argument("--epochs", type=float, default=None, help="Override the facts preset's epochs.")
    parser.add_argument("--lr", type=float, default=None, help="Override the facts preset's learning rate.")
    parser.add_argument(
        "--rank", type=int, default=None, help="Override the preset's rank (alpha = 2 x rank)."
    )
    parser.add_argument(
        "--neftune-alpha",
        type=float,
        default=None,
        help="NEFTune noise alpha (default: the preset's; 0: off).",
    )
    parser.add_argument("--rslora", action="store_true", help="Train with rsLoRA scaling.")
    parser.add_argument(
        "--augment",
        type=int,
        default=0,
        help="Train on the facts plus this many paraphrases per question drafted by the local model.",
    )
    parser.add_argument("--min-similarity", type=float, default=0.85, help="With --augment: the filter.")
    parser.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads.")
    parser.add_argument(
        "--reuse", action="store_true", help="Reuse runs already trained in --out (same data and settings)."
    )
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--parity-positions", type=int, default=320)
    parser.add_argument(
        "--skip-transformers-recall", action="store_true", help="Ask only llama.cpp (the slow part)."
    )
    parser.add_argument("--at-step", type=int, default=0, help="Compare runs already in --out at this step.")
    parser.add_argument("--checkpoint-full", help="With --at-step: the full run's checkpoint folder.")
    parser.add_argument("--checkpoint-nf4", help="With --at-step: the NF4 run's checkpoint folder.")
    parser.add_argument("--train-child", choices=("full", "nf4"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out = args.out.resolve()
    if args.train_child:
        train_child(args)
        return
    facts = invent_facts(args.companies, args.seed)
    write_data(facts, args.out)
    augmented = augment_data(args, facts) if args.augment and not args.train_child else None
    modes = ["full", "nf4"] if args.compare_nf4 else ["full"]
    if args.at_step:
        # each mode's checkpoint of that step, as --checkpoint-MODE or under run-MODE/checkpoints
        trained = [snapshot_run(args, mode, args.at_step, checkpoint_of(args, mode)) for mode in modes]
    else:
        trained = [train_in_subprocess(args, mode) for mode in modes]
    results = {"facts": len(facts), "at_step": args.at_step or None, "augment": augmented, "modes": []}
    name = f"results-step{args.at_step}.json" if args.at_step else "results.json"
    for i, row in enumerate(trained):
        results["modes"].append(evaluate_mode(args, facts, row, with_base=i == 0))
        (args.out / name).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print_table(results)


if __name__ == "__main__":
    main()
