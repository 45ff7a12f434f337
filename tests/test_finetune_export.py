"""`lorekeeper finetune export`: file layout, registration, quantization, and refusals with clear errors.

Numerical faithfulness is proven in test_finetune_parity.py; here the tests check what a user and
llama.cpp rely on besides the numbers: the adapter's metadata and tensor layout, the registered
NAME.gguf + NAME.json, tied embeddings, Q8_0 / llama.cpp quantization, and that a full disk, an
unsupported architecture or an unsupported adapter never leaves a half-written or wrong file.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import finetune_tiny as ft  # noqa: E402
import gguf  # noqa: E402

from lorekeeper.finetune.export import (  # noqa: E402
    AdapterFormatError,
    ExportError,
    UnsupportedArchitecture,
    export_run,
)
from lorekeeper.finetune.gguf_arch import permute_rows_for_rope  # noqa: E402
from lorekeeper.finetune.parity import compare_logits, llama_cpp_logits, transformers_logits  # noqa: E402

pytestmark = (
    pytest.mark.slow
)  # every test here trains or converts a real model (seconds to half a minute each)

RANK, ALPHA = 8, 16.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny SmolLM2-shaped llama (tied embeddings) with a random LoRA, saved as a run."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer_dir = ft.smollm2_tokenizer_dir(root)
    model_dir, model = ft.make_hf_base(root, "llama", tokenizer_dir)
    peft_model = ft.add_random_lora(model, ft.ARCH_TARGETS["llama"], r=RANK, alpha=ALPHA)
    base = {"kind": "hf", "path": str(model_dir), "gguf_file": None, "architecture": "llama"}
    run = ft.write_run(root, "run-tiny", peft_model, base, tokenizer_dir)
    return {
        "root": root,
        "run": run,
        "peft": peft_model,
        "model_dir": model_dir,
        "tokenizer_dir": tokenizer_dir,
    }


def _copy_run(tiny, tmp_path: Path, name: str = "run-copy") -> Path:
    import shutil

    target = tmp_path / name
    shutil.copytree(tiny["run"], target, ignore=shutil.ignore_patterns("export"))
    return target


def _tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _field(path: Path, key: str):
    field = gguf.GGUFReader(str(path)).fields.get(key)
    return None if field is None else field.contents()


def test_adapter_gguf_has_lora_metadata_and_llama_cpp_tensor_layout(tiny, tmp_path):
    report = export_run(_copy_run(tiny, tmp_path), name="layout", register=False)

    adapter = report.adapter_gguf
    assert _field(adapter, "general.type") == "adapter"
    assert _field(adapter, "adapter.type") == "lora"
    assert _field(adapter, "general.architecture") == "llama"
    assert _field(adapter, "adapter.lora.alpha") == pytest.approx(ALPHA)
    lora = _tensors(adapter)
    base = _tensors(report.base_gguf)
    # 2 layers x 7 projections, an A and a B each, every one naming a tensor of the base GGUF
    assert len(lora) == 2 * 7 * 2
    for name, tensor in lora.items():
        stem, _, kind = name.rpartition(".")
        assert kind in ("lora_a", "lora_b") and stem in base
        rows, cols = (int(n) for n in reversed(tensor.shape))  # numpy order
        out_features, in_features = (int(n) for n in reversed(base[stem].shape))
        assert (rows, cols) == ((RANK, in_features) if kind == "lora_a" else (out_features, RANK))

    # Q/K: B rows follow llama.cpp's rope order (A untouched); V is copied as is
    from safetensors.numpy import load_file

    peft_state = load_file(str(tiny["run"] / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn"
    b_q = np.asarray(lora["blk.0.attn_q.weight.lora_b"].data)
    b_k = np.asarray(lora["blk.0.attn_k.weight.lora_b"].data)
    b_v = np.asarray(lora["blk.0.attn_v.weight.lora_b"].data)
    a_q = np.asarray(lora["blk.0.attn_q.weight.lora_a"].data)
    np.testing.assert_allclose(b_q, permute_rows_for_rope(peft_state[f"{prefix}.q_proj.lora_B.weight"], 4))
    np.testing.assert_allclose(b_k, permute_rows_for_rope(peft_state[f"{prefix}.k_proj.lora_B.weight"], 2))
    np.testing.assert_allclose(b_v, peft_state[f"{prefix}.v_proj.lora_B.weight"])
    np.testing.assert_allclose(a_q, peft_state[f"{prefix}.q_proj.lora_A.weight"])


def test_tied_embeddings_write_no_output_tensor_and_untied_do(tiny, tmp_path):
    tied = export_run(_copy_run(tiny, tmp_path), name="tied", register=False, verify=False)
    assert "token_embd.weight" in _tensors(tied.base_gguf)
    assert "output.weight" not in _tensors(tied.base_gguf)

    model_dir, model = ft.make_hf_base(tmp_path, "llama3", tiny["tokenizer_dir"])
    peft_model = ft.add_random_lora(model, ["q_proj"])
    base = {"kind": "hf", "path": str(model_dir), "gguf_file": None, "architecture": "llama"}
    run = ft.write_run(tmp_path, "run-untied", peft_model, base, tiny["tokenizer_dir"])
    untied = export_run(run, name="untied", register=False, verify=False)
    tensors = _tensors(untied.base_gguf)
    assert "output.weight" in tensors and "rope_freqs.weight" in tensors  # Llama 3 rope scaling


def test_merged_model_carries_tokenizer_chat_template_and_bos_rule(tiny, tmp_path):
    report = export_run(_copy_run(tiny, tmp_path), name="chat", adapter=False, merged=True, register=False)
    merged = report.merged_gguf
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tiny["model_dir"])
    assert _field(merged, "tokenizer.chat_template") == hf_tok.chat_template
    assert _field(merged, "tokenizer.ggml.add_bos_token") is False  # SmolLM2's template starts with BOS
    assert _field(merged, "tokenizer.ggml.bos_token_id") == hf_tok.bos_token_id
    assert len(_field(merged, "tokenizer.ggml.tokens")) == ft.VOCAB

    from lorekeeper.plugins.llama_open import open_llama

    llm = open_llama(merged, n_ctx=256)
    try:
        out = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    finally:
        llm.close()
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] >= 1


def test_export_registers_adapter_by_name_for_the_generator(tiny, tmp_path):
    from lorekeeper.plugins.models import file_sha256
    from lorekeeper.server.adapters import AdapterRegistry
    from lorekeeper.server.settings import Settings

    run = _copy_run(tiny, tmp_path)
    report = export_run(run, name="my-notes")

    registry = AdapterRegistry(Settings.load().adapters_dir)
    assert report.registered_gguf == registry.gguf_path("my-notes")
    assert report.registered_gguf.read_bytes() == report.adapter_gguf.read_bytes()
    info = json.loads((registry.directory / "my-notes.json").read_text())
    assert info["name"] == "my-notes"
    assert Path(info["base_model"]) == report.base_gguf
    assert info["base_sha256"] == file_sha256(report.base_gguf)
    assert (info["rank"], info["alpha"], info["architecture"]) == (RANK, ALPHA, "llama")
    assert Path(info["run_dir"]) == run.resolve()
    assert info["created"].endswith("+00:00")
    assert "q_proj" in info["target_modules"]
    assert info["adapter_file"] == report.registered_gguf.name
    assert "my-notes" in registry.names()
    assert not [p for p in registry.directory.iterdir() if p.name.startswith(".")]  # no temporary files


def test_merged_q8_0_uses_gguf_quantizer_and_stays_close(tiny, tmp_path):
    report = export_run(
        _copy_run(tiny, tmp_path), name="q8", adapter=False, merged=True, outtype="q8_0", register=False
    )
    tensors = _tensors(report.merged_gguf)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, ft.VOCAB, 127).tolist()
    result = compare_logits(transformers_logits(tiny["peft"], ids), llama_cpp_logits(report.merged_gguf, ids))
    assert result.mean_kl < 1e-4, (
        result
    )  # 8-bit weights: looser than F16, still far below the adapter's effect


def test_quantize_with_llama_cpp_writes_smaller_model(tiny, tmp_path):
    report = export_run(
        _copy_run(tiny, tmp_path), name="q4", adapter=False, quantize="Q4_K_M", register=False
    )
    assert report.quantized_gguf.is_file()
    assert report.merged_gguf is None
    assert not list(report.quantized_gguf.parent.glob("*merged-f16.gguf"))  # intermediate removed
    assert _field(report.quantized_gguf, "general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def test_unknown_quantization_type_is_refused_with_choices(tiny, tmp_path):
    with pytest.raises(ExportError, match="Q4_K_M"):
        export_run(_copy_run(tiny, tmp_path), adapter=False, quantize="Q3_XYZ", register=False)


# --- out of disk space ---------------------------------------------------------------------------


def _tiny_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_full_disk_leaves_no_gguf_under_the_final_name(tiny, tmp_path):
    """Export onto a 1 MiB filesystem (a real tmpfs when the tests may mount one; otherwise the same
    export in a child process whose file-size limit makes writes fail the same way)."""
    run = _copy_run(tiny, tmp_path)
    small = tmp_path / "small-disk"
    if _tiny_tmpfs(small):
        try:
            with pytest.raises(ExportError, match="disk space") as caught:
                export_run(run, name="full", merged=True, output_dir=small)
            assert caught.value.__cause__.errno == errno.ENOSPC
            left = sorted(p.name for p in small.iterdir())
        finally:
            subprocess.run(["umount", str(small)], check=True)
    else:
        script = textwrap.dedent(
            f"""
            import resource, signal, sys
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
            from lorekeeper.finetune.export import ExportError, export_run
            try:
                export_run({str(run)!r}, name="full", merged=True, output_dir={str(small)!r})
            except ExportError as exc:
                print(exc); sys.exit(3)
            """
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
        assert done.returncode == 3, done.stderr[-2000:]
        assert "disk space" in done.stdout
        left = sorted(p.name for p in small.iterdir())
    assert left == []  # neither a final .gguf nor a temporary .partial file
    from lorekeeper.server.adapters import AdapterRegistry
    from lorekeeper.server.settings import Settings

    assert "full" not in AdapterRegistry(Settings.load().adapters_dir).names()


# --- refusals ------------------------------------------------------------------------------------


def test_gguf_base_of_unsupported_architecture_is_named_in_the_error(tiny, tmp_path):
    fake = tmp_path / "gpt2-model.gguf"
    writer = gguf.GGUFWriter(str(fake), "gpt2")
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    run = _copy_run(tiny, tmp_path)
    base = {"kind": "gguf", "path": str(tmp_path), "gguf_file": fake.name, "architecture": "gpt2"}
    (run / "base.json").write_text(json.dumps(base))

    with pytest.raises(UnsupportedArchitecture) as caught:
        export_run(run, name="nope")
    message = str(caught.value)
    assert "'gpt2'" in message and "llama" in message and "phi3" in message and "gemma" in message
    assert not (run / "export").exists() or not list((run / "export").glob("*.gguf"))


def test_hf_base_of_unsupported_architecture_is_named_in_the_error(tiny, tmp_path):
    import shutil

    model_dir = tmp_path / "neox"
    shutil.copytree(tiny["model_dir"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (model_dir / "config.json").write_text(json.dumps(config))
    run = _copy_run(tiny, tmp_path)
    (run / "base.json").write_text(
        json.dumps({"kind": "hf", "path": str(model_dir), "architecture": "gpt_neox"})
    )

    with pytest.raises(UnsupportedArchitecture, match="'gpt_neox'.*supported"):
        export_run(run, name="nope")


@pytest.mark.parametrize(
    ("change", "match"),
    [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")],
)
def test_adapter_features_gguf_cannot_carry_are_refused(tiny, tmp_path, change, match):
    run = _copy_run(tiny, tmp_path)
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(change)
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match=match):
        export_run(run, name="nope")


def test_untrained_run_and_bad_name_are_refused_clearly(tiny, tmp_path):
    import shutil

    run = _copy_run(tiny, tmp_path)
    with pytest.raises(ExportError, match="not valid"):
        export_run(run, name="../escape")
    shutil.rmtree(run / "adapter")
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        export_run(run, name="untrained")


def test_cli_export_command(tiny, tmp_path):
    from typer.testing import CliRunner

    from lorekeeper.finetune.cli import app

    run = _copy_run(tiny, tmp_path)
    result = CliRunner().invoke(app, ["export", str(run), "--name", "cli-notes", "--merged", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    from lorekeeper.server.adapters import AdapterRegistry
    from lorekeeper.server.settings import Settings

    assert Path(written["registered_gguf"]) == AdapterRegistry(Settings.load().adapters_dir).gguf_path(
        "cli-notes"
    )
    assert Path(written["merged_gguf"]).is_file()

    bad = CliRunner().invoke(app, ["export", str(run), "--outtype", "q2"])
    assert bad.exit_code == 2
    assert "outtype" in bad.output


def test_lm_head_lora_on_tied_model_refused_as_adapter_and_untied_when_merged(tiny, tmp_path):
    """peft can adapt lm_head although it shares its weight with the embeddings. llama.cpp cannot
    apply that as an adapter (it would change the embeddings too), so the adapter export says so;
    the merged export writes a separate output.weight and matches transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["model_dir"], dtype=torch.float32)
    peft_model = ft.add_random_lora(model, ["q_proj", "lm_head"], seed=5)
    base = {"kind": "hf", "path": str(tiny["model_dir"]), "gguf_file": None, "architecture": "llama"}
    run = ft.write_run(tmp_path, "run-head", peft_model, base, tiny["tokenizer_dir"])

    with pytest.raises(ExportError, match="ties lm_head"):
        export_run(run, name="head")
    report = export_run(run, name="head", adapter=False, merged=True, outtype="f32", register=False)
    assert "output.weight" in _tensors(report.merged_gguf)
    rng = np.random.default_rng(2)
    ids = [1] + rng.integers(3, ft.VOCAB, 127).tolist()
    result = compare_logits(transformers_logits(peft_model, ids), llama_cpp_logits(report.merged_gguf, ids))
    assert result.mean_kl < 1e-5, result


def test_adapter_answers_on_its_own_base_and_another_model_is_refused_or_warned(tiny, tmp_path):
    """An adapter exported for a base converted from a Hugging Face folder: `lorekeeper ask --adapter`
    runs it on that base by itself; a generator running another model says which base it needs
    (llama.cpp cannot attach it to SmolLM2) or, when the shapes fit but the weights differ, warns."""
    import shutil

    from typer.testing import CliRunner

    from lorekeeper.plugins.generators.llamacpp import AdapterLoadError, LlamaCppGenerator
    from lorekeeper.plugins.models import default_gguf_path
    from lorekeeper.server import generation
    from lorekeeper.server.cli import app

    shipped = default_gguf_path()
    run = _copy_run(tiny, tmp_path)
    report = export_run(run, name="tiny-notes", merged=True)

    asked = CliRunner().invoke(
        app, ["ask", "Hello?", "--adapter", "tiny-notes", "--no-context", "--max-tokens", "4", "--json"]
    )
    assert asked.exit_code == 0, asked.output
    answer = json.loads(asked.stdout)
    assert (answer["model"], answer["adapter"]) == (report.base_gguf.name, "tiny-notes")
    assert not any("trained on" in w for w in answer["warnings"])
    assert f"on its base model {report.base_gguf}" in asked.output

    smollm2 = LlamaCppGenerator(shipped, n_ctx=256)
    try:
        with pytest.raises(
            AdapterLoadError, match=rf"exported for the base model {report.base_gguf}.*--model"
        ):
            generation.answer_question(
                "Hello?", generator=smollm2, use_context=False, max_tokens=4, adapter="tiny-notes"
            )
    finally:
        smollm2.close()

    def ask_with(model: Path) -> generation.GroundedAnswer:
        generator = LlamaCppGenerator(model, n_ctx=256)
        try:
            return generation.answer_question(
                "Hello?", generator=generator, use_context=False, max_tokens=4, adapter="tiny-notes"
            )
        finally:
            generator.close()

    # the merged model has the base's shapes, so llama.cpp attaches the adapter, but it is not the base
    warned = ask_with(report.merged_gguf)
    assert any(f"trained on {report.base_gguf}" in w for w in warned.warnings), warned.warnings
    # a byte-identical copy of the base elsewhere is the base
    copy = shutil.copy(report.base_gguf, tmp_path / "moved-base.gguf")
    assert not any("trained on" in w for w in ask_with(Path(copy)).warnings)


def test_mcp_generate_answers_an_adapter_on_its_own_base_beside_the_servers_model(tiny, tmp_path):
    """The MCP server runs SmolLM2; `generate(adapter=...)` for an adapter fine-tuned on another base
    loads that base (once) and answers with it, and requests without the adapter stay on SmolLM2."""
    import anyio
    from mcp import Client

    from lorekeeper.plugins.models import default_gguf_path
    from lorekeeper.server.mcp import ServerOptions, create_server
    from lorekeeper.server.settings import Settings

    report = export_run(_copy_run(tiny, tmp_path), name="tiny-mcp")
    settings = Settings.load({"db": tmp_path / "index.db"})
    server = create_server(ServerOptions(settings=settings, start_watcher=False))
    ask = {"prompt": "Hello?", "use_context": False, "max_tokens": 4, "temperature": 0}

    async def main():
        async with Client(server) as client:
            status = await client.call_tool("index_status", {})
            tuned = [await client.call_tool("generate", {**ask, "adapter": "tiny-mcp"}) for _ in range(2)]
            plain = await client.call_tool("generate", ask)
            return status, tuned, plain, list(server.state._base_generators)

    status, tuned, plain, loaded = anyio.run(main)
    listed = {a["name"]: a for a in status.structured_content["adapters"]}
    assert listed["tiny-mcp"]["runs_on_server_model"] is False
    assert listed["tiny-mcp"]["base_model"] == str(report.base_gguf)
    for result in tuned:
        assert not result.is_error, result.content
        out = result.structured_content
        assert (out["model"], out["adapter"]) == (report.base_gguf.name, "tiny-mcp")
        assert not any("trained on" in w for w in out["warnings"])
    assert loaded == [str(report.base_gguf.resolve())]  # loaded once, kept
    assert not plain.is_error and plain.structured_content["model"] == default_gguf_path().name


def test_export_record_carries_the_training_prompt_template_sampling_and_description(tiny, tmp_path):
    from lorekeeper.finetune.data import parse_record
    from lorekeeper.finetune.prompt import write_training_prompt
    from lorekeeper.server.adapters import AdapterRegistry
    from lorekeeper.server.settings import Settings

    persona = "You are Quill, the clerk of the Varnholt ferry office."
    chats = [{"messages": [{"role": "system", "content": persona}, {"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]  # fmt: skip
    chats.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    records = [parse_record(chat, f"data.jsonl:{i + 1}") for i, chat in enumerate(chats)]
    run = _copy_run(tiny, tmp_path)
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    write_training_prompt(run, records, template)
    export_run(run, name="quill", description="Answers as the ferry clerk")
    registry = AdapterRegistry(Settings.load().adapters_dir)
    record = registry.read("quill")
    assert record.system_prompt == persona
    assert record.chat_template == template
    assert record.description == "Answers as the ferry clerk"
    defaults = Settings.load()
    assert record.sampling == {
        k: getattr(defaults, k) for k in ("temperature", "top_p", "min_p", "repeat_penalty")
    }

    # a run trained before prompt.json existed: the tokenizer's template, no system prompt, a description
    (run / "prompt.json").unlink()
    export_run(run, name="older")
    older = registry.read("older")
    saved = json.loads((run / "tokenizer" / "tokenizer_config.json").read_text()).get("chat_template")
    if saved is None:
        saved = (run / "tokenizer" / "chat_template.jinja").read_text()
    assert older.system_prompt is None and older.chat_template == saved
    assert run.name in older.description


def test_quantize_only_export_keeps_a_merged_model_an_earlier_export_wrote(tiny, tmp_path, capfd):
    run = _copy_run(tiny, tmp_path)
    first = export_run(run, name="keep", adapter=False, merged=True, register=False)
    before = first.merged_gguf.read_bytes()
    capfd.readouterr()
    second = export_run(run, name="keep", adapter=False, quantize="Q8_0", register=False)
    assert second.merged_gguf is None and second.quantized_gguf.is_file()
    assert first.merged_gguf.is_file() and first.merged_gguf.read_bytes() == before
    assert not [p for p in first.merged_gguf.parent.iterdir() if p.name.startswith(".")]  # scratch removed
    # llama.cpp's own log (hundreds of lines while quantizing) stays quiet without --verbose
    assert len(capfd.readouterr().err.splitlines()) < 5


def test_merged_model_of_a_gguf_base_carries_the_chat_template_the_run_trained_with(tiny, tmp_path):
    from lorekeeper.finetune.prompt import CHATML

    first = export_run(_copy_run(tiny, tmp_path, "hf-run"), name="tiny-base", register=False)
    run = _copy_run(tiny, tmp_path, "gguf-run")
    base = first.base_gguf
    (run / "base.json").write_text(json.dumps({"kind": "gguf", "path": str(base.parent),
                                               "gguf_file": base.name, "architecture": "llama"}))  # fmt: skip
    (run / "prompt.json").write_text(json.dumps({"system_prompt": None, "chat_template": CHATML}))
    plain = export_run(run, name="plain", adapter=False, merged=True, register=False)
    assert _field(plain.merged_gguf, "tokenizer.chat_template") == _field(base, "tokenizer.chat_template")
    (run / "config.json").write_text(json.dumps({"chat_template": "chatml"}))
    chosen = export_run(run, name="chosen", adapter=False, merged=True, register=False)
    assert _field(chosen.merged_gguf, "tokenizer.chat_template") == CHATML


def test_export_server_config_prints_how_to_serve_the_adapter(tiny, tmp_path):
    """`finetune export --server-config`: the llama-server command on the converted base and the
    registered adapter, the llama-cpp-python config, and (the base is a Hugging Face folder) the
    vLLM command on the run's PEFT adapter folder; with --json the JSON stays alone on stdout."""
    import shlex

    from typer.testing import CliRunner

    from lorekeeper.finetune.cli import app
    from lorekeeper.server.adapters import AdapterRegistry
    from lorekeeper.server.settings import Settings

    run = _copy_run(tiny, tmp_path)
    result = CliRunner().invoke(app, ["export", str(run), "--name", "served", "--server-config", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    shown = result.stderr
    registered = AdapterRegistry(Settings.load().adapters_dir).gguf_path("served")
    base = written["base_gguf"]
    assert (
        shlex.join(["llama-server", "-m", base, "--lora", str(registered), "--lora-init-without-apply"])
        in shown
    )
    alias = Path(base).name.removesuffix(".gguf")
    assert f'"model_alias": "{alias}"' in shown and '"model_alias": "served"' in shown
    vllm = shlex.join(["vllm", "serve", str(tiny["model_dir"]), "--enable-lora", "--lora-modules",
                       f"served={run / 'adapter'}", "--served-model-name", alias])  # fmt: skip
    assert vllm in shown
    load = {"lora_name": "served", "lora_path": str(run / "adapter")}
    assert f"/v1/load_lora_adapter -H 'Content-Type: application/json' -d '{json.dumps(load)}'" in shown
    assert f"lorekeeper config set openai_model {alias}" in shown

    refused = CliRunner().invoke(app, ["export", str(run), "--no-register", "--server-config"])
    assert refused.exit_code == 2 and "leave out --no-adapter and --no-register" in refused.output
