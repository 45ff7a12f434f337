"""One way to open a llama.cpp model: the AMX decision, the setting, and that every load uses it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorekeeper.plugins import llama_open
from lorekeeper.plugins.models import default_gguf_path

ROOT = Path(__file__).resolve().parents[1]

# /proc/cpuinfo flag sets, trimmed: a Sapphire Rapids Xeon (AMX), an Ice Lake Xeon (AVX-512, no
# AMX), an AMD EPYC (AVX2) and an ARM Graviton (no x86 flags at all).
SAPPHIRE_RAPIDS = "fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8".split()
ICE_LAKE = "fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16".split()
EPYC = "fpu sse2 avx avx2 fma bmi2 sha_ni".split()
GRAVITON = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics".split()
AMX_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
PLAIN_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | REPACK = 1 |"


@pytest.mark.parametrize(
    ("flags", "info", "expected"),
    [
        (SAPPHIRE_RAPIDS, AMX_BUILD, False),  # the crash case: no repacking
        (SAPPHIRE_RAPIDS, PLAIN_BUILD, False),  # AMX CPU, whatever the build says
        (SAPPHIRE_RAPIDS, "", False),  # system info unreadable: the CPU flags decide
        ([], AMX_BUILD, False),  # no /proc/cpuinfo (macOS, Windows): the build decides
        (ICE_LAKE, PLAIN_BUILD, True),
        (EPYC, PLAIN_BUILD, True),
        (GRAVITON, "CPU : NEON = 1 | ARM_FMA = 1 |", True),
        ([], "", True),
    ],
)
def test_auto_turns_repacking_off_only_where_amx_would_be_used(flags, info, expected) -> None:
    assert llama_open.use_repack("auto", flags, info) is expected


@pytest.mark.parametrize("flags", [SAPPHIRE_RAPIDS, EPYC])
def test_the_setting_forces_either_choice(flags) -> None:
    assert llama_open.use_repack("on", flags, AMX_BUILD) is True
    assert llama_open.use_repack("off", flags, PLAIN_BUILD) is False


def test_setting_values_and_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv(llama_open.REPACK_ENV, raising=False)
    assert llama_open.repack_setting() == "auto"
    for raw, value in [("ON", "on"), ("1", "on"), ("false", "off"), (" auto ", "auto")]:
        assert llama_open.repack_setting(raw) == value
    monkeypatch.setenv(llama_open.REPACK_ENV, "sometimes")
    with pytest.raises(ValueError, match="llama_repack.*auto, on, off"):
        llama_open.repack_setting()
    monkeypatch.setenv(llama_open.REPACK_ENV, "off")
    assert llama_open.repack_setting() == "off" and llama_open.decide_repack() is False


def test_this_machine_is_decided_from_its_own_cpu() -> None:
    flags = llama_open.cpu_flags()
    expected = not llama_open.has_amx(flags, llama_open.llama_system_info())
    assert llama_open.decide_repack("auto") is expected


@pytest.mark.parametrize("repack", [False, True])
def test_open_llama_sets_the_parameter_and_the_model_answers(repack: bool) -> None:
    if repack and not llama_open.decide_repack():
        pytest.skip("repacking crashes llama.cpp on this CPU (AMX): only the safe path is run here")
    llm = llama_open.open_llama(default_gguf_path(), n_ctx=128, repack=repack)
    try:
        assert bool(llm.model_params.use_extra_bufts) is repack
        out = llm.create_completion("The capital of France is", max_tokens=6, temperature=0.0)
        assert out["choices"][0]["text"].strip()
    finally:
        llm.close()
    # the wrapper is gone once the load is done: a plain default is llama.cpp's own again
    import llama_cpp.llama_cpp as low

    assert low.llama_model_default_params().use_extra_bufts is True


def test_a_missing_model_file_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="no-such.gguf"):
        llama_open.open_llama("no-such.gguf")


def test_every_gguf_load_goes_through_open_llama() -> None:
    """No module builds ``llama_cpp.Llama`` itself: a new load site would skip the AMX decision."""
    offenders = []
    for folder in ("server", "plugins", "finetune", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("llama_open.py", Path(__file__).name):
                continue
            text = path.read_text(encoding="utf-8")
            if re.search(r"(?<![\w.])Llama\(|llama_cpp\.Llama\(|from llama_cpp import .*\bLlama\b", text):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
