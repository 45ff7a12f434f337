"""An adapter carries its prompt: the system turn and sampling of its record reach the model through
``ask``, ``chat`` and MCP ``generate``; ``adapters list|show|rm``; ``chat`` as a plain conversation.

The real llama.cpp generator answers (SmolLM2 with a small real LoRA GGUF); a spy on its ``stream``
records what it was asked, so the tests see the prompt and sampling that reach llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from fakes import ScriptedGenerator
from tiny_lora import adapter_for, write_lora_adapter
from typer.testing import CliRunner

from lorekeeper import plugins
from lorekeeper.finetune.data import parse_record
from lorekeeper.finetune.prompt import most_common_system
from lorekeeper.plugins.base import ChatMessage
from lorekeeper.plugins.generators.llamacpp import LlamaCppGenerator
from lorekeeper.plugins.models import default_gguf_path
from lorekeeper.server import generation
from lorekeeper.server.adapters import AdapterRecord, AdapterRegistry
from lorekeeper.server.cli import app
from lorekeeper.server.settings import Settings

PERSONA = "You are Quill, the clerk of the Varnholt ferry office. Answer in one short sentence."
SAMPLING = {"temperature": 0.0, "top_p": 0.5, "min_p": 0.1, "repeat_penalty": 1.05}


def _cli(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input, catch_exceptions=False)


@pytest.fixture(scope="module")
def llama():
    gen = plugins.get_generator("llamacpp")
    gen.count_tokens("load once")
    return gen


@pytest.fixture
def quill(llama) -> AdapterRegistry:
    """Adapter 'quill' registered with a record as export writes it (on the embedded base)."""
    registry = AdapterRegistry(Settings.load().adapters_dir)
    registry.directory.mkdir(parents=True, exist_ok=True)
    gguf = adapter_for(llama, registry.directory.parent / "quill-src.gguf")
    record = AdapterRecord(name="quill", base_model=str(default_gguf_path()), rank=8, system_prompt=PERSONA,
                           sampling=dict(SAMPLING), description="the ferry clerk")  # fmt: skip
    registry.register("quill", gguf, record)
    return registry


@pytest.fixture
def asked(monkeypatch) -> list[tuple[list[ChatMessage], dict]]:
    """What the real llama.cpp generator is asked: (messages, keyword arguments) per answer."""
    calls: list[tuple[list[ChatMessage], dict]] = []
    real = LlamaCppGenerator.stream

    def spy(self, messages, **kwargs):
        calls.append((list(messages), kwargs))
        return real(self, messages, **kwargs)

    monkeypatch.setattr(LlamaCppGenerator, "stream", spy)
    return calls


# ---------------------------------------------------------------------------- the rules, fast


def test_most_common_system_turn_of_the_training_chats() -> None:
    def chat(system: str | None) -> dict:
        turns = [{"role": "system", "content": system}] if system else []
        return {"messages": [*turns, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}

    rows = [chat("A"), chat("B"), chat("A"), chat(None), {"text": "plain text is not a chat"}]
    records = [parse_record(row, f"d.jsonl:{i}") for i, row in enumerate(rows)]
    assert most_common_system(records) == ("A", 0.5)
    assert most_common_system(records[3:]) == (None, 1.0)
    assert most_common_system([]) == (None, 0.0)


def test_adapter_prompt_opens_the_system_turn_and_system_replaces_it() -> None:
    gen = ScriptedGenerator()
    record = AdapterRecord(name="x", system_prompt=PERSONA)
    hit = type("Hit", (), {"path": "a.txt", "text": "The ferry leaves at nine.", "score": 1.0})()
    grounded = generation.build_prompt("When?", [hit], gen, max_tokens=8,
                                       turns=generation.adapter_turns(record, None))  # fmt: skip
    system = grounded.messages[0].content
    assert system.startswith(PERSONA) and generation.GROUNDED_SYSTEM in system
    assert "The ferry leaves" in grounded.messages[-1].content  # sources stay in the user turn
    plain = generation.build_prompt("When?", [], gen, max_tokens=8, use_context=False,
                                    turns=generation.adapter_turns(record, None))  # fmt: skip
    assert [(m.role, m.content) for m in plain.messages] == [("system", PERSONA), ("user", "When?")]
    mine = generation.build_prompt("When?", [], gen, max_tokens=8, use_context=False,
                                   turns=generation.adapter_turns(record, "Be terse."))  # fmt: skip
    assert mine.messages[0].content == "Be terse."
    none = generation.build_prompt("When?", [], gen, max_tokens=8, use_context=False,
                                   turns=generation.adapter_turns(record, ""))  # fmt: skip
    assert [m.role for m in none.messages] == ["user"]


def test_sampling_request_over_record_over_settings() -> None:
    class Sampler(ScriptedGenerator):
        sampling_options = ("top_p", "min_p", "repeat_penalty", "adapter_scale")

    settings = Settings.load({"top_p": 0.7})  # a flag
    chosen = generation.sampling_for(Sampler(), settings, None, SAMPLING, 0.5)
    assert chosen == {
        "temperature": 0.0,
        "top_p": 0.7,
        "min_p": 0.1,
        "repeat_penalty": 1.05,
        "adapter_scale": 0.5,
    }
    assert generation.sampling_for(Sampler(), settings, 0.9, SAMPLING)["temperature"] == 0.9
    assert (
        generation.sampling_for(Sampler(), Settings.load(), None, None)["temperature"]
        == Settings.load().temperature
    )


def test_chat_history_keeps_the_latest_whole_turns_that_fit() -> None:
    from lorekeeper.server.cli.chat import fit_history

    gen = ScriptedGenerator()
    history = []
    for i in range(6):
        history += [ChatMessage("user", f"question {i} " * 5), ChatMessage("assistant", f"answer {i} " * 5)]
    everything, dropped = fit_history(gen, history, "now?", 10_000)
    assert everything == history and dropped == 0
    budget = gen.count_message_tokens([*history[-4:], ChatMessage("user", "now?")])
    kept, dropped = fit_history(gen, history, "now?", budget)
    assert kept == history[-4:] and dropped == 8  # two whole turns, the latest
    assert fit_history(gen, history, "now?", 1) == ([], 12)


# ---------------------------------------------------------------------------- adapters list|show|rm


def test_adapters_list_show_rm(tmp_path: Path) -> None:
    registry = AdapterRegistry(Settings.load().adapters_dir)
    src = write_lora_adapter(tmp_path / "a.gguf", n_embd=16, n_layer=1)
    registry.register("notes-v1", src, AdapterRecord(name="notes-v1", base_model="/models/base.gguf", rank=8,
                                                     description="house style", system_prompt=PERSONA))  # fmt: skip
    listed = _cli("adapters", "list")
    assert listed.exit_code == 0, listed.output
    for text in ("notes-v1", "base.gguf", "8", "house style"):
        assert text in listed.stdout
    shown = _cli("adapters", "show", "notes-v1")
    assert shown.exit_code == 0
    record = json.loads(shown.stdout)
    assert record["system_prompt"] == PERSONA and Path(record["adapter_path"]).is_file()
    unknown = _cli("adapters", "rm", "nope")
    assert (
        unknown.exit_code == 1 and "unknown adapter 'nope'" in unknown.stderr and "notes-v1" in unknown.stderr
    )
    removed = _cli("adapters", "rm", "notes-v1")
    assert removed.exit_code == 0
    assert not list(registry.directory.iterdir())  # record and GGUF gone as a pair
    assert "no adapters" in _cli("adapters", "list").stdout


# ---------------------------------------------------------------------------- the real code paths


@pytest.mark.slow
def test_ask_with_an_adapter_uses_its_system_prompt_and_sampling(quill, asked) -> None:
    result = _cli("ask", "Who are you?", "--adapter", "quill", "--no-context", "--max-tokens", "4",
                  "--adapter-scale", "0.5")  # fmt: skip
    assert result.exit_code == 0, result.output
    messages, kwargs = asked[-1]
    assert (messages[0].role, messages[0].content) == ("system", PERSONA)
    assert kwargs["adapter"] == "quill" and kwargs["adapter_scale"] == 0.5
    assert {k: kwargs[k] for k in SAMPLING} == SAMPLING
    overridden = _cli("ask", "Who are you?", "--adapter", "quill", "--no-context", "--max-tokens", "4",
                      "--system", "Be terse.", "--temperature", "0.7")  # fmt: skip
    assert overridden.exit_code == 0, overridden.output
    messages, kwargs = asked[-1]
    assert messages[0].content == "Be terse." and kwargs["temperature"] == 0.7
    bad = _cli("ask", "hi", "--adapter-scale", "0.5", "--no-context")
    assert bad.exit_code == 1 and "--adapter-scale needs --adapter" in bad.stderr


@pytest.mark.slow
def test_ask_with_retrieval_puts_the_adapter_prompt_before_the_retrieval_instructions(
    quill, asked, tmp_path, embedder
) -> None:
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.store import Store

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ferry.txt").write_text("The Varnholt ferry leaves every nine hours.\n", encoding="utf-8")
    db = tmp_path / "index.db"
    with Store.open(db) as store:
        Indexer(store, embedder).add_root(docs)
    result = _cli("--db", str(db), "ask", "How often does the ferry leave?", "--adapter", "quill",
                  "--max-tokens", "8")  # fmt: skip
    assert result.exit_code == 0, result.output
    messages, _ = asked[-1]
    assert messages[0].content.startswith(PERSONA + "\n\n" + generation.GROUNDED_SYSTEM)
    assert "nine hours" in messages[-1].content


def test_chat_keeps_the_conversation_and_uses_the_adapter_prompt(quill, asked) -> None:
    result = _cli(
        "chat",
        "--adapter",
        "quill",
        "--max-tokens",
        "4",
        input="Hello there.\n\nWhat did I say?\n/exit\nnever\n",
    )
    assert result.exit_code == 0, result.output
    assert len(asked) == 2  # the blank line is skipped; /exit ends before "never"
    first, second = asked[0][0], asked[1][0]
    assert (first[0].role, first[0].content) == ("system", PERSONA)
    assert [m.role for m in second] == ["system", "user", "assistant", "user"]
    assert second[1].content == "Hello there." and second[3].content == "What did I say?"
    assert second[2].content.strip() and second[2].content.strip() in result.stdout
    assert asked[1][1]["temperature"] == SAMPLING["temperature"]


def test_chat_without_an_adapter_ends_on_end_of_input(llama, asked) -> None:
    result = _cli("chat", "--max-tokens", "4", "--system", "Be brief.", input="Hi.\n")
    assert result.exit_code == 0, result.output
    assert len(asked) == 1 and asked[0][0][0].content == "Be brief." and asked[0][1]["adapter"] is None


def test_mcp_generate_with_an_adapter_uses_its_system_prompt(quill, asked, tmp_path) -> None:
    from mcp import Client

    from lorekeeper.server.mcp import ServerOptions, create_server
    from lorekeeper.server.store import Store

    db = tmp_path / "index.db"
    Store.open(db).close()
    server = create_server(ServerOptions(settings=Settings.load({"db": db}), start_watcher=False))

    async def main():
        async with Client(server) as client:
            status = await client.call_tool("index_status", {})
            assert (
                "adapter quill (base " in status.content[0].text
                and ": the ferry clerk" in status.content[0].text
            )
            return await client.call_tool("generate", {"prompt": "Who are you?", "use_context": False,
                                                       "max_tokens": 4, "adapter": "quill", "adapter_scale": 0.25})  # fmt: skip

    result = anyio.run(main)
    assert not result.is_error, result.content
    messages, kwargs = asked[-1]
    assert (messages[0].role, messages[0].content) == ("system", PERSONA)
    assert kwargs["adapter_scale"] == 0.25 and kwargs["temperature"] == SAMPLING["temperature"]


TEMPLATE = (
    "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:{% endif %}"
)


def test_an_adapter_trained_with_another_chat_template_is_asked_with_it(quill, llama, monkeypatch) -> None:
    from lorekeeper.plugins.generators.llama_worker import ModelProcess

    record = quill.read("quill")
    record.chat_template = TEMPLATE
    quill.register("styled", quill.gguf_path("quill"), record)
    prompts: list[str] = []
    real = ModelProcess.generate

    def spy(self, request):
        prompts.append(llama.vocab.detokenize(request["tokens"], special=True).decode("utf-8", "replace"))
        return real(self, request)

    monkeypatch.setattr(ModelProcess, "generate", spy)
    gen = LlamaCppGenerator(adapters=quill)
    messages = [ChatMessage("user", "Who are you?")]
    assert "".join(gen.stream(messages, max_tokens=2, temperature=0, adapter="styled")) is not None
    assert "### user: Who are you?" in prompts[-1] and prompts[-1].rstrip().endswith("### assistant:")
    "".join(gen.stream(messages, max_tokens=2, temperature=0, adapter="quill"))  # no template: the model's
    assert "<|im_start|>user\nWho are you?" in prompts[-1]
