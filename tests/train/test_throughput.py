"""Training-throughput features from a recipe: fused kernels (and the fused lm_head + cross-entropy) give
the same training run, memory savers give the same losses and gradients, MFU is logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm.train.memory import apply_activation_checkpointing, compile_decoder_layers
from tests.train.test_train_integration import losses, mllm, tiny_recipe, world, write_recipe  # noqa: F401

FUSED = {"rms_norm": True, "swiglu": True, "rope": True, "fused_cross_entropy": True}


def test_fifty_steps_with_fused_kernels_match_the_stock_run(world):
    stock = tiny_recipe(world, "run_stock50", steps=50, save_every=0)
    fused = tiny_recipe(world, "run_fused50", steps=50, save_every=0)
    fused["model"]["kernels"] = FUSED  # auto backend: the kernels' PyTorch twins on CPU, chunked fused CE
    mllm("train", str(write_recipe(world, "stock50", stock)))
    proc = mllm("train", str(write_recipe(world, "fused50", fused)))
    assert "fused kernels (auto backend): {'rms_norm': 5, 'swiglu': 2, 'rope': 2" in proc.stderr
    a, b = losses(world / "run_stock50"), losses(world / "run_fused50")
    assert len(a) == len(b) == 50
    # fp32; the fused CE sums the loss chunk by chunk (another summation order), so allow float noise
    # that 50 Adam steps amplify a little.
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), step
    assert a[50] < a[1] - 0.5  # it trained


def test_triton_kernels_in_a_training_run_match_the_stock_run(world):
    """The Triton kernels themselves (interpreted on CPU) inside real training steps."""
    stock = tiny_recipe(world, "run_stock3", steps=3, save_every=0)
    triton = tiny_recipe(world, "run_triton3", steps=3, save_every=0)
    triton["model"]["kernels"] = {**FUSED, "backend": "triton"}
    mllm("train", str(write_recipe(world, "stock3", stock)))
    mllm("train", str(write_recipe(world, "triton3", triton)), env={"TRITON_INTERPRET": "1"})
    a, b = losses(world / "run_stock3"), losses(world / "run_triton3")
    for step in (1, 2, 3):
        assert a[step] == pytest.approx(b[step], rel=1e-4), step


def test_mfu_tflops_and_data_wait_are_logged(world):
    recipe = tiny_recipe(world, "run_mfu", steps=2, save_every=0)
    recipe["run"]["peak_tflops"] = 0.5  # a made-up peak: CPUs have no table entry
    mllm("train", str(write_recipe(world, "mfu", recipe)))
    rows = [json.loads(line) for line in (world / "run_mfu" / "metrics.jsonl").read_text().splitlines()]
    row = rows[-1]
    assert row["tflops_per_device"] > 0 and row["mfu"] == pytest.approx(row["tflops_per_device"] / 0.5)
    assert 0 <= row["data_wait"] < 1 and row["peak_mem_gb"] > 0


@pytest.mark.parametrize("policy, every", [("full", 1), ("full", 2), ("selective", 1)])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny, policy, every):
    inputs = batch(tiny)
    plain = tiny.model("clip", seed=1).train()
    saved = tiny.model("clip", seed=1).train()
    assert len(apply_activation_checkpointing(saved, policy, every)) == (1 if every == 2 else 2)
    assert_same_step(plain, saved, inputs)


def test_compiled_decoder_layers_give_the_same_loss_and_gradients(tiny):
    inputs = batch(tiny)
    plain = tiny.model("clip", seed=1).train()
    compiled = tiny.model("clip", seed=1).train()
    assert compile_decoder_layers(compiled, backend="aot_eager") == 2
    assert_same_step(plain, compiled, inputs, atol=1e-5)


def batch(tiny):
    from tests.test_modeling import right_padded_batch

    model = tiny.model("clip", seed=1)
    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, model.config.num_image_tokens)
    labels = input_ids.masked_fill(input_ids == model.config.image_token_id, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": tiny.pixel_values(2),
            "labels": labels}


def assert_same_step(a, b, inputs, atol=0.0):
    loss_a, loss_b = a(**inputs).loss, b(**inputs).loss
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_b, loss_a, atol=atol, rtol=0)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, atol=max(atol, 1e-7), rtol=1e-6, msg=name)


def test_packed_training_matches_padded_training(world):
    """data.packing: the same samples per step, packed into fewer rows, give the same losses."""
    attention = {"mode": "causal", "backend": "reference"}  # document windows need the interval layout
    padded = tiny_recipe(world, "run_padded", steps=2, save_every=0)
    packed = tiny_recipe(world, "run_packed", steps=2, save_every=0)
    padded["model"]["attention"] = packed["model"]["attention"] = attention
    packed["data"]["packing"] = True
    mllm("train", str(write_recipe(world, "padded", padded)))
    mllm("train", str(write_recipe(world, "packed", packed)))
    a, b = losses(world / "run_padded"), losses(world / "run_packed")
    assert a[1] == pytest.approx(b[1], rel=1e-5) and a[2] == pytest.approx(b[2], rel=1e-4)
    bad = tiny_recipe(world, "run_packed_sdpa", steps=1)
    bad["data"]["packing"] = True
    proc = mllm("train", str(write_recipe(world, "packed_sdpa", bad)), check=False)
    assert proc.returncode == 2 and "data.packing needs the interval attention layout" in proc.stderr
