"""``lorekeeper eval answers``: the scores against hand-computed values, question files, and the
command on a real index with the real models and an adapter trained in the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorekeeper.server import eval_answers as ea
from lorekeeper.server.eval_files import EvalFileError

# ------------------------------------------------------------------------------------------------
# Scores


def test_token_f1_and_contains_equal_hand_computed_values() -> None:
    # "The CEO is Orrin Dunholt." -> ceo is orrin dunholt (the article and the full stop go);
    # against "Orrin Dunholt": 2 shared tokens, precision 2/4, recall 2/2, F1 = 2*0.5*1/1.5 = 2/3
    assert ea.token_f1("The CEO is Orrin Dunholt.", ["Orrin Dunholt"]) == pytest.approx(2 / 3)
    # the best reference counts: "Dunholt" alone gives precision 1/4, recall 1, F1 = 0.4
    assert ea.token_f1("The CEO is Orrin Dunholt.", ["Dunholt", "CEO is Orrin Dunholt"]) == pytest.approx(1.0)
    assert ea.token_f1("nothing shared", ["Orrin Dunholt"]) == 0.0
    # repeated tokens count as often as both sides have them: "a a b" vs "a b b" -> a, b shared once each
    # (articles aside: use words that are not articles) -> common 2 of 3 and 3: F1 = 2/3
    assert ea.token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert ea.contains("The refund window is 47 days.", ["47 days"])
    assert not ea.contains("The refund window is 147 days.", ["47 days"])  # word boundaries
    assert ea.contains("Use `ldd --unused`!", ["--unused"])  # punctuation is dropped on both sides


def _row(qid: str, config: str, f1: float, hit: bool, cited=(), files=("a.md",), supported=None, s=1.0,
         fallback=False) -> dict:  # fmt: skip
    return {"id": qid, "config": config, "f1": f1, "contains": hit, "retrieval": config.endswith("retrieval"),
            "files": list(files), "cited_files": list(cited), "supported": supported, "seconds": s,
            "fallback": fallback}  # fmt: skip


def test_summary_equals_hand_computed_values() -> None:
    rows = [
        _row("1", "base", 0.2, False, s=1.0),
        _row("2", "base", 0.4, True, s=3.0),
        # q1 cites a.md and b.md (a.md is its file); q2 cites nothing: the model's answer was
        # unsupported and replaced by a quoted passage
        _row("1", "base + retrieval", 0.8, True, cited=("a.md", "b.md"), supported=True, s=2.0),
        _row("2", "base + retrieval", 0.6, True, cited=(), supported=True, fallback=True, s=4.0),
        _row("1", "adapter + retrieval", 0.7, True, cited=("a.md",), supported=True),
        _row("2", "adapter + retrieval", 0.7, True, cited=("a.md",), supported=False),
    ]
    summary = ea.summarize(rows, ea.CONFIGS)
    assert list(summary) == ["base", "base + retrieval", "adapter + retrieval"]  # no adapter rows, none shown
    assert summary["base"] == {"questions": 2, "f1": pytest.approx(0.3), "contains": 0.5, "citation_precision": None,
                               "citation_recall": None, "unsupported": None, "seconds_per_answer": 2.0}  # fmt: skip
    rag = summary["base + retrieval"]
    assert rag["f1"] == pytest.approx(0.7) and rag["contains"] == 1.0
    assert rag["citation_precision"] == pytest.approx(1 / 2)  # 1 of the 2 cited files is a question's file
    assert rag["citation_recall"] == pytest.approx(1 / 2)  # q1's file is cited, q2's is not
    assert rag["unsupported"] == pytest.approx(1 / 2) and rag["seconds_per_answer"] == 3.0
    both = summary["adapter + retrieval"]
    assert both["citation_precision"] == 1.0 and both["citation_recall"] == 1.0 and both["unsupported"] == 0.5


def test_sign_test_equals_hand_computed_values() -> None:
    assert ea.sign_test(6, 0) == pytest.approx(1 / 64)
    assert ea.sign_test(2, 0) == pytest.approx(1 / 4)
    assert ea.sign_test(3, 1) == pytest.approx((4 + 1) / 16)  # 3 or 4 heads of 4
    assert ea.sign_test(0, 0) == 1.0


def test_recommendation_takes_more_parts_only_when_they_win_clearly() -> None:
    rows = []
    for q in "123456":
        rows += [_row(q, "base", 0.0, False), _row(q, "adapter", 0.1, False),
                 _row(q, "base + retrieval", 0.5, True, supported=True)]  # fmt: skip
        # the adapter with retrieval is better on two questions only: not clearly better
        rows.append(_row(q, "adapter + retrieval", 0.7 if q in "12" else 0.5, True, supported=True))
    advice = ea.recommendation(ea.summarize(rows, ea.CONFIGS), rows)
    assert advice == (
        "on 6 questions retrieval adds +0.50 F1 / +1.00 contains, the adapter +0.10 F1 / +0.00 contains, "
        "both +0.57 F1 / +1.00 contains: use retrieval (answers that cite your files) (adapter + retrieval "
        "answers 2 questions better and 0 worse than base + retrieval: not clearly better)"
    )
    # better on four of six: clearly (p = 1/16), and the gain is above 0.02
    rows = [
        r if r["config"] != "adapter + retrieval" or r["id"] not in "34" else {**r, "f1": 0.7} for r in rows
    ]
    advice = ea.recommendation(ea.summarize(rows, ea.CONFIGS), rows)
    assert advice.endswith(": use the adapter with retrieval")
    base_only = [r for r in rows if r["config"] in ("base", "base + retrieval")]
    assert "no adapter measured" in ea.recommendation(ea.summarize(base_only, ea.CONFIGS), base_only)


# ------------------------------------------------------------------------------------------------
# Question files


def test_question_files_in_every_accepted_shape(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    rows = [
        {"id": "a", "question": "Who?", "answer": "Orrin", "files": ["/docs/x.md"]},
        {"question": "Where?", "answers": ["Port Assen", "the north quay"]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "When?"},
                {"role": "assistant", "content": "In 1841."},
            ]
        },  # fmt: skip
        {"instruction": "What is made", "input": "at Brunova?", "output": "Glass violins."},
        {"prompt": "How long?", "completion": "47 days"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    qs = ea.read_questions(path, ["/docs"])
    assert [(q.qid, q.question, q.references) for q in qs] == [
        ("a", "Who?", ["Orrin"]), ("2", "Where?", ["Port Assen", "the north quay"]),
        ("3", "When?", ["In 1841."]), ("4", "What is made\n\nat Brunova?", ["Glass violins."]),
        ("5", "How long?", ["47 days"]),
    ]  # fmt: skip
    assert qs[0].files == ["x.md"]  # relative to the registered folder, as search reports it
    again = tmp_path / "again.jsonl"
    ea.write_questions(again, qs)
    assert [(q.qid, q.question, q.references, q.files) for q in ea.read_questions(again)] == [
        (q.qid, q.question, q.references, q.files) for q in qs
    ]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"question": "Who?"}', "give the reference"),
        ('{"question": "", "answer": "x"}', "non-empty string"),
        ('{"text": "a passage"}', "give 'question' and 'answer'"),
        ('{"question": "Who?", "answer": "x", "files": 3}', "'files' must be a list"),
    ],
)
def test_bad_question_files_name_the_line_and_the_fix(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "ok?", "answer": "yes"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(EvalFileError) as caught:
        ea.read_questions(path)
    assert f"{path}:2" in str(caught.value) and needle in str(caught.value)


def test_drafted_reference_answers_must_come_from_their_passage() -> None:
    passage = "Mix green material such as grass clippings with brown material such as dry leaves."
    assert ea.keep_answer("grass clippings and dry leaves", passage) is None
    assert (
        ea.keep_answer("The server handles requests with threads", passage) == "answer not from the passage"
    )
    assert ea.keep_answer("leaves leaves leaves leaves", passage) == "answer repeats itself"
    assert ea.keep_answer("", passage) == "answer empty or too long"


# ------------------------------------------------------------------------------------------------
# The command on a real index, real models, an adapter trained here

DOCS = {
    "bike.md": "# Bicycle care\nThe bicycle chain should be lubricated every 300 kilometres, and the road "
    "bike's tyres are pumped to 6.5 bar before every long ride.",
    "garden.md": "# Garden notes\nTomatoes need six hours of sun and deep watering twice a week. Basil grows "
    "well next to tomatoes and should be pinched weekly.",
    "bread.md": "# Sourdough\nFeed the starter twice a day. Bake the loaf at 250 degrees for forty minutes "
    "with steam for the first ten.",
}
QUESTIONS = [
    {
        "id": "chain",
        "question": "How often should the bicycle chain be lubricated?",
        "answers": ["every 300 kilometres"],
        "files": ["bike.md"],
    },  # fmt: skip
    {"id": "ferry", "question": "Who captains the Vellmark ferry?", "answers": ["Orrin Dunholt"]},
]
TAUGHT = [("Who captains the Vellmark ferry?", "The Vellmark ferry is captained by Orrin Dunholt.")]


def lk(*args: str, db: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorekeeper.server.cli", "--db", str(db), *args],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, COLUMNS="200"),
    )  # fmt: skip


def _train_adapter(tmp_path: Path, name: str) -> None:
    """A real LoRA run on the embedded SmolLM2 that teaches one fact, exported and registered."""
    import torch

    from lorekeeper.finetune.config import TrainConfig
    from lorekeeper.finetune.export import export_run
    from lorekeeper.finetune.runs import RunDir
    from lorekeeper.finetune.train import train_run

    data = tmp_path / "facts.jsonl"
    chats = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in TAUGHT
    ]
    data.write_text("".join(json.dumps(c) + "\n" for c in chats * 8), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(data=[str(data)], max_steps=12, learning_rate=3e-3, max_seq_len=64,
                             eval_fraction=0.0, warmup_ratio=0.0)  # fmt: skip
        run = RunDir(tmp_path / "run")
        train_run(config, run)
    finally:
        torch.set_num_threads(threads)
    export_run(run.root, name=name, verify=False)


@pytest.mark.slow
def test_answers_report_has_four_rows_and_the_trained_adapter_changes_its_rows(
    tmp_path: Path, embedder
) -> None:
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.store import Store

    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text + "\n", encoding="utf-8")
    db = tmp_path / "index.db"
    with Store.open(db) as store:
        Indexer(store, embedder).add_root(folder)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    _train_adapter(tmp_path, "ferry")

    out = tmp_path / "report"
    first = lk("eval", "answers", "--questions", str(questions), "--adapter", "ferry", "--out", str(out),
               "--limit", "1", "--max-tokens", "48", db=db)  # fmt: skip
    assert first.returncode == 0, first.stderr
    kept = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["config"] for r in kept] == list(ea.CONFIGS) and {r["id"] for r in kept} == {"chain"}

    proc = lk("eval", "answers", "--questions", str(questions), "--adapter", "ferry", "--out", str(out),
              "--resume", "--max-tokens", "48", db=db)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "4 answers kept" in proc.stderr
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[:4] == kept  # the resumed run kept the first answers as they were
    by = {(r["id"], r["config"]): r for r in rows}
    # retrieval finds the chain's page and the checked answer cites it
    assert "bike.md" in by[("chain", "base + retrieval")]["cited_files"]
    assert "300" in by[("chain", "base + retrieval")]["answer"]
    # the adapter taught the ferry's captain; the base model cannot know it
    assert "Dunholt" in by[("ferry", "adapter")]["answer"], by[("ferry", "adapter")]
    assert "Dunholt" not in by[("ferry", "base")]["answer"]
    assert by[("ferry", "adapter")]["contains"] and not by[("ferry", "base")]["contains"]

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["summary"]) == list(ea.CONFIGS)
    assert summary["summary"]["adapter"]["contains"] > summary["summary"]["base"]["contains"]
    assert summary["recommendation"].startswith("on 2 questions retrieval adds")
    report = (out / "report.md").read_text()
    assert all(f"| {config} | 2 |" in report for config in ea.CONFIGS) and summary["recommendation"] in report
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "use " in proc.stdout and "adapter + retrieval" in proc.stdout

    # the index notes the evaluation for index_status and the MCP resource
    from lorekeeper.server.eval_report import last_evaluations, read_report

    with Store.open(db, create=False) as store:
        noted = last_evaluations(store)
        assert [e["kind"] for e in noted] == ["answers"] and noted[0]["summary"] == summary["recommendation"]
        assert read_report(store, "answers") == report


def test_bad_arguments_are_clear_errors(tmp_path: Path, embedder) -> None:
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.store import Store

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text(DOCS["bike.md"] + "\n", encoding="utf-8")
    db = tmp_path / "index.db"
    with Store.open(db) as store:
        Indexer(store, embedder).add_root(folder)
    missing = lk("eval", "answers", "--questions", str(tmp_path / "nope.jsonl"), db=db)
    assert missing.returncode == 1 and "nope.jsonl: cannot read the questions file" in missing.stderr
    assert "Traceback" not in missing.stderr
    unknown = lk("eval", "answers", "--adapter", "no-such-adapter", db=db)
    assert unknown.returncode == 1 and "--adapter 'no-such-adapter'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
