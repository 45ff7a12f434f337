"""The training loss without the full logits: the output layer runs on answer tokens only, in chunks.

A causal LM's own loss multiplies every position's hidden state by the output layer (49,152 x 576
for SmolLM2), upcasts those logits to fp32 and keeps them, and their gradient, for the backward
pass: for a batch of 4 x 256 tokens that is about 0.5 GB, more than the rest of a small model's
training together, and most of it belongs to positions whose label is ignored (prompts, padding)
when only answers are trained on.

``causal_lm_loss`` gives the same number from the decoder's hidden states: it keeps the positions
that have a label, and computes output layer + cross-entropy over at most ``chunk_tokens`` of them
at a time, each chunk recomputed in the backward pass (so only one chunk's logits exist at once).
The reduction is the one transformers uses (``ForCausalLMLoss``): a sum divided by
``num_items_in_batch`` when the Trainer passes it (gradient accumulation), a mean otherwise.

It applies only to model families whose output is plain ``lm_head(hidden)`` (no logit scaling or
soft-capping); ``supports`` says which, and everything else keeps the model's own loss.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100

# Families whose logits are exactly lm_head(final hidden state): checked against each model's
# forward in transformers (Gemma soft-caps, Cohere and Granite scale, so they are not here).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2"})


def causal_lm(model: Any) -> Any:
    """The ...ForCausalLM module inside a peft wrapper (LoRA layers are in it, in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports(model: Any) -> bool:
    """Whether ``causal_lm_loss`` gives this model's own loss."""
    inner = causal_lm(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return False
    return callable(getattr(inner, "get_decoder", None)) and inner.get_output_embeddings() is not None


def causal_lm_loss(
    model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None, chunk_tokens: int = 1024
) -> Any:
    """The causal LM loss of ``inputs`` (input_ids, labels, optional position_ids/attention_mask)."""
    import torch
    from torch.nn import functional as F
    from torch.utils.checkpoint import checkpoint

    inner = causal_lm(model)
    head = inner.get_output_embeddings()
    labels = inputs["labels"]
    decoder_inputs = {k: inputs[k] for k in ("input_ids", "position_ids", "attention_mask") if k in inputs}
    hidden = inner.get_decoder()(**decoder_inputs, use_cache=False).last_hidden_state
    # tokens < n predict n: position t's label is labels[t + 1]; the last position predicts nothing
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    states = hidden[:, :-1][keep]
    wanted = targets[keep]

    def chunk_loss(h: Any, y: Any) -> Any:
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    # starts at 0 but joined to the graph, so a batch with no labelled token still backpropagates
    total = hidden.sum().float() * 0.0
    step = chunk_tokens if chunk_tokens > 0 else max(1, states.shape[0])
    for start in range(0, states.shape[0], step):
        h, y = states[start : start + step], wanted[start : start + step]
        if torch.is_grad_enabled() and chunk_tokens > 0:
            total = total + checkpoint(chunk_loss, h, y, use_reentrant=False)
        else:
            total = total + chunk_loss(h, y)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    # the mean over labelled positions; no labelled position gives nan, as cross_entropy's mean does
    return total / keep.sum()
