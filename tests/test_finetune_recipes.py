"""Training presets (--goal) and the choice between full-precision LoRA and QLoRA (no model loaded,
except the embedded GGUF's header)."""

from __future__ import annotations

import json
import math

import pytest

from lorekeeper.finetune.config import ConfigError, TrainConfig
from lorekeeper.finetune.precision import (
    FULL_PRECISION_MAX_PARAMS,
    base_parameter_count,
    choose_base_precision,
)
from lorekeeper.finetune.recipes import GOAL_PRESETS, config_for_goal, planned_steps


def test_auto_trains_small_bases_on_the_deployed_weights_and_big_ones_in_nf4():
    small = choose_base_precision("auto", 135_000_000)
    assert small.quantize_4bit is False and "135M" in small.reason
    assert choose_base_precision("auto", FULL_PRECISION_MAX_PARAMS).quantize_4bit is False
    big = choose_base_precision("auto", FULL_PRECISION_MAX_PARAMS + 1)
    assert big.quantize_4bit is True and "QLoRA" in big.reason
    assert choose_base_precision("auto", None).quantize_4bit is False


def test_explicit_precision_wins_and_a_saved_choice_is_kept():
    assert choose_base_precision("nf4", 135_000_000).quantize_4bit is True
    assert choose_base_precision("full", 70_000_000_000).quantize_4bit is False
    # a resumed run (or an old config.json) keeps what it trained with under auto
    assert choose_base_precision("auto", 135_000_000, quantize_4bit=True).quantize_4bit is True
    assert choose_base_precision("full", 135_000_000, quantize_4bit=True).quantize_4bit is False


def test_old_config_json_loads_with_its_4bit_setting(tmp_path):
    old = {"data": ["notes"], "quantize_4bit": True, "lora_r": 8, "epochs": 1.0}
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = TrainConfig.load(tmp_path / "config.json")
    assert config.base_precision == "auto" and config.quantize_4bit is True
    assert choose_base_precision(config.base_precision, 135_000_000, quantize_4bit=True).quantize_4bit


def test_embedded_base_parameter_count_is_read_from_the_gguf_header():
    from lorekeeper.finetune.base_model import resolve_base

    count = base_parameter_count(resolve_base(None))
    assert count is not None and 100_000_000 < count < 200_000_000  # SmolLM2-135M
    assert choose_base_precision("auto", count).quantize_4bit is False


def test_bad_precision_and_goal_are_refused_by_name():
    with pytest.raises(ConfigError, match="base_precision"):
        TrainConfig(data=["x"], base_precision="int3")
    with pytest.raises(ConfigError, match="goal"):
        config_for_goal("poetry", data=["x"])


def test_facts_preset_sets_its_fields_and_explicit_options_override():
    config = config_for_goal("facts", data=["facts.jsonl"])
    preset = GOAL_PRESETS["facts"]
    for name, value in preset.items():
        assert getattr(config, name) == value, name
    assert config.goal == "facts" and config.eval_fraction == 0.0 and config.train_on_prompt is False
    overridden = config_for_goal("facts", data=["facts.jsonl"], epochs=3.0, lora_r=4)
    assert overridden.epochs == 3.0 and overridden.lora_r == 4
    assert overridden.learning_rate == preset["learning_rate"]
    plain = config_for_goal(None, data=["facts.jsonl"])
    assert plain == TrainConfig(data=["facts.jsonl"]) and plain.goal is None


def test_presets_differ_where_the_jobs_differ():
    facts, style, domain = (config_for_goal(g, data=["d"]) for g in ("facts", "style", "domain"))
    assert facts.epochs > style.epochs and facts.learning_rate > style.learning_rate
    assert facts.early_stopping_patience == 0 < style.early_stopping_patience
    assert domain.train_on_prompt is True and style.train_on_prompt is False


def test_planned_steps_count_epochs_or_max_steps():
    config = config_for_goal("facts", data=["d"], batch_size=8)
    assert planned_steps(config, 48) == (config.epochs, math.ceil(6 * config.epochs))
    capped = config_for_goal("facts", data=["d"], batch_size=8, max_steps=30)
    assert planned_steps(capped, 48) == (5.0, 30)


def _chats(path, n: int):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Code of depot {i}?"},
                {"role": "assistant", "content": f"D-{i}7"},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_cli_data_states_the_presets_plan_and_explicit_options_win(tmp_path):
    from typer.testing import CliRunner

    from lorekeeper.finetune.cli import app

    data = _chats(tmp_path / "facts.jsonl", 20)
    result = CliRunner().invoke(app, ["data", str(data), "--goal", "facts", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout[result.stdout.index("{") :])
    preset = GOAL_PRESETS["facts"]
    assert plan["goal"] == "facts" and plan["heldout_records"] == 0 and plan["train_records"] == 20
    assert plan["epochs"] == preset["epochs"]
    assert plan["optimizer_steps"] == math.ceil(20 / preset["batch_size"]) * preset["epochs"]
    assert "estimate" in plan["estimated_cpu_minutes"]
    assert "lorekeeper finetune augment" in result.stderr  # the facts preset points at paraphrasing

    result = CliRunner().invoke(app, ["data", str(data), "--goal", "facts", "--epochs", "3", "--json"])
    plan = json.loads(result.stdout[result.stdout.index("{") :])
    assert plan["epochs"] == 3 and plan["optimizer_steps"] == 3 * math.ceil(20 / preset["batch_size"])


def test_cli_train_refuses_contradicting_precision_options(tmp_path):
    from typer.testing import CliRunner

    from lorekeeper.finetune.cli import app

    data = _chats(tmp_path / "facts.jsonl", 4)
    result = CliRunner().invoke(
        app, ["train", "--data", str(data), "--4bit", "--base-precision", "full", "-o", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "contradicts --base-precision full" in result.output
    result = CliRunner().invoke(
        app, ["train", "--data", str(data), "--goal", "poems", "-o", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "goal='poems'" in result.output
