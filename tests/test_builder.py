"""`ModelSpec` validation and `build_model_and_processor` from local folders (offline).

Pretrained parts are tiny randomised models saved here with `save_pretrained` / `torch.save`; the
built model must hold exactly those weights (compared tensor by tensor), not a fresh init.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel, LlamaForCausalLM

from mllm.builder import ModelSpec, build_model_and_processor
from mllm.configuration import OpenCLIPVisionConfig
from mllm.modeling import MLLMForConditionalGeneration
from mllm.schema import ConfigError, from_dict
from mllm.tokenizer import IMAGE_TOKEN, load_tokenizer


def spec(**data) -> ModelSpec:
    return from_dict(ModelSpec, data)


def assert_same_weights(got: torch.nn.Module | dict, want: torch.nn.Module | dict):
    got = got if isinstance(got, dict) else got.state_dict()
    want = want if isinstance(want, dict) else want.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"text": {"name": "some/lm", "config": {"model_type": "llama"}}}, r"^text: give exactly one of `name`"),
        ({"text": {}}, r"^text: give exactly one of `name`"),
        ({"text": {"config": {"hidden_size": 32}}}, r"^text: config needs a model_type"),
        ({"vision": {"type": "open_clip"}}, r"^vision: name is required for open_clip towers"),
        ({"vision": {"type": "clip"}}, r"^vision: a clip tower needs `name`"),
        ({"vision": {"type": "siglip", "name": "x", "pretrained": "w.pt"}},
         r"^vision: model_cfg / pretrained apply to open_clip towers only"),
        ({"vision": {"type": "eva", "name": "x"}}, r"^vision\.type: 'eva' is not allowed; choose one of 'open_clip', "),
        ({"projector": {"depth": 0}}, r"^projector: depth must be >= 1, got 0"),
        ({"vision": {"name": "x", "layer": -2}}, r"unknown config key 'vision\.layer'; valid keys under 'vision': "),
    ],
)
def test_spec_validation_errors(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        spec(**data)


TINY_CLIP = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "image_size": 48, "patch_size": 16}


def test_spec_errors_inside_a_run_config_name_the_full_path():
    from mllm.train.config import RunConfig

    with pytest.raises(ConfigError, match=r"^model\.text: give exactly one of `name`"):
        from_dict(RunConfig, {"model": {"text": {}}, "stages": []})


def test_backbone_from_config_needs_a_tokenizer():
    s = spec(vision={"type": "clip", "config": TINY_CLIP},
             text={"config": {"model_type": "llama", "hidden_size": 32}})
    with pytest.raises(ConfigError, match="model.tokenizer is required"):
        build_model_and_processor(s)


def test_vocab_smaller_than_the_tokenizer_is_rejected(tokenizer_dir):
    s = spec(vision={"type": "clip", "config": TINY_CLIP},
             text={"config": {"model_type": "llama", "hidden_size": 32, "vocab_size": 100}},
             tokenizer=str(tokenizer_dir))
    with pytest.raises(ConfigError, match=r"text\.config\.vocab_size 100 < tokenizer size 320"):
        build_model_and_processor(s)


def test_vision_config_model_type_must_match_the_type(tokenizer_dir):
    text = {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 4}}
    # A matching model_type (as in a saved config's to_dict()) is accepted ...
    model, processor = build_model_and_processor(spec(
        vision={"type": "clip", "config": {**TINY_CLIP, "model_type": "clip_vision_model"}}, text=text,
        tokenizer=str(tokenizer_dir)))
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.vision_config.num_hidden_layers == 2
    assert processor.num_image_tokens == 9
    # ... a different one is a user error, not a TypeError.
    mismatch = r"vision\.config\.model_type 'siglip_vision_model' does not match vision\.type 'clip'"
    with pytest.raises(ConfigError, match=mismatch):
        build_model_and_processor(spec(
            vision={"type": "clip", "config": {**TINY_CLIP, "model_type": "siglip_vision_model"}}, text=text,
            tokenizer=str(tokenizer_dir)))


def test_vision_name_of_the_wrong_kind_is_rejected(tiny, tmp_path, tokenizer_dir):
    LlamaForCausalLM(tiny.text_config()).save_pretrained(tmp_path / "lm")
    s = spec(vision={"type": "clip", "name": str(tmp_path / "lm")}, text={"name": str(tmp_path / "lm")},
             tokenizer=str(tokenizer_dir))
    with pytest.raises(ConfigError, match="is a llama, not a clip vision model"):
        build_model_and_processor(s)


# ---------------------------------------------------------------------------------------- local folders


@pytest.fixture(scope="module")
def saved_parts(tiny, tokenizer_dir, tmp_path_factory):
    """A tiny CLIP tower and two tiny Llama LMs (full vocab, and 20 tokens short) saved to folders."""
    root = tmp_path_factory.mktemp("pretrained")
    vision = tiny.randomise(CLIPVisionModel(tiny.clip_config()), seed=11).eval()
    vision.save_pretrained(root / "clip")
    vocab = len(load_tokenizer(tokenizer_dir))
    lms = {}
    for name, size in (("lm", vocab), ("lm_short", vocab - 20)):
        lm = tiny.randomise(LlamaForCausalLM(tiny.text_config(vocab_size=size)), seed=12).eval()
        lm.save_pretrained(root / name)
        lms[name] = lm
    return root, vision, lms


def test_build_from_local_folders_loads_the_saved_weights(saved_parts, tokenizer_dir, synth_world, tiny):
    root, vision, lms = saved_parts
    s = spec(vision={"type": "clip", "name": str(root / "clip")}, text={"name": str(root / "lm")},
             tokenizer=str(tokenizer_dir))
    torch.manual_seed(99)
    model, processor = build_model_and_processor(s)
    lm = lms["lm"]

    assert isinstance(model, MLLMForConditionalGeneration)
    assert_same_weights(model.model.vision_tower, vision)
    assert_same_weights(model.model.language_model, lm.model)
    assert_same_weights(model.lm_head, lm.lm_head)
    assert model.config.text_config.hidden_size == lm.config.hidden_size
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert processor.num_image_tokens == model.config.num_image_tokens == 9

    # The built pair runs end to end, and its LM is the saved LM (text-only logits match it exactly).
    batch = processor(images=tiny.images(synth_world, 1), text=["<|user|>\n<image>\nWhat?<|end|>\n"])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
        ids = torch.tensor([[10, 20, 30, 40]])
        torch.testing.assert_close(model(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_build_resizes_a_backbone_with_a_smaller_vocab(saved_parts, tokenizer_dir):
    root, _, lms = saved_parts
    lm = lms["lm_short"]
    s = spec(vision={"type": "clip", "name": str(root / "clip")}, text={"name": str(root / "lm_short")},
             tokenizer=str(tokenizer_dir))
    model, processor = build_model_and_processor(s)
    vocab = len(processor.tokenizer)
    assert model.config.vocab_size == model.config.text_config.vocab_size == vocab
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == vocab
    old = lm.config.vocab_size
    assert torch.equal(model.get_input_embeddings().weight[:old], lm.get_input_embeddings().weight)
    assert torch.equal(model.lm_head.weight[:old], lm.lm_head.weight)
    assert_same_weights(model.model.language_model.layers, lm.model.layers)


def test_build_open_clip_tower_from_a_local_weights_file(tiny, tmp_path, tokenizer_dir):
    from mllm.vision.open_clip_tower import create_open_clip_model

    name, model_cfg = "mllm-test-builder-vit", tiny.open_clip_model_cfg()
    clip = create_open_clip_model(OpenCLIPVisionConfig(model_name=name, model_cfg=model_cfg))
    tiny.randomise(clip, seed=21)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")

    vision = {"type": "open_clip", "name": name, "model_cfg": model_cfg, "pretrained": str(tmp_path / "clip.pt")}
    s = spec(vision=vision,
             text={"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 4}},
             tokenizer=str(tokenizer_dir))
    torch.manual_seed(5)
    model, processor = build_model_and_processor(s)
    assert_same_weights(model.model.vision_tower.visual, clip.visual)
    # The weights now live in the model: the saved config must not point back at the file.
    assert model.config.vision_config.pretrained is None
    assert model.config.vision_config.hidden_size == model_cfg["vision_cfg"]["width"]
    assert processor.num_image_tokens == model.config.num_image_tokens == 9

    model.save_pretrained(tmp_path / "built")
    (tmp_path / "clip.pt").unlink()  # reloading needs nothing but the checkpoint
    torch.manual_seed(6)
    loaded = MLLMForConditionalGeneration.from_pretrained(tmp_path / "built")
    assert_same_weights(loaded, model)
