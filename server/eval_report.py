"""Evaluation reports on disk, and the index's note of the last one.

``eval answers`` writes a folder: ``report.md`` (the table and the recommendation), ``chart.png``
(F1, exact-contains and citation recall per configuration), ``answers.jsonl`` (one row per question
and configuration) and ``summary.json``. ``eval retrieval`` writes ``report.md`` and
``summary.json`` in its own folder. Each command then records in the index (meta key
``eval:retrieval`` / ``eval:answers``) when it ran, its one-line result and where the report is,
which ``index_status`` and the MCP resources ``lorekeeper://eval/retrieval`` and
``lorekeeper://eval/answers`` read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KINDS = ("retrieval", "answers")
ANSWER_COLUMNS = (
    ("f1", "token F1"),
    ("contains", "contains answer"),
    ("citation_precision", "citation precision"),
    ("citation_recall", "citation recall"),
    ("unsupported", "unsupported"),
    ("seconds_per_answer", "s / answer"),
)


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key == "seconds_per_answer":
        return f"{value:.1f}"
    return f"{value:.2f}"


def answers_table(summary: dict[str, dict[str, Any]]) -> str:
    """The Markdown table of an answers summary."""
    head = "| configuration | questions | " + " | ".join(label for _, label in ANSWER_COLUMNS) + " |"
    rule = "|---|---:|" + "---:|" * len(ANSWER_COLUMNS)
    lines = [head, rule]
    for config, s in summary.items():
        cells = " | ".join(_cell(s[key], key) for key, _ in ANSWER_COLUMNS)
        lines.append(f"| {config} | {s['questions']} | {cells} |")
    return "\n".join(lines)


def plot_answers(summary: dict[str, dict[str, Any]], png: Path, title: str) -> Path:
    """Grouped bars: token F1, contains-answer share and citation recall per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("f1", "token F1"), ("contains", "contains answer"), ("citation_recall", "citation recall")]
    configs = list(summary)
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=100)
    for i, (key, label) in enumerate(metrics):
        values = [summary[c][key] or 0.0 for c in configs]
        xs = [x + (i - (len(metrics) - 1) / 2) * width for x in range(len(configs))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, labels=[_cell(summary[c][key], key) for c in configs], fontsize=7, padding=1)
    ax.set_xticks(range(len(configs)), configs)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share / score (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def write_answers_report(folder: Path, summary: dict, advice: str, meta: dict[str, Any]) -> Path:
    """report.md, chart.png and summary.json in ``folder`` (answers.jsonl is written as rows finish)."""
    n = max((s["questions"] for s in summary.values()), default=0)
    plot_answers(summary, folder / "chart.png", f"{n} questions, {meta.get('model', '')}")
    lines = [
        f"# Answer evaluation ({meta['date']})",
        "",
        f"**{advice}**",
        "",
        answers_table(summary),
        "",
        "![F1, contains answer and citation recall per configuration](chart.png)",
        "",
        f"Model: {meta.get('model')}; adapter: {meta.get('adapter') or 'none'}; questions: "
        f"{meta.get('questions_file')}; k={meta.get('k')}, max_tokens={meta.get('max_tokens')}, temperature 0.",
        "",
        "Token F1 and 'contains answer' compare each answer with its reference; citation precision and "
        "recall compare the files a checked answer cites with the question's files (retrieval rows only); "
        "'unsupported' is the share of retrieval answers the citation check found no source for. "
        "Per-question answers: answers.jsonl.",
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")
    payload = {"summary": summary, "recommendation": advice, **meta}
    (folder / "summary.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return folder / "report.md"


def write_retrieval_report(folder: Path, scores: dict[str, dict[str, float]], sweep: Sequence[dict],
                           best: dict | None, headline: str, meta: dict[str, Any]) -> Path:  # fmt: skip
    """report.md and summary.json of a retrieval evaluation: means per mode, the sweep's best rows."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = list(next(iter(scores.values()))) if scores else []
    lines = [f"# Retrieval evaluation ({meta['date']})", "", f"**{headline}**", "",
             "| mode | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]  # fmt: skip
    lines += [
        f"| {mode} | " + " | ".join(f"{m[k]:.3f}" for k in metrics) + " |" for mode, m in scores.items()
    ]
    if sweep:
        lines += ["", "Fusion sweep (best first):", "", "| vector | keyword | rrf_k | nDCG@10 |",
                  "|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {r['vector_weight']:g} | {r['keyword_weight']:g} | {r['rrf_k']} | {r['ndcg@10']:.3f} |"
                  for r in sweep[:10]]  # fmt: skip
    if meta.get("chunk_sizes"):
        rows = meta["chunk_sizes"]
        lines += ["", f"Chunk size on a sample of {rows[0]['files']} files (* = current):", "",
                  "| tokens | chunks | recall@10 | MRR@10 | nDCG@10 |", "|---:|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {r['chunk_tokens']}{' *' if r['current'] else ''} | {r['chunks']} | {r['recall@10']:.3f} | "
                  f"{r['mrr@10']:.3f} | {r['ndcg@10']:.3f} |" for r in rows]  # fmt: skip
    lines += ["", f"Queries: {meta.get('queries')} ({meta.get('source')}).", ""]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")
    payload = {"scores": scores, "sweep": list(sweep), "best": best, "headline": headline, **meta}
    (folder / "summary.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return folder / "report.md"


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def record_last(store: Any, kind: str, report: Path, headline: str, date: str) -> None:
    """Note in the index that an evaluation of ``kind`` ran, so index_status can mention it."""
    store.set_meta(f"eval:{kind}", json.dumps({"date": date, "report": str(report), "summary": headline}))


def last_evaluations(store: Any) -> list[dict[str, str]]:
    """The noted evaluations (kind, date, summary, report path), retrieval first."""
    out = []
    for kind in KINDS:
        raw = store.get_meta(f"eval:{kind}")
        try:
            note = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            note = None
        if isinstance(note, dict):
            out.append({"kind": kind, **{k: str(note.get(k, "")) for k in ("date", "summary", "report")}})
    return out


def read_report(store: Any, kind: str) -> str:
    """The Markdown report of the last evaluation of ``kind``, or a sentence saying there is none."""
    note = next((e for e in last_evaluations(store) if e["kind"] == kind), None)
    if note is None:
        return f"No {kind} evaluation yet: run `lorekeeper eval {kind}`."
    try:
        return Path(note["report"]).read_text(encoding="utf-8")
    except OSError as exc:
        return f"The {kind} evaluation of {note['date']} ({note['summary']}) wrote {note['report']}, which cannot be read: {exc}"
