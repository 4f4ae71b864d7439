"""Modality-aware MoE: equality with the dense model it came from, routing isolation between modalities,
grouped-matmul vs per-expert loop, capacity / expert choice, losses, generation and save / load."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP

from mllm.modeling import MLLMForConditionalGeneration
from mllm.schema import ConfigError
from mllm.sparse import MoEBlock, MoESpec, RoutingContext, UpcycleSpec, moe_blocks, upcycle
from mllm.sparse.experts import Experts, grouped_mm_supported
from mllm.sparse.routing import load_balancing_loss, z_loss
from tests.test_modeling import generate, right_padded_batch

ATOL = 1e-5  # fp32: renormalised top-k weights sum to 1 up to rounding (measured max diff ~1e-6)


def dense_inputs(tiny, model):
    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, model.config.num_image_tokens)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": tiny.pixel_values(2)}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def llama_mlp(hidden=32, intermediate=64, seed=0):
    torch.manual_seed(seed)
    from transformers import LlamaConfig

    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate))


def tokens(batch=2, seq=12, dim=32, image_every=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, dim, generator=g)
    modality = (torch.arange(seq) % image_every == 0).long().expand(batch, seq).clone()
    return x, RoutingContext(modality, torch.ones(batch, seq, dtype=torch.bool))


# ---------------------------------------------------------------------------------- equal to dense


@pytest.mark.parametrize("spec", [
    MoESpec(experts={"text": 1, "image": 1}, top_k=1),
    MoESpec(modality_aware=False, num_experts=1, top_k=1),
    MoESpec(experts={"text": 1, "image": 1}, top_k=1, implementation="loop"),
], ids=["modality-aware", "shared-pool", "loop"])
def test_one_expert_moe_equals_the_dense_ffn(spec):
    mlp = llama_mlp()
    block = MoEBlock(spec, 32, 64, mlp.act_fn)
    block.init_from_dense(mlp)
    x, context = tokens()
    block.routing_context = context
    with torch.no_grad():
        # Same weights, weight 1.0 for the only expert: the same floats come out.
        torch.testing.assert_close(block(x), mlp(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [
    {}, {"modality_aware": False}, {"shared_experts": 1}, {"capacity_factor": 8.0}, {"mot": True},
    {"implementation": "loop"}, {"layers": "every_other"}, {"layers": [0]},
    {"experts": {"text": 2, "image": 3}, "top_k": 1},
    {"attention_experts": 3}, {"attention_experts": 3, "share_kv": False},
    {"attention_experts": 2, "attention_top_k": 1, "layers": [1]},
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "top2-of-4+4")
def test_upcycled_model_logits_equal_the_dense_model(tiny, kwargs):
    dense = tiny.model("clip", seed=1)
    inputs = dense_inputs(tiny, dense)
    moe = copy.deepcopy(dense)
    layers = upcycle(moe, UpcycleSpec(**kwargs), seed=3)
    assert len(moe_blocks(moe)) == len(layers) > 0
    torch.testing.assert_close(logits(moe, inputs), logits(dense, inputs), atol=ATOL, rtol=0)
    # The comparison can fail: perturbing one expert changes the output.
    with torch.no_grad():
        moe_blocks(moe)[0][1].experts.down_proj[0].mul_(3.0)
    assert (logits(moe, inputs) - logits(dense, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("attention", [None, {"mode": "mma", "backend": "reference", "assistant_token_id": 6}],
                         ids=["backbone-sdpa", "mma-interval"])
def test_attention_experts_equal_dense_attention_until_an_expert_changes(tiny, share_kv, attention):
    """BAM upcycling: stacked expert heads through the backbone's own attention function (or ours)."""
    dense = tiny.model("clip", seed=1, attention=attention)
    inputs = dense_inputs(tiny, dense)
    moe = copy.deepcopy(dense)
    upcycle(moe, UpcycleSpec(attention_experts=3, share_kv=share_kv, layers=[0]))
    torch.testing.assert_close(logits(moe, inputs), logits(dense, inputs), atol=ATOL, rtol=0)
    with torch.no_grad():
        moe.model.language_model.layers[0].self_attn.q_weight[1].mul_(2.0)
    assert (logits(moe, inputs) - logits(dense, inputs)).abs().max() > 1e-3


def test_upcycle_noise_makes_experts_differ_and_is_seeded(tiny):
    dense = tiny.model("clip", seed=1)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    upcycle(a, UpcycleSpec(noise=0.01), seed=5)
    upcycle(b, UpcycleSpec(noise=0.01), seed=5)
    bank = moe_blocks(a)[0][1].experts.gate_proj
    assert not torch.equal(bank[0], bank[1])
    assert torch.equal(bank, moe_blocks(b)[0][1].experts.gate_proj)


def test_upcycling_twice_or_a_non_gated_ffn_is_refused(tiny):
    model = tiny.model("clip", seed=1)
    upcycle(model, UpcycleSpec())
    with pytest.raises(ValueError, match="already has MoE"):
        upcycle(model, UpcycleSpec())
    from mllm.sparse.moe import apply_moe

    layer = torch.nn.Module()
    layer.mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lm = torch.nn.Module()
    lm.layers = torch.nn.ModuleList([layer])
    with pytest.raises(ValueError, match="gate_proj"):
        apply_moe(lm, MoESpec())


# ---------------------------------------------------------------------------------- routing


def test_tokens_never_reach_the_other_modalitys_experts(tiny):
    model = tiny.model("clip", seed=1)
    upcycle(model, UpcycleSpec(experts={"text": 2, "image": 3}, top_k=1))
    # An adversarial router: every logit of the image experts is huge, so unmasked routing would send
    # every text token there.
    for _, block in moe_blocks(model):
        with torch.no_grad():
            block.router.weight[2:] = 0.0
            block.router.weight[:2] = torch.randn_like(block.router.weight[:2])
        block.reset_stats()
    inputs = dense_inputs(tiny, model)
    with torch.no_grad():
        for _, block in moe_blocks(model):
            block.router.weight[2:] += 1e3 * torch.sign(torch.randn(block.router.weight.shape[1]))
    logits(model, inputs)
    n_image = int(((inputs["input_ids"] == model.config.image_token_id) & inputs["attention_mask"].bool()).sum())
    n_text = int(inputs["attention_mask"].sum()) - n_image
    for _, block in moe_blocks(model):
        load = block.stats["load"]  # [modality, expert]
        assert load[0, 2:].sum() == 0 and load[1, :2].sum() == 0
        assert load[0].sum() == n_text and load[1].sum() == n_image  # padding is not counted
    # And the shared pool does mix them (the isolation is the grouping, not an accident).
    pool = tiny.model("clip", seed=1)
    upcycle(pool, UpcycleSpec(modality_aware=False, num_experts=4, top_k=1))
    for _, block in moe_blocks(pool):
        with torch.no_grad():
            block.router.weight[3] += 1e3 * torch.sign(torch.randn(block.router.weight.shape[1]))
        block.reset_stats()
    logits(pool, inputs)
    assert all(block.stats["load"][0, 3] > 0 and block.stats["load"][1, 3] > 0 for _, block in moe_blocks(pool))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_grouped_matmul_equals_the_per_expert_loop_forward_and_grads():
    torch.manual_seed(0)
    grouped = Experts(5, 32, 64, torch.nn.SiLU(), "grouped_mm")
    with torch.no_grad():
        for p in grouped.parameters():
            p.normal_(0, 0.1)
    loop = copy.deepcopy(grouped)
    loop.implementation = "loop"
    counts = torch.tensor([7, 0, 3, 11, 2])  # an empty expert included
    x = torch.randn(int(counts.sum()), 32)
    assert grouped_mm_supported(x, grouped.gate_proj, grouped.down_proj, explicit=True)
    grad = torch.randn(x.shape[0], 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = grouped.dropless(xa, counts), loop.dropless(xb, counts)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    (ya * grad).sum().backward()
    (yb * grad).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    for name in ("gate_proj", "up_proj", "down_proj"):
        ga, gb = getattr(grouped, name).grad, getattr(loop, name).grad
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(ga[1]) == 0  # the empty expert gets a zero (not a missing) gradient
        assert torch.count_nonzero(ga[0]) > 0


def test_moe_block_grouped_equals_loop_end_to_end_with_grads():
    mlp = llama_mlp()
    spec = MoESpec(experts={"text": 3, "image": 2}, top_k=2)
    a = MoEBlock(spec, 32, 64, mlp.act_fn)
    a.init_random(0.1, torch.Generator().manual_seed(0))
    b = copy.deepcopy(a)
    a.experts.implementation, b.experts.implementation = "grouped_mm", "loop"
    x, context = tokens(seq=17)
    a.routing_context = b.routing_context = context
    a.train(), b.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    (ya.square().sum() + a.aux_loss).backward()
    (yb.square().sum() + b.aux_loss).backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert a.router.weight.grad.abs().sum() > 0  # the router learns through the weights and the losses


def test_capacity_drops_the_overflow_and_counts_it():
    mlp = llama_mlp()
    spec = MoESpec(experts={"text": 2, "image": 2}, top_k=1, capacity_factor=0.5)
    block = MoEBlock(spec, 32, 64, mlp.act_fn)
    block.init_from_dense(mlp)
    x, context = tokens(batch=1, seq=16, image_every=2)  # 8 text + 8 image tokens
    block.routing_context = context
    block.train()  # capacity applies in training; inference is dropless (causal)
    with torch.no_grad():
        out = block(x)
    # Capacity per expert = ceil(0.5 * 1 * 8 / 2) = 2, so 4 of each modality's 8 tokens are computed.
    assert block.stats["dropped"].tolist() == [4.0, 4.0]
    computed = (out.abs().sum(-1) > 0).sum()
    assert computed == 8  # dropped tokens get no FFN output (the residual carries them)
    torch.testing.assert_close(out[0][out[0].abs().sum(-1) > 0], mlp(x)[0][out[0].abs().sum(-1) > 0],
                               atol=1e-6, rtol=0)
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), mlp(x), atol=1e-6, rtol=0)


def test_expert_choice_respects_capacity_and_trains_the_causal_router():
    mlp = llama_mlp()
    spec = MoESpec(experts={"text": 2, "image": 2}, top_k=1, routing="expert_choice", capacity_factor=1.0)
    block = MoEBlock(spec, 32, 64, mlp.act_fn)
    block.init_random(0.1, torch.Generator().manual_seed(0))
    x, context = tokens(batch=1, seq=16, image_every=2)
    block.routing_context = context
    block.train()
    block(x)
    # Each expert picks exactly capacity = 1 * 1 * 8 / 2 = 4 tokens of its own modality.
    assert block.stats["load"].tolist() == [[4.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 4.0]]
    assert "aux_router_loss" in block.aux_terms
    block.aux_loss.backward()
    assert block.aux_router.weight.grad.abs().sum() > 0
    # Inference: the auxiliary router picks top-k experts per token, inside the token's group.
    block.eval()
    block.reset_stats()
    with torch.no_grad():
        block(x)
    assert block.stats["load"][0, 2:].sum() == 0 and block.stats["load"][1, :2].sum() == 0
    assert block.stats["load"].sum() == 16


def test_balance_loss_is_one_for_a_uniform_router_and_z_loss_matches_its_formula():
    n, e = 10, 4
    probs = torch.full((n, e), 0.25)
    assignment = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3]), e).float()
    onehot = torch.ones(n, 1)
    assert load_balancing_loss(probs, assignment, onehot, torch.ones(1, e)).item() == pytest.approx(1.0)
    # All tokens on expert 0 with the router agreeing: E * 1 * 1 = 4.
    skewed = torch.zeros(n, e)
    skewed[:, 0] = 1.0
    assert load_balancing_loss(skewed, skewed, onehot, torch.ones(1, e)).item() == pytest.approx(4.0)
    logits = torch.randn(n, e)
    valid = torch.tensor([1.0] * 8 + [0.0] * 2)
    expected = (torch.logsumexp(logits[:8], -1) ** 2).mean()
    torch.testing.assert_close(z_loss(logits, valid), expected)


def test_training_forward_adds_the_weighted_aux_losses(tiny):
    model = tiny.model("clip", seed=1)
    upcycle(model, UpcycleSpec(aux_loss_coef=0.01, z_loss_coef=0.001))
    inputs = dense_inputs(tiny, model)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    model.train()
    out = model(**inputs, labels=labels)
    expected = sum(0.01 * b.aux_terms["balance_loss"] + 0.001 * b.aux_terms["z_loss"] for _, b in moe_blocks(model))
    torch.testing.assert_close(out.aux_loss.detach(), expected)
    model.eval()
    assert model(**inputs).aux_loss is None  # inference adds nothing


# ---------------------------------------------------------------------------------- generation, save / load


@pytest.mark.parametrize("kwargs", [{}, {"routing": "expert_choice", "capacity_factor": 1.0}, {"mot": True},
                                    {"attention_experts": 2, "share_kv": False}],
                         ids=["token-choice", "expert-choice", "mot", "attention-experts"])
def test_cached_generation_equals_uncached_with_moe(tiny, tokenizer, synth_world, kwargs):
    model = tiny.model("clip", seed=1)
    upcycle(model, UpcycleSpec(noise=0.05, **kwargs), seed=2)
    processor = tiny.processor(tokenizer, model.config)
    batch = processor(images=tiny.images(synth_world, 2), text=["<image>What is this?", "Describe <image> now"])
    cached, cached_logits = generate(model, batch, use_cache=True)
    uncached, uncached_logits = generate(model, batch, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=ATOL, rtol=0)


def test_moe_model_save_and_from_pretrained_round_trip(tiny, tmp_path):
    model = tiny.model("clip", seed=1)
    upcycle(model, UpcycleSpec(noise=0.05, shared_experts=1, attention_experts=2, layers=[1]), seed=2)
    with torch.no_grad():  # attention experts that differ, so a mixed-up load would show
        model.model.language_model.layers[1].self_attn.q_weight[0].mul_(1.5)
    model.save_pretrained(tmp_path)
    loaded = MLLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.moe == model.config.moe
    assert [n for n, _ in moe_blocks(loaded)] == [n for n, _ in moe_blocks(model)]
    inputs = dense_inputs(tiny, model)
    # Identical state dicts; the attention experts' einsums may pick another kernel for freshly
    # allocated weights (measured: 1.2e-7 apart), hence not atol=0.
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad, match", [
    ({"top_k": 3, "experts": {"text": 2, "image": 4}}, "top_k"),
    ({"experts": {"text": 2, "audio": 2}}, "audio"),
    ({"routing": "expert_choice"}, "capacity_factor"),
    ({"layers": "some"}, "layers"),
    ({"attention_experts": 2, "mot": True}, "choose one"),
])
def test_bad_moe_config_names_the_key(bad, match):
    from mllm.schema import from_dict

    with pytest.raises(ConfigError, match=match):
        from_dict(MoESpec, bad, "moe")


# ---------------------------------------------------------------------------------- no host syncs


class HostSyncDetector(torch.overrides.TorchFunctionMode):
    """Records tensor ops that force a device->host sync on CUDA (value reads, data-dependent shapes)."""

    SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
               torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.nonzero, torch.nonzero, torch.bincount,
               torch.Tensor.bincount, torch.unique, torch.Tensor.unique, torch.masked_select,
               torch.Tensor.masked_select, torch.repeat_interleave, torch.Tensor.repeat_interleave}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNCING:
            self.calls.append(getattr(func, "__name__", str(func)))
        if func is torch.Tensor.__getitem__ and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.calls.append("boolean-mask indexing")
        return func(*args, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"implementation": "grouped_mm"}, {"capacity_factor": 1.0}, {"routing": "expert_choice", "capacity_factor": 1.0},
    {"shared_experts": 1, "router_jitter": 0.01, "router_noise": 0.1, "implementation": "grouped_mm"},
], ids=["dropless-grouped", "capacity", "expert-choice", "shared+noise"])
def test_moe_forward_and_backward_make_no_host_sync_calls(kwargs):
    """What runs on CUDA must not wait for the device: no .item()/.tolist(), no nonzero / bincount / boolean
    indexing (data-dependent shapes). The per-expert loop (a fallback) is the documented exception."""
    mlp = llama_mlp()
    block = MoEBlock(MoESpec(**kwargs), 32, 64, mlp.act_fn)
    block.init_random(0.1, torch.Generator().manual_seed(0))
    x, context = tokens(seq=16)
    block.routing_context = context
    block.train()
    detector = HostSyncDetector()
    with detector:
        out = block(x.requires_grad_())
        (out.square().sum() + block.aux_loss).backward()
    assert detector.calls == []
    # The detector does see syncs: the loop fallback splits on host-side counts.
    loop = MoEBlock(MoESpec(implementation="loop"), 32, 64, mlp.act_fn)
    loop.init_random(0.1)
    loop.routing_context = context
    with HostSyncDetector() as seen:
        loop(x)
    assert "tolist" in seen.calls
