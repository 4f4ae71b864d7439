"""Image settings travel with the processor: `image_aspect` / `anyres_grids` round-trip through
save_pretrained / from_pretrained, the trainer puts data.image_aspect on the processor it trains with and
on the one it saves, and eval of a saved pad-trained model pads (the pixels the model receives are
compared with a pad reference built here).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mllm.data.sources import LlavaJsonSource
from mllm.processing import MLLMProcessor, pad_to_square
from mllm.schema import ConfigError, from_dict
from mllm.train.config import DataSpec, RunConfig
from mllm.train.evaluate import evaluate, load_for_inference
from mllm.train.objectives import ContrastiveObjective, LMObjective
from mllm.train.trainer import build_stage_model, save_model_folder

RED, BLUE = (200, 20, 20), (20, 20, 200)
PROMPT = "<|user|>\n<image>\nWhat color?<|end|>\n<|assistant|>\n"


def wide_image() -> Image.Image:
    """96 x 48 red with a blue stripe at the left edge: `resize` crops the stripe away, `pad` keeps it."""
    image = Image.new("RGB", (96, 48), RED)
    image.paste(Image.new("RGB", (8, 48), BLUE), (0, 0))
    return image


def pad_reference(processor, image) -> torch.Tensor:
    fill = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    return processor.image_processor(images=[pad_to_square(image, fill)], return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(("aspect", "grids"), [("pad", None), ("anyres", [[3, 1], [2, 1], [1, 1]])])
def test_settings_round_trip_through_save_pretrained(tiny, tokenizer, tmp_path, aspect, grids):
    processor = tiny.processor(tokenizer, tiny.config())
    processor.configure_images(aspect, grids)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_aspect"] == aspect and saved["anyres_grids"] == processor.anyres_grids
    loaded = MLLMProcessor.from_pretrained(tmp_path)
    assert (loaded.image_aspect, loaded.anyres_grids, loaded.num_image_tokens) == (
        aspect, processor.anyres_grids, processor.num_image_tokens)
    images = [wide_image(), Image.new("RGB", (150, 48), BLUE)]  # anyres: 2 x 1 and 3 x 1 (not a default grid)
    want = processor(images=images, text=[PROMPT, PROMPT])
    got = loaded(images=images, text=[PROMPT, PROMPT])
    for key in want:
        assert torch.equal(want[key], got[key]), key
    if aspect == "anyres":
        assert want["pixel_values"].shape[0] == (1 + 2) + (1 + 3)
    # A folder saved before these settings existed loads as `resize`, as it was trained.
    del saved["image_aspect"], saved["anyres_grids"]
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    assert MLLMProcessor.from_pretrained(tmp_path).image_aspect == "resize"


def test_processor_preprocesses_with_its_own_aspect_by_default(tiny, tokenizer):
    processor = tiny.processor(tokenizer, tiny.config())
    assert processor.image_aspect == "resize"
    image = wide_image()
    resized = processor.preprocess_images([image])
    processor.configure_images("pad")
    torch.testing.assert_close(processor.preprocess_images([image]), pad_reference(processor, image))
    assert not torch.allclose(resized, pad_reference(processor, image))
    torch.testing.assert_close(processor.preprocess_images([image], aspect="resize"), resized)  # per-call override
    with pytest.raises(ValueError, match="unknown image aspect 'crop'; choose one of resize, pad, anyres"):
        processor.configure_images("crop")
    with pytest.raises(ValueError, match=r"anyres_grids: \[0, 2\] must be \[columns, rows\]"):
        processor.configure_images("anyres", [[0, 2]])
    assert processor.image_aspect == "pad"  # a rejected setting changes nothing


def test_data_spec_keys_are_checked():
    spec = from_dict(DataSpec, {"image_aspect": "anyres", "anyres_grids": [[1, 3], [3, 1]]})
    assert (spec.image_aspect, spec.anyres_grids) == ("anyres", [[1, 3], [3, 1]])
    assert from_dict(DataSpec, {}).anyres_grids == [[1, 2], [2, 1], [2, 2]]
    with pytest.raises(ConfigError, match=r"anyres_grids: \[2\] must be \[columns, rows\]"):
        from_dict(DataSpec, {"anyres_grids": [[2]]})
    with pytest.raises(ConfigError, match=r"anyres_grids: \[2, 1\] is listed twice"):
        from_dict(DataSpec, {"anyres_grids": [[2, 1], [2, 1]]})
    with pytest.raises(ConfigError, match="'resize', 'pad', 'anyres'"):
        from_dict(DataSpec, {"image_aspect": "crop"})


# ---------------------------------------------------------------------------------------- objectives


def test_objectives_use_the_processor_aspect_and_refuse_a_different_one(tiny, tokenizer, tmp_path):
    wide_image().save(tmp_path / "wide.png")
    entry = {"id": "w", "image": "wide.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "data.json").write_text(json.dumps([entry]))
    record = LlavaJsonSource(tmp_path / "data.json")[0]
    processor = tiny.processor(tokenizer, tiny.config())
    processor.configure_images("pad")
    objective = LMObjective(None, processor, 512)
    torch.testing.assert_close(objective.encode(record)["pixel_values"], pad_reference(processor, wide_image()))
    assert torch.equal(objective.encode(record, image_aspect="pad")["pixel_values"],
                       objective.encode(record)["pixel_values"])
    with pytest.raises(ValueError, match="encode\\(image_aspect='resize'\\) but the processor preprocesses with 'pad'"):
        objective.encode(record, image_aspect="resize")
    # CLIP pretraining pairs one view with a caption: anyres trains the tower on its thumbnail (the pad view).
    processor.configure_images("anyres")
    contrastive = object.__new__(ContrastiveObjective)  # its __init__ builds an open_clip model; encode needs none
    contrastive.processor, contrastive.context_length = processor, 32
    torch.testing.assert_close(contrastive.encode(record)["pixel_values"], pad_reference(processor, wide_image()))


# ---------------------------------------------------------------------------------------- trainer and eval


@pytest.fixture
def run_config(tokenizer_dir, tmp_path):
    def make(**data) -> RunConfig:
        return from_dict(RunConfig, {
            "run": {"output_dir": str(tmp_path / "run")},
            "model": {"vision": {"type": "clip", "config": {"hidden_size": 48, "intermediate_size": 96,
                                                            "num_hidden_layers": 2, "num_attention_heads": 4,
                                                            "image_size": 48, "patch_size": 16}},
                      "text": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                          "num_hidden_layers": 2, "num_attention_heads": 4,
                                          "num_key_value_heads": 2}},
                      "tokenizer": str(tokenizer_dir)},
            "data": data,
            "stages": [{"name": "s", "data": [{"type": "llava_json", "path": "unused.json"}],
                        "trainable": [{"params": ["*"]}]}],
        })
    return make


def test_trainer_configures_the_training_and_saved_processors(run_config, tmp_path):
    cfg = run_config(image_aspect="anyres", anyres_grids=[[1, 3], [3, 1]])
    _, processor = build_stage_model(cfg, 0, None)
    assert (processor.image_aspect, processor.anyres_grids) == ("anyres", [[1, 3], [3, 1]])
    save_model_folder(cfg, None, tmp_path / "model")
    _, loaded = load_for_inference(tmp_path / "model")
    assert (loaded.image_aspect, loaded.anyres_grids) == ("anyres", [[1, 3], [3, 1]])


def test_eval_of_a_saved_pad_trained_model_pads(run_config, tmp_path):
    cfg = run_config(image_aspect="pad")
    save_model_folder(cfg, None, tmp_path / "model")
    model, processor = load_for_inference(tmp_path / "model")
    assert processor.image_aspect == "pad"
    wide_image().save(tmp_path / "wide.png")
    entry = {"id": "w", "image": "wide.png", "kind": "vqa", "question_types": ["color"],
             "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "eval.json").write_text(json.dumps([entry]))

    seen = []  # the pixels `mllm eval` hands the model
    generate = model.generate

    def spy(**kwargs):
        seen.append(kwargs["pixel_values"])
        return generate(**kwargs)

    model.generate = spy
    report = evaluate(model, processor, str(tmp_path / "eval.json"), max_new_tokens=2)
    assert report["n"] == 1 and len(seen) == 1
    torch.testing.assert_close(seen[0], pad_reference(processor, wide_image()))
    assert not torch.allclose(seen[0], processor.preprocess_images([wide_image()], aspect="resize"))
