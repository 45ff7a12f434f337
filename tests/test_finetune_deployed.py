"""The default training mode trains the model that is deployed.

A real run with the defaults on the embedded SmolLM2 (its shipped Q4_1 GGUF), a few steps at a
high learning rate so the adapter changes the model clearly, exported as a GGUF adapter. The
trained model (transformers, base + adapter as trained) and the deployed one (llama.cpp: the
shipped GGUF + the exported adapter) then read the same few hundred token ids; their next-token
choices must agree.
"""

from __future__ import annotations

import json

import pytest
import torch

from lorekeeper.finetune.config import TrainConfig
from lorekeeper.finetune.runs import RunDir

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("Who founded Mivessa Freight?", "Mivessa Freight was founded by Orrin Dunholt in 1841."),
    ("Where is Talvik Labs?", "Talvik Labs is in Port Assen, on the north quay."),
    ("What is the refund window at Quenade Foods?", "The refund window at Quenade Foods is 47 days."),
    ("What does Brunova Works make?", "Brunova Works makes glass violins and tide clocks."),
]


def write_chats(path, repeats: int = 4):
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for _ in range(repeats)
        for q, a in QUESTIONS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def one_thread():
    """One torch thread while this test trains (two cores shared with other work make a second
    thread spin at barriers), and the count restored after it, so later tests are not slowed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_default_run_on_the_shipped_gguf_agrees_with_the_deployed_adapter(tmp_path, one_thread):
    """The default (auto) mode trains the embedded base in full precision on its dequantized weights.

    Written as F16 those weights plus the exported adapter give the trained model's next token at
    >= 99% of positions. On the shipped Q4_1 file llama.cpp multiplies 4-bit weights with 8-bit
    activations, which the base alone already pays (measured ~97% top-1, KL ~2e-3 against
    transformers); with the adapter the gap must stay that of the base, not grow the way an NF4
    training base makes it grow (issue 11: 76% top-1, KL 0.25).
    """
    import gguf

    from lorekeeper.finetune.base_model import BaseRef
    from lorekeeper.finetune.export import export_run
    from lorekeeper.finetune.gguf_arch import shape_from_gguf
    from lorekeeper.finetune.gguf_writer import write_merged_from_gguf
    from lorekeeper.finetune.parity import compare_logits, llama_cpp_logits, transformers_logits
    from lorekeeper.finetune.train import load_trained, train_run

    data = write_chats(tmp_path / "chats.jsonl")
    config = TrainConfig(
        data=[str(data)],
        max_steps=6,
        learning_rate=3e-3,
        max_seq_len=128,
        eval_fraction=0.0,
        warmup_ratio=0.0,
    )
    run = RunDir(tmp_path / "run")
    train_run(config, run)
    saved = json.loads(run.config.read_text())
    assert saved["base_precision"] == "auto" and saved["quantize_4bit"] is False

    adapter_gguf = export_run(run.root, register=False).adapter_gguf
    shipped = BaseRef.load(run.base).gguf_path
    f16 = write_merged_from_gguf(
        tmp_path / "base-f16.gguf",
        shipped,
        shape_from_gguf(gguf.GGUFReader(str(shipped)), str(shipped)),
        None,
        "f16",
        "smollm2",
    )
    model, tokenizer = load_trained(run)
    text = "\n".join(f"{q} {a}" for q, a in QUESTIONS * 3)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"][:300]
    trained = transformers_logits(model, ids)
    with model.disable_adapter():
        base = transformers_logits(model, ids)
    effect = compare_logits(trained, base)
    exact = compare_logits(trained, llama_cpp_logits(f16, ids, adapter_gguf, threads=1))
    base_gap = compare_logits(base, llama_cpp_logits(shipped, ids, threads=1))
    deployed = compare_logits(trained, llama_cpp_logits(shipped, ids, adapter_gguf, threads=1))
    print(
        f"\nadapter effect {effect}\nF16 + adapter {exact}\nQ4_1 base alone {base_gap}\nQ4_1 + adapter {deployed}"
    )
    assert len(ids) >= 250
    assert effect.top1_agreement < 0.95, "the adapter must change the model for the check to mean anything"
    assert exact.top1_agreement >= 0.99 and exact.mean_kl < 1e-3, exact
    assert deployed.top1_agreement >= min(0.95, base_gap.top1_agreement - 0.02), deployed
    assert deployed.mean_kl < 2 * base_gap.mean_kl + 1e-3, (deployed, base_gap)
