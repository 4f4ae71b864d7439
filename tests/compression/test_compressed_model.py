"""Compression inside the model: token counts, bit-exact identity at ratio 1.0, training, cached
generation, save / load, the builder and recipe errors, the Llava export's refusal and FLOP counts.

Tiny fp32 models with every weight randomised (tests/conftest.py). Grids: 48 px / patch 8 = 6 x 6 (the
processor's image size, for generation), and 56 px / patch 8 = 7 x 7 = 49 patches (an odd side).
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, SiglipVisionConfig

from mllm.builder import ModelSpec, build_model_and_processor
from mllm.compression import COMPRESSORS
from mllm.configuration import MLLMConfig, OpenCLIPVisionConfig
from mllm.export.llava import check_llava_exportable, to_llava
from mllm.modeling import IGNORE_INDEX, MLLMForConditionalGeneration
from mllm.processing import MLLMProcessor
from mllm.schema import ConfigError, from_dict
from mllm.train import flops
from mllm.train.flops import batch_flops
from tests.test_modeling import PROMPTS, generate, right_padded_batch
from tests.train.test_flops import all_pairs, counter, module_flops, unpadded_batch

METHODS = sorted(COMPRESSORS)
IMAGE_TOKEN_ID = 4


def vision_config(kind: str, tiny, image_size: int = 48, patch_size: int = 8):
    if kind == "open_clip":
        cfg = tiny.open_clip_model_cfg()
        cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": image_size, "patch_size": patch_size}
        return OpenCLIPVisionConfig(model_name=f"mllm-test-vit-{image_size}-{patch_size}", model_cfg=cfg)
    overrides = dict(image_size=image_size, patch_size=patch_size)
    return tiny.siglip_config(**overrides) if kind == "siglip" else tiny.clip_config(**overrides)


def model(tiny, compression: dict | None, vision: str = "clip", image_size: int = 48, seed: int = 1,
          **kwargs) -> MLLMForConditionalGeneration:
    config = MLLMConfig(vision_config=vision_config(vision, tiny, image_size), text_config=tiny.text_config(),
                        image_token_id=IMAGE_TOKEN_ID, compression=compression, **kwargs)
    torch.manual_seed(seed)
    return tiny.randomise(MLLMForConditionalGeneration(config), seed).eval()


def pixels(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("vision", ["clip", "siglip", "open_clip"])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_num_image_tokens_is_what_encode_images_returns(tiny, method, vision, strategy):
    m = model(tiny, {"method": method, "ratio": 0.25}, vision, image_size=56, vision_feature_select_strategy=strategy)
    with torch.no_grad():
        features = m.model.encode_images(pixels(2, 56))
    has_cls = vision != "siglip"
    want = (16 if method in ("pool", "pixel_shuffle") else 12) + (has_cls and strategy == "full")  # 7 x 7 grid
    assert m.config.num_image_tokens == want
    assert features.shape == (2, want, m.config.text_config.hidden_size)


def test_pixel_shuffle_widens_the_projector_input(tiny):
    m = model(tiny, {"method": "pixel_shuffle", "ratio": 0.25})
    assert m.model.multi_modal_projector.linear_1.in_features == 4 * m.config.vision_config.hidden_size
    assert model(tiny, {"method": "pool", "ratio": 0.25}).model.multi_modal_projector.linear_1.in_features == 48


# ---------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_ratio_one_model_equals_the_uncompressed_model_bit_for_bit(tiny, method, strategy):
    dense = model(tiny, None, vision_feature_select_strategy=strategy)
    same = model(tiny, {"method": method, "ratio": 1.0}, seed=5, vision_feature_select_strategy=strategy)
    same.load_state_dict(dense.state_dict(), strict=True)  # same keys and shapes: compression has no weights
    assert same.config.num_image_tokens == dense.config.num_image_tokens
    input_ids, attention_mask = right_padded_batch(dense.config.vocab_size, dense.config.num_image_tokens)
    with torch.no_grad():
        want = dense(input_ids=input_ids, pixel_values=pixels(2, 48), attention_mask=attention_mask).logits
        got = same(input_ids=input_ids, pixel_values=pixels(2, 48), attention_mask=attention_mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_compression_changes_what_the_llm_sees(tiny):
    """The identity test above can fail: at ratio 0.25 the image features really are different."""
    dense = model(tiny, None)
    pooled = model(tiny, {"method": "pool", "ratio": 0.25})
    pooled.load_state_dict(dense.state_dict())
    with torch.no_grad():
        a = dense.model.encode_images(pixels(1, 48))
        b = pooled.model.encode_images(pixels(1, 48))
    assert a.shape[1] == 36 and b.shape[1] == 9
    # Pooling after the projector: token 0 is the mean of the projected 2 x 2 top-left window.
    torch.testing.assert_close(b[0, 0], a[0, [0, 1, 6, 7]].mean(0), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", METHODS)
def test_a_compressed_model_trains(tiny, method):
    m = model(tiny, {"method": method, "ratio": 0.25}, seed=2).train()
    k = m.config.num_image_tokens
    assert k == 9
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(9, m.config.vocab_size, (4, 12), generator=generator)
    input_ids = torch.cat([text[:, :2], torch.full((4, k), IMAGE_TOKEN_ID), text[:, 2:]], dim=1)
    labels = input_ids.clone()
    labels[:, : 2 + k] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "pixel_values": pixels(4, 48), "labels": labels}
    optimizer = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = m(**batch).loss
        loss.backward()
        if not losses:  # gradients reach the tower through the merge (indices are not differentiable)
            assert m.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
            assert m.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_uncached(tiny, tokenizer, synth_world, method):
    m = model(tiny, {"method": method, "ratio": 0.25})
    processor = tiny.processor(tokenizer, m.config)
    assert processor.num_image_tokens == 9
    batch = processor(images=tiny.images(synth_world, 2), text=PROMPTS)
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == 2 * 9
    cached, cached_logits = generate(m, batch, use_cache=True)
    uncached, uncached_logits = generate(m, batch, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=1e-5, rtol=0)
    assert not torch.equal(cached[0], cached[1])  # not a degenerate model


# ---------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("method", METHODS)
def test_save_and_from_pretrained_round_trip(tiny, tokenizer, tmp_path, method):
    section = {"method": method, "ratio": 0.25} if method != "vmtc" else {"method": "vmtc", "tokens": 7,
                                                                          "primary": 0.25, "iterations": 2}
    m = model(tiny, section, vision_feature_select_strategy="full")
    processor = tiny.processor(tokenizer, m.config)
    m.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MLLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_processor = MLLMProcessor.from_pretrained(tmp_path)
    assert loaded.config.compression == m.config.compression
    assert loaded.config.compression["method"] == method  # the whole section, defaults included
    assert loaded.config.num_image_tokens == m.config.num_image_tokens == loaded_processor.num_image_tokens
    assert type(loaded.model.token_compressor) is type(m.model.token_compressor)
    input_ids, attention_mask = right_padded_batch(m.config.vocab_size, m.config.num_image_tokens)
    with torch.no_grad():
        want = m(input_ids=input_ids, pixel_values=pixels(2, 48), attention_mask=attention_mask).logits
        got = loaded(input_ids=input_ids, pixel_values=pixels(2, 48), attention_mask=attention_mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- builder / recipe


TINY_CLIP = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "image_size": 48, "patch_size": 8}
TINY_TEXT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4}


def test_builder_passes_the_section_and_the_processor_expands_to_k(tokenizer_dir, synth_world, tiny):
    spec = from_dict(ModelSpec, {"vision": {"type": "clip", "config": TINY_CLIP}, "text": {"config": TINY_TEXT},
                                 "tokenizer": str(tokenizer_dir),
                                 "compression": {"method": "tome", "ratio": 0.25}})
    m, processor = build_model_and_processor(spec)
    assert m.config.compression["method"] == "tome" and m.config.compression["ratio"] == 0.25
    assert processor.num_image_tokens == m.config.num_image_tokens == 9  # 36 patches -> 9
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]
    encoded = processor.encode_conversation(messages, num_images=1)
    assert encoded["input_ids"].count(IMAGE_TOKEN_ID) == 9 and sum(encoded["modality_ids"]) == 9
    batch = processor(images=tiny.images(synth_world, 1), text=PROMPTS[:1])
    with torch.no_grad():
        assert torch.isfinite(m(**batch).logits).all()


@pytest.mark.parametrize(("section", "pattern"), [
    ({"method": "pool", "ratio": 0.3}, r"^model\.compression: ratio 0\.3 is not 1/n"),
    ({"method": "tome"}, r"^model\.compression: give exactly one of ratio"),
    ({"method": "tome", "ratio": 0.5, "keep": 3}, r"unknown config key 'model\.compression\.keep'"),
])
def test_recipe_errors_name_the_key(section, pattern):
    from mllm.train.config import RunConfig

    with pytest.raises(ConfigError, match=pattern):
        from_dict(RunConfig, {"model": {"compression": section}, "stages": []})


def test_init_from_cannot_change_the_saved_compression():
    with pytest.raises(ConfigError, match="init_from loads the saved model with its own config; remove "
                                          "model.compression"):
        from_dict(ModelSpec, {"init_from": "runs/x", "compression": {"method": "pool", "ratio": 0.25}})


def test_cls_saliency_on_siglip_is_rejected_at_config_time(tiny):
    with pytest.raises(ValueError, match="saliency 'cls' needs a vision tower with a CLS token; SigLIP has none"):
        MLLMConfig(vision_config=tiny.siglip_config(), text_config=tiny.text_config(),
                   compression={"method": "vmtc", "ratio": 0.25, "saliency": "cls"})


# ---------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_plain_llava_export_refuses_compression(tiny, ratio):
    """Plain Llava has no compressor: even ratio 1.0 (numerically the identity) is refused, as every set section
    is, naming the remote-code format that carries it (tests/export/test_export_remote.py)."""
    m = model(tiny, {"method": "tome", "ratio": ratio})
    with pytest.raises(ValueError, match=r"cannot export .* the 'compression' section is set .* export with "
                                         r"--format mllm"):
        check_llava_exportable(m.config, remote_code=False)
    check_llava_exportable(m.config, remote_code=True)
    with pytest.raises(ValueError, match="'compression' section is set"):
        to_llava(m)


# ---------------------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("method", METHODS)
def test_flops_count_the_compressed_tokens(tiny, method):
    """Per module, our count equals FlopCounterMode's: the projector runs on every patch (pool, tome, vmtc:
    compression after it) or on K 4x-wide tokens (pixel_shuffle); the LLM on K image tokens per image."""
    m = model(tiny, {"method": method, "ratio": 0.25})
    ids = unpadded_batch(m.config)  # K = 9 image tokens per row
    assert flops.image_tokens_per_image(m.config) == m.config.num_image_tokens == 9
    with counter() as fc, torch.no_grad():
        m(input_ids=ids, pixel_values=pixels(2, 48))
    ours = batch_flops(m.config, ids, **all_pairs(ids))  # infers 2 images from 18 image tokens
    assert ours.vision == module_flops(fc, "model.vision_tower")
    assert ours.projector == module_flops(fc, "model.multi_modal_projector")
    assert ours.llm_matmul + ours.llm_attention == (module_flops(fc, "model.language_model")
                                                    + module_flops(fc, "lm_head"))
    expected_projector_tokens = 9 if method == "pixel_shuffle" else 36
    assert flops.projector_tokens_per_image(m.config) == expected_projector_tokens
