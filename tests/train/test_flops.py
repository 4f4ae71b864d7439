"""`mllm.train.flops` against a brute-force count and against itself.

The brute force is `torch.utils.flop_counter.FlopCounterMode` around a real forward (and backward) of
the tiny model: it counts every matmul / conv / attention call with the same 2*m*k*n convention, so our
formula must equal it exactly once attention is counted on the same pairs. The counter counts SDPA on
all T x T pairs (it sees shapes, not masks), so the comparison passes windows covering every pair;
the causal count then differs from it by exactly the masked pairs' attention FLOPs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mllm.attention.layout import compute_layout, dense_mask
from mllm.modeling import MLLMForConditionalGeneration
from mllm.train import flops
from mllm.train.flops import LLMShape, attention_pairs, batch_flops, mfu, model_flops_per_sample
from tests.test_modeling import right_padded_batch

IMAGE_TOKEN_ID = 4
SEQ = 20
aten = torch.ops.aten


# FlopCounterMode has no formula for the CPU flash-attention op that SDPA runs here (it knows the CUDA
# ones); these are its CUDA formulas: forward QK^T + PV = 4*b*h*sq*sk*d, backward 4 matmuls = 2x.
def _sdpa_cpu_flops(query_shape, key_shape, *args, **kwargs):
    b, h, sq, d = query_shape
    return 4 * b * h * sq * key_shape[2] * d


def _sdpa_cpu_backward_flops(grad_shape, query_shape, key_shape, *args, **kwargs):
    return 2 * _sdpa_cpu_flops(query_shape, key_shape)


def counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
    })


def unpadded_batch(config, rows: int = 2) -> torch.Tensor:
    """[rows, SEQ] ids, one image per row at different offsets, no padding (the counter sees every token)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(9, config.vocab_size, (rows, SEQ), generator=generator)
    n = config.num_image_tokens
    for r in range(rows):
        ids[r, 1 + r: 1 + r + n] = IMAGE_TOKEN_ID
    return ids


def all_pairs(ids: torch.Tensor) -> dict:
    return {"kv_start": torch.zeros_like(ids), "kv_end": torch.full_like(ids, ids.shape[1])}


def module_flops(fc: FlopCounterMode, name: str) -> int:
    return sum(fc.get_flop_counts()[f"MLLMForConditionalGeneration.{name}"].values())


# ---------------------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("vision", ["clip", "siglip", "open_clip"])
def test_forward_flops_equal_flop_counter(tiny, vision):
    model = tiny.model(vision, seed=1)
    ids = unpadded_batch(model.config)
    with counter() as fc, torch.no_grad():
        model(input_ids=ids, pixel_values=tiny.pixel_values(2))
    ours = batch_flops(model.config, ids, **all_pairs(ids))
    # Per component, exactly (integers in float64): a wrong size, layer count or token count shows here.
    assert ours.vision == module_flops(fc, "model.vision_tower")
    assert ours.projector == module_flops(fc, "model.multi_modal_projector")
    assert ours.llm_matmul + ours.llm_attention == (module_flops(fc, "model.language_model")
                                                    + module_flops(fc, "lm_head"))
    assert ours.forward == fc.get_total_flops()

    # Causal attention (the default) counts only the visible triangle: less by the masked pairs exactly.
    causal = batch_flops(model.config, ids)
    masked_pairs = 2 * (SEQ * SEQ - SEQ * (SEQ + 1) // 2)
    assert fc.get_total_flops() - causal.forward == masked_pairs * flops.llm_attention_flops_per_pair(model.config)


@pytest.mark.parametrize("frozen", [False, True])
def test_training_flops_equal_flop_counter_up_to_documented_input_grads(tiny, frozen):
    """The 6N convention counts 3x forward for every differentiated matmul; autograd skips two input
    gradients nobody needs, which the counter sees: the patch conv's (pixel_values need no grad), and,
    with a frozen tower, the projector's first layer's (its input needs no grad)."""
    model = tiny.model("clip", seed=1).train()
    model.model.vision_tower.requires_grad_(not frozen)
    ids = unpadded_batch(model.config)
    with counter() as fc:
        model(input_ids=ids, pixel_values=tiny.pixel_values(2)).logits.sum().backward()
    ours = batch_flops(model.config, ids, frozen_vision=frozen, **all_pairs(ids))
    shape = flops.vit_shape(model.config.vision_config)
    embed = 2 * 2 * shape.patches * shape.patch_dim * shape.hidden  # 2 images
    linear_1 = 2 * 2 * model.config.num_image_tokens * shape.hidden * model.config.text_config.hidden_size
    assert fc.get_total_flops() == ours.training - (linear_1 if frozen else embed)
    # Frozen: the tower runs forward only (the counter sees no vision backward at all).
    assert (ours.vision_training == ours.vision) == frozen


def test_moe_forward_flops_equal_flop_counter(tiny):
    """Activated experts (top-2 of a modality group), shared expert and router, counted by the counter.
    The per-expert loop runs plain matmuls (the counter has no formula for torch._grouped_mm)."""
    moe = {"layers": [1], "experts": {"text": 3, "image": 2}, "top_k": 2, "shared_experts": 1,
           "implementation": "loop"}
    torch.manual_seed(0)
    model = tiny.randomise(MLLMForConditionalGeneration(tiny.config("clip", moe=moe))).eval()
    ids = unpadded_batch(model.config)
    with counter() as fc, torch.no_grad():
        model(input_ids=ids, pixel_values=tiny.pixel_values(2))
    # The one matmul we leave out is bookkeeping, not model FLOPs: MoEBlock's load statistics,
    # one_hot(modality) [2, N] @ assignment [N, E].
    stats = 2 * 2 * ids.numel() * 5
    assert batch_flops(model.config, ids, **all_pairs(ids)).forward + stats == fc.get_total_flops()


def test_dense_llm_matmuls_are_two_flops_per_linear_weight(tiny):
    """The 6N link: forward matmul FLOPs per token = 2 x the LLM's matmul weights (+ lm_head)."""
    model = tiny.model("clip")
    weights = sum(m.weight.numel() for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear))
    weights += model.lm_head.weight.numel()
    assert flops.llm_matmul_flops_per_token(model.config) == 2 * weights


# ---------------------------------------------------------------------------------------- MoE


def with_moe(tiny, **moe):
    return tiny.config("clip", moe={"experts": {"text": 4, "image": 4}, **moe})


def test_moe_counts_activated_experts(tiny):
    dense = tiny.config("clip")
    shape = LLMShape.from_config(dense.text_config)
    per_token = {k: flops.llm_matmul_flops_per_token(with_moe(tiny, top_k=k)) for k in (1, 2, 3)}
    assert per_token[1] < per_token[2] < per_token[3]
    router = 2 * shape.hidden * 8  # 8 experts in all (4 text + 4 image); a token scores its group's 4
    for k, value in per_token.items():
        # Upcycled top-k (experts are copies of the dense FFN): k dense FFNs + the router, per MoE layer.
        assert value == flops.llm_matmul_flops_per_token(dense) + shape.layers * ((k - 1) * shape.gated_ffn + router)
    shared = flops.llm_matmul_flops_per_token(with_moe(tiny, top_k=2, shared_experts=1))
    assert shared == per_token[2] + shape.layers * shape.gated_ffn
    every_other = flops.llm_matmul_flops_per_token(with_moe(tiny, top_k=2, layers="every_other"))
    assert every_other == flops.llm_matmul_flops_per_token(dense) + (shape.gated_ffn + router)  # layer 1 only
    # Experts change matmuls only: attention and the vision side stay.
    assert flops.llm_attention_flops_per_pair(with_moe(tiny, top_k=2)) == flops.llm_attention_flops_per_pair(dense)


def test_expert_choice_counts_filled_slots_and_both_routers(tiny):
    config = with_moe(tiny, top_k=2, routing="expert_choice", capacity_factor=1.5)
    shape = LLMShape.from_config(config.text_config)
    dense = flops.llm_matmul_flops_per_token(tiny.config("clip"))
    routers = 2 * (2 * shape.hidden * 8)
    assert flops.llm_matmul_flops_per_token(config) == dense + shape.layers * (2.0 * shape.gated_ffn + routers)


def test_attention_experts_run_every_expert(tiny):
    dense = tiny.config("clip")
    bam = with_moe(tiny, top_k=1, attention_experts=3, attention_top_k=1)
    assert flops.llm_attention_flops_per_pair(bam) == 3 * flops.llm_attention_flops_per_pair(dense)
    shape = LLMShape.from_config(dense.text_config)
    extra_q_o = 2 * 2 * 2 * shape.hidden * shape.heads * shape.head_dim  # 2 more copies of q and o
    router = 2 * shape.hidden * (8 + 3)  # FFN router (8 experts) + attention router (3)
    assert flops.llm_matmul_flops_per_token(bam) - flops.llm_matmul_flops_per_token(dense) == \
        shape.layers * (extra_q_o + router)


# ---------------------------------------------------------------------------------------- attention windows


def test_mma_and_causal_windows_change_only_the_attention_term(tiny):
    config = tiny.config("clip")
    n = config.num_image_tokens
    ids, mask = right_padded_batch(config.vocab_size, n)
    assistant = torch.zeros_like(ids, dtype=torch.bool)
    assistant[:, 13] = True  # an assistant turn after the image in both rows (lengths 16 and 14)
    modality = (ids == IMAGE_TOKEN_ID).long()
    causal = compute_layout(mask, modality, assistant, mode="causal")
    mma = compute_layout(mask, modality, assistant, mode="mma")

    by_mask = batch_flops(config, ids, mask)
    by_causal = batch_flops(config, ids, mask, causal.kv_start, causal.kv_end)
    by_mma = batch_flops(config, ids, mask, mma.kv_start, mma.kv_end)
    assert by_causal == by_mask  # the mask's causal default equals the causal layout (padding included)
    assert by_mma.llm_attention > by_causal.llm_attention  # image tokens also see the question
    for field in ("vision", "vision_training", "projector", "llm_matmul"):
        assert getattr(by_mma, field) == getattr(by_causal, field)
    # The pair count is the dense mask's, and padding counts neither as tokens nor as pairs.
    assert attention_pairs(kv_start=mma.kv_start, kv_end=mma.kv_end) == int(dense_mask(mma).sum())
    lengths = mask.sum(-1)
    assert by_mask.llm_matmul == int(lengths.sum()) * flops.llm_matmul_flops_per_token(config)
    assert by_mask.llm_attention == sum(int(x) * (int(x) + 1) // 2 for x in lengths) * \
        flops.llm_attention_flops_per_pair(config)


def test_per_sample_planning_equals_a_one_row_batch_and_counts_add(tiny):
    config = tiny.config("clip")
    ids = unpadded_batch(config, rows=1)
    one = batch_flops(config, ids)
    assert model_flops_per_sample(config, SEQ, num_images=1) == one
    assert batch_flops(config, torch.cat([ids, ids])) == one + one
    assert one.training == one.vision_training + 3 * (one.projector + one.llm_matmul + one.llm_attention)
    with pytest.raises(ValueError, match="expand to"):
        model_flops_per_sample(config, 5, num_images=1)
    with pytest.raises(ValueError, match="not a multiple"):
        batch_flops(config, ids[:, :-SEQ + 4])  # cuts the image span
    assert batch_flops(config, ids, num_images=0).vision == 0


def test_layers_past_the_feature_layer_are_forward_only(tiny):
    """LLaVA reads layer -2: the last layer runs but no gradient reaches it."""
    shape = flops.vit_shape(tiny.clip_config())
    layer = flops.vit_layer_flops(shape)
    forward, training = flops.vision_flops_per_image(tiny.config("clip"))
    _, training_last = flops.vision_flops_per_image(tiny.config("clip", vision_feature_layer=-1))
    assert training_last - training == 2 * layer
    assert flops.vision_flops_per_image(tiny.config("clip"), frozen_vision=True) == (forward, forward)


def test_open_clip_sizes_come_from_model_cfg(tiny):
    shape = flops.vit_shape(tiny.open_clip_config())
    assert (shape.hidden, shape.intermediate, shape.layers, shape.patches, shape.has_cls) == (48, 96, 3, 9, True)
    cfg = tiny.open_clip_model_cfg()
    del cfg["vision_cfg"]["mlp_ratio"]  # missing: open_clip's default ratio, 4
    from mllm.configuration import OpenCLIPVisionConfig

    assert flops.vit_shape(OpenCLIPVisionConfig(model_name="x", model_cfg=cfg)).intermediate == 4 * 48
    # An unbuilt open_clip config (no image_size yet) costs what the built model's config does.
    fresh, built = tiny.config("open_clip"), tiny.model("open_clip").config
    assert fresh.vision_config.image_size is None and built.vision_config.image_size == 48
    assert model_flops_per_sample(fresh, SEQ) == model_flops_per_sample(built, SEQ)
    for strategy in ("default", "full"):
        config = tiny.config("clip", vision_feature_select_strategy=strategy)
        assert flops.image_tokens_per_image(config) == config.num_image_tokens


# ---------------------------------------------------------------------------------------- peaks / MFU


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5), ("NVIDIA GH200 480GB", 989.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05), ("NVIDIA L4", 121.0),
    ("NVIDIA A10G", 125.0), ("nvidia h100 pcie", 756.0),
])
def test_peak_table_lookup(name, peak):
    assert flops.lookup_peak_tflops(name) == peak


def test_mfu():
    assert mfu(494.75e12, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
    assert mfu(1e12, "cpu") is None and mfu(1e12, None) is None and mfu(1e12, "Quadro Mystery") is None
    assert mfu(100e12, "Quadro Mystery", peak_tflops=200.0) == pytest.approx(0.5)
    assert mfu(100e12, "NVIDIA H100 80GB HBM3", peak_tflops=400.0) == pytest.approx(0.25)  # override wins
    with pytest.raises(ValueError, match="peak_tflops"):
        mfu(1.0, None, peak_tflops=0.0)


# ---------------------------------------------------------------------------------------- MoD


def exact_and_dense(tiny, model, ids: torch.Tensor):
    """(our count of `model`'s forward, asserted equal to the counter's; the dense model's count)."""
    with counter() as fc, torch.no_grad():
        model(input_ids=ids, pixel_values=tiny.pixel_values(2))
    ours = batch_flops(model.config, ids, **all_pairs(ids))
    assert ours.forward == fc.get_total_flops()
    return ours, batch_flops(tiny.config("clip"), ids, **all_pairs(ids))


@pytest.mark.parametrize("capacity", [1.0, 0.3])
def test_mod_counts_what_the_skipped_tokens_do_not_run(tiny, capacity):
    """Skipped image tokens: no q/o projection, FFN or attention row; the router runs on every token."""
    from mllm.sparse.depth import convert
    from mllm.sparse.mod import MoDSpec

    model = tiny.model("clip", seed=1)
    convert(model, mod=MoDSpec(capacity=capacity, skip_first=0))
    ours, dense = exact_and_dense(tiny, model, unpadded_batch(model.config))
    assert (ours.forward < dense.forward) == (capacity < 1.0)


# ---------------------------------------------------------------------------------------- token pruning


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_fastv_counts_the_compacted_layers_and_its_scoring_pass(tiny, keep):
    """From its layer on, the dropped image tokens run nothing (projections, FFN, attention rows and keys);
    the scoring pass adds its q / k projections and logits. Exact against the counter (SDPA on the compacted
    length, all pairs)."""
    from mllm.compression.pruning import TokenPruningSpec, convert

    model = tiny.model("clip", seed=1)
    convert(model, TokenPruningSpec(method="fastv", layer=1, keep=keep, query_tokens=4))
    ids = unpadded_batch(model.config)
    ours, dense = exact_and_dense(tiny, model, ids)
    assert (ours.forward < dense.forward) == (keep < 1.0)
    # Causal windows: the compacted triangle per row, whichever image tokens stay.
    T, n = SEQ, model.config.num_image_tokens
    Tk = T - (n - math.ceil(n * keep))
    layers = model.config.text_config.num_hidden_layers
    pairs = 2 * (T * (T + 1) // 2) * 1 + 2 * (Tk * (Tk + 1) // 2) * (layers - 1)
    assert batch_flops(model.config, ids).llm_attention == pairs * flops.llm_attention_flops_per_pair(model.config) / layers


def test_exit_gates_cost_one_projection_per_row_and_save_nothing_in_training(tiny):
    from mllm.compression.pruning import TokenPruningSpec, convert

    model = tiny.model("clip", seed=1)
    convert(model, TokenPruningSpec(method="exit"))
    ids = unpadded_batch(model.config)
    model.train()
    with counter() as fc:
        model(input_ids=ids, pixel_values=tiny.pixel_values(2))
    assert batch_flops(model.config, ids, **all_pairs(ids)).forward == fc.get_total_flops()
