"""The chunked training loss (finetune/loss.py): the model's own loss and gradients, without full logits.

Tiny random models of each family (two layers, SmolLM2's 49,152-token vocabulary, random LoRA
matrices) get packed batches as the trainer builds them: records with restarting position ids,
prompt and padding positions labelled -100. The chunked loss must equal what the model computes
itself, gradients included, and must never keep more than one chunk of logits for the backward pass.
The slow test trains the real SmolLM2 base both ways and compares the loss curves.
"""

from __future__ import annotations

import pytest
import torch

from lorekeeper.finetune.loss import causal_lm_loss, supports
from tests.finetune_tiny import ARCH_TARGETS, VOCAB, add_random_lora, tiny_config


def tiny_lora_model(arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    # as the trainer has it: with a cache, transformers would not see the packed records in the
    # position ids and would let them attend to each other
    model.config.use_cache = False
    model = add_random_lora(model, ARCH_TARGETS[arch])
    model.train()  # LoRA dropout is 0, so training mode is deterministic
    return model


def packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of packed records: prompt tokens and padding carry no label; positions restart per record."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 24), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # record 1's prompt
    labels[0, 12:15] = -100  # record 2's prompt
    labels[1, :3] = -100
    labels[1, 20:] = -100  # padding
    positions = torch.cat([torch.arange(12), torch.arange(12)]).repeat(2, 1)
    positions[1] = torch.cat([torch.arange(20), torch.arange(4)])
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "phi3"])
def test_equals_the_models_own_loss_and_gradients(arch):
    model = tiny_lora_model(arch)
    assert supports(model)
    batch = packed_batch()
    own = model(**batch).loss
    own.backward()
    expected = lora_grads(model)
    assert len(expected) == 2 * len(ARCH_TARGETS[arch]) * 2  # A and B, every target, both layers
    for chunk in (0, 5, 1024):
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, batch, chunk_tokens=chunk)
        loss.backward()
        assert abs(loss.item() - own.item()) < 1e-5, (chunk, loss.item(), own.item())
        for name, grad in lora_grads(model).items():
            assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-7), (chunk, name)


def test_sum_over_num_items_in_batch_as_the_trainer_asks():
    """With gradient accumulation the Trainer passes the labelled-token count of the whole step."""
    model = tiny_lora_model("llama")
    batch = packed_batch(seed=3)
    with torch.no_grad():
        own = model(**batch, num_items_in_batch=torch.tensor(100)).loss
        chunked = causal_lm_loss(model, batch, num_items_in_batch=torch.tensor(100), chunk_tokens=7)
    assert abs(chunked.item() - own.item()) < 1e-5


def test_keeps_one_chunk_of_logits_for_the_backward_pass():
    """The memory claim: the largest tensor autograd saves is one chunk's logits, not the batch's."""
    model = tiny_lora_model("llama")
    batch = packed_batch()

    def largest_saved(compute) -> int:
        sizes = [0]

        def pack(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = compute()
        loss.backward()
        return max(sizes)

    own = largest_saved(lambda: model(**batch).loss)
    chunked = largest_saved(lambda: causal_lm_loss(model, batch, chunk_tokens=8))
    assert own >= 2 * 24 * VOCAB  # the model's own loss keeps every position's logits
    assert chunked <= 8 * VOCAB, chunked


def test_families_with_scaled_or_capped_logits_keep_their_own_loss():
    from transformers import AutoModelForCausalLM

    gemma = AutoModelForCausalLM.from_config(tiny_config("gemma"))
    assert not supports(gemma)
    assert supports(AutoModelForCausalLM.from_config(tiny_config("llama")))


@pytest.mark.slow
def test_training_on_smollm2_follows_the_same_loss_curve(tmp_path):
    """The real base, full precision: 6 steps with the chunked loss and with the model's own."""
    from lorekeeper.finetune.plot import read_metrics
    from lorekeeper.finetune.runs import RunDir
    from lorekeeper.finetune.train import train_run
    from tests.test_finetune_train import small_config, write_notes

    data = write_notes(tmp_path / "notes", files=2, paragraphs=6)
    curves = {}
    for chunk in (0, 64):
        config = small_config(
            data, base_precision="full", max_steps=6, eval_steps=3, save_steps=100, loss_chunk_tokens=chunk
        )
        run = RunDir(tmp_path / f"run-{chunk}")
        train_run(config, run)
        rows = read_metrics(run.metrics)
        curves[chunk] = [r["loss"] for r in rows if "loss" in r]
        curves[chunk, "eval"] = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(curves[0]) == len(curves[64]) == 6
    for own, chunked in zip(curves[0], curves[64]):
        assert abs(own - chunked) < 2e-3 * own, (curves[0], curves[64])
    assert curves[0, "eval"] == pytest.approx(curves[64, "eval"], rel=2e-3)
    assert curves[64][-1] < curves[64][0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_in_bf16_the_same_loss_in_less_memory():
    """bf16 autocast on CUDA, as the trainer runs there: the loss agrees, the peak memory is far lower."""
    model = tiny_lora_model("llama").cuda()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 256), generator=gen)
    batch = {
        "input_ids": ids.cuda(),
        "labels": ids.cuda(),
        "position_ids": torch.arange(256).repeat(4, 1).cuda(),
    }

    def peak(compute) -> tuple[float, int]:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compute()
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), torch.cuda.max_memory_allocated() - before

    own, own_bytes = peak(lambda: model(**batch).loss)
    chunked, chunked_bytes = peak(lambda: causal_lm_loss(model, batch, chunk_tokens=256))
    assert abs(own - chunked) < 1e-2 * own, (own, chunked)
    assert chunked_bytes < 0.5 * own_bytes, (chunked_bytes, own_bytes)
