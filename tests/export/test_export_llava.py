"""Export to a plain transformers Llava checkpoint: parity with our model through the real files.

Tiny models are built from config with `build_model_and_processor` and a tokenizer trained here,
every weight perturbed (norm scales, biases, embeddings included) so that a swapped, dropped or
mis-prefixed tensor changes the logits. The exported folder is reloaded with nothing but
`AutoModelForImageTextToText` / `AutoProcessor` (no trust_remote_code) and compared with our model on
the same chat prompts and images: input_ids, pixel_values, logits (fp32) and greedy generations.
"""

import json
import random

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from mllm.builder import ModelSpec, ProjectorSpec, TextSpec, VisionSpec, build_model_and_processor
from mllm.data.synth import caption_text, candidate_questions, render_scene, sample_scene
from mllm.export import ExportVerificationError, export_model, save_as_llava, verify_export
from mllm.export.llava import check_llava_exportable, to_llava, to_llava_processor
from mllm.export.model_card import write_model_card
from mllm.tokenizer import train_tokenizer

# fp32 on both sides; open_clip's fused-qkv attention vs CLIP's separate q/k/v and SDPA summation
# order differ by ~1e-6.
ATOL = 1e-5

OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 64, "layers": 3, "head_width": 16, "mlp_ratio": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
HF_VISION_CFG = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "image_size": 32, "patch_size": 8}
LLAMA_CFG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
QWEN2_CFG = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "tie_word_embeddings": True}

# name -> (vision spec kwargs, text config); open_clip names must be unique per registration.
CASES = {
    "open_clip-llama": (dict(type="open_clip", name="mllm-test-export-vit", model_cfg=OPEN_CLIP_CFG), LLAMA_CFG),
    "clip-qwen2": (dict(type="clip", config=HF_VISION_CFG), QWEN2_CFG),
    "clip-full-qwen2": (dict(type="clip", config=HF_VISION_CFG, select_strategy="full"), QWEN2_CFG),
    "siglip-llama": (dict(type="siglip", config=HF_VISION_CFG), LLAMA_CFG),
}
QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokenizer")
    rng = random.Random(0)
    lines = []
    for _ in range(200):
        scene = sample_scene(rng)
        lines.append(caption_text(scene))
        lines += [f"{q} {a}" for _, q, a in candidate_questions(scene)]
    (tmp / "corpus.txt").write_text("\n".join(lines))
    train_tokenizer([str(tmp / "corpus.txt")], tmp / "tok", vocab_size=320)
    return str(tmp / "tok")


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its init so no default (ones, zeros, copies) can hide a wrong mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("weight") and param.ndim == 1:  # norm scales stay near 1
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:  # biases, class embedding
                param.copy_(0.2 * noise)
            else:  # fan-in scaled: activations stay O(1), logits stay well separated
                param.copy_(noise * param[0].numel() ** -0.5)


def build(tokenizer_dir, case: str, depth: int = 2):
    vision, text = CASES[case]
    spec = ModelSpec(vision=VisionSpec(**vision), projector=ProjectorSpec(depth=depth),
                     text=TextSpec(config=dict(text)), tokenizer=tokenizer_dir)
    if vision["type"] == "open_clip":
        pytest.importorskip("open_clip")
    model, processor = build_model_and_processor(spec)
    perturb(model)
    return model.eval(), processor


def images(n: int = 2):
    rng = random.Random(1)
    return [render_scene(sample_scene(rng), 16, rng) for _ in range(n)]  # 48 x 48 RGB


def prompts(processor) -> list[str]:
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in QUESTIONS
    ]


def our_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                     attention_mask=inputs["attention_mask"]).logits


def assert_same_as_ours(model, processor, folder):
    """Reload `folder` with plain transformers and compare everything on a left-padded batch of 2."""
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava" and "auto_map" not in config
    exported = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    exported_processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(exported, LlavaForConditionalGeneration)

    texts = prompts(exported_processor)
    assert texts == prompts(processor)  # the chat template travelled with the processor
    ours = processor(images=images(), text=texts)
    theirs = exported_processor(images=images(), text=texts, padding=True, return_tensors="pt")
    assert torch.equal(theirs["input_ids"], ours["input_ids"])  # same <image> expansion, left padding
    assert torch.equal(theirs["attention_mask"], ours["attention_mask"])
    assert (ours["input_ids"] == model.config.image_token_id).sum() == 2 * processor.num_image_tokens
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=0, rtol=0)

    want = our_logits(model, ours)
    with torch.no_grad():
        got = exported(**theirs).logits
    real = ours["attention_mask"].bool()
    assert want[real].std() > 0.1  # the comparison below is not between two near-constant tensors
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)

    tokenizer = processor.tokenizer
    stop = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]
    assert exported.generation_config.eos_token_id == stop
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    ours_gen = model.generate(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"],
                              pixel_values=ours["pixel_values"], **kwargs)
    theirs_gen = exported.generate(**theirs, **kwargs)
    assert torch.equal(theirs_gen, ours_gen)


# ----------------------------------------------------------------------------- (a), (b): parity


@pytest.mark.parametrize("case", list(CASES))
def test_exported_checkpoint_matches_our_model(tokenizer_dir, tmp_path, case):
    model, processor = build(tokenizer_dir, case)
    out = save_as_llava(model, processor, tmp_path / "llava")
    assert not (tmp_path / "llava.tmp").exists()
    assert_same_as_ours(model, processor, out)


def test_weights_are_copied_unless_shared(tokenizer_dir):
    model, _ = build(tokenizer_dir, "clip-qwen2")
    copied, shared = to_llava(model), to_llava(model, share_weights=True)
    ours = model.model.multi_modal_projector.linear_1.weight
    assert copied.model.multi_modal_projector.linear_1.weight.data_ptr() != ours.data_ptr()
    assert shared.model.multi_modal_projector.linear_1.weight.data_ptr() == ours.data_ptr()
    # tie_word_embeddings survives the conversion (qwen2 case ties them).
    assert copied.lm_head.weight is copied.model.language_model.embed_tokens.weight


def test_parity_check_can_fail(tokenizer_dir, tmp_path):
    """Guards the parity test: a one-tensor change in the export must break it."""
    model, processor = build(tokenizer_dir, "clip-qwen2")
    out = save_as_llava(model, processor, tmp_path / "llava")
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.bias.add_(0.01)
    with pytest.raises(AssertionError):
        assert_same_as_ours(model, processor, out)


def test_export_model_from_saved_folder_and_verify(tokenizer_dir, tmp_path):
    """The run-folder path: save_pretrained -> export_model -> verify_export (HF CLIP tower)."""
    model, processor = build(tokenizer_dir, "clip-qwen2")
    model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    out = export_model(tmp_path / "run", tmp_path / "export", format="llava")
    assert verify_export(out, tmp_path / "run") < 1e-5
    assert_same_as_ours(model, processor, out)


def test_verify_export_detects_a_wrong_checkpoint(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, "clip-qwen2")
    model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    out = export_model(tmp_path / "run", tmp_path / "export", format="llava")
    perturb(model, seed=1)
    model.save_pretrained(tmp_path / "run")
    with pytest.raises(ExportVerificationError, match="logits differ"):
        verify_export(out, tmp_path / "run")


def test_export_model_from_saved_open_clip_folder(tokenizer_dir, tmp_path):
    """Reloading an open_clip run folder builds the tower on the meta device first (from_pretrained)."""
    model, processor = build(tokenizer_dir, "open_clip-llama")
    model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    out = export_model(tmp_path / "run", tmp_path / "export", format="llava")
    assert verify_export(out, tmp_path / "run") < 1e-5
    assert_same_as_ours(model, processor, out)


# ----------------------------------------------------------------------------- (c): rejections


def test_projector_depth_3_is_rejected_before_writing(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, "clip-qwen2", depth=3)
    with pytest.raises(ValueError, match="projector_depth=3.*linear_1 -> act -> linear_2"):
        save_as_llava(model, processor, tmp_path / "llava")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("section", ["moe", "mod", "moh", "attention", "compression", "token_pruning"])
def test_active_extension_sections_are_rejected(tokenizer_dir, section):
    model, _ = build(tokenizer_dir, "clip-qwen2")
    config = model.config
    for off in (None, {}, {"enabled": False}):
        object.__setattr__(config, section, off)
        check_llava_exportable(config)
    object.__setattr__(config, section, {"num_experts": 4})
    with pytest.raises(ValueError, match=f"'{section}' section is set"):
        to_llava(model)


def test_processor_token_count_mismatch_is_rejected(tokenizer_dir):
    model, processor = build(tokenizer_dir, "clip-qwen2")
    processor.image_processor.crop_size = {"height": 40, "width": 40}  # 5 x 5 patches, not 4 x 4
    with pytest.raises(ValueError, match="expand <image> to 25 tokens but the model takes 16"):
        to_llava_processor(processor, model.config)


# ----------------------------------------------------------------------------- (d): sharding


def test_small_shard_size_writes_an_index_and_still_loads(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, "open_clip-llama")
    out = save_as_llava(model, processor, tmp_path / "llava", max_shard_size="200KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and all(name.startswith("model-0000") for name in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not list(out.glob("*.bin"))
    assert_same_as_ours(model, processor, out)


# ----------------------------------------------------------------------------- (e): model card


def read_front_matter(path) -> tuple[dict, str]:
    text = path.read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_model_card_has_hub_metadata(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, "clip-qwen2")
    out = save_as_llava(model, processor, tmp_path / "my-vlm", metrics={"vqa_accuracy": 0.81234, "steps": 600},
                        base_model="Qwen/Qwen2-0.5B")
    metadata, body = read_front_matter(out / "README.md")
    assert metadata == {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "base_model": "Qwen/Qwen2-0.5B",
        "tags": ["mllm", "llava", "vision-language"],
    }
    assert 'AutoModelForImageTextToText.from_pretrained("my-vlm")' in body
    assert "AutoProcessor" in body
    assert "| vqa_accuracy | 0.8123 |" in body and "| steps | 600 |" in body


def test_model_card_without_base_model_or_metrics(tmp_path):
    write_model_card(tmp_path, description="A tiny test model.")
    metadata, body = read_front_matter(tmp_path / "README.md")
    assert "base_model" not in metadata and metadata["pipeline_tag"] == "image-text-to-text"
    assert "A tiny test model." in body and "## Evaluation" not in body


# ----------------------------------------------------------------------------- (f): no overwrite


def test_existing_non_empty_folder_is_never_overwritten(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, "clip-qwen2")
    model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    for call in (lambda: export_model(tmp_path / "run", target, format="llava"), lambda: save_as_llava(model, processor, target)):
        with pytest.raises(FileExistsError, match=str(target)):
            call()
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "export.tmp").exists()


def test_empty_existing_folder_and_stale_tmp_are_fine(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, "clip-qwen2")
    (tmp_path / "export").mkdir()
    (tmp_path / "export.tmp").mkdir()
    (tmp_path / "export.tmp" / "partial.safetensors").write_text("left by a killed export")
    out = save_as_llava(model, processor, tmp_path / "export")
    assert not (out / "partial.safetensors").exists() and (out / "config.json").exists()
    assert not (tmp_path / "export.tmp").exists()
