"""Mixture-of-Depths over image tokens and Mixture-of-Head attention against the dense model.

- capacity 1 with the gate off equals the dense model; MoH with every head active equals dense;
- skipped image tokens' hidden states are bit-identical across a routed layer; kept tokens keep their
  position ids; the kept queries' attention windows are the full layout's rows (causal, MMA, packed);
- cached and uncached generation agree; save / from_pretrained round-trips; routers train.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mllm.attention.layout import compute_layout, dense_mask
from mllm.modeling import MLLMForConditionalGeneration
from mllm.schema import ConfigError, from_dict
from mllm.sparse.depth import convert
from mllm.sparse.mod import MoDLayer, MoDSpec, flat_rows, gather_rows, mod_layers, take_rows
from mllm.sparse.moh import MoHSpec, moh_modules
from tests.test_modeling import generate, right_padded_batch

ATOL = 1e-5


def inputs(tiny, model):
    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, model.config.num_image_tokens)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": tiny.pixel_values(2)}


def hidden_states(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def real(batch):
    return batch["attention_mask"].bool()


def randomise_routers(model, std: float = 0.5) -> None:
    """Trained-looking routers (they start at zero): distinct scores, gates and head weights away from 1."""
    with torch.no_grad():
        for _, layer in mod_layers(model):
            layer.mod_router.weight.normal_(0, std)
        for _, attn in moh_modules(model):
            attn.moh_router.weight.normal_(0, std)


def test_capacity_one_without_gate_equals_dense(tiny):
    dense = tiny.model("clip", seed=1)
    routed = copy.deepcopy(dense)
    assert convert(routed, mod=MoDSpec(capacity=1.0, gate="none", skip_first=0)) == {"mod": [0, 1]}
    batch = inputs(tiny, dense)
    diff = (logits(routed, batch) - logits(dense, batch))[real(batch)].abs().max()
    assert diff < 1e-6, diff  # same math; only SDPA's masked-vs-causal summation order differs


def test_conversion_starts_with_gate_one_and_moves_when_capacity_drops(tiny):
    dense = tiny.model("clip", seed=1)
    batch = inputs(tiny, dense)
    full = copy.deepcopy(dense)
    convert(full, mod=MoDSpec(capacity=1.0, skip_first=0))  # tanh gate, zero router: g = 1 exactly
    torch.testing.assert_close(logits(full, batch), logits(dense, batch), atol=1e-6, rtol=0)
    sparse = copy.deepcopy(dense)
    convert(sparse, mod=MoDSpec(capacity=0.25, skip_first=0))
    assert (logits(sparse, batch) - logits(dense, batch))[real(batch)].abs().max() > 1e-4


def test_skipped_tokens_pass_a_routed_layer_bit_identical(tiny):
    model = tiny.model("clip", seed=1)
    convert(model, mod=MoDSpec(capacity=0.25, skip_first=1))  # layer 1 routed, layer 0 dense
    with torch.no_grad():  # a trained-looking router: distinct scores, gates away from 1
        model.model.language_model.layers[1].mod_router.weight.normal_(0, 0.5)
    batch = inputs(tiny, model)
    seen = {}
    layer = model.model.language_model.layers[1]
    hook = layer.register_forward_hook(lambda m, args, kwargs, out: seen.update(before=args[0], after=out),
                                       with_kwargs=True)
    logits(model, batch)
    hook.remove()
    before, after = seen["before"], seen["after"]  # input / output of the routed layer
    image = batch["input_ids"] == model.config.image_token_id
    changed = (after != before).any(-1)  # [B, T]
    per_row = image.sum(1)
    kept = torch.ceil(per_row * 0.25).long()
    assert torch.equal((changed & image).sum(1), kept)  # exactly the quota of image tokens ran
    skipped = image & ~changed
    assert torch.equal(after[skipped], before[skipped])  # bit-identical, not merely close
    assert changed[~image & real(batch)].all()  # every real text token ran
    stats = layer.mod_stats
    assert stats[0] == image.sum() and stats[1] == kept.sum()


def test_row_indexing_equals_gather_forward_and_backward():
    """The index_select / index_copy row helpers the routed and pruned layers use equal gather / scatter."""
    torch.manual_seed(0)
    B, T, D = 3, 7, 5
    index = torch.stack([torch.randperm(T)[:4] for _ in range(B)])
    for x in (torch.randn(B, T, D), torch.randn(1, T, D), torch.randn(B, T)):
        x.requires_grad_(True)
        full = x.expand(B, *x.shape[1:])
        expanded = index.view(B, 4, *([1] * (x.dim() - 2))).expand(B, 4, *x.shape[2:])
        ours, ref = gather_rows(x, index), full.gather(1, expanded)
        assert torch.equal(ours, ref)
        weights = torch.randn_like(ref)
        (g_ours,) = torch.autograd.grad((ours * weights).sum(), x)
        (g_ref,) = torch.autograd.grad((ref * weights).sum(), x)
        assert torch.allclose(g_ours, g_ref)
    hidden, update = torch.randn(B, T, D), torch.randn(B, 4, D)
    flat = flat_rows(index, T)
    assert torch.equal(take_rows(hidden, flat, (B, 4, D)), hidden.gather(1, index[..., None].expand(-1, -1, D)))
    written = hidden.reshape(B * T, D).index_copy(0, flat, update.reshape(-1, D)).view(B, T, D)
    assert torch.equal(written, hidden.scatter(1, index[..., None].expand(-1, -1, D), update))


def test_kept_queries_see_the_full_layouts_rows(tiny):
    """The kept tokens' key windows equal the full layout restricted to them (causal, MMA, packed)."""
    torch.manual_seed(0)
    B, T = 2, 12
    modality = torch.zeros(B, T, dtype=torch.long)
    modality[0, 2:6] = 1
    modality[1, 5:9] = 1
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0
    assistant = torch.zeros(B, T, dtype=torch.bool)
    assistant[:, 10] = True
    documents = torch.tensor([[0] * 7 + [1] * 5, [0] * 12])
    index = torch.tensor([[0, 1, 3, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 6, 9, 10, 11]])
    from mllm.sparse.routing import RoutingContext

    context = RoutingContext(modality, mask.bool())
    for layout in (compute_layout(mask, modality, assistant, mode="mma"),
                   compute_layout(mask, modality, None, mode="causal", document_ids=documents)):
        full = dense_mask(layout)  # [B, T, T]
        rows = MoDLayer._key_windows(index, T, context, layout)
        assert torch.equal(rows, full.gather(1, index[..., None].expand(-1, -1, T)))
    # Without a layout (the backbone's causal attention): causal and padding keys excluded.
    rows = MoDLayer._key_windows(index, T, context, None)
    keys = torch.arange(T)
    assert torch.equal(rows[1, 8], (keys <= 11) & mask[1].bool())


@pytest.mark.parametrize("attention", [None, {"mode": "mma", "backend": "reference"}])
def test_kept_tokens_get_exactly_the_dense_layer_output(tiny, tokenizer, attention):
    """With the gate off, a kept token's output is the dense layer's output at that token: its query keeps
    its original position (rotary angle), sees the same keys (skipped tokens included) through the full
    layout's window, and runs the same FFN. A wrong position, window or compaction would show here."""
    kwargs = {}
    if attention is not None:
        kwargs["attention"] = {**attention, "assistant_token_id": tokenizer.convert_tokens_to_ids("<|assistant|>")}
    dense = tiny.model("clip", seed=1, **kwargs)
    routed = copy.deepcopy(dense)
    convert(routed, mod=MoDSpec(capacity=0.3, skip_first=0, gate="none"))
    randomise_routers(routed)
    batch = inputs(tiny, dense)
    seen = {}
    for name, model in (("dense", dense), ("routed", routed)):
        layer = model.model.language_model.layers[0]
        hook = layer.register_forward_hook(lambda m, args, kw, out, name=name: seen.update({name: (args[0], out)}),
                                           with_kwargs=True)
        logits(model, batch)
        hook.remove()
    (before, dense_out), (routed_before, routed_out) = seen["dense"], seen["routed"]
    assert torch.equal(before, routed_before)  # layer 0's input: the same embeddings
    image = batch["input_ids"] == dense.config.image_token_id
    changed = (routed_out != before).any(-1)
    kept = changed & real(batch)
    assert ((kept & image).sum(1) == torch.ceil(image.sum(1) * 0.3)).all() and (kept & ~image).any()
    torch.testing.assert_close(routed_out[kept], dense_out[kept], atol=1e-6, rtol=0)
    assert torch.equal(routed_out[image & ~changed], before[image & ~changed])


@pytest.mark.parametrize("attention", [None, {"mode": "mma", "backend": "sdpa"}])
def test_cached_generation_equals_uncached_with_mod(tiny, tokenizer, synth_world, attention):
    kwargs = {}
    if attention is not None:
        kwargs["attention"] = {**attention, "assistant_token_id": tokenizer.convert_tokens_to_ids("<|assistant|>")}
    model = tiny.model("clip", seed=1, **kwargs)
    convert(model, mod=MoDSpec(capacity=0.3, skip_first=0), moh=MoHSpec(top_k=2, shared_heads=1))
    randomise_routers(model)
    processor = tiny.processor(tokenizer, model.config)
    # Chat prompts: MMA lets image tokens see the question up to the assistant turn, never the answer.
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                             add_generation_prompt=True) for q in ("What is this?", "Describe it")]
    batch = processor(images=tiny.images(synth_world, 2), text=prompts)
    batch.pop("modality_ids")  # uncached steps recompute it from input_ids (the batch's copy would not grow)
    cached, cached_logits = generate(model, batch, use_cache=True)
    uncached, uncached_logits = generate(model, batch, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=ATOL, rtol=0)


def test_moh_with_every_head_and_unit_weights_equals_dense(tiny):
    dense = tiny.model("clip", seed=1)
    moh = copy.deepcopy(dense)
    convert(moh, moh=MoHSpec(top_k=4))  # 4 heads, zero router: weight (1/4) / 1 * 4 = 1 exactly
    batch = inputs(tiny, dense)
    torch.testing.assert_close(logits(moh, batch), logits(dense, batch), atol=1e-6, rtol=0)
    sparse = copy.deepcopy(dense)
    convert(sparse, moh=MoHSpec(top_k=2, shared_heads=1))
    randomise_routers(sparse)
    assert (logits(sparse, batch) - logits(dense, batch)).abs().max() > 1e-3
    usage = moh_modules(sparse)[0][1].moh_usage  # tokens per routed head (3 routed, top-2 each)
    assert usage.sum() == 2 * real(batch).sum() and usage.shape == (3,)


def test_save_and_from_pretrained_round_trip(tiny, tmp_path):
    model = tiny.model("clip", seed=1)
    convert(model, mod=MoDSpec(capacity=0.5, schedule="cosine", final_capacity=0.2, skip_first=0),
            moh=MoHSpec(top_k=3))
    randomise_routers(model)
    model.save_pretrained(tmp_path)
    loaded = MLLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert [m.mod_capacity for _, m in mod_layers(loaded)] == pytest.approx([0.5, 0.2])
    batch = inputs(tiny, model)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)


def test_routers_get_gradients_and_train(tiny):
    model = tiny.model("clip", seed=1)
    convert(model, mod=MoDSpec(capacity=0.5, skip_first=0), moh=MoHSpec(top_k=2))
    assert len(mod_layers(model)) == 2
    batch = inputs(tiny, model)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    model.train()
    model(**batch, labels=labels).loss.backward()
    # The last layer's image-token outputs reach no loss (no later layer reads them): no gradient there.
    for _, layer in mod_layers(model)[:-1]:
        assert layer.mod_router.weight.grad.abs().sum() > 0
    for _, attn in moh_modules(model):
        assert attn.moh_router.weight.grad.abs().sum() > 0


def test_capacity_schedule_and_layer_choice():
    spec = MoDSpec(capacity=0.85, schedule="cosine", final_capacity=0.15, skip_first=2)
    caps = spec.capacities(8)
    assert list(caps) == [2, 3, 4, 5, 6, 7]
    assert caps[2] == pytest.approx(0.85) and caps[7] == pytest.approx(0.15)
    assert all(a > b for a, b in zip(list(caps.values()), list(caps.values())[1:]))  # decays with depth
    assert MoDSpec(layers="every_other", skip_first=0).layer_indices(6) == [1, 3, 5]
    assert MoDSpec(layers=[0, 2, -1], skip_first=1).layer_indices(4) == [2, 3]


@pytest.mark.parametrize("cls, data, message", [
    (MoDSpec, {"capacity": 0}, "capacity must be in"),
    (MoDSpec, {"schedule": "cosine"}, "final_capacity"),
    (MoDSpec, {"final_capacity": 0.1}, "cosine only"),
    (MoHSpec, {"top_k": 0}, "top_k"),
])
def test_bad_sections_name_the_problem(cls, data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(cls, data, "mod")


def test_mod_moh_export_matches_and_loads_back(tiny, tokenizer, synth_world, tmp_path):
    """The remote-code export carries MoD and MoH (mllm's own sources, flattened), and reads back."""
    from transformers import AutoModelForImageTextToText

    from mllm.export import save_export
    from mllm.export.from_llava import load_llava_as_mllm

    model = tiny.model("clip", seed=1)
    convert(model, mod=MoDSpec(capacity=0.3, skip_first=0), moh=MoHSpec(top_k=2, shared_heads=1))
    randomise_routers(model)
    processor = tiny.processor(tokenizer, model.config)
    out = save_export(model, processor, tmp_path / "export")
    exported = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    batch = processor(images=tiny.images(synth_world, 2), text=["<image>What is this?", "Describe <image> now"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    want = logits(model, inputs)
    torch.testing.assert_close(logits(exported, inputs), want, atol=ATOL, rtol=0)
    back, _ = load_llava_as_mllm(out)
    assert back.config.mod == model.config.mod and back.config.moh == model.config.moh
    torch.testing.assert_close(logits(back, inputs), want, atol=ATOL, rtol=0)
