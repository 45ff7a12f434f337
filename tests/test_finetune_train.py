"""A real QLoRA run on the CPU: SmolLM2, 4-bit NF4 (asked for: the default for a base this small is
full precision, tested in test_finetune_deployed.py), a dataset written from text files here.

One run is shared by the module (a few seconds a step on two busy cores): it trains, then resumes
from its checkpoint for more steps, then is evaluated.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lorekeeper.finetune.config import TrainConfig
from lorekeeper.finetune.runs import RunDir

pytestmark = pytest.mark.slow

PLACES = [
    "Quorvane",
    "Mellistra",
    "Tobbin Reach",
    "Ashgrove",
    "Varnholt",
    "Pellucid Bay",
    "Oskerran",
    "Drumlin Vale",
]
GOODS = ["blue salt", "copper wire", "glass beads", "river pearls", "smoked eel", "linen"]


def write_notes(folder: Path, files: int = 4, paragraphs: int = 12) -> Path:
    """Markdown notes in one consistent house style, so held-out passages share what training teaches."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        paras = []
        for _ in range(paragraphs):
            a, b = rng.sample(PLACES, 2)
            good, hours = rng.choice(GOODS), rng.randint(2, 9)
            paras.append(
                f"The ferry from {a} to {b} leaves every {hours} hours and carries {good}. "
                f"Traders in {a} pay for {good} with tokens stamped in {b}. "
                f"Every ferry captain of {a} keeps a ledger of {good} sold in {b}."
            )
        (folder / f"notes{f}.md").write_text(
            "# Ferry notes\n\n" + "\n\n".join(paras) + "\n", encoding="utf-8"
        )
    return folder


def small_config(data: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=[str(data)],
        max_seq_len=64,
        batch_size=2,
        learning_rate=2e-3,
        max_steps=10,
        eval_steps=5,
        save_steps=5,
        warmup_ratio=0.0,
        early_stopping_patience=0,
        seed=1,
        base_precision="nf4",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on two cores shared with other processes, a second thread spins at barriers
    and makes every step several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory) -> Path:
    """One data directory for the module, so the GGUF base is dequantized into its cache once."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def use_shared_home(shared_home, monkeypatch):
    monkeypatch.setenv("LOREKEEPER_HOME", str(shared_home))
    return shared_home


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_home):
    """Train 10 steps, then resume to 15: (run, first result, resumed result)."""
    import os

    from lorekeeper.finetune.train import train_run

    home = shared_home
    old = os.environ.get("LOREKEEPER_HOME")
    os.environ["LOREKEEPER_HOME"] = str(home)  # module-scoped: the autouse per-test home is not active yet
    try:
        data = write_notes(tmp_path_factory.mktemp("notes"))
        run = RunDir(tmp_path_factory.mktemp("runs") / "ferries")
        first = train_run(small_config(data), run)
        resumed = train_run(small_config(data, max_steps=15), run, resume=True)
        yield run, first, resumed
    finally:
        if old is None:
            os.environ.pop("LOREKEEPER_HOME", None)
        else:
            os.environ["LOREKEEPER_HOME"] = old


def metrics(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics.read_text(encoding="utf-8").splitlines()]


def test_heldout_loss_goes_down(trained):
    run, first, resumed = trained
    rows = metrics(run)
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert evals[0][0] == 0, "the base model's held-out loss is measured before the first step"
    assert first.first_eval_loss == evals[0][1]
    assert resumed.best_eval_loss < first.first_eval_loss - 0.3
    assert evals[-1][1] < evals[0][1]


def test_run_directory_holds_everything(trained):
    run, _, _ = trained
    config = json.loads(run.config.read_text())
    assert config["max_seq_len"] == 64 and config["quantize_4bit"] is True and config["lora_r"] == 8
    base = json.loads(run.base.read_text())
    assert base["kind"] == "gguf" and base["architecture"] == "llama" and base["gguf_file"].endswith(".gguf")
    adapter_config = json.loads((run.adapter / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) >= {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert (run.adapter / "adapter_model.safetensors").stat().st_size > 1_000_000
    assert (run.tokenizer / "tokenizer.json").is_file()
    assert (
        "im_start" in (run.tokenizer / "chat_template.jinja").read_text()
        or "chat_template" in (run.tokenizer / "tokenizer_config.json").read_text()
    )
    assert run.loss_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(run.data_summary.read_text())
    assert summary["files"] == 4 and summary["heldout_records"] >= 1 and summary["train_tokens"] > 0
    assert run.heldout.is_file()
    steps = sorted(int(p.name.split("-")[1]) for p in run.checkpoints.glob("checkpoint-*"))
    assert steps[-1] == 15
    rows = metrics(run)
    assert all("tokens_per_s" in r for r in rows)
    assert any("loss" in r and "learning_rate" in r for r in rows)


def test_resume_continues_the_step_count(trained):
    run, first, resumed = trained
    assert first.steps == 10 and resumed.steps == 15
    training_steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert training_steps == list(range(1, 16)), "resume continued at step 11, without redoing steps"
    assert sum(1 for r in metrics(run) if r["step"] == 0) == 1, "resume does not re-measure the base"


def test_evaluation_compares_base_and_adapter(trained, use_shared_home):
    from lorekeeper.finetune.evaluate import evaluate_run

    run, _, _ = trained
    report = evaluate_run(run, n_prompts=1, max_new_tokens=8, llama_cpp=True)
    hf = report["transformers"]
    assert hf["adapter"]["perplexity"] < hf["base"]["perplexity"]
    assert hf["adapter"]["tokens"] == hf["base"]["tokens"] > 0
    assert "skipped" in report["llama_cpp"]  # nothing exported in this run
    sample = report["samples"][0]
    assert sample["prompt"] and isinstance(sample["base"], str) and isinstance(sample["adapter"], str)
    assert json.loads(run.eval_result.read_text())["transformers"] == hf


def test_llama_cpp_perplexity_on_the_exported_adapter(trained, use_shared_home):
    """After export, the same held-out ids through llama.cpp: base GGUF alone vs with the adapter."""
    from lorekeeper.finetune.evaluate import evaluate_run
    from lorekeeper.finetune.export import export_run

    run, _, _ = trained
    export_run(run.root, register=False)
    report = evaluate_run(run, n_prompts=0, llama_cpp=True, threads=1)
    cpp, hf = report["llama_cpp"], report["transformers"]
    assert "skipped" not in cpp, cpp
    assert cpp["adapter"]["tokens"] == hf["adapter"]["tokens"]
    assert cpp["adapter"]["perplexity"] < cpp["base"]["perplexity"]
    # The base GGUF is Q4_1 and training saw it as NF4, so the engines agree closely, not exactly.
    assert abs(cpp["adapter"]["loss"] - hf["adapter"]["loss"]) < 0.25 * hf["adapter"]["loss"]


def test_unknown_target_module_lists_the_real_ones(tmp_path, use_shared_home):
    from lorekeeper.finetune.train import TargetModuleError, train_run

    data = write_notes(tmp_path / "notes", files=1, paragraphs=4)
    with pytest.raises(TargetModuleError) as err:
        train_run(small_config(data, target_modules=["q_proj", "query_key_value"]), RunDir(tmp_path / "run"))
    message = str(err.value)
    assert "query_key_value" in message
    for real in ("q_proj", "k_proj", "gate_proj", "down_proj"):
        assert real in message
    assert "lm_head" not in message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_4bit_with_paged_optimizer(tmp_path):
    from lorekeeper.finetune.train import resolve_optimizer, train_run

    data = write_notes(tmp_path / "notes")
    config = small_config(data, max_seq_len=128, max_steps=12, eval_steps=6, save_steps=6)
    assert resolve_optimizer(config, "cuda") == "paged_adamw_8bit"
    result = train_run(config, RunDir(tmp_path / "run"), device="cuda")
    assert result.best_eval_loss < result.first_eval_loss
    state = json.loads(
        (tmp_path / "run" / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text()
    )
    assert state["global_step"] == 12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_default_trains_the_deployed_weights_in_bf16(tmp_path):
    """On a GPU the embedded base trains as its dequantized weights in bf16 (no NF4), with AdamW."""
    from lorekeeper.finetune.train import resolve_optimizer, resolve_precision, train_run

    data = write_notes(tmp_path / "notes")
    config = small_config(
        data, base_precision="auto", max_seq_len=128, max_steps=12, eval_steps=6, save_steps=6
    )
    assert resolve_precision(config, "cuda") == "bf16"
    assert resolve_optimizer(config, "cuda") == "adamw_torch"
    result = train_run(config, RunDir(tmp_path / "run"), device="cuda")
    assert result.best_eval_loss < result.first_eval_loss
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["quantize_4bit"] is False
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_early_stopping_waits_for_patience_misses():
    from lorekeeper.finetune.train import EarlyStopper

    stopper = EarlyStopper(patience=2, threshold=0.01)
    assert stopper.update(3.0) == (True, False)
    assert stopper.update(2.5) == (True, False)
    assert stopper.update(2.495) == (False, False), "an improvement under the threshold is a miss"
    assert stopper.update(2.6) == (False, True)
    assert stopper.best == 2.5
    never = EarlyStopper(patience=0)
    assert [never.update(x)[1] for x in (1.0, 2.0, 3.0, 4.0)] == [False] * 4


def test_last_progress_line_shows_the_final_heldout_loss(tmp_path, use_shared_home):
    """The held-out loss after the last step is measured after training ends (3 steps, evaluated
    every 2): the bar's last line shows that one, not the one from step 2."""
    import io

    from rich.console import Console

    from lorekeeper.finetune.train import train_run

    data = write_notes(tmp_path / "notes")
    out = io.StringIO()
    run = RunDir(tmp_path / "run")
    train_run(small_config(data, max_steps=3, eval_steps=2, save_steps=2), run,
              console=Console(file=out, width=200, force_terminal=False))  # fmt: skip
    evals = [(row["step"], row["eval_loss"]) for row in metrics(run) if "eval_loss" in row]
    assert [step for step, _ in evals] == [0, 2, 3]  # the base, step 2, the last step (measured once)
    bar = [line for line in out.getvalue().splitlines() if line.startswith("training")][-1]
    assert f"held-out {evals[-1][1]:.4f}" in bar, bar
