"""`MLLMForConditionalGeneration` against references: transformers' Llava (same weights, same logits),
uncached generation (cached must match it), single-row generation (left-padded batches must match),
a manual cross-entropy (the loss), and itself before save / after load.

Every model is fp32 with all weights randomised (norm scales and biases included), so a swapped,
skipped or mis-initialised tensor changes the numbers. Tolerances: fp32 matmuls summed in a different
order (SDPA vs eager, cached vs full attention) differ by ~1e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaConfig, LlavaForConditionalGeneration

from mllm.modeling import IGNORE_INDEX, MLLMForConditionalGeneration

ATOL = 1e-5
IMAGE_TOKEN_ID = 4  # <image> in our tokenizers (special tokens come first; conftest checks it)
PROMPTS = [
    "<|user|>\n<image>\nWhat color is the circle?<|end|>\n<|assistant|>\n",
    "<|system|>\nBe brief.<|end|>\n<|user|>\nLook: <image>\nshape?<|end|>\n<|assistant|>\n",
]
NEW_TOKENS = 8


def llava_twin(model: MLLMForConditionalGeneration) -> LlavaForConditionalGeneration:
    """transformers' Llava with our model's weights (the module names are the same, no key mapping)."""
    config = model.config
    llava_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=False,
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    # strict: every key of ours exists in Llava and vice versa, with the same shapes.
    llava.load_state_dict(model.state_dict(), strict=True)
    return llava


def right_padded_batch(vocab_size: int, num_image_tokens: int, pad_id: int = 0):
    """Two rows of different length and image position, right-padded, with a mask."""
    generator = torch.Generator().manual_seed(3)

    def text(n):  # ordinary tokens: above the 9 special ids
        return torch.randint(9, vocab_size, (n,), generator=generator).tolist()

    image = [IMAGE_TOKEN_ID] * num_image_tokens
    rows = [image + text(7), text(3) + image + text(2)]
    width = max(map(len, rows))
    input_ids = torch.full((2, width), pad_id)
    attention_mask = torch.zeros((2, width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    assert attention_mask[1].sum() < width  # row 1 really is padded
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_logits_equal_transformers_llava(tiny, strategy):
    model = tiny.model("clip", seed=1, vision_feature_select_strategy=strategy)
    llava = llava_twin(model)
    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, model.config.num_image_tokens)
    pixel_values = tiny.pixel_values(2)
    with torch.no_grad():
        ours = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits
        theirs = llava(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits
        # The comparison can fail: other pixels give other logits (the image really is read).
        other = model(input_ids=input_ids, pixel_values=tiny.pixel_values(2, seed=9),
                      attention_mask=attention_mask).logits
    assert ours.shape == theirs.shape == (*input_ids.shape, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (ours - other).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------- generation


def generate(model, inputs, use_cache: bool):
    out = model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache,
        # A random model may emit <image>; uncached decoding would then re-read it as an image slot.
        suppress_tokens=[IMAGE_TOKEN_ID], output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)  # [B, N], [B, N, V]


@pytest.mark.parametrize("vision", ["clip", "open_clip"])
def test_cached_generation_equals_uncached_and_unbatched(tiny, tokenizer, synth_world, vision):
    model = tiny.model(vision, seed=1)
    processor = tiny.processor(tokenizer, model.config)
    images = tiny.images(synth_world, 2)
    batch = processor(images=images, text=PROMPTS)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is exercised

    cached, cached_logits = generate(model, batch, use_cache=True)
    uncached, uncached_logits = generate(model, batch, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=ATOL, rtol=0)
    # Not a degenerate model: the rows differ, and neither repeats one token.
    assert not torch.equal(cached[0], cached[1])
    assert all(len(set(row.tolist())) > 1 for row in cached)

    # Each left-padded row generates what it generates alone (positions and mask honour the padding).
    for i, (prompt, image) in enumerate(zip(PROMPTS, images)):
        single, single_logits = generate(model, processor(images=[image], text=[prompt]), use_cache=True)
        assert torch.equal(single[0], cached[i])
        torch.testing.assert_close(single_logits[0], cached_logits[i], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- errors


def test_image_token_and_feature_count_mismatch_raises(tiny):
    model = tiny.model("clip")
    n = model.config.num_image_tokens
    input_ids = torch.tensor([[10] + [IMAGE_TOKEN_ID] * (2 * n) + [11]])  # two images' worth of tokens
    with pytest.raises(ValueError, match=rf"{2 * n} image tokens but 1 image\(s\) give {n} features"):
        model(input_ids=input_ids, pixel_values=tiny.pixel_values(1))
    # One token short of one image: also rejected, never truncated.
    with pytest.raises(ValueError, match=rf"{n - 1} image tokens but 1 image\(s\) give {n} features"):
        model(input_ids=input_ids[:, : n], pixel_values=tiny.pixel_values(1))


def test_image_tokens_without_pixel_values_raise(tiny):
    model = tiny.model("clip")
    input_ids = torch.tensor([[10] + [IMAGE_TOKEN_ID] * model.config.num_image_tokens + [11]])
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(input_ids=input_ids)
    model(input_ids=torch.tensor([[10, 11, 12]]))  # text-only input is fine


# ---------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("vision", ["clip", "open_clip"])
def test_save_and_from_pretrained_round_trip(tiny, tmp_path, vision):
    model = tiny.model(vision, seed=1)
    model.save_pretrained(tmp_path)
    torch.manual_seed(1234)  # a fresh random init would differ from the saved weights
    loaded = MLLMForConditionalGeneration.from_pretrained(tmp_path).eval()

    assert type(loaded.model.vision_tower) is type(model.model.vision_tower)
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    for key in saved:
        assert torch.equal(saved[key], reloaded[key]), key
    assert loaded.config.num_image_tokens == model.config.num_image_tokens

    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, model.config.num_image_tokens)
    pixel_values = tiny.pixel_values(2)
    with torch.no_grad():
        want = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits
        got = loaded(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- backbones


def test_qwen2_backbone_forward_and_generate(tiny, tokenizer, synth_world):
    model = tiny.model("clip", text="qwen2", seed=1)
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    assert model.model.language_model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's qkv bias
    processor = tiny.processor(tokenizer, model.config)
    batch = processor(images=tiny.images(synth_world, 2), text=PROMPTS)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    cached, cached_logits = generate(model, batch, use_cache=True)
    uncached, uncached_logits = generate(model, batch, use_cache=False)
    assert cached.shape == (2, NEW_TOKENS)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("vision", ["clip", "siglip", "open_clip"])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_num_image_tokens_matches_the_features(tiny, vision, strategy):
    model = tiny.model(vision, vision_feature_select_strategy=strategy)
    config = model.config
    with torch.no_grad():
        features = model.model.encode_images(tiny.pixel_values(2))  # [N_img, tokens, D_text]
    patches = (48 // 16) ** 2
    has_cls = vision != "siglip"
    assert config.num_image_tokens == patches + (has_cls and strategy == "full")
    assert features.shape == (2, config.num_image_tokens, config.text_config.hidden_size)


def test_hidden_size_is_the_text_hidden_size(tiny):
    config = tiny.config("clip")
    assert config.vision_config.hidden_size != config.text_config.hidden_size  # the check can fail
    assert config.hidden_size == config.text_config.hidden_size == 32
    assert config.vocab_size == config.text_config.vocab_size


# ---------------------------------------------------------------------------------------- loss / grads


def test_loss_is_mean_shifted_cross_entropy_and_gradients_flow(tiny):
    model = tiny.model("clip", seed=2).train()
    n = model.config.num_image_tokens
    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, n)
    labels = input_ids.clone()
    labels[input_ids == IMAGE_TOKEN_ID] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    labels[0, n : n + 3] = IGNORE_INDEX  # a "prompt" that is not trained on
    out = model(input_ids=input_ids, pixel_values=tiny.pixel_values(2), attention_mask=attention_mask,
                labels=labels)

    # Reference: token t predicts label t + 1; mean over the targets that are not -100.
    log_probs = out.logits.float().log_softmax(-1)  # [B, T, V]
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != IGNORE_INDEX:
                terms.append(-log_probs[b, t, labels[b, t + 1]])
    assert len(terms) == int((labels[:, 1:] != IGNORE_INDEX).sum()) > 0
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), atol=1e-6, rtol=1e-6)
    # Unshifted CE would be a different number (the shift matters here).
    unshifted = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert abs(unshifted.item() - out.loss.item()) > 1e-3

    out.loss.backward()
    named = dict(model.named_parameters())
    for prefix in ("model.multi_modal_projector.", "model.language_model.", "lm_head.",
                   "model.vision_tower.embeddings."):
        params = {k: p for k, p in named.items() if k.startswith(prefix)}
        assert params, prefix
        for name, param in params.items():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    # vision_feature_layer=-2: the last vision block and post_layernorm are outside the graph.
    last = f"model.vision_tower.encoder.layers.{model.config.vision_config.num_hidden_layers - 1}."
    unused = [k for k in named if k.startswith(last) or ".post_layernorm." in k]
    assert unused and all(named[k].grad is None for k in unused)
