"""NEFTune, rsLoRA and DoRA options, and paraphrase augmentation (`finetune augment`).

Options: recorded in the run's config.json, an old config.json still loads, and each one reaches
what applies it (peft's LoraConfig, the Trainer's TrainingArguments); a DoRA run trains and its
export says clearly why it cannot be a GGUF. Augmentation: the filters on drafted paraphrases, the
real SmolLM2 drafting through the CLI (slow), and clear errors for bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakes import ScriptedGenerator  # noqa: E402

from lorekeeper.finetune.augment import (  # noqa: E402
    DEFAULT_MIN_SIMILARITY,
    DRIFTED,
    DUPLICATE,
    LOST_NAME,
    NOT_A_QUESTION,
    OTHER_KIND,
    SAME,
    Paraphraser,
    answer_kind,
    augment_rows,
    masked,
    names_and_numbers,
    normalized,
    question_problem,
    read_rows,
    row_question_answer,
)
from lorekeeper.finetune.config import ConfigError, TrainConfig  # noqa: E402

QA = [
    ("Who is the CEO of Talvik Analytics?", "The CEO of Talvik Analytics is Quenade Dunholt."),
    ("How many employees does Mibade Works have?", "Mibade Works has 4312 employees."),
    ("What is the refund window at Drasorin Labs?", "The refund window at Drasorin Labs is 37 days."),
]


def write_qa(path: Path, extra: list[dict] = ()) -> Path:
    """The three facts in three row shapes (chat with a system turn, Alpaca, prompt/completion)."""
    (q0, a0), (q1, a1), (q2, a2) = QA
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You answer questions about companies."},
                {"role": "user", "content": q0},
                {"role": "assistant", "content": a0},
            ]
        },
        {"instruction": q1, "output": a1},
        {"prompt": q2, "completion": a2},
        *extra,
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Options in the config


def test_options_are_recorded_and_an_old_config_loads_with_them_off(tmp_path):
    config = TrainConfig(data=["x"], neftune_alpha=5.0, use_rslora=True, use_dora=True)
    config.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["neftune_alpha"] == 5.0 and saved["use_rslora"] is True and saved["use_dora"] is True
    assert TrainConfig.load(tmp_path / "config.json").neftune_alpha == 5.0

    old = {k: v for k, v in saved.items() if k not in ("neftune_alpha", "use_rslora", "use_dora")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = TrainConfig.load(tmp_path / "old.json")
    assert (loaded.neftune_alpha, loaded.use_rslora, loaded.use_dora) == (0.0, False, False)


def test_negative_neftune_alpha_is_refused_by_name():
    with pytest.raises(ConfigError, match="neftune_alpha"):
        TrainConfig(data=["x"], neftune_alpha=-1.0)


def test_cli_train_help_lists_the_options():
    from typer.testing import CliRunner

    from lorekeeper.finetune.cli import app

    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    for flag in ("--neftune-alpha", "--rslora", "--dora"):
        assert flag in result.output


@pytest.mark.slow
def test_rslora_and_dora_reach_peft_and_neftune_reaches_the_trainer(tmp_path):
    import torch
    import transformers
    from finetune_tiny import tiny_config

    from lorekeeper.finetune.runs import RunDir
    from lorekeeper.finetune.train import _training_arguments, prepare_model

    def tiny_model():
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab=256))

    plain = TrainConfig(data=["x"], gradient_checkpointing=False)
    model, _ = prepare_model(tiny_model(), plain)
    assert not model.peft_config["default"].use_rslora and not model.peft_config["default"].use_dora
    assert not [n for n, _ in model.named_parameters() if "lora_magnitude_vector" in n]

    options = TrainConfig(data=["x"], gradient_checkpointing=False, use_rslora=True, use_dora=True)
    model, targets = prepare_model(tiny_model(), options)
    lora = model.peft_config["default"]
    assert lora.use_rslora and lora.use_dora
    magnitudes = [n for n, p in model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert len(magnitudes) == 2 * len(targets)  # one trained magnitude per adapted module, both layers

    args = _training_arguments(
        TrainConfig(data=["x"], neftune_alpha=5.0),
        RunDir(tmp_path / "run"),
        "fp32",
        "adamw_torch",
        "cpu",
        False,
    )
    assert args.neftune_noise_alpha == 5.0
    off = _training_arguments(plain, RunDir(tmp_path / "run"), "fp32", "adamw_torch", "cpu", False)
    assert off.neftune_noise_alpha is None


@pytest.mark.slow
def test_a_dora_run_with_neftune_trains_and_its_export_says_why_not(tmp_path):
    """A real (tiny) training run: the options land in config.json, adapter_config.json and the
    Trainer's saved arguments; the export refuses with what to do instead."""
    import torch
    from finetune_tiny import make_hf_base, smollm2_tokenizer_dir
    from typer.testing import CliRunner

    from lorekeeper.finetune.cli import app
    from lorekeeper.finetune.export import export_run
    from lorekeeper.finetune.lora_tensors import AdapterFormatError
    from lorekeeper.finetune.runs import RunDir
    from lorekeeper.finetune.train import train_run

    model_dir, _ = make_hf_base(tmp_path, "llama", smollm2_tokenizer_dir(tmp_path))
    data = write_qa(tmp_path / "qa.jsonl")
    config = TrainConfig(
        data=[str(data)],
        base=str(model_dir),
        max_steps=2,
        batch_size=2,
        save_steps=2,
        eval_fraction=0.34,  # one of the three records held out, for `finetune eval`
        early_stopping_patience=0,
        gradient_checkpointing=False,
        use_dora=True,
        neftune_alpha=5.0,
    )
    run = RunDir(tmp_path / "run")
    train_run(config, run)
    saved = json.loads(run.config.read_text())
    assert saved["use_dora"] is True and saved["neftune_alpha"] == 5.0
    assert json.loads((run.adapter / "adapter_config.json").read_text())["use_dora"] is True
    args = torch.load(run.latest_checkpoint() / "training_args.bin", weights_only=False)
    assert args.neftune_noise_alpha == 5.0

    with pytest.raises(AdapterFormatError, match="DoRA.*cannot apply.*train without use_dora"):
        export_run(run.root, register=False)
    result = CliRunner().invoke(app, ["export", str(run.root), "--merged"])
    assert result.exit_code == 2 and "DoRA" in result.output and "Traceback" not in result.output
    # what the message offers instead: the run measured in transformers
    result = CliRunner().invoke(
        app, ["eval", str(run.root), "--no-llama-cpp", "--json", "--prompts", "1", "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["heldout_records"] == 1 and report["transformers"]["adapter"]["loss"] > 0


# ------------------------------------------------------------------------------------------------
# Augmentation: filters


def test_filters_name_why_a_draft_is_not_a_rewording():
    original = "How many employees does Mibade Works have?"
    assert names_and_numbers(original) == {"mibade", "works"}
    assert names_and_numbers("When did Sala open in 1984?") == {"sala", "1984"}
    assert question_problem("What is the headcount of Mibade Works?", original) is None
    assert question_problem("Mibade Works has 12 employees.", original) == NOT_A_QUESTION
    assert question_problem("Answer: how many?", original) == NOT_A_QUESTION
    assert question_problem("Which company has more employees?", original) == LOST_NAME
    assert normalized("  How many employees does MIBADE Works have ?") == normalized(original)
    assert question_problem("What is the date of Mibade Works's founding?", original) is None
    assert question_problem("Who owns Mibade Works?", original) == OTHER_KIND
    assert [answer_kind(q) for q in ("When was X founded?", "The CEO of X is who?", "What is X?")] == [
        "time",
        "person",
        None,
    ]
    assert (
        masked("Is Mibade Works's office in 1984 Road?", {"mibade", "works", "1984"})
        == "Is X X office in X Road?"
    )


class QueuedGenerator(ScriptedGenerator):
    """Replies to "Rewrite: QUESTION" with the next of ``replies[QUESTION]`` (the drafts a model might
    write), then with the question itself, as a weak model often does."""

    def __init__(self, replies: dict[str, list[str]]) -> None:
        super().__init__()
        self.replies = {q: list(r) for q, r in replies.items()}

    def stream(self, messages, **kwargs):
        question = messages[-1].content.removeprefix("Rewrite: ")
        queue = self.replies.get(question) or []
        self.answer = queue.pop(0) if queue else question
        return super().stream(messages, **kwargs)


def test_augment_keeps_good_drafts_with_the_answer_unchanged_and_counts_the_rest(tmp_path, embedder):
    rows, questions = read_rows(write_qa(tmp_path / "qa.jsonl", extra=[{"text": "a plain passage"}]))
    assert questions == 3
    (q0, a0), (q1, a1), (q2, _) = QA
    drafts = {
        q0: [
            "Which person is the chief executive of Talvik Analytics?",  # kept
            q0,  # the original again
            "Who runs Talvik Analytics as its CEO?",  # kept: two wanted, done after 3 drafts
        ],
        q1: [
            "What is the number of employees at Mibade Works?",  # kept
            "What is the number of employees at Mibade Works?",  # a kept draft again
            "Which company has more employees?",  # lost the name
            "Who owns Mibade Works?",  # asks for a person, not a number
        ],  # then 4 more drafts (8 in all), each the original
        q2: [
            "The refund window at Drasorin Labs is 10 days.",  # an answer
            "Where are the offices of Drasorin Labs?",  # another question (MiniLM cosine ~0.56)
        ],  # then 6 originals
    }
    out, report = augment_rows(
        rows, Paraphraser(QueuedGenerator(drafts), embedder, DEFAULT_MIN_SIMILARITY), 2
    )
    assert (report.questions, report.copied, report.drafts, report.kept) == (3, 1, 3 + 8 + 8, 3)
    assert report.dropped[SAME] == 1 + 4 + 6 and report.dropped[DUPLICATE] == 1
    assert report.dropped[OTHER_KIND] == 1
    assert report.dropped[LOST_NAME] == 1 and report.dropped[NOT_A_QUESTION] == 1
    assert sum(n for why, n in report.dropped.items() if why.startswith(DRIFTED)) == 1
    assert len(out) == report.rows_written == 4 + 3
    pairs = [row_question_answer(r) for r in out if "text" not in r]
    assert pairs[:5] == [
        (q0, a0),
        ("Which person is the chief executive of Talvik Analytics?", a0),
        ("Who runs Talvik Analytics as its CEO?", a0),
        (q1, a1),
        ("What is the number of employees at Mibade Works?", a1),
    ]
    assert out[1]["messages"][0] == {"role": "system", "content": "You answer questions about companies."}
    assert set(out[4]) == {"instruction", "output"} and out[-1] == {"text": "a plain passage"}


def test_question_answer_rows_are_paraphrased_in_their_own_shape(tmp_path, embedder):
    (q0, a0), _, _ = QA
    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"question": q0, "answer": a0, "files": ["people.md"]}) + "\n", encoding="utf-8"
    )
    rows, questions = read_rows(path)
    assert questions == 1
    drafts = {q0: ["Which person is the chief executive of Talvik Analytics?"]}
    out, report = augment_rows(
        rows, Paraphraser(QueuedGenerator(drafts), embedder, DEFAULT_MIN_SIMILARITY), 1
    )
    assert report.kept == 1
    assert out == [
        {"question": q0, "answer": a0, "files": ["people.md"]},
        {
            "question": "Which person is the chief executive of Talvik Analytics?",
            "answer": a0,
            "files": ["people.md"],
        },
    ]


# ------------------------------------------------------------------------------------------------
# Augmentation: the command


def _augment(*args: str):
    from typer.testing import CliRunner

    from lorekeeper.finetune.cli import app

    return CliRunner().invoke(app, ["augment", *args])


def test_augment_bad_input_is_a_clear_error(tmp_path):
    result = _augment(str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2 and "missing.jsonl: no such file" in result.output

    text_only = tmp_path / "notes.jsonl"
    text_only.write_text('{"text": "plain"}\n{"messages": [{"role": "user", "content": "Hi."}, '
                         '{"role": "assistant", "content": "Hello."}]}\n')  # fmt: skip
    result = _augment(str(text_only), "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2 and "no question/answer rows to paraphrase" in result.output

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "Why?", "completion": "Because."}\n{"prompt": \n')
    result = _augment(str(broken), "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2 and "broken.jsonl:2: not valid JSON" in result.output

    result = _augment(str(broken), "--out", str(broken))
    assert result.exit_code == 2 and "is the input file" in result.output
    good = write_qa(tmp_path / "qa.jsonl")
    result = _augment(str(good), "--out", str(tmp_path / "o.jsonl"), "--model", str(tmp_path / "no.gguf"))
    assert result.exit_code == 2 and "no such model file" in result.output
    for result in [_augment(str(broken), "--out", str(tmp_path / "o.jsonl"), "-n", "0")]:
        assert result.exit_code == 2 and "--paraphrases 0" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow
def test_augment_with_the_real_model_writes_paraphrases_that_pass_the_filters(tmp_path, embedder):
    source = write_qa(tmp_path / "qa.jsonl")
    out = tmp_path / "aug.jsonl"
    result = _augment(str(source), "--out", str(out), "--paraphrases", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["questions"] == 3 and report["rows_written"] == len(rows) == 3 + report["kept"]
    assert report["kept"] >= 1  # SmolLM2-135M is a weak paraphraser, but not a useless one
    assert report["drafts"] == report["kept"] + sum(report["dropped"].values())

    answers = dict((a, q) for q, a in QA)
    seen = set()
    for row in rows:
        question, answer = row_question_answer(row)
        original = answers[answer]  # every answer is one of the originals, character for character
        assert normalized(question) not in seen
        seen.add(normalized(question))
        if question != original:
            assert question_problem(question, original) is None
            names = names_and_numbers(original)
            vectors = embedder.embed([masked(question, names), masked(original, names)])
            assert float(vectors[0] @ vectors[1]) >= DEFAULT_MIN_SIMILARITY
