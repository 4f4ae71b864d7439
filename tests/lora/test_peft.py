"""LoRA / DoRA through PEFT on our model: anchored targets, MoE experts as targets, and the three ways to
compute the adapted model agreeing (adapter forward, our merge + saved adapter, PEFT's merge_and_unload)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from mllm.schema import ConfigError, from_dict
from mllm.sparse import MoESpec
from mllm.sparse.upcycle import build_moe_layers
from mllm.train.lora import PeftSpec, apply_peft, check_quantization, lora_module_names, merged_and_adapter

ATOL = 1e-4  # fp32; merging adds B @ A into W, the adapter path computes x W + (x A) B: ~1e-6 apart


def moe_model(tiny, seed=0):
    model = tiny.model("clip", "llama", seed=seed)
    build_moe_layers(model.model.language_model, MoESpec(experts={"text": 2, "image": 2}, top_k=1).to_config(), 0.02)
    model.config.moe = MoESpec(experts={"text": 2, "image": 2}, top_k=1).to_config()
    return tiny.randomise(model, seed).eval()


def inputs(tiny, model, n=2):
    ids = torch.randint(5, 200, (n, 24), generator=torch.Generator().manual_seed(3))
    tokens = model.config.num_image_tokens
    ids[:, 2:2 + tokens] = model.config.image_token_id
    return {"input_ids": ids, "pixel_values": tiny.pixel_values(n), "attention_mask": torch.ones_like(ids)}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomise_adapters(peft_model, seed=1):
    """LoRA B starts at zero (the adapted model equals the base); move every adapter weight off its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def test_default_targets_stay_in_the_language_model(tiny):
    model = tiny.model("clip", "llama")
    vision_q = [n for n, _ in model.named_modules() if n.startswith("model.vision_tower") and n.endswith("q_proj")]
    assert vision_q  # short names alone would hit the vision tower too
    peft_model = apply_peft(model, PeftSpec())
    names = lora_module_names(peft_model)
    assert names and all(n.startswith("model.language_model.layers.") for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)


def test_a_regex_reaching_the_vision_tower_is_refused(tiny):
    with pytest.raises(ConfigError, match="outside the language model.*vision_tower"):
        apply_peft(tiny.model("clip", "llama"), PeftSpec(target_regex=r".*\.(q_proj|v_proj)"))


@pytest.mark.parametrize("method, experts", [("lora", False), ("dora", False), ("lora", True)])
def test_adapter_equals_merged_equals_merge_and_unload(tiny, tmp_path, method, experts):
    base = moe_model(tiny) if experts else tiny.model("clip", "llama")
    spec = PeftSpec(method=method, dropout=0.0, expert_targets=["gate_proj", "up_proj", "down_proj"] if experts else [],
                    modules_to_save=["multi_modal_projector", "router"] if experts else ["multi_modal_projector"])
    peft_model = apply_peft(copy.deepcopy(base), spec).eval()
    randomise_adapters(peft_model)
    with torch.no_grad():  # modules_to_save train a copy: move it so a merge that drops it is caught
        for module in peft_model.modules():
            if type(module).__name__ == "ModulesToSaveWrapper":
                for p in module.modules_to_save.parameters():
                    p.mul_(1.5)
    if experts:
        assert any(".mlp.experts" in n for n in lora_module_names(peft_model))
    batch = inputs(tiny, base)
    adapted = logits(peft_model, batch)
    assert (adapted - logits(base, batch)).abs().max() > 1e-2  # the adapters do something

    merged_by_peft = copy.deepcopy(peft_model).merge_and_unload()
    torch.testing.assert_close(logits(merged_by_peft, batch), adapted, atol=ATOL, rtol=0)

    merged_state = merged_and_adapter(copy.deepcopy(peft_model), tmp_path / "adapter")
    ours = copy.deepcopy(base)
    ours.load_state_dict(merged_state)
    torch.testing.assert_close(logits(ours, batch), adapted, atol=ATOL, rtol=0)
    assert not any("lora_" in k or "base_layer" in k for k in merged_state)

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, batch), adapted, atol=ATOL, rtol=0)


def test_qlora_needs_a_gpu_and_bitsandbytes_and_says_so(monkeypatch):
    import importlib.util

    spec = PeftSpec(quantize="4bit")
    check_quantization(PeftSpec())  # plain LoRA needs neither
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="QLoRA.*CUDA GPU.*quantize: none"):
        check_quantization(spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        check_quantization(spec)


@pytest.mark.parametrize("data, message", [
    ({"expert_targets": ["w1"]}, "expert_targets.*gate_proj"),
    ({"method": "dora", "expert_targets": ["up_proj"]}, "DoRA"),
    ({"r": 0}, "r must be >= 1"),
    ({"target_regex": "("}, "not a valid regex"),
    ({"targets": []}, "nothing would be adapted"),
    ({"rank": 8}, "rank"),
])
def test_bad_peft_sections_name_the_problem(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PeftSpec, data, "stages.1.peft")
