"""The MCP tools, resources and prompt, driven through the SDK's in-process client session.

Real index (MiniLM embeddings in SQLite), real SmolLM2 generation; only the transport is in-memory
(stdio and HTTP are in test_mcp_transports.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types import ResourceListChangedNotification
from tiny_lora import adapter_for

from lorekeeper import plugins
from lorekeeper.server.indexer import Indexer
from lorekeeper.server.mcp import LorekeeperMCP, ServerOptions, create_server, doc_uri
from lorekeeper.server.settings import Settings
from lorekeeper.server.store import Store

DOCS = {
    "bike.txt": "The bicycle chain should be lubricated every 300 kilometres.\nTyre pressure for the road bike is 6.5 bar.\n",
    "garden.md": "# Garden notes\n\n## Tomatoes\n\nTomatoes need six hours of sun and deep watering twice a week.\n\n"
    "## Basil\n\nBasil grows well next to tomatoes and should be pinched weekly.\n",
    "recipes/bread.md": "# Sourdough\n\nFeed the starter twice a day. Bake the loaf at 250 degrees for forty minutes.\n",
    "notes.rst": "Meeting notes: the quarterly budget review moved to Thursday.\n",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, embedder) -> dict[str, Path]:
    """A small indexed folder, an outside folder, a link that escapes, and an ignored file."""
    base = tmp_path_factory.mktemp("mcp-corpus")
    docs = base / "docs"
    for name, text in DOCS.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text, encoding="utf-8")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("the launch code is 0000\n", encoding="utf-8")
    (docs / ".git").mkdir()
    (docs / ".git" / "config").write_text("[remote]\n token = hunter2\n", encoding="utf-8")
    db = base / "index.db"
    with Store.open(db) as store:
        Indexer(store, embedder).add_root(docs)
    (docs / "escape.txt").symlink_to(outside / "secret.txt")  # made after indexing: never indexed
    return {"docs": docs.resolve(), "outside": outside.resolve(), "db": db, "base": base}


@pytest.fixture(scope="module")
def llama():
    gen = plugins.get_generator("llamacpp")
    gen.count_tokens("load once")
    return gen


def serve(
    corpus: dict[str, Path], scenario: Callable[[Client], Awaitable[Any]], mode: str = "auto", **options: Any
) -> Any:
    opts = ServerOptions(settings=Settings.load({"db": corpus["db"]}), start_watcher=False)
    for key, value in options.items():
        setattr(opts, key, value)
    server = create_server(opts)

    async def main() -> Any:
        async with Client(server, mode=mode) as client:
            return await scenario(client)

    return anyio.run(main)


# ---------------------------------------------------------------------------- tools


def test_tools_have_typed_schemas_docs_and_read_only_hints(corpus) -> None:
    async def scenario(client: Client):
        return (await client.list_tools()).tools

    tools = {t.name: t for t in serve(corpus, scenario)}
    assert set(tools) == {"retrieve", "generate", "index_status"}  # folder tools are off by default
    k = tools["retrieve"].input_schema["properties"]["k"]
    assert (k["minimum"], k["maximum"], k["default"]) == (1, 200, 8)
    assert tools["retrieve"].input_schema["required"] == ["query"]
    for tool in tools.values():
        assert tool.description and len(tool.description) > 80  # tells a model when to use it
        assert tool.output_schema is not None
        assert tool.annotations.read_only_hint is True
    assert "hits" in tools["retrieve"].output_schema["properties"]
    assert "invalid_citations" in tools["generate"].output_schema["properties"]


def test_retrieve_returns_ranked_chunks_with_provenance(corpus) -> None:
    async def scenario(client: Client):
        return await client.call_tool("retrieve", {"query": "how often to oil the bicycle chain", "k": 3})

    result = serve(corpus, scenario)
    assert not result.is_error
    hits = result.structured_content["hits"]
    assert 1 <= len(hits) <= 3
    top = hits[0]
    assert top["path"] == str(corpus["docs"] / "bike.txt")
    assert top["uri"] == doc_uri(top["path"]) and top["uri"].startswith("lorekeeper://doc/")
    assert top["start_line"] == 1 and "lubricated" in top["text"]
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    text = result.content[0].text
    assert text.startswith("[1] " + top["path"]) and "lubricated" in text  # readable, not raw JSON


def test_retrieve_filters_by_type_and_path(corpus) -> None:
    async def scenario(client: Client):
        by_type = await client.call_tool("retrieve", {"query": "tomatoes bread chain", "file_types": ["md"]})
        by_glob = await client.call_tool(
            "retrieve", {"query": "tomatoes bread chain", "path_glob": "**/recipes/*"}
        )
        keyword = await client.call_tool("retrieve", {"query": "Thursday", "mode": "keyword"})
        return by_type, by_glob, keyword

    by_type, by_glob, keyword = serve(corpus, scenario)
    assert by_type.structured_content["hits"]
    assert all(h["path"].endswith(".md") for h in by_type.structured_content["hits"])
    assert {h["path"] for h in by_glob.structured_content["hits"]} == {
        str(corpus["docs"] / "recipes" / "bread.md")
    }
    assert keyword.structured_content["hits"][0]["path"].endswith("notes.rst")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"query": ""}, "at least 1 character"),
        ({"query": "   "}, "query is empty"),
        ({"query": "chain", "k": 0}, "greater than or equal to 1"),
        ({"query": "chain", "k": 10_000}, "less than or equal to 200"),
        ({"query": "chain", "mode": "semantic"}, "hybrid"),
        ({"query": "chain", "modified_after": "last tuesday"}, "ISO 8601"),
    ],
)
def test_bad_retrieve_input_is_a_clear_tool_error_and_the_server_keeps_serving(
    corpus, arguments, message
) -> None:
    async def scenario(client: Client):
        bad = await client.call_tool("retrieve", arguments)
        good = await client.call_tool("retrieve", {"query": "tyre pressure", "k": 1})
        return bad, good

    bad, good = serve(corpus, scenario)
    assert bad.is_error and message in bad.content[0].text
    assert not good.is_error and good.structured_content["hits"]


def test_generate_answers_from_sources_and_streams_tokens_as_progress(corpus, llama) -> None:
    progress: list[tuple[float, str]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message or ""))

    async def scenario(client: Client):
        return await client.call_tool(
            "generate",
            {
                "prompt": "How often should the bicycle chain be lubricated?",
                "max_tokens": 24,
                "temperature": 0,
            },
            progress_callback=on_progress,
        )

    result = serve(corpus, scenario)
    assert not result.is_error, result.content[0].text
    out = result.structured_content
    assert out["answer"].strip() and out["used_context"] is True
    assert out["sources"] and out["sources"][0]["number"] == 1
    assert str(corpus["docs"] / "bike.txt") in {s["path"] for s in out["sources"]}
    assert all(s["uri"].startswith("lorekeeper://doc/") for s in out["sources"])
    assert set(out["cited"]) == {s["number"] for s in out["sources"] if s["cited"]}
    assert out["completion_tokens"] >= 1 and out["prompt_tokens"] > 0
    assert progress, "tokens should stream as progress notifications"
    assert [v for v, _ in progress] == sorted(v for v, _ in progress)
    assert "".join(m for _, m in progress).strip() == out["generated"]  # the model's text, as it came
    assert result.content[0].text.startswith(out["answer"]) and "Sources" in result.content[0].text
    assert out["supported"] in (True, False) and out["sentences"] or out["answer"]


def test_a_crashed_model_process_is_reported_and_replaced_while_retrieve_keeps_answering(
    corpus, llama
) -> None:
    """SIGKILL the llama.cpp worker in the middle of an answer: that answer fails with a clear error,
    retrieve and index_status keep answering, and the next generate starts a new worker."""
    import os
    import signal

    killed: list[int] = []

    async def kill_on_first_token(value: float, total: float | None, message: str | None) -> None:
        if not killed:
            pid = llama.process.pid
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    ask = {"prompt": "Describe the garden notes in detail.", "max_tokens": 200, "temperature": 0}

    async def scenario(client: Client):
        crashed = await client.call_tool("generate", ask, progress_callback=kill_on_first_token)
        found = await client.call_tool("retrieve", {"query": "basil"})
        status = await client.call_tool("index_status", {})
        again = await client.call_tool("generate", {**ask, "max_tokens": 8})
        return crashed, found, status, again

    llama.worker_info()  # a worker is running before the scenario starts
    crashed, found, status, again = serve(corpus, scenario)
    assert killed
    assert crashed.is_error
    text = crashed.content[0].text
    assert "the model process crashed (signal 9 (SIGKILL))" in text and "llama-worker.log" in text
    assert "llama_repack" in text  # what to try
    assert not found.is_error and found.structured_content["hits"]
    assert not status.is_error
    assert not again.is_error and again.structured_content["completion_tokens"] >= 1
    assert llama.process.pid not in (None, killed[0])


def test_generate_without_context_still_answers(corpus, llama) -> None:
    async def scenario(client: Client):
        return await client.call_tool(
            "generate",
            {"prompt": "Say hello to the user.", "use_context": False, "max_tokens": 12, "temperature": 0},
        )

    result = serve(corpus, scenario)
    assert not result.is_error
    assert result.structured_content["answer"].strip()
    assert result.structured_content["sources"] == [] and result.structured_content["used_context"] is False


def test_generate_with_an_adapter_and_unknown_adapter_error(corpus, llama) -> None:
    adapters = Settings.load().adapters_dir  # this test's data directory, as the server's settings
    adapter_for(llama, adapters / "house-style.gguf")
    # one fitting the loaded model's shapes, but exported (says its record) for another base model
    adapter_for(llama, adapters / "other-base.gguf", seed=1)
    other = {"name": "other-base", "base_model": "/models/other.gguf", "base_sha256": "0" * 64}
    (adapters / "other-base.json").write_text(json.dumps(other), encoding="utf-8")
    before = llama.worker_info()

    async def scenario(client: Client):
        ok = await client.call_tool(
            "generate",
            {
                "prompt": "Say hi.",
                "use_context": False,
                "max_tokens": 6,
                "temperature": 0,
                "adapter": "house-style",
            },
        )
        unknown = await client.call_tool(
            "generate", {"prompt": "Say hi.", "adapter": "nope", "max_tokens": 4}
        )
        after = await client.call_tool(
            "generate", {"prompt": "Say hi.", "use_context": False, "max_tokens": 4}
        )
        foreign = await client.call_tool(
            "generate", {"prompt": "Say hi.", "use_context": False, "max_tokens": 4, "adapter": "other-base"}
        )
        status = await client.call_tool("index_status", {})
        return ok, unknown, after, foreign, status

    ok, unknown, after, foreign, status = serve(corpus, scenario)
    assert not ok.is_error and ok.structured_content["adapter"] == "house-style"
    assert not any("trained on" in w for w in ok.structured_content["warnings"])
    assert not foreign.is_error
    assert any("trained on /models/other.gguf" in w for w in foreign.structured_content["warnings"])
    listed = {a["name"]: a for a in status.structured_content["adapters"]}
    assert listed["house-style"]["runs_on_server_model"] is None  # no record: nothing to compare
    assert listed["other-base"]["runs_on_server_model"] is False
    assert listed["other-base"]["base_model"] == "/models/other.gguf"
    assert "adapter other-base (base /models/other.gguf, not this server's model)" in status.content[0].text
    assert unknown.is_error
    assert "unknown adapter 'nope'" in unknown.content[0].text and "house-style" in unknown.content[0].text
    assert not after.is_error and after.structured_content["adapter"] is None
    after_info = llama.worker_info()  # the server's generator shares the fixture's worker: one load
    assert after_info["model_handle"] == before["model_handle"]
    assert after_info["model_loads"] == before["model_loads"]


def test_generate_prompt_longer_than_the_context_window_is_a_clear_error(corpus, llama) -> None:
    async def scenario(client: Client):
        too_long = await client.call_tool(
            "generate",
            {"prompt": "why " * (llama.context_window + 10), "use_context": False, "max_tokens": 8},
        )
        too_much_answer = await client.call_tool(
            "generate",
            {"prompt": "why " * (llama.context_window - 100), "use_context": False, "max_tokens": 500},
        )
        still_fine = await client.call_tool("retrieve", {"query": "basil"})
        return too_long, too_much_answer, still_fine

    too_long, too_much_answer, still_fine = serve(corpus, scenario)
    assert too_long.is_error and "context window" in too_long.content[0].text
    assert "never cut" in too_long.content[0].text
    assert too_much_answer.is_error and "lower max_tokens" in too_much_answer.content[0].text
    assert not still_fine.is_error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"prompt": ""}, "at least 1 character"),
        ({"prompt": "x", "k": 0}, "greater than or equal to 1"),
        ({"prompt": "x", "k": 10_000}, "less than or equal to 200"),
        ({"prompt": "x", "max_tokens": 0}, "greater than or equal to 1"),
        ({"prompt": "x", "temperature": 5}, "less than or equal to 2"),
    ],
)
def test_bad_generate_input_is_a_clear_tool_error(corpus, arguments, message) -> None:
    async def scenario(client: Client):
        return await client.call_tool("generate", arguments)

    result = serve(corpus, scenario)
    assert result.is_error and message in result.content[0].text


def test_index_status_reports_roots_counts_and_failures(corpus) -> None:
    async def scenario(client: Client):
        return await client.call_tool("index_status", {})

    result = serve(corpus, scenario)
    out = result.structured_content
    assert [r["path"] for r in out["roots"]] == [str(corpus["docs"])]
    assert out["documents"] == len(DOCS) and out["chunks"] >= len(DOCS)
    assert out["embed_model"] == "all-MiniLM-L6-v2"
    assert f"{len(DOCS)} documents" in result.content[0].text


# ---------------------------------------------------------------------------- resources and prompt


def test_document_resource_serves_indexed_files_inside_roots(corpus) -> None:
    async def scenario(client: Client):
        return await client.read_resource(doc_uri(corpus["docs"] / "recipes" / "bread.md"))

    result = serve(corpus, scenario)
    assert "Feed the starter twice a day" in result.contents[0].text


def _uri_cases(corpus) -> list[tuple[str, str]]:
    docs, outside = corpus["docs"], corpus["outside"]
    return [
        (doc_uri(docs) + "/../outside/secret.txt", ""),  # clients may normalise the dots away
        (doc_uri(docs) + "/%2E%2E/outside/secret.txt", "'..' is not allowed"),
        (doc_uri(outside / "secret.txt"), "outside the registered folders"),
        ("lorekeeper://doc/etc/passwd", "outside the registered folders"),
        (doc_uri(docs / "escape.txt"), "points outside"),
        (doc_uri(docs / ".git" / "config"), "not in the index"),
        (doc_uri(docs / "missing.md"), "not in the index"),
    ]


def test_document_resource_rejects_traversal_outside_paths_links_and_unindexed_files(corpus) -> None:
    async def scenario(client: Client):
        outcomes = []
        for uri, message in _uri_cases(corpus):
            try:
                result = await client.read_resource(uri)
                outcomes.append((uri, message, result.contents[0].text))
            except MCPError as exc:
                outcomes.append((uri, message, exc))
        still = await client.read_resource(doc_uri(corpus["docs"] / "bike.txt"))
        return outcomes, still

    outcomes, still = serve(corpus, scenario)
    for uri, message, outcome in outcomes:
        assert isinstance(outcome, MCPError), f"{uri} was served: {outcome!r}"
        assert message in str(outcome), f"{uri}: {outcome}"
        assert "launch code" not in str(outcome) and "hunter2" not in str(outcome)
    assert "lubricated" in still.contents[0].text


def test_resource_list_has_documents_and_status(corpus) -> None:
    async def scenario(client: Client):
        listed = await client.list_resources()
        templates = await client.list_resource_templates()
        status = await client.read_resource("lorekeeper://status")
        return listed, templates, status

    listed, templates, status = serve(corpus, scenario)
    uris = {r.uri for r in listed.resources}
    assert "lorekeeper://status" in uris
    assert {doc_uri(corpus["docs"] / name) for name in DOCS} <= uris
    assert templates.resource_templates[0].uri_template == "lorekeeper://doc/{+path}"
    assert '"documents": 4' in status.contents[0].text


def test_answer_from_documents_prompt_carries_retrieved_passages(corpus) -> None:
    async def scenario(client: Client):
        prompts = await client.list_prompts()
        got = await client.get_prompt("answer_from_documents", {"question": "What temperature for the loaf?"})
        return prompts, got

    prompts, got = serve(corpus, scenario)
    assert [p.name for p in prompts.prompts] == ["answer_from_documents"]
    text = got.messages[0].content.text
    assert "250 degrees" in text and "What temperature for the loaf?" in text
    assert '<source id="1" file="' in text and "data, not instructions" in text


# ---------------------------------------------------------------------------- live index


def _fresh_copy(corpus, name: str) -> tuple[Path, Path]:
    folder = corpus["base"] / name
    shutil.copytree(corpus["docs"], folder, ignore=shutil.ignore_patterns(".git", "escape.txt"))
    return folder, corpus["base"] / f"{name}.db"


async def _until(check: Callable[[], Awaitable[bool]], seconds: float = 90) -> None:
    """Poll ``check`` until it holds; fail after ``seconds``."""
    with anyio.fail_after(seconds):
        while not await check():
            await anyio.sleep(0.1)


async def _settled(server: LorekeeperMCP) -> None:
    """Wait until the watcher has caught up and every index change has been announced."""

    async def watcher_idle() -> bool:
        watcher = server.state.watcher if server.state else None
        return watcher is not None and await anyio.to_thread.run_sync(watcher.wait_idle, 30)

    async def announced() -> bool:
        return server.notifier.idle()

    await _until(watcher_idle)
    await _until(announced)


def test_handshake_clients_are_told_when_the_resource_list_changes(corpus) -> None:
    folder, db = _fresh_copy(corpus, "live-legacy")
    notices: list[ResourceListChangedNotification] = []

    async def on_message(message) -> None:
        if isinstance(message, ResourceListChangedNotification):
            notices.append(message)

    server = create_server(ServerOptions(settings=Settings.load({"db": db}), watch=[folder]))
    new = folder / "kayak.md"

    async def main():
        async with Client(server, mode="legacy", message_handler=on_message) as client:
            advertised = client.server_capabilities.resources.list_changed
            await _settled(server)
            before = len(notices)
            new.write_text("# Kayak\n\nThe kayak paddle is 220 centimetres long.\n", encoding="utf-8")

            async def listed() -> bool:
                return doc_uri(new) in {r.uri for r in (await client.list_resources()).resources}

            async def notified() -> bool:
                return len(notices) > before

            await _until(listed)
            await _until(notified)
            return advertised

    assert anyio.run(main) is True


def test_modern_clients_hear_resource_list_changes_on_listen(corpus) -> None:
    folder, db = _fresh_copy(corpus, "live-modern")
    server = create_server(ServerOptions(settings=Settings.load({"db": db}), watch=[folder]))

    async def main():
        async with Client(server) as client:
            async with client.listen(resources_list_changed=True) as sub:
                new = folder / "tent.md"
                new.write_text("# Tent\n\nThe tent pegs are in the blue bag.\n", encoding="utf-8")
                with anyio.fail_after(90):
                    async for _event in sub:
                        hits = (
                            await client.call_tool("retrieve", {"query": "tent pegs blue bag"})
                        ).structured_content
                        if any(h["path"] == str(new) for h in hits["hits"]):
                            return True
        return False

    assert anyio.run(main)


def test_folder_tools_only_when_allowed(corpus, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "boat.txt").write_text("The sailing boat's mooring is at pier nine.\n", encoding="utf-8")
    db = tmp_path / "folders.db"
    shutil.copy(corpus["db"], db)

    async def scenario(client: Client):
        names = {t.name for t in (await client.list_tools()).tools}
        added = await client.call_tool("add_folder", {"path": str(extra)})
        found = await client.call_tool("retrieve", {"query": "where is the boat moored", "k": 1})
        relative = await client.call_tool("add_folder", {"path": "relative/dir"})
        removed = await client.call_tool("remove_folder", {"path": str(extra)})
        gone = await client.call_tool("retrieve", {"query": "where is the boat moored", "k": 8})
        unknown = await client.call_tool("remove_folder", {"path": str(tmp_path / "never-added")})
        return names, added, found, relative, removed, gone, unknown

    names, added, found, relative, removed, gone, unknown = serve(
        {**corpus, "db": db}, scenario, allow_folder_tools=True
    )
    assert {"add_folder", "remove_folder"} <= names
    assert added.structured_content["indexed"] == 1
    assert found.structured_content["hits"][0]["path"] == str((extra / "boat.txt").resolve())
    assert relative.is_error and "absolute" in relative.content[0].text
    assert not removed.is_error
    assert all("boat.txt" not in h["path"] for h in gone.structured_content["hits"])
    assert unknown.is_error and "not a registered folder" in unknown.content[0].text


# ---------------------------------------------------------------------------- CLI: ask and mcp-config


def _cli(*args: str):
    from typer.testing import CliRunner

    from lorekeeper.server.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_ask_streams_an_answer_then_lists_sources(corpus, llama) -> None:
    result = _cli(
        "--db", str(corpus["db"]), "ask", "How often is the bike chain lubricated?", "--max-tokens", "16"
    )
    assert result.exit_code == 0, result.output
    answer, _, sources = result.stdout.partition("Sources (* = supports the answer):")
    assert answer.strip()
    assert f"[1] {corpus['docs'] / 'bike.txt'}" in sources  # the best match is source 1


def test_ask_json_and_no_context(corpus, llama) -> None:
    result = _cli("--db", str(corpus["db"]), "ask", "Say hi.", "--no-context", "--max-tokens", "6", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["answer"] and payload["sources"] == [] and payload["completion_tokens"] >= 1


def test_ask_with_unknown_adapter_fails_clearly(corpus, llama) -> None:
    result = _cli("--db", str(corpus["db"]), "ask", "hi", "--adapter", "nope")
    assert result.exit_code == 1
    assert "unknown adapter 'nope'" in result.stderr


def test_mcp_config_prints_snippets_for_each_client(tmp_path: Path) -> None:
    result = _cli("mcp-config", "--client", "vscode", "--db", str(tmp_path / "x.db"))
    assert result.exit_code == 0, result.output
    server = json.loads(result.stdout)["servers"]["lorekeeper"]
    assert server["type"] == "stdio" and server["args"][-1] == "serve"
    assert str(tmp_path / "x.db") in server["args"]
    both = _cli("mcp-config")
    assert "Claude Desktop" in both.stdout and "Cursor" in both.stdout and "VS Code" in both.stdout
    http = _cli("mcp-config", "--client", "cursor", "--http", "--port", "9999")
    entry = json.loads(http.stdout)["mcpServers"]["lorekeeper"]
    assert entry["url"] == "http://127.0.0.1:9999/mcp" and entry["headers"]["Authorization"].startswith(
        "Bearer "
    )


def test_ask_reports_a_crashed_model_process_in_words(corpus, tmp_path: Path) -> None:
    """`lorekeeper ask` whose llama.cpp worker dies (SIGKILL here; a segfault on some CPUs) ends
    with an error message naming the signal and what to do, never a bare exit 139."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, LOREKEEPER_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorekeeper.server.cli", "--db", str(corpus["db"]), "ask",
         "Describe every note in great detail.", "--max-tokens", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    worker = None
    while worker is None and time.monotonic() < deadline and proc.poll() is None:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == proc.pid and b"lorekeeper.plugins.generators.llama_worker" in cmdline:
                    worker = int(entry.name)
        time.sleep(0.05)
    assert worker is not None, "the worker process never started"
    time.sleep(1.0)  # let it start answering
    os.kill(worker, signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, (proc.returncode, err[-2000:])
    assert "error: the model process crashed (signal 9 (SIGKILL))" in " ".join(err.split())
    assert "Traceback" not in err


def test_index_status_and_resources_give_the_last_evaluation(corpus, tmp_path) -> None:
    """`lorekeeper eval answers` notes its report in the index; MCP clients see it in index_status and
    read it as a resource; a kind never run says how to run it."""
    from lorekeeper.server.eval_report import record_last

    report = tmp_path / "report.md"
    report.write_text("# Answer evaluation\n\n**on 3 questions retrieval adds +0.30 F1: use retrieval**\n")
    with Store.open(corpus["db"]) as store:
        record_last(
            store,
            "answers",
            report,
            "on 3 questions retrieval adds +0.30 F1: use retrieval",
            "2026-12-03 10:00 UTC",
        )

    async def scenario(client: Client):
        status = await client.call_tool("index_status", {})
        listed = await client.list_resources()
        answers = await client.read_resource("lorekeeper://eval/answers")
        retrieval = await client.read_resource("lorekeeper://eval/retrieval")
        return status, listed, answers, retrieval

    try:
        status, listed, answers, retrieval = serve(corpus, scenario)
    finally:
        with Store.open(corpus["db"]) as store:
            store.set_meta("eval:answers", None)
    evaluations = status.structured_content["evaluations"]
    assert evaluations == [{"kind": "answers", "date": "2026-12-03 10:00 UTC", "uri": "lorekeeper://eval/answers",
                            "summary": "on 3 questions retrieval adds +0.30 F1: use retrieval"}]  # fmt: skip
    assert "last answers evaluation (2026-12-03 10:00 UTC)" in status.content[0].text
    assert {"lorekeeper://eval/answers", "lorekeeper://eval/retrieval"} <= {r.uri for r in listed.resources}
    assert answers.contents[0].text == report.read_text()
    assert "No retrieval evaluation yet: run `lorekeeper eval retrieval`" in retrieval.contents[0].text
