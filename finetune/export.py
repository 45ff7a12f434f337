"""`lorekeeper finetune export RUN`: a trained run -> GGUF files llama.cpp runs, registered by name.

Three products, each optional:

- the LoRA adapter as a GGUF adapter (``NAME.lora.gguf``), applied by llama.cpp on top of the base
  GGUF; registered as ``adapters_dir()/NAME.gguf`` plus ``NAME.json`` so ``generate(adapter=NAME)``
  and ``lorekeeper ask --adapter NAME`` find it;
- a merged model (base + adapter) as GGUF F16/F32/Q8_0, tokenizer and chat template included;
- that merged model quantized further by llama.cpp's own quantizer (Q4_K_M, Q5_K_M, ...).

A GGUF base is the adapter's base as is (the shipped SmolLM2 Q4_1 by default). A Hugging Face
directory base is first converted to a GGUF (``NAME-base-f16.gguf``) so the adapter has a base to sit
on. Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorekeeper.plugins.llama_open import quiet_native_stderr

from .gguf_arch import ModelShape, UnsupportedArchitecture, shape_from_gguf, shape_from_hf_config
from .gguf_writer import (
    OUTTYPES,
    ExportError,
    quantize_gguf,
    write_lora_adapter,
    write_merged_from_gguf,
    write_model_from_hf,
)
from .lora_tensors import AdapterFormatError, LoraAdapter, load_adapter
from .runs import RunDir

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "min_p", "repeat_penalty")  # stored in the adapter's record

__all__ = [
    "AdapterFormatError",
    "ExportError",
    "ExportReport",
    "UnsupportedArchitecture",
    "export_run",
    "register_adapter",
]


@dataclass
class ExportReport:
    """What an export wrote, for the CLI and for tests."""

    name: str
    run_dir: Path
    architecture: str
    base_gguf: Path | None = None  # the GGUF the adapter is applied to
    adapter_gguf: Path | None = None
    registered_gguf: Path | None = None
    registered_json: Path | None = None
    merged_gguf: Path | None = None
    quantized_gguf: Path | None = None
    rank: int = 0
    alpha: float = 0.0
    lora_modules: int = 0
    files: list[Path] = field(default_factory=list)
    # probe texts llama.cpp tokenizes differently from the tokenizer the run trained with (only
    # checked for tokenizers converted from a Hugging Face directory; a GGUF base's is copied as is)
    tokenizer_mismatches: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "files"
        } | {"files": [str(p) for p in self.files]}

    def __str__(self) -> str:
        lines = [f"exported {self.name} ({self.architecture}, LoRA r={self.rank}, alpha={self.alpha:g})"]
        for label, path in (
            ("base GGUF", self.base_gguf),
            ("adapter", self.adapter_gguf),
            ("registered as", self.registered_gguf),
            ("merged model", self.merged_gguf),
            ("quantized model", self.quantized_gguf),
        ):
            if path is not None:
                size = f" ({path.stat().st_size / 1e6:.1f} MB)" if path.is_file() else ""
                lines.append(f"  {label}: {path}{size}")
        if self.tokenizer_mismatches:
            lines.append(
                "  warning: llama.cpp tokenizes these probe texts differently from the trained tokenizer:"
            )
            lines.extend(f"    {m}" for m in self.tokenizer_mismatches)
        return "\n".join(lines)


def _check_name(name: str) -> str:
    from lorekeeper.server.adapters import AdapterError, validate_name

    try:
        return validate_name(name)
    except AdapterError as exc:
        raise ExportError(str(exc)) from None


def _read_base(run: RunDir) -> Any:
    from .base_model import BaseRef

    if not run.base.is_file():
        raise ExportError(f"{run.root} has no base.json: is it a fine-tuning run directory?")
    return BaseRef.load(run.base)


def check_llama_cpp_loads(
    base_gguf: Path, adapter_gguf: Path | None = None, *, verbose: bool = False
) -> None:
    """Load the model (and adapter) in llama.cpp once, so a broken export is caught before use;
    llama.cpp's own log stays quiet unless ``verbose``."""
    from lorekeeper.plugins.llama_open import open_llama

    try:
        llm = open_llama(
            base_gguf,
            lora_path=str(adapter_gguf) if adapter_gguf else None,
            n_ctx=32,
            n_threads=1,
            verbose=verbose,
        )
    except (ValueError, RuntimeError) as exc:
        what = f"adapter {adapter_gguf} on {base_gguf}" if adapter_gguf else str(base_gguf)
        raise ExportError(f"llama.cpp refused the exported {what}: {exc}") from exc
    llm.close()


def check_tokenizer(gguf_path: Path, tokenizer_dir: Path) -> list[str]:
    """Probe texts that llama.cpp, reading the converted GGUF, tokenizes unlike the run's tokenizer.

    A difference is reported, not fatal: some Hugging Face tokenizers follow rules llama.cpp has
    no setting for (a SentencePiece tokenizer converted with ``legacy=False`` marks only the very
    start of a text as a word start; the GGUF keeps chat prompts exact, so a raw text's first word
    differs), and the model still runs.
    """
    from transformers import AutoTokenizer

    from .parity import tokenizer_mismatches

    found = [
        str(m) for m in tokenizer_mismatches(gguf_path, AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    ]
    for line in found:
        log.warning("tokenizer of %s differs from the trained one on %s", gguf_path.name, line)
    return found


def register_adapter(
    adapter_gguf: Path,
    name: str,
    *,
    base_gguf: Path,
    adapter: LoraAdapter,
    shape: ModelShape,
    run_dir: Path,
    settings: Any = None,
    description: str | None = None,
) -> tuple[Path, Path]:
    """Register the adapter by name in the adapter registry (GGUF and record replaced as a pair).

    The record carries how the run was asked (its training system prompt and chat template, see
    ``prompt.py``), default sampling (the settings at export time) and a description."""
    from lorekeeper.server.adapters import AdapterError, AdapterRecord, AdapterRegistry
    from lorekeeper.server.settings import Settings

    from .prompt import default_description, read_training_prompt

    settings = settings or Settings.load()
    registry = AdapterRegistry(settings.adapters_dir)
    suffixes = sorted({m.module.rsplit(".", 1)[-1] for m in adapter.modules.values()})
    prompt = read_training_prompt(Path(run_dir))
    record = AdapterRecord(
        name=name,
        base_model=str(base_gguf),
        base_sha256=registry.sha256(Path(base_gguf)),
        architecture=shape.spec.name,
        rank=adapter.rank,
        alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        target_modules=suffixes,
        run_dir=str(run_dir),
        system_prompt=prompt.get("system_prompt"),
        chat_template=prompt.get("chat_template"),
        sampling={key: float(getattr(settings, key)) for key in SAMPLING_KEYS},
        description=description or default_description(Path(run_dir).name, prompt),
    )
    try:
        return registry.register(name, adapter_gguf, record)
    except AdapterError as exc:  # a full or read-only disk: the previous adapter is intact
        raise ExportError(str(exc)) from exc


def export_run(
    run_dir: Path | str,
    *,
    name: str | None = None,
    adapter: bool = True,
    merged: bool = False,
    outtype: str = "f16",
    quantize: str | None = None,
    register: bool = True,
    output_dir: Path | str | None = None,
    verify: bool = True,
    description: str | None = None,
    verbose: bool = False,
) -> ExportReport:
    """Export a run's adapter (and optionally a merged, optionally quantized, model) as GGUF.

    ``outtype`` (f16, f32, q8_0) applies to the merged model and to a base converted from a
    Hugging Face directory. ``quantize`` (e.g. "Q4_K_M") re-quantizes the merged model with
    llama.cpp; it implies a merged export. ``verify`` loads the results in llama.cpp once.
    ``description`` goes into the adapter's record (default: one line about the run's data);
    llama.cpp's own log (hundreds of lines on some CPUs) is shown only when ``verbose``.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if not adapter and not merged and not quantize:
        raise ExportError("nothing to export: ask for the adapter, a merged model, or a quantized model")
    name = _check_name(name or run_dir.name)
    run = RunDir(run_dir)
    out = Path(output_dir).expanduser().resolve() if output_dir else run.export
    base = _read_base(run)
    lora = load_adapter(run.adapter)
    base_gguf, shape, config = _base_shape(base)
    job = _Export(
        run_dir=run_dir,
        out=out,
        name=name,
        outtype=outtype,
        verify=verify,
        base=base,
        lora=lora,
        shape=shape,
        config=config,
        tokenizer_dir=run.tokenizer if (run.tokenizer / "tokenizer.json").is_file() else None,
        description=description,
        verbose=verbose,
        report=ExportReport(
            name=name,
            run_dir=run_dir,
            architecture=shape.spec.name,
            rank=lora.rank,
            alpha=lora.alpha,
            lora_modules=len(lora.modules),
        ),
    )
    if adapter:
        job.write_adapter(base_gguf, register=register)
    if merged or quantize:
        job.write_merged(merged=merged, quantize=quantize)
    return job.report


def _base_shape(base: Any) -> tuple[Path | None, ModelShape, dict[str, Any]]:
    """The run's base as (its GGUF or None for a Hugging Face directory, its shape, its HF config)."""
    if base.kind == "gguf":
        import gguf

        base_gguf = Path(base.gguf_path)
        if not base_gguf.is_file():
            raise ExportError(f"the run's base model {base_gguf} is gone: restore it to export this run")
        return base_gguf, shape_from_gguf(gguf.GGUFReader(str(base_gguf)), str(base_gguf)), {}
    model_dir = Path(base.path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"the run's base model {model_dir} has no config.json: restore it to export")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    return None, shape_from_hf_config(config), config


def _trained_template(run_dir: Path) -> str | None:
    """The chat template a run trained with when it chose one (``--chat-template``); None: the base's."""
    from .prompt import read_training_prompt

    try:
        chosen = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return read_training_prompt(run_dir).get("chat_template") if chosen else None


@dataclass
class _Export:
    """One export_run call: what its adapter and merged-model steps share, and its report."""

    run_dir: Path
    out: Path
    name: str
    outtype: str
    verify: bool
    base: Any  # the run's BaseRef
    lora: LoraAdapter
    shape: ModelShape
    config: dict[str, Any]  # the Hugging Face config of a directory base ({} for a GGUF base)
    tokenizer_dir: Path | None
    report: ExportReport
    description: str | None = None
    verbose: bool = False  # let llama.cpp's own log through
    tokenizer_checked: bool = False  # the base and the merged model carry the same converted tokenizer

    def hf_model(self, final: Path, with_adapter: LoraAdapter | None, kind: str) -> Path:
        """Convert the Hugging Face directory base (plus `with_adapter` merged in) to a GGUF."""
        written = write_model_from_hf(
            final,
            Path(self.base.path),
            self.tokenizer_dir or Path(self.base.path),
            self.shape,
            self.config,
            with_adapter,
            kind,
            self.name,
        )
        if self.verify and not self.tokenizer_checked:
            self.report.tokenizer_mismatches = check_tokenizer(
                written, self.tokenizer_dir or Path(self.base.path)
            )
            self.tokenizer_checked = True
        return written

    def write_adapter(self, base_gguf: Path | None, *, register: bool) -> None:
        """The GGUF adapter (and a converted base when the base is a directory), registered if asked."""
        name, out, report = self.name, self.out, self.report
        if base_gguf is None:
            base_gguf = self.hf_model(out / f"{name}-base-{self.outtype}.gguf", None, self.outtype)
            report.files.append(base_gguf)
        report.base_gguf = base_gguf
        adapter_path = write_lora_adapter(out / f"{name}.lora.gguf", self.shape, self.lora, name)
        report.adapter_gguf = adapter_path
        report.files.append(adapter_path)
        if self.verify:
            check_llama_cpp_loads(base_gguf, adapter_path, verbose=self.verbose)
        if register:
            report.registered_gguf, report.registered_json = register_adapter(
                adapter_path,
                name,
                base_gguf=base_gguf,
                adapter=self.lora,
                shape=self.shape,
                run_dir=self.run_dir,
                description=self.description,
            )
        log.info("adapter written to %s", adapter_path)

    def write_merged(self, *, merged: bool, quantize: str | None) -> None:
        """The merged model, and its llama.cpp-quantized copy when `quantize` names a type."""
        name, out, report, outtype = self.name, self.out, self.report, self.outtype
        merged_path = out / f"{name}-merged-{outtype}.gguf"
        if not merged:
            # only the quantized model was asked for: its full-precision source is this export's own
            # scratch file, never a merged model an earlier export left under the final name
            merged_path = out / f".{name}-merged-{outtype}.{secrets.token_hex(4)}.for-quantize.gguf"
        try:
            if self.base.kind == "gguf":
                write_merged_from_gguf(merged_path, Path(self.base.gguf_path), self.shape, self.lora,
                                       outtype, name, _trained_template(self.run_dir))  # fmt: skip
            else:
                self.hf_model(merged_path, self.lora, outtype)
            if quantize:
                qname = quantize.upper().replace("-", "_")
                with quiet_native_stderr(not self.verbose):  # llama.cpp logs hundreds of lines
                    quantized = quantize_gguf(merged_path, out / f"{name}-merged-{qname}.gguf", qname)
                report.quantized_gguf = quantized
                report.files.append(quantized)
                if self.verify:
                    check_llama_cpp_loads(quantized, verbose=self.verbose)
        finally:
            if not merged:
                merged_path.unlink(missing_ok=True)  # the scratch source of the quantized model
        if merged:
            report.merged_gguf = merged_path
            report.files.append(merged_path)
            if self.verify:
                check_llama_cpp_loads(merged_path, verbose=self.verbose)
