"""`apply_fused_kernels` against the model it was applied to: the same logits and every gradient, the same
state_dict, the same greedy generations (cached = uncached), untouched MoE blocks, and no effect on any
other model in the process. Spies prove the fused ops really run (a swap that did nothing would pass
every equality). fp32 throughout; on CPU "auto" runs the kernels' PyTorch twins, which are the
transformers formulas op for op, so before/after differences are 0 (ATOL is only a guard).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

import mllm.fused as fused_module
from mllm.fused import FusedGatedMLP, FusedRMSNorm, apply_fused_kernels
from mllm.kernels.dispatch import triton_import_error
from mllm.modeling import IGNORE_INDEX
from mllm.sparse import MoEBlock
from tests.test_modeling import PROMPTS, generate, right_padded_batch

ATOL = 1e-6
IMAGE_TOKEN_ID = 4


def batch(tiny, model) -> dict:
    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, model.config.num_image_tokens)
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == IMAGE_TOKEN_ID), IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": tiny.pixel_values(2),
            "labels": labels}


def logits_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(reference, fused, inputs, atol=ATOL) -> None:
    want_logits, want_grads = logits_and_grads(reference, inputs)
    got_logits, got_grads = logits_and_grads(fused, inputs)
    torch.testing.assert_close(got_logits, want_logits, atol=atol, rtol=0)
    assert got_grads.keys() == want_grads.keys()
    # Every LLM parameter gets a gradient (the vision layers past the feature layer get none, both sides).
    assert all(n in want_grads for n, _ in reference.named_parameters() if n.startswith("model.language_model."))
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def spies(monkeypatch) -> dict[str, int]:
    """Count calls of the kernels as mllm.fused calls them (`reset(spies)` after applying: the
    equivalence probes call them too)."""
    calls = {"rms_norm": 0, "swiglu": 0, "apply_rope": 0}
    for name in calls:
        original = getattr(fused_module, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(fused_module, name, spy)
    return calls


def reset(spies: dict[str, int]) -> None:
    spies.update(dict.fromkeys(spies, 0))


# ---------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_logits_and_every_gradient_equal_after_fusing(tiny, spies, text):
    reference = tiny.model("clip", text=text, seed=1).train()
    model = tiny.model("clip", text=text, seed=1).train()
    summary = apply_fused_kernels(model)
    reset(spies)
    layers = model.config.text_config.num_hidden_layers
    assert len(summary["rms_norm"]) == 2 * layers + 1 and len(summary["swiglu"]) == len(summary["rope"]) == layers
    assert summary["skipped"] == {}
    assert all(name.startswith("model.language_model.") for op in ("rms_norm", "swiglu", "rope")
               for name in summary[op])  # the vision tower is not touched
    inputs = batch(tiny, model)
    assert_same_training_step(reference, model, inputs)
    # The fused path ran (one forward): every norm, every MLP, every attention layer.
    assert spies == {"rms_norm": 2 * layers + 1, "swiglu": layers, "apply_rope": layers}


def test_state_dict_parameters_and_idempotence(tiny):
    model = tiny.model("clip", seed=1)
    before = model.state_dict()
    params = list(model.parameters())
    norm_weight = model.model.language_model.layers[0].input_layernorm.weight
    apply_fused_kernels(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # The same Parameter objects: an optimizer built before the swap still updates the model.
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert model.model.language_model.layers[0].input_layernorm.weight is norm_weight

    again = apply_fused_kernels(model)
    assert again == {"rms_norm": [], "swiglu": [], "rope": [], "skipped": {}}
    assert list(model.state_dict()) == list(before)
    layer = model.model.language_model.layers[0]
    assert type(layer.self_attn).__mro__[1] is LlamaAttention  # not a subclass of a subclass
    # A later call with another backend switches it rather than stacking wrappers.
    apply_fused_kernels(model, backend="reference")
    assert layer.input_layernorm.backend == layer.mlp.backend == type(layer.self_attn).fused_backend == "reference"


def test_other_models_in_the_process_are_untouched(tiny, spies):
    rope = modeling_llama.apply_rotary_pos_emb
    apply_fused_kernels(tiny.model("clip", seed=1))
    reset(spies)
    assert modeling_llama.apply_rotary_pos_emb is rope  # no global patch
    other = tiny.model("clip", seed=1)
    assert type(other.model.language_model.layers[0].self_attn) is LlamaAttention
    with torch.no_grad():
        other(**{k: v for k, v in batch(tiny, other).items() if k != "labels"})
    assert spies == {"rms_norm": 0, "swiglu": 0, "apply_rope": 0}


def test_fused_model_copies_and_pickles(tiny):
    model = tiny.model("clip", seed=1)
    apply_fused_kernels(model)
    inputs = {k: v for k, v in batch(tiny, model).items() if k != "labels"}
    clone = copy.deepcopy(model)
    attn = pickle.loads(pickle.dumps(model.model.language_model.layers[0].self_attn))
    assert type(attn) is type(model.model.language_model.layers[0].self_attn)
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- generation


def test_greedy_generation_unchanged_and_cached_equals_uncached(tiny, tokenizer, synth_world):
    model = tiny.model("clip", seed=1)
    processor = tiny.processor(tokenizer, model.config)
    inputs = processor(images=tiny.images(synth_world, 2), text=PROMPTS)
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padding is exercised
    before, before_logits = generate(model, inputs, use_cache=True)
    apply_fused_kernels(model)
    cached, cached_logits = generate(model, inputs, use_cache=True)
    uncached, uncached_logits = generate(model, inputs, use_cache=False)
    assert torch.equal(cached, before) and torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, before_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=1e-5, rtol=0)  # test_modeling's tolerance
    assert not torch.equal(cached[0], cached[1])  # not a degenerate model


# ---------------------------------------------------------------------------------------- what is left alone


def test_moe_blocks_are_left_alone_and_attention_experts_get_rope(tiny, spies):
    moe = {"layers": [1], "experts": {"text": 2, "image": 2}, "top_k": 2, "shared_experts": 1,
           "attention_experts": 2, "implementation": "loop"}
    reference = tiny.model("clip", seed=1, moe=moe).train()
    model = tiny.model("clip", seed=1, moe=moe).train()
    block = model.model.language_model.layers[1].mlp
    shared = block.shared_expert  # a gated MLP inside the MoE block: would match if the walk went in
    summary = apply_fused_kernels(model)
    reset(spies)
    layers = model.model.language_model.layers
    assert layers[1].mlp is block and block.shared_expert is shared and type(shared).__name__ == "GatedMLP"
    assert isinstance(layers[0].mlp, FusedGatedMLP)
    assert summary["skipped"] == {"model.language_model.layers.1.mlp": summary["skipped"][
        "model.language_model.layers.1.mlp"]} and isinstance(block, MoEBlock)
    assert "model.language_model.layers.1.self_attn" in summary["rope"]  # BAM attention experts
    assert_same_training_step(reference, model, batch(tiny, model))
    assert spies["apply_rope"] == 2 and spies["swiglu"] == 1


class OffsetRMSNorm(nn.Module):
    """Gemma's norm: scales by 1 + weight, a different formula behind the same attribute names."""

    def __init__(self, norm: LlamaRMSNorm):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1.0 + self.weight) * h.to(x.dtype)


def test_lookalikes_with_another_formula_are_skipped(tiny):
    reference = tiny.model("clip", seed=1).train()
    model = tiny.model("clip", seed=1).train()
    for m in (reference, model):
        layer = m.model.language_model.layers[0]
        layer.input_layernorm = OffsetRMSNorm(layer.input_layernorm)
        layer.mlp.act_fn = nn.GELU()  # a GELU gated MLP (GeGLU): swiglu would be wrong
    summary = apply_fused_kernels(model)
    layer = model.model.language_model.layers[0]
    assert isinstance(layer.input_layernorm, OffsetRMSNorm) and isinstance(layer.mlp, LlamaMLP)
    assert set(summary["skipped"]) == {"model.language_model.layers.0.input_layernorm",
                                       "model.language_model.layers.0.mlp"}
    assert all("formula" in reason for reason in summary["skipped"].values())
    assert isinstance(model.model.language_model.layers[1].mlp, FusedGatedMLP)  # the rest is fused
    assert_same_training_step(reference, model, batch(tiny, model))


def test_ops_subset_and_bad_arguments(tiny):
    model = tiny.model("clip", seed=1)
    summary = apply_fused_kernels(model, ops=["rms_norm"])
    assert summary["swiglu"] == summary["rope"] == [] and len(summary["rms_norm"]) == 5
    assert isinstance(model.model.language_model.norm, FusedRMSNorm)
    assert type(model.model.language_model.layers[0].self_attn) is LlamaAttention
    with pytest.raises(ValueError, match="valid ops: rms_norm, swiglu, rope"):
        apply_fused_kernels(model, ops=["layer_norm"])
    with pytest.raises(ValueError, match="valid backends"):
        apply_fused_kernels(model, backend="cuda")
    with pytest.raises(TypeError, match="language_model"):
        apply_fused_kernels(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------- Triton


@pytest.mark.skipif(triton_import_error() is not None, reason="Triton is not importable")
def test_triton_backend_in_the_interpreter(tiny, spies):
    """The Triton kernels themselves (TRITON_INTERPRET=1, set by conftest) inside the model. fp32 kernels
    reduce in another order than the twins: differences ~1e-7, far below any wiring bug's O(1)."""
    reference = tiny.model("clip", seed=1).train()
    model = tiny.model("clip", seed=1).train()
    apply_fused_kernels(model, backend="triton")
    reset(spies)
    assert_same_training_step(reference, model, batch(tiny, model), atol=1e-5)
    assert spies["rms_norm"] == 5 and spies["apply_rope"] == 2 and spies["swiglu"] == 2
