"""Fine-tuning bookkeeping a user meets before any training: bad inputs named before the model
loads, no folders left by failed runs, `finetune runs rm`, absolute data paths for `--resume`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorekeeper.finetune.base_model import BaseModelError, resolve_base
from lorekeeper.finetune.cli import app
from lorekeeper.finetune.config import TrainConfig
from lorekeeper.finetune.data import DataError
from lorekeeper.finetune.runs import RunDir
from lorekeeper.server.settings import Settings


def _fake_gguf(path: Path, version: int = 99) -> Path:
    path.write_bytes(b"GGUF" + version.to_bytes(4, "little") + b"\0" * 64)
    return path


def _chats(path: Path, rows: int = 4) -> Path:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
             for i in range(rows)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_base_with_gguf_magic_and_a_bad_version_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="GGUF version 99"):
        resolve_base(_fake_gguf(tmp_path / "fake.gguf"))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x05")
    with pytest.raises(BaseModelError, match="not a readable GGUF"):
        resolve_base(truncated)


@pytest.mark.slow  # imports transformers (and loads a tokenizer): tens of seconds on two busy cores
def test_cli_train_on_a_fake_base_fails_clearly_and_leaves_no_run(tmp_path):
    data = _chats(tmp_path / "d.jsonl")
    result = CliRunner().invoke(
        app,
        ["train", "--data", str(data), "--base", str(_fake_gguf(tmp_path / "fake.gguf")), "--name", "bad"],
    )
    assert result.exit_code == 2, result.output
    assert "GGUF version 99" in result.output and "Traceback" not in result.output
    assert not (Settings.load().runs_dir / "bad").exists()
    listed = CliRunner().invoke(app, ["runs"])
    assert listed.exit_code == 0 and "bad" not in listed.output


@pytest.mark.slow  # imports transformers (and loads a tokenizer): tens of seconds on two busy cores
def test_data_errors_come_before_the_base_model_is_read(tmp_path):
    """A bad data file is named first: the base (here unreadable) is not even looked at yet."""
    from lorekeeper.finetune.train import train_run

    bad = tmp_path / "d.jsonl"
    bad.write_text('{"messages": "not a list"}\n', encoding="utf-8")
    config = TrainConfig(data=[str(bad)], base=str(_fake_gguf(tmp_path / "fake.gguf")))
    with pytest.raises(DataError, match="d.jsonl:1"):
        train_run(config, RunDir(tmp_path / "run"))


def test_data_paths_are_stored_absolute_so_resume_works_elsewhere(tmp_path, monkeypatch):
    _chats(tmp_path / "d.jsonl")
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(data=["d.jsonl"])
    config.save(tmp_path / "config.json")
    monkeypatch.chdir(os.path.sep)
    loaded = TrainConfig.load(tmp_path / "config.json")
    assert loaded.data == [str(tmp_path / "d.jsonl")]
    from lorekeeper.finetune.data import gather_records

    records, files = gather_records(loaded)
    assert files == 1 and len(records) == 4


def test_runs_rm_removes_a_run_and_names_an_unknown_one(tmp_path):
    run = Settings.load().runs_dir / "old-run"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}", encoding="utf-8")
    listed = CliRunner().invoke(app, ["runs"])
    assert listed.exit_code == 0 and "old-run" in listed.output
    removed = CliRunner().invoke(app, ["runs", "rm", "old-run"])
    assert removed.exit_code == 0, removed.output
    assert not run.exists()
    unknown = CliRunner().invoke(app, ["runs", "rm", "old-run"])
    assert unknown.exit_code == 2 and "no fine-tuning run at 'old-run'" in unknown.output


@pytest.mark.slow  # imports transformers (and loads a tokenizer): tens of seconds on two busy cores
def test_unknown_target_module_is_named_from_the_file_headers_before_loading(tmp_path):
    """The base folder's safetensors header lists its layers but the file holds no weights: loading
    it would fail, so the target error proves the check ran before any load."""
    from lorekeeper.finetune.target_check import linear_names_from_files
    from lorekeeper.finetune.train import TargetModuleError, train_run

    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    header = {f"model.layers.0.{m}.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
              for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}  # fmt: skip
    header["model.embed_tokens.weight"] = {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]}
    header["model.layers.0.input_layernorm.weight"] = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    config = TrainConfig(
        data=[str(_chats(tmp_path / "d.jsonl"))], base=str(folder), target_modules=["q_proj", "qkv"]
    )
    with pytest.raises(TargetModuleError) as err:
        train_run(config, RunDir(tmp_path / "run"))
    assert "qkv" in str(err.value) and "down_proj, q_proj, v_proj" in str(err.value)

    # the embedded GGUF: names from its tensor list, as the loaded model names them
    names = linear_names_from_files(resolve_base(None))
    assert names == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.mark.slow  # imports transformers (and loads a tokenizer): tens of seconds on two busy cores
def test_eval_data_file_is_the_heldout_set_and_all_data_trains(tmp_path):
    from lorekeeper.finetune.base_model import load_tokenizer
    from lorekeeper.finetune.data import build_datasets

    train = _chats(tmp_path / "train.jsonl", rows=6)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"messages": [{"role": "user", "content": "held"},
                                                {"role": "assistant", "content": "out"}]}) + "\n")  # fmt: skip
    config = TrainConfig(data=[str(train)], eval_data=[str(heldout)])
    assert config.eval_data == [str(heldout.resolve())]
    built = build_datasets(config, load_tokenizer(resolve_base(None)))
    assert (built.summary.train_records, built.summary.heldout_records) == (6, 1)
    assert [r.reference_answer() for r in built.heldout_records] == ["out"]
    result = CliRunner().invoke(app, ["data", str(train), "--eval-data", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "missing.jsonl" in result.output


@pytest.mark.slow  # imports transformers (and loads a tokenizer): tens of seconds on two busy cores
def test_chat_template_option_renders_the_training_chats(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}", encoding="utf-8"
    )
    data = _chats(tmp_path / "d.jsonl", rows=2)
    shown = CliRunner().invoke(app, ["data", str(data), "--chat-template", str(template), "--show", "1"])
    assert shown.exit_code == 0, shown.output
    assert "### user: q" in shown.output and "### assistant: a" in shown.output
    chatml = CliRunner().invoke(app, ["data", str(data), "--chat-template", "chatml", "--show", "1"])
    assert "<|im_start|>user\nq" in chatml.output and "SmolLM" not in chatml.output  # no default system turn
    missing = CliRunner().invoke(app, ["data", str(data), "--chat-template", "nope.jinja"])
    assert missing.exit_code == 2 and "chat_template" in missing.output and "chatml" in missing.output
