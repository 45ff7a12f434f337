"""The one way lorekeeper opens a GGUF model with llama.cpp (``open_llama``).

Why it exists: on CPUs with Intel AMX (Sapphire Rapids and newer Xeons) llama.cpp, built with the
native flags pip uses, moves quantised weights into AMX buffers ("extra buffer types") and then
crashes with a segmentation fault on the first multi-token decode (``ggml_backend_amx_mul_mat``,
llama.cpp issue 20824, closed without a fix). Opening the model with
``llama_model_params.use_extra_bufts = False`` - what llama.cpp's own CLI calls ``--no-repack`` -
avoids it at a small cost in speed. llama-cpp-python does not expose that parameter, so it is set
here, on the one code path every model load takes: the generator, the fine-tuning export probes,
evaluation, parity checks and the benchmark scripts.

The decision (``use_repack``) is a pure function of the setting and the CPU, so it is unit-tested
on flag sets; the setting is ``llama_repack`` (``LOREKEEPER_LLAMA_REPACK``): ``auto`` (default: off
on an AMX CPU, on elsewhere), ``on`` or ``off``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPACK_ENV = "LOREKEEPER_LLAMA_REPACK"
REPACK_CHOICES = ("auto", "on", "off")
AMX_FLAGS = frozenset({"amx_int8", "amx_tile", "amx_bf16"})

_patch_lock = threading.Lock()
_logged_decision = False


def repack_setting(raw: str | None = None) -> str:
    """The repack setting: ``raw``, else the ``llama_repack`` setting (``auto`` by default)."""
    if raw is None:
        from lorekeeper.server.settings import Settings

        raw = Settings.load().llama_repack
    value = str(raw).strip().lower() or "auto"
    aliases = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
    value = aliases.get(value, value)
    if value not in REPACK_CHOICES:
        raise ValueError(f"llama_repack={raw!r} ({REPACK_ENV}): use one of auto, on, off")
    return value


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux ``/proc/cpuinfo``); empty elsewhere."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def llama_system_info() -> str:
    """llama.cpp's build summary (``AVX2 = 1 | AMX_INT8 = 1 | ...``); empty if it cannot be read."""
    try:
        import llama_cpp

        return llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    except Exception:  # an import or ABI problem shows up, with its real message, when a model loads
        return ""


def has_amx(flags: Iterable[str], system_info: str = "") -> bool:
    """Whether llama.cpp would take its AMX path: the CPU reports AMX, or the build says it uses it."""
    flags = {f.lower() for f in flags}
    return bool(flags & AMX_FLAGS) or "AMX_INT8 = 1" in system_info


def use_repack(setting: str, flags: Iterable[str], system_info: str = "") -> bool:
    """Whether to let llama.cpp repack weights into extra buffer types (AMX and friends).

    ``on``/``off`` force the choice; ``auto`` repacks except on an AMX CPU, where it crashes.
    """
    setting = repack_setting(setting)
    if setting == "on":
        return True
    if setting == "off":
        return False
    return not has_amx(flags, system_info)


def decide_repack(setting: str | None = None) -> bool:
    """``use_repack`` for this machine and the current setting; says once, at info level, when AMX
    turns repacking off."""
    global _logged_decision
    chosen = repack_setting(setting)
    info = llama_system_info() if chosen == "auto" else ""
    flags = cpu_flags() if chosen == "auto" else frozenset()
    repack = use_repack(chosen, flags, info)
    if not _logged_decision:
        _logged_decision = True
        if chosen == "auto" and not repack:
            logger.info(
                "this CPU has Intel AMX: llama.cpp models open without repacked weight buffers, which "
                "crash there (llama.cpp issue 20824); set %s=on to repack anyway",
                REPACK_ENV,
            )
        elif chosen != "auto":
            logger.info("llama.cpp weight repacking forced %s by %s", chosen, REPACK_ENV)
    return repack


@contextmanager
def _model_params(repack: bool):
    """While active, every ``llama_cpp.Llama`` built takes ``use_extra_bufts = repack``.

    llama-cpp-python fills its model parameters from ``llama_model_default_params()`` inside
    ``Llama.__init__`` and offers no argument for this field, so the default is wrapped for the
    duration of one load (under a lock: loads on other threads wait).
    """
    import llama_cpp.llama_cpp as low

    with _patch_lock:
        original = low.llama_model_default_params

        def params() -> Any:
            p = original()
            p.use_extra_bufts = repack
            return p

        low.llama_model_default_params = params
        try:
            yield
        finally:
            low.llama_model_default_params = original


@contextmanager
def quiet_native_stderr(enabled: bool = True):
    """Send what native code writes to stderr (llama.cpp's own log) to /dev/null meanwhile.

    llama.cpp prints hundreds of lines on a load ("cannot use buft ...", metadata) and some warnings
    bypass llama-cpp-python's ``verbose=False``. Python exceptions still carry the real error.
    """
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def open_llama(
    model_path: str | Path,
    *,
    n_ctx: int = 0,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    logits_all: bool = False,
    vocab_only: bool = False,
    repack: bool | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> Any:
    """Open ``model_path`` as a ``llama_cpp.Llama``, safe on every CPU.

    ``repack`` None means ``decide_repack()`` (the setting, then the CPU). Other keyword arguments
    go to ``Llama`` unchanged. A vocabulary-only load runs no matrix code and is never affected.
    llama.cpp's own log is silenced unless ``verbose``.
    """
    from llama_cpp import Llama

    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file; give the path of a .gguf model")
    if repack is None:
        repack = True if vocab_only else decide_repack()
    if vocab_only and not n_ctx:
        n_ctx = 512  # llama-cpp-python still makes a (weightless) context; 0 would mean the full window
    with _model_params(repack), quiet_native_stderr(not verbose):
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            logits_all=logits_all,
            vocab_only=vocab_only,
            verbose=verbose,
            **kwargs,
        )
