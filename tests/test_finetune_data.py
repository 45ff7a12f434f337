"""Fine-tuning data: every accepted format, line-numbered errors, answer-only masking, packing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lorekeeper.finetune.config import ConfigError, TrainConfig
from lorekeeper.finetune.data import (
    IGNORE_INDEX,
    DataError,
    PackedCollator,
    Record,
    build_datasets,
    pack,
    parse_qa,
    parse_record,
    read_records,
    split_heldout,
    tokenize_record,
)


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer and chat template, read from the embedded GGUF."""
    from lorekeeper.finetune.base_model import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base(None))


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    )


# --- formats ---------------------------------------------------------------------------------


def test_every_format_is_read_into_records(tmp_path):
    data = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            {"conversations": [{"from": "human", "value": "Ping?"}, {"from": "gpt", "value": "Pong."}]},
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            {"prompt": "2+2=", "completion": "4"},
            {"text": "Plain prose for continued pretraining."},
            "",
        ],
    )
    (tmp_path / "notes.md").write_text("# Notes\n\nFirst paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    records, n_files = read_records([tmp_path])
    assert n_files == 2
    kinds = [r.kind for r in records]
    assert kinds == ["chat", "chat", "chat", "completion", "text", "text"]
    assert records[1].messages == [
        {"role": "user", "content": "Ping?"},
        {"role": "assistant", "content": "Pong."},
    ]
    assert records[2].messages == [
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    assert records[3].prompt == "2+2=" and records[3].completion == "4"
    assert records[4].source == f"{data}:5"
    assert "Second paragraph." in records[5].text and records[5].source.endswith("notes.md:1")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"messages": [', "not valid JSON"),
        ('{"instruction": "only half"}', "needs both 'instruction' and 'output'"),
        ('{"prompt": "p", "completion": 3}', "'completion' must be a string, got int"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role='robot'"),
        ('{"messages": [{"role": "user", "content": "no answer"}]}', "no assistant message"),
        ('{"question": "?"}', "needs both 'question' and 'answer'"),
        ('{"query": "?"}', "unrecognised record (keys: query)"),
        ("[1, 2]", "must be a JSON object, got list"),
    ],
)
def test_malformed_record_error_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"text": "fine"})
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, bad_line, good])
    with pytest.raises(DataError) as err:
        read_records([path])
    assert f"{path}:3" in str(err.value)
    assert message in str(err.value)


def test_every_bad_line_is_listed_not_only_the_first(tmp_path):
    good = json.dumps({"text": "fine"})
    first = write_jsonl(tmp_path / "a.jsonl", [good, '{"messages": [', good, '{"instruction": "half"}'])
    rows = [good] + ['{"query": "?"}'] * 30
    second = write_jsonl(tmp_path / "b.jsonl", rows)
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        read_records([first, second, tmp_path / "c.jsonl", tmp_path / "absent.jsonl"])
    message = str(err.value)
    assert message.startswith("34 problems in the training data")
    assert f"{first}:2: not valid JSON" in message
    assert f"{first}:4: an Alpaca record needs both" in message
    assert f"{second}:2: unrecognised record" in message
    assert f"{second}:19: unrecognised record" in message  # the 20th listed
    assert f"{second}:20:" not in message  # beyond the cap: counted, not listed
    assert "... and 14 more" in message
    assert len(message.splitlines()) == 1 + 20 + 1


def test_bad_lines_past_the_cap_in_other_files_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "fine"}', "[1]", "{}", "not json"])
    (tmp_path / "e.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        read_records([path, tmp_path / "e.jsonl", tmp_path / "absent.jsonl"])
    lines = str(err.value).splitlines()
    assert lines[0] == "5 problems in the training data; fix them and run again:"
    assert [line.strip().split(": ")[0] for line in lines[1:]] == [
        f"{path}:2", f"{path}:3", f"{path}:4", f"{tmp_path / 'e.jsonl'}:2", str(tmp_path / "absent.jsonl")
    ]  # fmt: skip
    assert "not UTF-8 text" in lines[4] and "no such file" in lines[5]


def test_empty_content_is_read_with_a_warning_naming_the_line(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "  "}]},
            {"instruction": "Name it", "output": ""},
            {"prompt": "2+2=", "completion": ""},
            {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "Pong."}]},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="lorekeeper.finetune.data"):
        records, _ = read_records([path])
    assert len(records) == 5
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "4 record(s) with empty content" in warned
    assert f"{path}:2: message 1 (assistant) has an empty 'content'" in warned
    assert f"{path}:3: 'output' is empty" in warned
    assert f"{path}:4: 'completion' is empty" in warned
    assert f"{path}:5: message 0 (user) has an empty 'content'" in warned
    assert f"{path}:1" not in warned


def test_alpaca_rows_are_reported_as_alpaca(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            {"prompt": "2+2=", "completion": "4"},
            {"text": "Plain prose."},
        ],
    )
    records, _ = read_records([path])
    assert [r.format_name for r in records] == ["alpaca", "chat", "prompt/completion", "text"]
    assert records[0].kind == "chat"  # trained with the chat template all the same
    assert Record.from_json(records[0].to_json()).format_name == "alpaca"  # survives the held-out file


def test_question_answer_rows_train_as_one_turn_with_the_answer_learned(tmp_path, tokenizer):
    # the shape of an `eval answers` question file: the same file can teach what it tests
    path = write_jsonl(
        tmp_path / "facts.jsonl",
        [
            {"question": "What is the refund window at Quorvane Labs?", "answer": "47 days."},
            {
                "system": "You answer about Quorvane Labs.",
                "question": "Who is the CEO?",
                "answer": "Idris Fenwater.",
            },
            {
                "question": "Where is it?",
                "answer": "Tallinn.",
                "files": ["notes/hq.md"],
            },  # extra keys ignored
        ],
    )
    records, _ = read_records([path])
    assert [r.format_name for r in records] == ["question/answer"] * 3
    assert records[0].messages == [
        {"role": "user", "content": "What is the refund window at Quorvane Labs?"},
        {"role": "assistant", "content": "47 days."},
    ]
    assert records[1].messages[0] == {"role": "system", "content": "You answer about Quorvane Labs."}
    assert Record.from_json(records[0].to_json()).format_name == "question/answer"
    example = tokenize_record(records[0], tokenizer)
    assert trained_text(tokenizer, example).strip().startswith("47 days.")  # only the answer carries a loss
    assert "refund window" not in trained_text(tokenizer, example)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "Why?"}, "needs both 'question' and 'answer'"),
        ({"answer": "Because."}, "needs both 'question' and 'answer'"),
        ({"question": "Why?", "answers": ["Because.", "So."]}, "give the one answer to learn as 'answer'"),
        ({"question": "Why?", "answer": ["Because."]}, "'answer'"),
    ],
)
def test_incomplete_question_answer_rows_name_the_line_and_the_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Fine?", "answer": "Yes."}, row])
    with pytest.raises(DataError) as caught:
        read_records([path])
    assert f"{path}:2" in str(caught.value) and message in str(caught.value)


def test_an_empty_answer_is_named_by_its_field(tmp_path):
    rows = [{"question": "Fine?", "answer": "Yes."}, {"question": "Why?", "answer": " "}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    records, _ = read_records([path])
    assert records[1].empty_parts() == ["'answer' is empty"]


def test_missing_file_and_unsupported_suffix_are_clear(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records([tmp_path / "absent.jsonl"])
    (tmp_path / "table.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported data file"):
        read_records([tmp_path / "table.csv"])


def test_empty_dataset_is_a_clear_error(tmp_path, tokenizer):
    write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    config = TrainConfig(data=[str(tmp_path)])
    with pytest.raises(DataError, match="no training records"):
        build_datasets(config, tokenizer)


def test_config_without_any_data_is_rejected():
    with pytest.raises(ConfigError, match="no training data"):
        TrainConfig()
    with pytest.raises(ConfigError, match="overlong"):
        TrainConfig(data=["x.jsonl"], overlong="wrap")


# --- tokens and labels -----------------------------------------------------------------------


def test_chat_loss_only_on_assistant_tokens(tokenizer):
    record = parse_record(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of Quorvane?"},
                {"role": "assistant", "content": "Tobbin Reach."},
                {"role": "user", "content": "And its river?"},
                {"role": "assistant", "content": "The Pellucid."},
            ]
        },
        "t:1",
    )
    example = tokenize_record(record, tokenizer)
    trained = trained_text(tokenizer, example)
    assert "Tobbin Reach." in trained and "The Pellucid." in trained
    for prompt_text in ("Be brief", "Capital of Quorvane", "And its river", "user"):
        assert prompt_text not in trained
    # The end-of-turn marker is learned, so the model knows when to stop.
    assert trained.count(tokenizer.eos_token) == 2
    # With --train-on-prompt every token but the first carries a loss.
    everything = tokenize_record(record, tokenizer, train_on_prompt=True)
    assert everything.labels[1:] == everything.input_ids[1:]


def test_prompt_completion_masks_the_prompt(tokenizer):
    record = parse_record({"prompt": "The ferry leaves every", "completion": " four hours"}, "t:1")
    example = tokenize_record(record, tokenizer)
    prompt_len = len(tokenizer("The ferry leaves every", add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in example.labels[:prompt_len])
    assert trained_text(tokenizer, example) == " four hours" + tokenizer.eos_token


def test_chat_template_tokens_match_hf_and_have_one_bos(tokenizer):
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]
    example = tokenize_record(Record("chat", "t:1", messages=messages), tokenizer)
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert example.input_ids == list(reference)
    bos = tokenizer.bos_token_id
    if bos is not None:
        assert example.input_ids[:2].count(bos) <= 1
        assert not (example.input_ids[0] == bos and example.input_ids[1] == bos)


def test_overlong_records_are_truncated_with_a_warning_or_rejected(tmp_path, tokenizer, caplog):
    long_answer = " ".join(f"word{i}" for i in range(400))
    path = write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"prompt": "Short question:", "completion": " short answer"},
            {"prompt": "Long question:", "completion": long_answer},
        ],
    )
    config = TrainConfig(data=[str(path)], max_seq_len=64, eval_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        built = build_datasets(config, tokenizer)
    assert built.summary.truncated == 1
    assert "1 record(s) were longer than max_seq_len=64" in caplog.text
    assert all(len(row.input_ids) <= 64 for row in built.train_rows)

    strict = TrainConfig(data=[str(path)], max_seq_len=64, eval_fraction=0.0, overlong="error")
    with pytest.raises(DataError, match=rf"{path}:2: the record is \d+ tokens, longer than max_seq_len=64"):
        build_datasets(strict, tokenizer)


def test_long_plain_text_is_cut_into_windows_not_lost(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(f"line{i}" for i in range(300))}])
    built = build_datasets(TrainConfig(data=[str(path)], max_seq_len=64, eval_fraction=0.0), tokenizer)
    assert built.summary.split_into_windows == 1 and built.summary.truncated == 0
    total = len(tokenize_record(read_records([path])[0][0], tokenizer).input_ids)
    assert built.summary.train_tokens == total


# --- split and packing -----------------------------------------------------------------------


def test_heldout_split_is_deterministic_and_disjoint():
    records = [Record("text", f"f:{i}", text=f"record {i}") for i in range(50)]
    train_a, held_a = split_heldout(records, 0.2, 200, seed=7)
    train_b, held_b = split_heldout(records, 0.2, 200, seed=7)
    _, held_c = split_heldout(records, 0.2, 200, seed=8)
    assert [r.source for r in held_a] == [r.source for r in held_b]
    assert {r.source for r in held_a} != {r.source for r in held_c}
    assert len(held_a) == 10 and len(train_a) == 40
    assert not {r.source for r in held_a} & {r.source for r in train_a}


def test_packing_keeps_records_whole_and_restarts_positions(tokenizer):
    records = [Record("text", f"f:{i}", text="word " * (5 + 4 * i)) for i in range(12)]
    examples = [tokenize_record(r, tokenizer) for r in records]
    rows = pack(examples, 64)
    assert len(rows) < len(examples)
    assert all(len(row.input_ids) <= 64 for row in rows)
    assert sum(len(row.input_ids) for row in rows) == sum(len(e.input_ids) for e in examples)
    lengths = sorted(len(e.input_ids) for e in examples)
    segments = []
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.position_ids)]
        segments += [b - a for a, b in zip(starts, starts[1:])]
        # each record's first token has no loss: a row never learns "end of A predicts start of B"
        assert all(row.labels[i] == IGNORE_INDEX for i in starts[:-1])
    assert sorted(segments) == lengths

    batch = PackedCollator(tokenizer.pad_token_id)(rows[:2])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape
    assert batch["input_ids"].shape[1] % 8 == 0
    assert "attention_mask" not in batch


def test_packed_rows_give_the_same_logits_as_separate_records():
    """transformers must see packed records as separate (block-diagonal attention).

    It does so only without an attention mask and without a KV cache, as in training.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    a, b = torch.randint(3, 128, (1, 9)), torch.randint(3, 128, (1, 13))
    with torch.no_grad():
        alone_a, alone_b = (
            model(input_ids=a, use_cache=False).logits,
            model(input_ids=b, use_cache=False).logits,
        )
        packed = model(
            input_ids=torch.cat([a, b], dim=1),
            position_ids=torch.cat([torch.arange(9), torch.arange(13)]).unsqueeze(0),
            use_cache=False,
        ).logits
    torch.testing.assert_close(packed[:, :9], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[:, 9:], alone_b, atol=1e-5, rtol=1e-4)


def test_summary_counts_tokens_before_training(tmp_path, tokenizer):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
        }
        for i in range(20)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    built = build_datasets(TrainConfig(data=[str(path)], max_seq_len=128, eval_fraction=0.1), tokenizer)
    summary = built.summary
    assert summary.records == 20 and summary.train_records == 18 and summary.heldout_records == 2
    assert summary.formats == {"chat": 20}
    assert 0 < summary.train_loss_tokens < summary.train_tokens
    assert summary.train_tokens == sum(len(e.input_ids) for e in built.train_examples)
    assert summary.heldout_rows >= 1 and 0 < summary.row_fill <= 1


# --- from the index --------------------------------------------------------------------------


def test_from_index_uses_indexed_chunks_as_text(tmp_path, tokenizer, embedder):
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.store import Store

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ferries.md").write_text("# Ferries\n\nThe ferry to Quorvane leaves at dawn.\n", encoding="utf-8")
    (docs / "salt.txt").write_text("Blue salt is traded in Mellistra.\n", encoding="utf-8")
    store = Store.open()
    try:
        Indexer(store, embedder=embedder).add_root(docs)
    finally:
        store.close()
    built = build_datasets(TrainConfig(from_index=True, index_path_glob="*.md", eval_fraction=0.0), tokenizer)
    texts = [tokenizer.decode(e.input_ids) for e in built.train_examples]
    assert any("Quorvane" in t for t in texts)
    assert not any("Mellistra" in t for t in texts)
    assert built.summary.formats == {"text": 1}


def test_parse_qa_reads_drafted_pairs():
    assert parse_qa("Question: Where?\nAnswer: Here.") == ("Where?", "Here.")
    assert parse_qa("I cannot help with that.") is None
    assert parse_qa("Answer: x Question: y") is None


def test_drafting_pairs_with_the_real_generator(tmp_path):
    """Optional path: the llama.cpp generator drafts pairs; every kept pair is a well-formed chat record."""
    from lorekeeper.finetune.data import draft_qa_pairs

    chunk = Record("text", "notes.md:1", text="The ferry from Quorvane to Mellistra leaves every four hours.")
    drafted = draft_qa_pairs([chunk], 1, max_tokens=24)
    assert len(drafted) <= 1
    for record in drafted:
        assert [m["role"] for m in record.messages] == ["user", "assistant"]
        assert all(m["content"] for m in record.messages)
        assert record.source == "notes.md:1 (drafted)"


# --- the CLI face ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_data_reports_tokens_and_names_bad_lines(tmp_path):
    from typer.testing import CliRunner

    from lorekeeper.finetune.cli import app

    rows = [{"instruction": f"Name place {i}", "output": f"Place {i}"} for i in range(10)]
    good = write_jsonl(tmp_path / "good.jsonl", rows)
    result = CliRunner().invoke(app, ["data", str(good), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["records"] == 10 and summary["formats"] == {"alpaca": 10} and summary["train_tokens"] > 0

    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], '{"instruction": "x", "output": }'])
    result = CliRunner().invoke(app, ["data", str(bad)])
    assert result.exit_code == 2
    assert f"error: {bad}:2: not valid JSON" in result.output

    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2 and "no training data" in result.output


def test_cli_data_lists_every_bad_line_before_loading_the_tokenizer(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lorekeeper.finetune import base_model
    from lorekeeper.finetune.cli import app

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer loaded before the files were checked")

    monkeypatch.setattr(base_model, "load_tokenizer", no_tokenizer)
    rows = [{"text": "fine"}, "{broken", {"instruction": "x"}, {"text": "fine"}, "[]"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = CliRunner().invoke(app, ["data", str(bad)])
    assert result.exit_code == 2, result.output
    assert "error: 3 problems in the training data" in result.output
    for line in (2, 3, 5):
        assert f"{bad}:{line}: " in result.output
    assert "Traceback" not in result.output
