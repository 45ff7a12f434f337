"""Write a small but real LoRA adapter GGUF for the packaged SmolLM2 model.

llama.cpp loads it like any exported adapter (``general.type = adapter``, ``adapter.type = lora``,
``blk.N.attn_q.weight.lora_a/_b``); random weights are enough to prove that switching adapters
changes the model's output and that the base model is not reloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_lora_adapter(path: Path, *, n_embd: int, n_layer: int, rank: int = 8, seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for layer in range(n_layer):
        # numpy shapes are reversed ggml shapes: A is (rank, n_in), B is (n_out, rank)
        writer.add_tensor(
            f"blk.{layer}.attn_q.weight.lora_a", rng.normal(0, 0.5, (rank, n_embd)).astype(np.float32)
        )
        writer.add_tensor(
            f"blk.{layer}.attn_q.weight.lora_b", rng.normal(0, 0.5, (n_embd, rank)).astype(np.float32)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def adapter_for(generator, path: Path, seed: int = 0) -> Path:
    """An adapter shaped for ``generator``'s loaded model (a ``LlamaCppGenerator``)."""
    meta = generator.metadata
    return write_lora_adapter(
        path, n_embd=int(meta["llama.embedding_length"]), n_layer=int(meta["llama.block_count"]), seed=seed
    )
