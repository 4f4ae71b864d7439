"""Visual-token pruning inside the LLM (FastV text-guided pruning, DyVTE-style visual-token exit).

References:
- keep 1.0 / closed exit gates: the dense model, bit for bit;
- a pruned model equals the dense model run layer by layer with the dropped image tokens masked out as keys
  from the pruning layer on (no compaction, no gathered positions): kept tokens' logits agree, for the
  backbone's SDPA, MMA, the interval reference backend and the Triton kernel (interpreter on CPU);
- the compacted windows are the full layout restricted to the kept tokens (causal, MMA, packed);
- the text-guided scores equal the prompt's attention to the image tokens read from eager attention
  probabilities; answers after the assistant header never change the selection;
- cached and uncached generation agree (fastv and exit, left-padded batches);
- exit gates: labels from forced exits, gates learn them, save / load round-trips.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mllm.attention.layout import compute_layout, dense_mask
from mllm.compression import convert as compress
from mllm.compression.config import CompressionSpec
from mllm.compression.pruning import (PrunedLayer, TokenPruningSpec, compact, convert, pruned_layers, pruning_stats,
                                      pruning_summary)
from mllm.configuration import MLLMConfig
from mllm.modeling import MLLMForConditionalGeneration
from mllm.schema import ConfigError
from tests.test_modeling import generate

LAYERS = 4


def build(tiny, tokenizer, seed: int = 1, attention: dict | None = None, **text):
    """A tiny model with a 4-layer LLM (pruning after layer 2 leaves two layers to prune)."""
    if attention is not None:
        attention = {**attention, "assistant_token_id": tokenizer.convert_tokens_to_ids("<|assistant|>")}
    config = MLLMConfig(vision_config=tiny.clip_config(), text_config=tiny.text_config(num_hidden_layers=LAYERS, **text),
                        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), attention=attention)
    torch.manual_seed(seed)
    return tiny.randomise(MLLMForConditionalGeneration(config), seed).eval()


def spec(tokenizer, **kwargs) -> TokenPruningSpec:
    return TokenPruningSpec(assistant_token_id=tokenizer.convert_tokens_to_ids("<|assistant|>"), **kwargs)


QUESTIONS = ("What colour is the shape?", "Is there a circle in the top left corner of this image?")


def chat_batch(tiny, tokenizer, synth_world, model, answers: tuple[str, ...] | None = None):
    """Two chat prompts of different length (left padding), with or without an answer after the header."""
    processor = tiny.processor(tokenizer, model.config)
    texts = []
    for i, question in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answers is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[i]}]})
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=answers is None))
    batch = processor(images=tiny.images(synth_world, 2), text=texts)
    batch.pop("modality_ids")
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is exercised
    return dict(batch)


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


# ---------------------------------------------------------------------------------------- identity


def test_keep_one_and_closed_exit_gates_are_the_dense_model(tiny, tokenizer, synth_world):
    dense = build(tiny, tokenizer)
    batch = chat_batch(tiny, tokenizer, synth_world, dense)
    reference = logits(dense, batch)
    for settings in (dict(method="fastv", layer=1, keep=1.0), dict(method="exit")):
        pruned = copy.deepcopy(dense)
        candidates = convert(pruned, spec(tokenizer, **settings))
        assert candidates == ([1] if settings["method"] == "fastv" else [1, 2, 3])
        assert all(isinstance(layer, PrunedLayer) for layer in pruned.model.language_model.layers[1:])
        assert torch.equal(logits(pruned, batch), reference), settings  # the dense layers themselves ran
    assert pruned_layers(dense) == []


# ---------------------------------------------------------------------------------------- references


def masked_reference(model, batch, keep: torch.Tensor, first: int, mode: str, tokenizer) -> torch.Tensor:
    """The dense model layer by layer on the full sequence, the dropped tokens masked out as keys in layers >=
    `first`: what pruning must compute for the kept tokens, without compaction or gathered positions."""
    inner, lm = model.model, model.model.language_model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = inner.merge_image_features(ids, inner.get_input_embeddings()(ids), inner.encode_images(batch["pixel_values"]))
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)  # generation-style positions under left padding
    layout = compute_layout(mask, (ids == model.config.image_token_id).long(),
                            ids == tokenizer.convert_tokens_to_ids("<|assistant|>"), mode=mode)
    full = dense_mask(layout)  # [B, T, T]
    rotary = lm.rotary_emb(embeds, position_ids)
    hidden = embeds
    for i, layer in enumerate(lm.layers):
        allowed = full if i < first else full & keep[:, None, :]
        allowed = allowed | torch.eye(ids.shape[1], dtype=torch.bool)  # padding rows: not NaN (never compared)
        base = type(layer).__mro__[2] if isinstance(layer, PrunedLayer) else type(layer)  # the backbone's layer
        hidden = base.forward(layer, hidden, attention_mask=allowed[:, None], position_ids=position_ids,
                              position_embeddings=rotary)
    return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("attention", [None, {"mode": "mma", "backend": "sdpa"},
                                       {"mode": "causal", "backend": "reference"},
                                       {"mode": "mma", "backend": "triton"}],
                         ids=["sdpa", "mma", "interval", "mma-triton"])  # triton: the interpreter on CPU
def test_fastv_equals_dense_with_dropped_keys_masked(tiny, tokenizer, synth_world, attention):
    width = {"hidden_size": 64} if (attention or {}).get("backend") == "triton" else {}  # head dim 16 for Triton
    model = build(tiny, tokenizer, attention=attention, **width)
    convert(model, spec(tokenizer, method="fastv", layer=2, keep=0.3))
    batch = chat_batch(tiny, tokenizer, synth_world, model)
    batch["position_ids"] = (batch["attention_mask"].long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        state = model.model.pruning_state
        image = state.image
        keep = state.keep
        assert ((keep & image).sum(1) == torch.ceil(image.sum(1) * 0.3)).all()  # each row keeps its quota
        assert (keep | image).all()  # text and padding always stay
        reference = masked_reference(model, batch, keep, 2, (attention or {}).get("mode", "causal"), tokenizer)
    real = batch["attention_mask"].bool() & keep
    torch.testing.assert_close(out.logits[real], reference[real], atol=2e-5, rtol=0)
    # Dropped tokens leave the sequence: their hidden states stop changing at layer 2.
    dropped = image & ~keep
    for after in out.hidden_states[3:-1]:  # outputs of layers 2 and 3 (the last entry is normed)
        assert torch.equal(after[dropped], out.hidden_states[2][dropped])


@pytest.mark.parametrize("mode", ["causal", "mma", "packed"])
def test_compacted_windows_are_the_full_layout_restricted_to_kept_tokens(mode):
    generator = torch.Generator().manual_seed(0)
    B, T = 3, 24
    image = torch.zeros(B, T, dtype=torch.long)
    image[:, 2:12] = 1
    assistant = torch.zeros(B, T, dtype=torch.bool)
    assistant[:, 15] = True
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    documents = torch.cat([torch.zeros(B, 14), torch.ones(B, 10)], 1).long() if mode == "packed" else None
    layout = compute_layout(mask, image, assistant, mode="causal" if mode == "packed" else mode,
                            document_ids=documents)
    keep = ~(image.bool() & (torch.rand(B, T, generator=generator) < 0.6))
    c = compact(keep, layout)
    full = dense_mask(layout)
    rows = full.gather(1, c.index[..., None].expand(-1, -1, T))
    expected = rows.gather(2, c.index[:, None, :].expand(-1, c.index.shape[1], -1))
    expected &= c.slot_valid[:, :, None] & c.slot_valid[:, None, :]
    assert torch.equal(dense_mask(c.layout), expected)
    # Kept tokens first, in their original order.
    for b in range(B):
        n = int(keep[b].sum())
        assert torch.equal(c.index[b, :n], keep[b].nonzero().squeeze(1))


def test_text_guided_scores_are_the_prompts_attention_to_image_tokens(tiny, tokenizer, synth_world):
    """The cheap scoring pass against the probabilities eager attention materialises."""
    model = build(tiny, tokenizer)
    model.model.language_model.config._attn_implementation = "eager"  # returns its probabilities
    n = 4
    pruning = spec(tokenizer, method="fastv", layer=2, keep=0.4, query_tokens=n)
    batch = chat_batch(tiny, tokenizer, synth_world, model)
    dense = copy.deepcopy(model)
    captured = {}
    hook = dense.model.language_model.layers[2].self_attn.register_forward_hook(
        lambda m, args, out: captured.update(probs=out[1]))
    assert dense.model.language_model.config._attn_implementation == "eager"
    logits(dense, batch, output_attentions=True)
    hook.remove()
    convert(model, pruning)
    logits(model, batch)
    state = model.model.pruning_state
    probs = captured["probs"]  # [B, H, T, T]
    ids = batch["input_ids"]
    image = ids == model.config.image_token_id
    for b in range(ids.shape[0]):
        header = int((ids[b] == pruning.assistant_token_id).nonzero()[0])
        text = (~image[b] & batch["attention_mask"][b].bool()).nonzero().squeeze(1)
        queries = text[text <= header][-n:]
        assert torch.equal(state.query_index[b][state.query_valid[b]], queries)
        to_image = probs[b][:, queries][..., image[b]]  # [H, n, I]
        score = (to_image / to_image.sum(-1, keepdim=True)).mean(0).sum(0)  # [I]
        quota = math.ceil(int(image[b].sum()) * 0.4)
        expected = image[b].nonzero().squeeze(1)[score.topk(quota).indices].sort().values
        assert torch.equal((state.keep[b] & image[b]).nonzero().squeeze(1), expected)


def test_answers_after_the_assistant_header_do_not_steer_the_selection(tiny, tokenizer, synth_world):
    model = build(tiny, tokenizer)
    convert(model, spec(tokenizer, method="fastv", layer=1, keep=0.3))
    kept = []
    for answers in (("red", "yes"), ("a blue square on the left", "no, it is at the bottom right")):
        batch = chat_batch(tiny, tokenizer, synth_world, model, answers=answers)
        logits(model, batch)
        state = model.model.pruning_state
        kept.append([row[img].tolist() for row, img in zip(state.keep, state.image)])
    assert kept[0] == kept[1]


# ---------------------------------------------------------------------------------------- generation


def open_gates(model, batch, seed: int = 0) -> None:
    """Trained-looking exit gates: the first gated layer lets one row's image tokens leave and keeps the
    other's, every later gate fires (so rows leave at different layers)."""
    generator = torch.Generator().manual_seed(seed)
    gated = [layer for _, layer in pruned_layers(model) if hasattr(layer, "exit_gate")]
    with torch.no_grad():
        for layer in gated:
            layer.exit_gate.weight.copy_(torch.randn(layer.exit_gate.weight.shape, generator=generator))
            layer.exit_gate.bias.fill_(50.0)
        gated[0].exit_gate.bias.zero_()
        logits(model, batch)
        first = model.model.pruning_state.gate_logits[gated[0].self_attn.layer_idx]  # [B]
        assert first[0] != first[1]
        gated[0].exit_gate.bias.fill_(-float(first.max() + first.min()) / 2)  # between the rows


@pytest.mark.parametrize("settings,attention", [
    (dict(method="fastv", layer=2, keep=0.3), None),
    (dict(method="fastv", layer=1, keep=0.5), {"mode": "mma", "backend": "reference"}),
    (dict(method="exit"), None),
], ids=["fastv-sdpa", "fastv-mma-interval", "exit"])
def test_cached_generation_equals_uncached_with_pruning(tiny, tokenizer, synth_world, settings, attention):
    model = build(tiny, tokenizer, attention=attention)
    convert(model, spec(tokenizer, **settings))
    batch = chat_batch(tiny, tokenizer, synth_world, model)
    if settings["method"] == "exit":
        open_gates(model, batch)
    logits(model, batch)  # the prefill alone: what it drops
    state = model.model.pruning_state
    cached, cached_logits = generate(model, batch, use_cache=True)
    uncached, uncached_logits = generate(model, batch, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=1e-5, rtol=0)
    assert state.keep is not None and not (state.keep | ~state.image).all()  # image tokens really were dropped
    if settings["method"] == "exit":  # one row's image tokens left at layer 1, the other's at layer 2
        pruning_stats(model)  # reset the counters
        logits(model, batch)
        kept = pruning_summary(model, pruning_stats(model))["kept_fraction"]
        assert kept == [pytest.approx(0.5), 0.0, 0.0]


# ---------------------------------------------------------------------------------------- exit gates


def test_exit_labels_come_from_forced_exits_and_gates_learn_them(tiny, tokenizer, synth_world):
    model = build(tiny, tokenizer, seed=2)
    with torch.no_grad():  # layer 3's attention adds nothing: image tokens leaving there change nothing
        model.model.language_model.layers[3].self_attn.o_proj.weight.zero_()
    convert(model, spec(tokenizer, method="exit", exit_layers=[1, 3]))
    batch = chat_batch(tiny, tokenizer, synth_world, model, answers=("red square", "yes"))
    ids = batch["input_ids"]
    answer = (ids == tokenizer.convert_tokens_to_ids("<|assistant|>")).long().cumsum(1) > 0  # header and after
    labels = torch.where(answer & (batch["attention_mask"] == 1), ids, -100)  # the assistant turns, as in training
    # Labels by hand: does exiting at layer l change any target-token prediction?
    full = logits(model, batch)[:, :-1].argmax(-1)
    targets = labels[:, 1:] != -100
    expected = torch.stack([((logits(model, batch, prune_force_exit=layer)[:, :-1].argmax(-1) == full) | ~targets).all(1)
                            for layer in (1, 3)], 1).float()
    assert torch.equal(expected, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))  # layer 1 matters, layer 3 does not
    for param in model.parameters():
        param.requires_grad_(False)
    gates = model.model.exit_gate_parameters()
    assert len(gates) == 4  # weight and bias at layers 1 and 3
    for param in gates:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(gates, lr=0.05)
    model.train()
    losses = []
    for _ in range(40):
        out = model(**batch, labels=labels)
        losses.append(float(out.aux_loss.detach()))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    logits(model, batch)
    gate = torch.stack([model.model.pruning_state.gate_logits[layer] for layer in (1, 3)], 1)
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal((gate > 0).float(), expected)  # the gates now predict the forced-exit labels


def test_pruned_model_round_trips_through_save_pretrained(tiny, tokenizer, synth_world, tmp_path):
    model = build(tiny, tokenizer)
    convert(model, spec(tokenizer, method="exit", exit_layers=[2]))
    batch = chat_batch(tiny, tokenizer, synth_world, model)
    open_gates(model, batch)
    model.save_pretrained(tmp_path)
    loaded = MLLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.token_pruning == model.config.token_pruning
    assert torch.equal(logits(loaded, batch), logits(model, batch))


# ---------------------------------------------------------------------------------------- settings


def test_bad_settings_are_refused(tiny, tokenizer):
    with pytest.raises(ConfigError, match="keep must be in"):
        TokenPruningSpec(keep=0.0).validate()
    with pytest.raises(ConfigError, match="layer must be >= 1"):
        TokenPruningSpec(layer=0).validate()
    with pytest.raises(ConfigError, match="do not exist"):
        convert(build(tiny, tokenizer), spec(tokenizer, method="fastv", layer=LAYERS))
    with pytest.raises(ConfigError, match="unknown key|valid"):
        TokenPruningSpec.from_config({"method": "fastv", "ratio": 0.5})
    flash = build(tiny, tokenizer)
    flash.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="attention implementations"):
        convert(flash, spec(tokenizer))


def test_pixel_shuffle_conversion_starts_as_pooling_before_the_projector(tiny, tokenizer):
    model = build(tiny, tokenizer)
    pooled = copy.deepcopy(model)
    assert compress(model, CompressionSpec(method="pixel_shuffle", ratio=0.25)) == model.config.num_image_tokens
    pixels = tiny.pixel_values(2)
    with torch.no_grad():
        features = model.model.encode_images(pixels)  # [N, K, D]
        tower = pooled.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # [N, P, Dv]
        side = math.isqrt(tower.shape[1])
        grid = tower.view(2, side, side, -1)
        window = grid[:, :2, :2].mean((1, 2))  # the first (full) 2x2 window, averaged
        expected = pooled.model.multi_modal_projector(window)
    torch.testing.assert_close(features[:, 0], expected, atol=1e-5, rtol=0)
