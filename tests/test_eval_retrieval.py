"""``lorekeeper eval retrieval``: the metrics against hand-computed values, trec_eval (pytrec_eval) and
ranx where it is installed, TREC files, drafted queries, and the command on a real index with the real embedder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorekeeper.server import eval_files, evaluation
from lorekeeper.server.eval_queries import clean_question, copies_run, generate_queries
from lorekeeper.server.evaluation import JudgedQuery, Judgement

# ------------------------------------------------------------------------------------------------
# The metrics on a tiny fixed example

QRELS = {
    "q1": {"a.md": 2, "b.md": 1, "c.md": 0},  # c.md judged not relevant
    "q2": {"x.md": 1},
    "q3": {"y.md": 0},  # no relevant file: left out of the means
    "q4": {"w.md": 1},  # judged, but the run found nothing for it
    "q5": {"r1.md": 1, "r2.md": 1},
}
RUN = {
    # a.md and c.md tie at 0.8: trec_eval orders ties by document id, in reverse: c.md before a.md
    "q1": {"d.md": 0.9, "a.md": 0.8, "c.md": 0.8, "b.md": 0.5},  # d.md is not judged at all
    "q2": {"x.md": 0.7, "p.md": 0.2},
    "q3": {"y.md": 0.4},
    "q5": {"n1": 0.9, "n2": 0.8, "n3": 0.7, "r1.md": 0.6, "n4": 0.5, "n5": 0.4, "r2.md": 0.3},
}
# By hand (log2 discount, gain = grade):
# q1: ranking d, c, a, b. R@1 = 0, R@5 = R@10 = 2/2 = 1, RR = 1/3 (a at rank 3).
#     DCG = 2/log2(4) + 1/log2(5) = 1 + 0.430677 = 1.430677; ideal = 2/log2(2) + 1/log2(3) = 2.630930
#     nDCG = 0.543791
# q2: x at rank 1: every metric 1.
# q4: nothing found: every metric 0.
# q5: r1 at rank 4, r2 at rank 7. R@1 = 0, R@5 = 1/2, R@10 = 1, RR = 1/4.
#     DCG = 1/log2(5) + 1/log2(8) = 0.430677 + 0.333333 = 0.764010; ideal = 1 + 1/log2(3) = 1.630930
#     nDCG = 0.468451
# Means over the 4 judged queries (q1, q2, q4, q5):
EXPECTED = {
    "recall@1": (0 + 1 + 0 + 0) / 4,  # 0.25
    "recall@5": (1 + 1 + 0 + 0.5) / 4,  # 0.625
    "recall@10": (1 + 1 + 0 + 1) / 4,  # 0.75
    "mrr@10": (1 / 3 + 1 + 0 + 1 / 4) / 4,  # 0.395833
    "ndcg@10": (0.543791 + 1 + 0 + 0.468451) / 4,  # 0.503060
}


def test_metrics_equal_hand_computed_values_with_ties_and_missing_judgements() -> None:
    rankings = {qid: evaluation.ranking_from_scores(docs) for qid, docs in RUN.items()}
    assert rankings["q1"] == ["d.md", "c.md", "a.md", "b.md"]
    scores = evaluation.evaluate(rankings, QRELS)
    assert scores.judged == 4 and scores.unjudged == ["q3"]
    for metric, value in EXPECTED.items():
        assert scores.means[metric] == pytest.approx(value, abs=1e-6), metric
    assert scores.per_query["q1"]["ndcg@10"] == pytest.approx(0.543791, abs=1e-6)
    assert scores.per_query["q4"] == dict.fromkeys(evaluation.METRICS, 0.0)


@pytest.mark.slow
def test_metrics_agree_with_ranx() -> None:
    ranx = pytest.importorskip(
        "ranx", reason="ranx is not installed (pip install ranx) to cross-check against"
    )
    # ranx breaks ties by insertion order: hand it each run in trec_eval's order, and every judged
    # query (ranx needs the run to name each one; q4's single miss scores 0 either way)
    ordered = {qid: {d: RUN[qid][d] for d in evaluation.ranking_from_scores(RUN[qid])} for qid in RUN}
    ordered["q4"] = {"nothing.md": 0.1}
    judged = {qid: grades for qid, grades in QRELS.items() if any(grades.values())}
    theirs = ranx.evaluate(ranx.Qrels(judged), ranx.Run({q: ordered[q] for q in judged}), list(EXPECTED))
    ours = evaluation.evaluate({q: list(docs) for q, docs in ordered.items()}, QRELS).means
    for metric in EXPECTED:
        assert ours[metric] == pytest.approx(float(theirs[metric]), abs=1e-9), metric


def test_metrics_agree_with_trec_eval_itself() -> None:
    """pytrec_eval wraps trec_eval's C code: the same run with its ties unbroken, the same qrels."""
    import pytrec_eval

    measures = {"recall.1,5,10", "recip_rank", "ndcg_cut.10"}
    theirs = pytrec_eval.RelevanceEvaluator(QRELS, measures).evaluate(RUN)
    names = {"recall@1": "recall_1", "recall@5": "recall_5", "recall@10": "recall_10",
             "mrr@10": "recip_rank", "ndcg@10": "ndcg_cut_10"}  # fmt: skip
    judged = [qid for qid, grades in QRELS.items() if any(grades.values())]
    rankings = {qid: evaluation.ranking_from_scores(docs) for qid, docs in RUN.items()}
    ours = evaluation.evaluate(rankings, QRELS)
    for metric, name in names.items():
        # trec_eval leaves out a query the run does not name (q4); we count it as 0, so does the mean
        mean = sum(theirs[q][name] for q in judged if q in theirs) / len(judged)
        assert ours.means[metric] == pytest.approx(mean, abs=1e-9), metric
        for qid in judged:
            if qid in theirs:
                assert ours.per_query[qid][metric] == pytest.approx(theirs[qid][name], abs=1e-9)


def test_line_range_judgements_count_the_chunk_that_overlaps_them() -> None:
    query = JudgedQuery(
        "q", "when is the review", [Judgement("notes.md", 2, (10, 20)), Judgement("other.md")]
    )

    def hit(path: str, start: int, end: int, score: float) -> SimpleNamespace:
        return SimpleNamespace(
            path=f"/docs/{path}", root="/docs", start_line=start, end_line=end, score=score
        )

    hits = [hit("notes.md", 1, 9, 0.9), hit("notes.md", 15, 30, 0.8), hit("other.md", 1, 5, 0.7),
            hit("other.md", 6, 9, 0.6)]  # fmt: skip
    ranked = evaluation.rank_hits(hits, query, ["/docs"])
    # the first chunk misses the judged lines; the second overlaps them; other.md counts once
    assert ranked.docs == ["notes.md#L1-9", "notes.md#L10-20", "other.md"]
    assert ranked.scores == [0.9, 0.8, 0.7]
    # grades 2 and 1 at ranks 2 and 3; ideal 2 then 1: (2/log2(3) + 1/2) / (2 + 1/log2(3)) = 0.669672
    assert evaluation.ndcg_at(ranked.docs, query.grades) == pytest.approx(0.669672, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Files


def test_trec_files_and_jsonl_round_trip(tmp_path: Path) -> None:
    runs = {
        "q1": evaluation.Ranked(["docs/a b.md", "c.md#L3-9", "d.md"], [0.5, 0.5, 0.25]),
        "q2": evaluation.Ranked([], []),
    }
    eval_files.write_run(tmp_path / "run.txt", runs, "lorekeeper-hybrid")
    lines = (tmp_path / "run.txt").read_text().splitlines()
    assert [line.split()[:4] for line in lines] == [["q1", "Q0", "docs/a%20b.md", "1"], ["q1", "Q0", "c.md#L3-9", "2"],
                                                    ["q1", "Q0", "d.md", "3"]]  # fmt: skip
    back = eval_files.read_run(tmp_path / "run.txt")
    # the tie at 0.5 was written a hair apart, so trec_eval (and we) keep the order written
    assert evaluation.ranking_from_scores(back["q1"]) == runs["q1"].docs

    (tmp_path / "qrels").write_text("q1 0 docs/a%20b.md 2\nq1 0 c.md#L3-9 1\nq2 0 e.md 0\n")
    (tmp_path / "topics").write_text("<top>\n<num> Number: q1\n<title> lost keys\n<desc> ...\n</top>\n"
                                     "<top><num>q2</num><title>river tides</title></top>\n")  # fmt: skip
    queries = eval_files.queries_from_trec(tmp_path / "qrels", tmp_path / "topics")
    assert [(q.qid, q.text) for q in queries] == [("q1", "lost keys"), ("q2", "river tides")]
    assert queries[0].judgements == [Judgement("docs/a b.md", 2), Judgement("c.md", 1, (3, 9))]
    (tmp_path / "topics.tsv").write_text("q1\tlost keys\nq2\triver tides\n")
    assert eval_files.read_topics(tmp_path / "topics.tsv") == {"q1": "lost keys", "q2": "river tides"}

    eval_files.write_queries_jsonl(tmp_path / "q.jsonl", queries)
    again = eval_files.read_queries_jsonl(tmp_path / "q.jsonl")
    assert [(q.qid, q.text, q.judgements) for q in again] == [(q.qid, q.text, q.judgements) for q in queries]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"query": "x", "relevant": ["a.md"]}\nnot json\n', "line 2: not JSON"),
        ('{"relevant": ["a.md"]}\n', 'line 1: "query" must be'),
        ('{"query": "x", "relevant": {"a.md": -1}}\n', "grade of a.md"),
        ('{"query": "x", "relevant": [{"path": "a.md", "lines": [9, 3]}]}\n', '"lines" of a.md'),
        (
            '{"id": "q", "query": "x", "relevant": "a"}\n{"id": "q", "query": "y", "relevant": "b"}\n',
            "used twice",
        ),
    ],
)
def test_bad_query_files_name_the_line_and_the_fix(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(eval_files.EvalFileError, match=needle) as info:
        eval_files.read_queries_jsonl(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------
# Drafted queries (a scripted drafter: the logic around the model)


def test_drafted_queries_that_copy_six_words_of_their_chunk_are_dropped() -> None:
    text = ("# Sourdough starter care\nFeed the starter equal weights of flour and water every day, keep it "
            "at room temperature, and discard half before each feeding so the culture stays lively and sour. "
            "A starter left in the fridge for weeks recovers after two or three warm feedings.")  # fmt: skip
    chunk = SimpleNamespace(path="/d/bread.md", text=text, chunk_hash="h1", heading_path=["Sourdough starter care"],
                            start_line=1, end_line=4, seq=0)  # fmt: skip
    assert clean_question("<p>How does a starter recover?</p> It warms up.") == "How does a starter recover?"
    assert copies_run("Why discard half before each feeding so?", text)
    assert not copies_run("Why throw away part of the culture before feeding it?", text)

    copying = generate_queries(
        [chunk], 1, ["/d"], lambda passage, temperature: "Question: Why discard half before each feeding so?"
    )
    kinds = {q.extra["kind"] for q in copying[0]}
    assert "question" not in kinds and copying[1] == {"question": 1}
    own_words = generate_queries(
        [chunk], 1, ["/d"], lambda passage, temperature: "Why throw away part of the culture?\nmore"
    )
    texts = {q.extra["kind"]: q.text for q in own_words[0]}
    assert texts["question"] == "Why throw away part of the culture?"
    assert texts["heading"] == "Sourdough starter care"
    assert len(texts["keywords"].split()) >= 3  # the key sentence's rarest words, without the heading's
    assert not set(texts["keywords"].split()) & {"sourdough", "starter", "care"}
    assert all(q.judgements == [Judgement("bread.md")] for q in own_words[0])
    assert not any(copies_run(q.text, text) for q in own_words[0])
    # a reply that asks nothing, or asks about "the passage", is drafted once more, sampled
    for first in (
        "The passage describes a starter.",
        "What does the passage say?",
        "I'm ready to help. What's that?",
    ):
        replies = {0.0: first, 0.7: 'The question is: "What keeps a starter lively?"'}
        second = generate_queries(
            [chunk], 1, ["/d"], lambda passage, temperature, replies=replies: replies[temperature]
        )
        assert [q.text for q in second[0] if q.extra["kind"] == "question"] == [
            "What keeps a starter lively?"
        ]
    unrelated = generate_queries([chunk], 1, ["/d"], lambda passage, temperature: "Who won the cup final?")
    assert "question" not in {q.extra["kind"] for q in unrelated[0]}


# ------------------------------------------------------------------------------------------------
# The command on a real index

DOCS = {
    "bees.md": "# Keeping honey bees\nA hive is inspected every week in spring to look for the queen, fresh eggs and "
    "signs of swarming. Calm the colony with cool smoke from the smoker before lifting frames. Honey is "
    "harvested in late summer once the cells are capped with wax.",
    "cars.md": "# Automobile upkeep\nChange the engine oil every eight thousand kilometres or once a year, "
    "whichever comes first. Rotate the tyres at the same time, check the brake pads for wear, and replace "
    "the brake fluid every two years because it absorbs water from the air.",
    "parking.md": "# Visitor parking and shuttle\nThe car park next to the service desk opens at eight. Visitors "
    "should ask at the service desk how often the shuttle bus runs; my colleagues and I usually say every "
    "twenty minutes. Car park tickets are validated at reception.",
    "sourdough.md": "# Sourdough starter care\nFeed the starter equal weights of flour and water every day and "
    "keep it at room temperature. Discard half before each feeding so the culture stays lively. A starter "
    "left in the fridge for weeks recovers after two or three warm feedings.",
    "tides.md": "# Ocean tides explained\nThe gravity of the moon pulls the oceans into a bulge on the side facing "
    "it and another on the far side. As the earth turns, coasts pass through both bulges, which gives most "
    "shores two high tides and two low tides each lunar day.",
    "chess.md": "# Chess opening principles\nIn the opening, fight for the centre with pawns, develop knights before "
    "bishops, and castle early to protect the king. Avoid moving the same piece twice and do not bring the "
    "queen out too soon, where she can be chased by minor pieces.",
    "volcano.md": "# Volcanic eruptions\nMagma rises because it is lighter than the surrounding rock. Gas dissolved "
    "in the magma expands as pressure drops near the surface; sticky, silica-rich magma traps that gas and "
    "erupts explosively, while runny basalt flows out as lava.",
    "knitting.md": "# Knitting a scarf\nCast on forty stitches with chunky wool and knit every row in garter "
    "stitch. Keep the tension loose so the fabric stays soft. When the scarf reaches about one and a half "
    "metres, cast off loosely and weave the loose ends into the edges.",
    "jupiter.md": "# Observing Jupiter's moons\nEven small binoculars show the four Galilean moons as points of "
    "light in a line beside the planet. Their positions change from night to night as they orbit; Io circles "
    "Jupiter in under two days, while Callisto takes more than two weeks.",
    "taxes.md": "# Filing quarterly taxes\nSelf-employed people pay estimated income tax four times a year. Set "
    "aside roughly a quarter of each invoice, record every business expense with its receipt, and send the "
    "payment before each quarterly deadline to avoid penalties and interest.",
    "espresso.md": "# Pulling an espresso shot\nGrind the beans fine, dose eighteen grams into the basket and tamp "
    "evenly. A good shot takes about twenty-five to thirty seconds to pour thirty-six grams. If it runs too "
    "fast the coffee tastes sour; if it drips slowly it turns bitter.",
    "marathon.md": "# Marathon training plan\nBuild weekly mileage slowly, by no more than a tenth each week. Most "
    "runs should be easy and conversational; add one long run each weekend and one session of intervals. "
    "Taper for two or three weeks before race day to arrive rested.",
    "compost.md": "# Backyard composting\nMix green material such as grass clippings and kitchen scraps with brown "
    "material such as dry leaves and cardboard. Turn the heap every couple of weeks to let air in, keep it as "
    "damp as a wrung sponge, and the compost is ready in a few months.",
    "photography.md": "# The exposure triangle\nAperture, shutter speed and ISO together set how bright a "
    "photograph is. A wide aperture blurs the background, a fast shutter freezes motion, and a high ISO "
    "brightens dark scenes at the cost of grain and noise.",
    "sleep.md": "# Healthy sleep habits\nGo to bed and wake up at the same time every day, even at weekends. Keep "
    "the bedroom dark, quiet and cool, avoid caffeine in the afternoon, and put screens away an hour before "
    "bed so the body can release melatonin.",
    "venv.md": "# Python virtual environments\nA virtual environment keeps the packages of one project apart "
    "from the rest of the system. Create one with python -m venv .venv, activate it, and install the "
    "project's dependencies inside it with pip so versions never clash.",
    "birds.md": "# Bird migration routes\nEvery autumn, swallows leave northern Europe and fly thousands of "
    "kilometres to southern Africa. Migrating birds navigate using the sun, the stars and the earth's magnetic "
    "field, and many return to the very same nest the following spring.",
}


@pytest.fixture(scope="module")
def real_index(tmp_path_factory: pytest.TempPathFactory, embedder) -> tuple[Path, Path]:
    """A folder of short documents indexed with the real embedder: (the folder, the index file)."""
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.store import Store

    base = tmp_path_factory.mktemp("eval")
    folder = base / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text + "\n", encoding="utf-8")
    with Store.open(base / "index.db") as store:
        report = Indexer(store, embedder).add_root(folder)
        assert report.indexed == len(DOCS)
    return folder, base / "index.db"


def lk(*args: str, db: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorekeeper.server.cli", "--db", str(db), *args],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, COLUMNS="200"),
    )  # fmt: skip


CAR_QUERY = "How often should I service my car?"  # cars.md shares none of its words; parking.md shares most


def _top_file(db: Path, embedder, query: str) -> str:
    """The first file `lorekeeper search` returns for ``query`` under the settings it reads now."""
    from lorekeeper.server.search import search
    from lorekeeper.server.settings import Settings
    from lorekeeper.server.store import Store

    s = Settings.load()
    with Store.open(db, create=False) as store:
        hits = search(store, embedder, query, k=3, vector_weight=s.vector_weight, keyword_weight=s.keyword_weight,
                      rrf_k=s.rrf_k)  # fmt: skip
    return Path(hits[0].path).name


@pytest.mark.slow
def test_eval_on_a_real_index_and_apply_changes_what_search_returns(
    real_index, embedder, tmp_path: Path
) -> None:
    folder, db = real_index
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        json.dumps({"id": "bees", "query": "when is honey harvested from the hive", "relevant": ["bees.md"]}) + "\n"
        + json.dumps({"id": "car", "query": CAR_QUERY, "relevant": [{"path": str(folder / "cars.md"), "grade": 2}]})
        + "\n"  # an absolute path is judged like the relative one
    )  # fmt: skip
    assert _top_file(db, embedder, CAR_QUERY) == "parking.md"  # the defaults: the shared words win
    proc = lk("eval", "retrieval", "--queries", str(queries), "--keyword-weights", "0", "--vector-weights", "1",
              "--rrf-ks", "60", "--apply", "--json", str(tmp_path / "out.json"), "--run-out",
              str(tmp_path / "run.txt"), db=db)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "hybrid" in proc.stdout and "nDCG@10" in proc.stdout and "applied" in proc.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    hybrid = report["modes"]["hybrid"]["per_query"]
    assert hybrid["bees"]["recall@10"] == 1.0 and hybrid["bees"]["recall@1"] == 1.0
    assert report["modes"]["keyword"]["per_query"]["car"]["recall@10"] == 0.0  # no shared word
    assert report["best"] == {"vector_weight": 1.0, "keyword_weight": 0.0, "rrf_k": 60} and report["applied"]
    assert report["best_mode"] == "hybrid"  # at its best fusion hybrid ties vector: the default stays

    from lorekeeper.server.settings import Settings

    settings = Settings.load()
    assert settings.keyword_weight == 0.0 and settings.sources["keyword_weight"] == "config.toml"
    assert _top_file(db, embedder, CAR_QUERY) == "cars.md"  # search now ranks by meaning alone
    again = lk("eval", "retrieval", "--queries", str(queries), "--mode", "hybrid", "--vector-weights", "1",
               "--apply", db=db)  # fmt: skip
    assert again.returncode == 0 and "config.toml is left as it is" in again.stdout, again.stderr
    assert Settings.load().keyword_weight == 0.0

    # a default mode that misses a query is replaced by one that finds it, and only with --apply
    assert lk("config", "set", "search_mode", "keyword", db=db).returncode == 0
    try:
        modes = lk("eval", "retrieval", "--queries", str(queries), "--mode", "keyword", "--mode", "vector",
                   "--apply", db=db)  # fmt: skip
        assert modes.returncode == 0 and "best search mode: vector" in modes.stdout, modes.stderr
        assert Settings.load().search_mode == "vector"
    finally:
        assert lk("config", "unset", "search_mode", db=db).returncode == 0

    # the hybrid run file, scored again from disk, gives the numbers the command printed
    run = eval_files.read_run(tmp_path / "run.txt.hybrid")
    judged = eval_files.read_queries_jsonl(queries, [str(folder)])
    rescored = evaluation.evaluate({q: evaluation.ranking_from_scores(d) for q, d in run.items()},
                                   evaluation.qrels_of(judged))  # fmt: skip
    assert rescored.means == pytest.approx(report["modes"]["hybrid"]["means"])


@pytest.mark.slow
def test_drafted_queries_are_answerable_from_their_source_and_copy_no_six_words(real_index, embedder) -> None:
    from lorekeeper import plugins
    from lorekeeper.server.eval_queries import draft_with
    from lorekeeper.server.search import search
    from lorekeeper.server.store import Store

    folder, db = real_index
    generator = plugins.get_generator("llamacpp")
    with Store.open(db, create=False) as store:
        chunks = list(store.iter_chunks())
        queries, _ = generate_queries(chunks, 8, [str(folder)], draft_with(generator), seed=1)
        kinds = {q.extra["kind"] for q in queries}
        assert {"question", "heading", "keywords"} <= kinds, [q.text for q in queries]
        by_path = {c.path: c.text for c in chunks}
        found = 0
        for q in queries:
            source = str(folder / q.judgements[0].path)
            assert not copies_run(q.text, by_path[source]), q.text
            hits = search(store, embedder, q.text, k=10, mode="hybrid")
            found += source in {h.path for h in hits}
    assert found >= 0.7 * len(queries), f"{found} of {len(queries)} found their source in the top 10"


@pytest.mark.slow
def test_bad_arguments_are_clear_errors_not_tracebacks(real_index, tmp_path: Path) -> None:
    _, db = real_index
    (tmp_path / "bad.jsonl").write_text('{"query": "bees", "relevant": 3}\n')
    (tmp_path / "marks.jsonl").write_text('{"query": "?!", "relevant": ["bees.md"]}\n')
    cases = [
        (["--queries", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--queries", str(tmp_path / "bad.jsonl")], 'bad.jsonl line 1: "relevant" must list'),
        (["--qrels", str(tmp_path / "qrels")], "--qrels and --topics go together"),
        (["--rrf-ks", "ten"], "--rrf-ks 'ten'"),
        (["--mode", "hybrid", "--no-sweep", "--apply"], "--apply writes the best settings measured"),
        (["--chunk-sizes", "8,128"], "each size must be at least 16 tokens"),
        (
            ["--queries", str(tmp_path / "marks.jsonl")],
            "query q1 ('?!'): query '?!' has no words to search for",
        ),
    ]
    for args, needle in cases:
        proc = lk("eval", "retrieval", *args, db=db)
        assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, (
            args,
            proc.stderr,
        )
