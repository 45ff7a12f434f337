"""Which base model a run trains on, and how to load it for training.

A base is either a GGUF file (the embedded SmolLM2 by default, so everything works offline) or a
Hugging Face model directory. transformers dequantizes a GGUF into an ordinary trainable model, and
the tokenizer with its chat template comes out of the same file, so nothing else has to travel with
it. The reference (``BaseRef``) is saved in every run directory as ``base.json``: export and
evaluation load exactly the model the adapter was trained on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GGUF = "gguf"
HF = "hf"


class BaseModelError(ValueError):
    """The base model could not be found or read; the message says which path and what to do."""


@dataclass
class BaseRef:
    """Where a base model lives.

    For ``kind == "gguf"`` ``path`` is the directory holding the file and ``gguf_file`` its name
    (the split transformers' ``from_pretrained(path, gguf_file=...)`` wants); ``gguf_path`` joins
    them. For ``kind == "hf"`` ``path`` is the model directory and ``gguf_file`` is None.
    ``architecture`` is the GGUF ``general.architecture`` or the config's ``model_type``
    ("llama", "qwen2", "phi3", "gemma", ...).
    """

    kind: str
    path: str
    gguf_file: str | None = None
    architecture: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (GGUF, HF):
            raise BaseModelError(f"base kind must be 'gguf' or 'hf', not {self.kind!r}")
        if self.kind == GGUF and not self.gguf_file:
            raise BaseModelError("a GGUF base needs gguf_file (the file name inside path)")

    @property
    def gguf_path(self) -> Path | None:
        """The GGUF file itself, or None for a Hugging Face directory."""
        return Path(self.path) / self.gguf_file if self.kind == GGUF and self.gguf_file else None

    @property
    def display_name(self) -> str:
        return self.gguf_file if self.kind == GGUF and self.gguf_file else Path(self.path).name

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseRef:
        known = {k: data[k] for k in ("kind", "path", "gguf_file", "architecture") if k in data}
        return cls(**known)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> BaseRef:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` from a GGUF's metadata, read without loading the tensors."""
    try:
        from gguf import GGUFReader

        from .gguf_arch import gguf_field

        return gguf_field(GGUFReader(str(path), "r"), "general.architecture", None)
    except Exception as exc:  # an unreadable header is reported when the model itself is loaded
        log.debug("could not read the architecture of %s: %s", path, exc)
        return None


def safetensors_headers(folder: Path) -> list[dict[str, Any]]:
    """The JSON header of each ``*.safetensors`` file in ``folder`` (tensor name -> dtype, shape,
    offsets; ``__metadata__`` left out), read without the weights; [] when there is none. Raises
    ``OSError``, ``ValueError`` or ``struct.error`` on a file that is not safetensors."""
    headers = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        headers.append(header)
    return headers


GGUF_VERSIONS = (2, 3)  # the GGUF format versions transformers and llama.cpp read


def check_gguf_header(path: Path) -> None:
    """A ``BaseModelError`` unless ``path`` starts like a GGUF file that can be read (magic, version,
    metadata), so a bad file is named before any model loads."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise BaseModelError(f"base model {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    if head[:4] != b"GGUF":
        raise BaseModelError(f"base model {str(path)!r} is not a GGUF file (it does not start with 'GGUF')")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if version not in GGUF_VERSIONS:
        raise BaseModelError(
            f"base model {str(path)!r} has GGUF version {version}, which cannot be read (versions "
            f"{', '.join(map(str, GGUF_VERSIONS))} can): is the file complete and a GGUF model?"
        )
    try:
        from gguf import GGUFReader

        GGUFReader(str(path), "r")
    except Exception as exc:  # the gguf reader raises ValueError, struct/numpy errors ... on a bad file
        raise BaseModelError(
            f"base model {str(path)!r} is not a readable GGUF file ({exc}): is the download complete?"
        ) from None


def resolve_base(spec: str | Path | None) -> BaseRef:
    """Turn what the user typed (nothing, a .gguf file, or a model directory) into a ``BaseRef``.

    None means the embedded SmolLM2-135M-Instruct GGUF (``plugins.models.default_gguf_path``).
    """
    if spec is None or str(spec) == "":
        from lorekeeper.plugins.models import default_gguf_path

        path = default_gguf_path()
    else:
        path = Path(spec).expanduser()
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BaseModelError(
                f"base model {str(path)!r} is a file but not a .gguf: give a GGUF file or a Hugging Face "
                "model directory (with config.json)"
            )
        check_gguf_header(path)
        return BaseRef(
            kind=GGUF, path=str(path.parent), gguf_file=path.name, architecture=gguf_architecture(path)
        )
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" (it holds {ggufs[0].name}: pass that file instead)" if ggufs else ""
            raise BaseModelError(f"base model directory {str(path)!r} has no config.json{hint}")
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, json.JSONDecodeError) as exc:
            raise BaseModelError(f"cannot read {config}: {exc}") from exc
        return BaseRef(kind=HF, path=str(path), gguf_file=None, architecture=model_type)
    raise BaseModelError(
        f"base model {str(spec)!r} does not exist: give a .gguf file or a Hugging Face model directory"
    )


def _pretrained_kwargs(ref: BaseRef) -> dict[str, Any]:
    return {"gguf_file": ref.gguf_file} if ref.kind == GGUF else {}


def load_tokenizer(ref: BaseRef):
    """The base's tokenizer, chat template included (for a GGUF, both come from its metadata)."""
    from transformers import AutoTokenizer

    return _with_pad_token(AutoTokenizer.from_pretrained(ref.path, **_pretrained_kwargs(ref)))


def _with_pad_token(tokenizer):
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any known token will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _drop_gguf_marker(model) -> None:
    """Forget that the weights came from a GGUF, so save_pretrained and peft treat it as ordinary."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def default_dtype(device: str):
    """bf16 on CUDA GPUs that compute in it, fp16 on other GPUs, fp32 on the CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dequantized_cache_dir(ref: BaseRef) -> Path:
    """A plain safetensors copy of a GGUF base, so 4-bit loading can quantize it like any HF model."""
    from lorekeeper.server.settings import Settings

    gguf = ref.gguf_path
    assert gguf is not None
    stat = gguf.stat()
    key = f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    return Settings.load().cache_dir / "dequantized" / key


def dequantized_dir(ref: BaseRef) -> Path:
    """Dequantize a GGUF base once into a cached HF directory (config, weights, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    target = _dequantized_cache_dir(ref)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    log.info("dequantizing %s once into %s", ref.gguf_path, target)
    model = AutoModelForCausalLM.from_pretrained(ref.path, gguf_file=ref.gguf_file, dtype=torch.float32)
    _drop_gguf_marker(model)
    # Written aside, then renamed: an interrupted run never leaves a half-written cache behind.
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    load_tokenizer(ref).save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target


def load_base(
    ref: BaseRef,
    *,
    quantize_4bit: bool,
    dtype: Any = None,
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load ``ref`` for training: (model, tokenizer).

    ``quantize_4bit`` loads the weights as NF4 with double quantization (QLoRA); bitsandbytes does
    this on the CPU too. ``dtype`` is the compute dtype (default: bf16 on CUDA where supported,
    fp32 on the CPU); ``device`` defaults to CUDA when there is one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    # A GGUF is dequantized once into a cached plain copy: transformers cannot quantize a GGUF while
    # loading it, and reading the copy is faster than converting the GGUF again on every run.
    source = dequantized_dir(ref) if ref.kind == GGUF else Path(ref.path)
    tokenizer = _with_pad_token(AutoTokenizer.from_pretrained(source))
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quant, dtype=dtype, device_map={"": device}
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model.to(device)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
