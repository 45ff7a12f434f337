"""Write GGUF files llama.cpp loads: LoRA adapters, merged models, and their tokenizer metadata.

Every file is written to a temporary name in the destination directory and renamed into place
only once complete (``atomic_file``), so a full disk or a crash never leaves a half-written GGUF
under the name a user or the generator would load.

The module stays one unit (over the ~500-line guide): every section (atomic files, tensor encoding,
adapter, merged models, tokenizer metadata, quantizer) serves the same few writers and raises the same
``ExportError``; the tokenizer-metadata section is the seam to cut along if it grows further.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .gguf_arch import ModelShape, hf_weight_to_gguf, permute_rows_for_rope, qk_heads, write_hparams
from .lora_tensors import LoraAdapter, LoraModule

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "q8_0")
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class ExportError(RuntimeError):
    """Export failed; the message says what and what to do. No partial file is left behind."""


class UnsupportedTokenizer(ExportError):
    """The base's tokenizer cannot be written as GGUF metadata by this exporter."""


# --- atomic files --------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        tmp = None
        _fsync_dir(final.parent)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise ExportError(
                f"not enough disk space to write {final} ({exc.strerror}); nothing was written under that "
                "name: free some space or choose another output directory"
            ) from exc
        raise ExportError(f"could not write {final}: {exc}") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


@dataclass
class PlannedTensor:
    """A tensor to write, produced only when its turn comes so one tensor at a time is in memory.

    ``shape`` is the float tensor's numpy shape; ``produce()`` returns its float32 values.
    """

    name: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]
    outtype: str

    def storage(self) -> tuple[np.dtype, gguf.GGMLQuantizationType | None, tuple[int, ...], int]:
        """(numpy dtype, raw GGML type, stored shape, bytes) the tensor will take in the file."""
        count = int(np.prod(self.shape))
        kind = _storage_kind(self.shape, self.outtype)
        if kind == "q8_0":
            q8 = gguf.GGMLQuantizationType.Q8_0
            byte_shape = gguf.quants.quant_shape_to_byte_shape(self.shape, q8)
            return np.dtype(np.uint8), q8, byte_shape, int(np.prod(byte_shape))
        if kind == "f16":
            return np.dtype(np.float16), None, self.shape, count * 2
        return np.dtype(np.float32), None, self.shape, count * 4


def _storage_kind(shape: tuple[int, ...], outtype: str) -> str:
    if outtype == "f32" or len(shape) < 2:
        return "f32"  # vectors (norms, biases, rope factors) stay F32, as llama.cpp expects
    if outtype == "q8_0" and shape[-1] % 32 == 0:
        return "q8_0"
    return "f16"


def write_gguf(
    final: Path, arch: str, fill: Callable[[gguf.GGUFWriter], None], tensors: list[PlannedTensor]
) -> Path:
    """Write metadata (``fill(writer)``) then each planned tensor in turn, atomically."""
    with atomic_file(final) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            fill(writer)
            plans = []
            for tensor in tensors:
                dtype, raw, stored_shape, nbytes = tensor.storage()
                writer.add_tensor_info(tensor.name, stored_shape, dtype, nbytes, raw_dtype=raw)
                plans.append((tensor, nbytes))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor, nbytes in plans:
                data = encode_tensor(tensor.produce(), tensor.outtype)
                if data.nbytes != nbytes or tuple(np.shape(data))[:-1] != tuple(tensor.shape)[:-1]:
                    raise ExportError(f"tensor {tensor.name!r} changed shape while exporting")
                writer.write_tensor_data(data)
        finally:
            writer.close()
    return Path(final)


# --- tensors -------------------------------------------------------------------------------------


def encode_tensor(value: np.ndarray, outtype: str) -> np.ndarray:
    """Float tensor -> the bytes-to-be for ``outtype`` (see ``_storage_kind``)."""
    value = np.ascontiguousarray(value, dtype=np.float32)
    kind = _storage_kind(value.shape, outtype)
    if kind == "q8_0":
        return gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
    return value.astype(np.float16) if kind == "f16" else value


def gguf_tensor_as_float(tensor: Any) -> np.ndarray:
    """A tensor read by GGUFReader as float32 in numpy layout (rows, columns), dequantized if needed."""
    kind = tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        data = np.asarray(tensor.data, dtype=np.float32)
    else:
        try:
            data = gguf.quants.dequantize(tensor.data, kind)
        except NotImplementedError as exc:
            raise ExportError(f"cannot dequantize tensor {tensor.name!r} of type {kind.name}") from exc
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return data.reshape(shape)


def lora_delta_for_gguf(shape: ModelShape, module: LoraModule) -> np.ndarray:
    """``scale * B @ A`` in GGUF row order (Q/K rows interleaved for llama-style rope)."""
    delta = module.delta()
    heads = qk_heads(shape, module.weight_name)
    return permute_rows_for_rope(delta, heads) if heads is not None else delta


def _adapted_gguf_names(shape: ModelShape, adapter: LoraAdapter | None) -> dict[str, LoraModule]:
    if adapter is None:
        return {}
    return {shape.tensor_name(m.weight_name): m for m in adapter.modules.values()}


# --- LoRA adapter --------------------------------------------------------------------------------


def write_lora_adapter(final: Path, shape: ModelShape, adapter: LoraAdapter, name: str) -> Path:
    """The adapter as a GGUF LoRA file llama.cpp attaches to the base model.

    llama.cpp computes ``W x + (alpha / r) * B (A x)`` with ``r`` read from each B matrix, so the
    file's alpha is chosen as ``default_scale * r``; modules whose peft scale differs (rsLoRA with
    per-module ranks, alpha/rank patterns) get the ratio folded into B, which is exact. A is
    (r, in) and B is (out, r) in numpy order, as peft stores them; Q/K B rows are permuted like the
    base weights they adapt.
    """
    alpha = adapter.default_scale * adapter.rank
    tensors: list[PlannedTensor] = []
    for module in adapter.modules.values():
        if module.module.endswith("lm_head") and shape.tied_embeddings:
            raise ExportError(
                "the adapter trains lm_head, but this model ties lm_head to the token embeddings; "
                "llama.cpp cannot apply that as a LoRA adapter: export a merged model instead"
            )
        base_name = shape.tensor_name(module.weight_name)
        b = module.b
        heads = qk_heads(shape, module.weight_name)
        if heads is not None:
            b = permute_rows_for_rope(b, heads)
        ratio = module.scale / (alpha / module.rank)
        if not np.isclose(ratio, 1.0, rtol=1e-6):
            b = b * ratio
        for suffix, value in ((".lora_a", module.a), (".lora_b", b)):
            tensors.append(PlannedTensor(base_name + suffix, value.shape, lambda v=value: v, "f32"))

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(name)

    return write_gguf(final, shape.spec.name, fill, tensors)


# --- merged model from a GGUF base ---------------------------------------------------------------

_SKIP_COPY = {"general.architecture", "general.file_type", "general.name", "general.type"}


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: set[str] = _SKIP_COPY) -> None:
    """Copy every key/value (hyper-parameters, tokenizer, chat template) from one GGUF to another."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value: Any = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(key, value, vtype, sub_type=sub)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), vtype)
        else:
            writer.add_key_value(key, field.parts[field.data[0]].tolist()[0], vtype)


def write_merged_from_gguf(
    final: Path,
    base_gguf: Path,
    shape: ModelShape,
    adapter: LoraAdapter | None,
    outtype: str,
    name: str,
    chat_template: str | None = None,
) -> Path:
    """Base GGUF weights (dequantized) plus the LoRA deltas, re-encoded as ``outtype``.

    Everything else - hyper-parameters, tokenizer, chat template, BOS behaviour - is copied from
    the base file, so the merged model speaks exactly like the model the adapter was trained on;
    ``chat_template`` replaces the base's when the run trained with another (``--chat-template``).
    """
    reader = gguf.GGUFReader(str(base_gguf))
    adapted = _adapted_gguf_names(shape, adapter)
    names = {t.name for t in reader.tensors}
    lm_head = adapter.modules.get("lm_head") if adapter else None
    if lm_head is not None:
        adapted.pop("output.weight", None)
        if "output.weight" in names:
            adapted["output.weight"] = lm_head
    missing = [n for n in adapted if n not in names]
    if missing:
        raise ExportError(f"the adapter targets tensors absent from {base_gguf.name}: {missing[:5]}")

    def merged_value(tensor: Any, module: LoraModule | None) -> np.ndarray:
        value = gguf_tensor_as_float(tensor)
        return value if module is None else value + lora_delta_for_gguf(shape, module)

    tensors: list[PlannedTensor] = []
    for tensor in reader.tensors:
        dims = tuple(int(n) for n in reversed(tensor.shape))
        module = adapted.get(tensor.name)
        tensors.append(
            PlannedTensor(tensor.name, dims, lambda t=tensor, m=module: merged_value(t, m), outtype)
        )
        if lm_head is not None and tensor.name == "token_embd.weight" and "output.weight" not in names:
            # peft adapted the (tied) output projection only: untie it in the merged model
            untied = lambda t=tensor: gguf_tensor_as_float(t) + lm_head.delta()  # noqa: E731
            tensors.append(PlannedTensor("output.weight", dims, untied, outtype))

    def fill(writer: gguf.GGUFWriter) -> None:
        copy_metadata(reader, writer, _SKIP_COPY | ({"tokenizer.chat_template"} if chat_template else set()))
        if chat_template:
            writer.add_chat_template(chat_template)
        writer.add_name(name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(_FILE_TYPES[outtype])

    return write_gguf(final, shape.spec.name, fill, tensors)


# --- merged (or plain) model from a Hugging Face directory ---------------------------------------


def hf_weight_index(model_dir: Path) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """name -> (shape, loader) for every weight in a Hugging Face model directory, read lazily."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    index: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    if files:
        from safetensors import safe_open

        def loader(path: Path, key: str) -> Callable[[], np.ndarray]:
            def load() -> np.ndarray:
                with safe_open(str(path), framework="pt") as fh:
                    return fh.get_tensor(key).float().numpy()

            return load

        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    index[key] = (tuple(fh.get_slice(key).get_shape()), loader(path, key))
        return index
    bins = sorted(Path(model_dir).glob("pytorch_model*.bin"))
    if not bins:
        raise ExportError(f"{model_dir} holds no *.safetensors or pytorch_model*.bin weights")
    import torch

    for path in bins:  # legacy format: no lazy reading, the state dict is loaded whole
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            array = value.float().numpy()
            index[key] = (tuple(array.shape), lambda a=array: a)
    return index


def write_model_from_hf(
    final: Path,
    model_dir: Path,
    tokenizer_dir: Path,
    shape: ModelShape,
    config: dict[str, Any],
    adapter: LoraAdapter | None,
    outtype: str,
    name: str,
) -> Path:
    """Convert a Hugging Face model (plus the adapter's deltas, if given) to a GGUF model file."""
    deltas = {m.weight_name: m for m in adapter.modules.values()} if adapter else {}
    weights = hf_weight_index(model_dir)
    lm_head = deltas.get("lm_head.weight")
    untie = lm_head is not None and shape.tied_embeddings and "lm_head.weight" not in weights
    unused = set(deltas) - set(weights) - ({"lm_head.weight"} if untie else set())
    if unused:
        raise ExportError(f"the adapter targets weights absent from {model_dir}: {sorted(unused)[:5]}")

    def converted(hf_name: str, load: Callable[[], np.ndarray], module: LoraModule | None) -> np.ndarray:
        value = load()
        if module is not None:
            value = value + module.delta()
        return hf_weight_to_gguf(shape, hf_name, value)

    tensors: list[PlannedTensor] = []
    for hf_name, (dims, load) in weights.items():
        if "rotary_emb" in hf_name:
            continue
        if hf_name == "lm_head.weight" and shape.tied_embeddings and lm_head is None:
            continue
        module = deltas.get(hf_name)
        produce = lambda n=hf_name, f=load, m=module: converted(n, f, m)  # noqa: E731
        tensors.append(PlannedTensor(shape.tensor_name(hf_name), dims, produce, outtype))
        if untie and hf_name.endswith("embed_tokens.weight"):
            # peft adapted the (tied) output projection only: untie it in the exported model
            tensors.append(
                PlannedTensor("output.weight", dims, lambda f=load: f() + lm_head.delta(), outtype)
            )

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(_FILE_TYPES[outtype])
        extra = write_hparams(writer, shape, config)
        write_hf_tokenizer(writer, tokenizer_dir, int(config["vocab_size"]))
        for tensor_name, value in extra.items():
            tensors.append(PlannedTensor(tensor_name, value.shape, lambda v=value: v, "f32"))

    return write_gguf(final, shape.spec.name, fill, tensors)


# --- tokenizer metadata from a Hugging Face tokenizer ---------------------------------------------

# llama.cpp names for byte-level BPE pre-tokenizers, recognised by the regex in tokenizer.json
_PRE_BY_REGEX = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    kinds = [s.get("type") for s in steps]
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds[:1] == ["Split"] and kinds[-1:] == ["ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in _PRE_BY_REGEX:
            return _PRE_BY_REGEX[regex]
    raise UnsupportedTokenizer(
        f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is not one the exporter recognises "
        "(GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE are); export from a GGUF base instead"
    )


def _adds_special(tokenizer: Any, token_id: int | None, at_start: bool) -> bool:
    """Whether the tokenizer puts ``token_id`` at the start (or end) of a plain encode by itself."""
    if token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    edge = 0 if at_start else -1
    return len(with_special) > len(plain) and with_special[edge] == token_id


def _is_byte_level_bpe(model: dict[str, Any], decoder: str | None) -> bool:
    return model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel"


def _is_sentencepiece_bpe(model: dict[str, Any], tok_json: dict[str, Any]) -> bool:
    """A SentencePiece BPE model as transformers converts it (Llama 2, Mistral, Phi-3, Gemma):
    BPE over ``▁``-marked text with raw bytes as the fallback for characters outside the vocabulary."""
    decoders = tok_json.get("decoder") or {}
    kinds = [d.get("type") for d in decoders.get("decoders", [decoders])]
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "ByteFallback" in kinds


def _adds_space_prefix(tok_json: dict[str, Any]) -> bool:
    """The GGUF's ``add_space_prefix``: whether llama.cpp marks text as a word start (``▁``), which it
    does at the start of the text and again after every special token.

    SentencePiece's ``add_dummy_prefix`` shows in a converted tokenizer as a Prepend normalizer
    (older conversions) or a Metaspace pre-tokenizer that prepends ``always`` (``legacy=True``):
    both mark every text segment, special tokens included, as llama.cpp does. Gemma marks none.
    A Metaspace with ``prepend_scheme: first`` (``legacy=False``, as Phi-3 folders may be) marks
    only the very start of the text, which llama.cpp cannot express: the prefix is left off, so
    that chat prompts, which start with a special token or BOS and have one at every turn, get the
    ids the model was trained on; only a raw text's first word then differs, and export says so.
    """

    def steps(part: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        if not part:
            return []
        return list(part.get(key, [])) if part.get("type") == "Sequence" else [part]

    for step in steps(tok_json.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
    for step in steps(tok_json.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme") or (
                "always" if step.get("add_prefix_space", True) else "never"
            )
            return scheme == "always"
    return False


def _sentencepiece_scores(vocab: dict[str, int], merges: list[str]) -> dict[int, float]:
    """Merge priorities as SentencePiece scores: llama.cpp's SPM tokenizer joins, at each step, the
    adjacent pair whose joined piece has the highest score, and Hugging Face's BPE joins the pair
    with the lowest merge rank; scoring each piece by minus the rank of the first merge that makes
    it gives both the same order. Pieces no merge makes (characters, bytes, specials) score below
    every merge, so llama.cpp never prefers them to a real merge."""
    scores: dict[int, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        idx = vocab.get(left + right)
        if idx is not None and idx not in scores:
            scores[idx] = -float(rank)
    floor = -float(len(merges))
    return {idx: scores.get(idx, floor - idx) for idx in vocab.values()}


_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def write_hf_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> None:
    """A Hugging Face tokenizer -> GGUF ``tokenizer.*`` metadata, chat template and BOS rule included.

    Two families convert: byte-level BPE (GPT-2 style: Llama 3, Qwen2, SmolLM) becomes llama.cpp's
    ``gpt2`` tokenizer with its pre-tokenizer named; SentencePiece BPE with byte fallback (Llama 2,
    Mistral, Phi-3, Gemma) becomes llama.cpp's ``llama`` tokenizer with scores derived from the
    merges. The tokenizer is loaded the way training loaded it (``AutoTokenizer``) and described
    from its live state, not from tokenizer.json on disk: transformers may replace parts of the
    saved tokenizer, and the GGUF must reproduce the ids the adapter was trained on.
    """
    tokenizer, tok_json = _load_fast_tokenizer(tokenizer_dir)
    model = tok_json.get("model", {})
    byte_level = _is_byte_level_family(model, tok_json, tokenizer_dir)
    vocab: dict[str, int] = model["vocab"]
    added = tok_json.get("added_tokens", [])
    _check_vocab_fits(vocab, added, vocab_size, tokenizer_dir)
    size = vocab_size  # ids past the tokenizer's (a config vocab padded past it) stay placeholders
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json.get("pre_tokenizer")))
        writer.add_token_merges(merges)
    else:
        _write_sentencepiece_model(writer, tok_json, vocab, merges, types, tokenizer.unk_token_id)
    for token in added:
        if token["id"] == tokenizer.unk_token_id and not byte_level:
            continue
        tokens[token["id"]] = token["content"]
        types[token["id"]] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    _write_special_tokens(writer, tokenizer)


def _load_fast_tokenizer(tokenizer_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The tokenizer as training loaded it, and its live state as tokenizer.json would hold it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise UnsupportedTokenizer(f"cannot load the tokenizer in {tokenizer_dir}: {exc}") from exc
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizer(
            f"the tokenizer in {tokenizer_dir} is not a fast (tokenizers) tokenizer; export from a GGUF base instead"
        )
    return tokenizer, json.loads(backend.to_str())


def _is_byte_level_family(model: dict[str, Any], tok_json: dict[str, Any], tokenizer_dir: Path) -> bool:
    """True for byte-level BPE, False for SentencePiece BPE; any other tokenizer is refused."""
    decoder = (tok_json.get("decoder") or {}).get("type")
    byte_level = _is_byte_level_bpe(model, decoder)
    if not byte_level and not _is_sentencepiece_bpe(model, tok_json):
        raise UnsupportedTokenizer(
            f"{tokenizer_dir}: the exporter converts byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM) and "
            f"SentencePiece BPE ones with byte fallback (Llama 2, Mistral, Phi-3, Gemma); this one is "
            f"{model.get('type')} with a {decoder} decoder: export from a GGUF base of this model instead"
        )
    return byte_level


def _check_vocab_fits(
    vocab: dict[str, int], added: list[dict[str, Any]], vocab_size: int, tokenizer_dir: Path
) -> None:
    """Refuse a tokenizer whose ids (added tokens included) run past the model's embedding rows."""
    needed = max([0, *(i + 1 for i in vocab.values()), *(a["id"] + 1 for a in added)])
    if needed > vocab_size:
        raise UnsupportedTokenizer(
            f"the tokenizer in {tokenizer_dir} has token ids up to {needed - 1}, but the model's embedding "
            f"has {vocab_size} rows (vocab_size in config.json): tokens were added without resizing the "
            "model; resize its embeddings (model.resize_token_embeddings) before training, or drop the tokens"
        )


def _write_sentencepiece_model(
    writer: gguf.GGUFWriter,
    tok_json: dict[str, Any],
    vocab: dict[str, int],
    merges: list[str],
    types: list[gguf.TokenType],
    unk_token_id: int | None,
) -> None:
    """llama.cpp's ``llama`` tokenizer: space-prefix rule and scores; marks byte and unknown pieces in `types`."""
    writer.add_tokenizer_model("llama")
    writer.add_add_space_prefix(_adds_space_prefix(tok_json))
    scores = [0.0] * len(types)
    for idx, score in _sentencepiece_scores(vocab, merges).items():
        scores[idx] = score
    for text, idx in vocab.items():
        if _BYTE_PIECE.match(text):
            types[idx] = gguf.TokenType.BYTE
    if unk_token_id is not None:
        types[unk_token_id] = gguf.TokenType.UNKNOWN
    writer.add_token_scores(scores)


def _write_special_tokens(writer: gguf.GGUFWriter, tokenizer: Any) -> None:
    """Special token ids, whether llama.cpp adds BOS/EOS itself, and the chat template."""
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(_adds_special(tokenizer, tokenizer.bos_token_id, at_start=True))
    writer.add_add_eos_token(_adds_special(tokenizer, tokenizer.eos_token_id, at_start=False))
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: llama.cpp uses the default one
        template = template.get("default")
    if template:
        writer.add_chat_template(template)


# --- llama.cpp quantizer -------------------------------------------------------------------------


def quantize_types() -> list[str]:
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return sorted(n[len(prefix) :] for n in dir(llama_cpp) if n.startswith(prefix))


def quantize_gguf(source: Path, final: Path, qtype: str, threads: int = 0) -> Path:
    """Re-quantize a GGUF model with llama.cpp's own quantizer (k-quants need it), atomically."""
    import llama_cpp

    key = qtype.upper().replace("-", "_")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{key}", None)
    if ftype is None:
        raise ExportError(f"unknown quantization {qtype!r}; choose one of: {', '.join(quantize_types())}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    with atomic_file(final) as tmp:
        rc = llama_cpp.llama_model_quantize(
            str(source).encode("utf-8"), str(tmp).encode("utf-8"), ctypes.byref(params)
        )
        if rc != 0:
            free = os.statvfs(tmp.parent).f_bavail * os.statvfs(tmp.parent).f_frsize
            hint = " (the disk looks full)" if free < Path(source).stat().st_size // 4 else ""
            raise ExportError(f"llama.cpp could not quantize {source} to {key} (code {rc}){hint}")
    return Path(final)
