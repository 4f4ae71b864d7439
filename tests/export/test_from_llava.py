"""Exported Llava checkpoints load back as our model (`mllm.export.from_llava`), computing the same function.

Each tiny model is built from config, every weight perturbed, exported (`save_as_llava`; MMA and MoE
models with `save_export(format="mllm")`), reloaded with `load_llava_as_mllm` and compared with the
original: logits on a left-padded batch of two chat prompts with images (fp32), and input_ids /
pixel_values of the reloaded processor vs the original one and vs the folder's own LlavaProcessor.
Broken folders must fail naming what is wrong.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoProcessor

from mllm.builder import AttentionSpec, ModelSpec, ProjectorSpec, TextSpec, VisionSpec, build_model_and_processor
from mllm.export import save_as_llava, save_export
from mllm.export.from_llava import is_llava_export, load_llava_as_mllm
from mllm.sparse.config import MoESpec

from test_export_llava import CASES, build, images, perturb, prompts  # noqa: E402  (shared tiny cases)

# Same ops in the same order on both sides, except open_clip's fused qkv vs CLIP's q/k/v (~1e-6).
ATOL = 1e-5
# transformers v5 `save_pretrained` writes Llava keys in the pre-4.52 layout; ours are the in-memory names.
OUR_TO_DISK = {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
               "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                     attention_mask=inputs["attention_mask"]).logits


def assert_same_function(original, original_processor, loaded, loaded_processor):
    ours = original_processor(images=images(), text=prompts(original_processor))
    theirs = loaded_processor(images=images(), text=prompts(loaded_processor))
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(theirs[key], ours[key]), key
    assert bool((ours["attention_mask"] == 0).any())  # the batch really is left-padded
    real = ours["attention_mask"].bool()
    want, got = logits(original, ours)[real], logits(loaded, theirs)[real]
    assert want.std() > 0.1  # not two near-constant tensors
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    return want


def build_extended(tokenizer_dir, case: str, **sections):
    """A perturbed tiny model of `case` with extension sections (attention=AttentionSpec(...), moe=MoESpec(...))."""
    vision, text = CASES[case]
    if vision["type"] == "open_clip":
        pytest.importorskip("open_clip")
    spec = ModelSpec(vision=VisionSpec(**vision), projector=ProjectorSpec(depth=2), text=TextSpec(config=dict(text)),
                     tokenizer=tokenizer_dir, **sections)
    model, processor = build_model_and_processor(spec)
    perturb(model)
    return model.eval(), processor


def to_disk_name(name: str) -> str:
    prefix = next(p for p in OUR_TO_DISK if name.startswith(p))
    return OUR_TO_DISK[prefix] + name[len(prefix):]


def rewrite_weights(folder, edit) -> None:
    """Replace `folder/model.safetensors` with `edit(tensors)`."""
    path = folder / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    save_file(edit(tensors), path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def clip_qwen2_export(tokenizer_dir, tmp_path_factory):
    model, processor = build(tokenizer_dir, "clip-qwen2")
    return model, processor, save_as_llava(model, processor, tmp_path_factory.mktemp("export") / "llava")


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trips(tokenizer_dir, tmp_path, case):
    model, processor = build(tokenizer_dir, case)
    out = save_as_llava(model, processor, tmp_path / "llava")
    assert is_llava_export(out)
    loaded, loaded_processor = load_llava_as_mllm(out)
    assert not loaded.training and loaded.dtype == torch.float32
    assert_same_function(model, processor, loaded, loaded_processor)

    config, original = loaded.config, model.config
    assert config.vision_config.model_type == ("clip_vision_model" if case.startswith("open_clip")
                                               else original.vision_config.model_type)
    for field in ("image_token_id", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
                  "multimodal_projector_bias", "tie_word_embeddings", "num_image_tokens", "attention", "moe"):
        assert getattr(config, field) == getattr(original, field), field
    assert config.text_config.to_dict() == original.text_config.to_dict()
    tied = loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert tied == original.tie_word_embeddings == CASES[case][1].get("tie_word_embeddings", False)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    # The folder's own LlavaProcessor (what transformers users run) agrees with ours as well.
    llava_processor = AutoProcessor.from_pretrained(out)
    texts = prompts(loaded_processor)
    theirs = llava_processor(images=images(), text=texts, padding=True, return_tensors="pt")
    ours = loaded_processor(images=images(), text=texts)
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.equal(theirs["pixel_values"], ours["pixel_values"])
    assert loaded_processor.tokenizer.padding_side == processor.tokenizer.padding_side == "right"


def test_mma_export_round_trips(tokenizer_dir, tmp_path):
    model, processor = build_extended(tokenizer_dir, "open_clip-llama", attention=AttentionSpec(mode="mma"))
    out = save_export(model, processor, tmp_path / "mma", format="mllm")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] in ("mllm_llava", "mllm_mma_llava") and raw["mma_mode"] == "mma"
    loaded, loaded_processor = load_llava_as_mllm(out)
    assert loaded.config.attention == model.config.attention == {
        "mode": "mma", "backend": "sdpa", "assistant_token_id": raw["mma_assistant_token_id"]}
    want = assert_same_function(model, processor, loaded, loaded_processor)

    # Control: the same weights with causal attention compute something else.
    raw["mma_mode"] = "causal"
    (out / "config.json").write_text(json.dumps(raw))
    causal, _ = load_llava_as_mllm(out)
    assert causal.config.attention is None
    inputs = processor(images=images(), text=prompts(processor))
    assert (logits(causal, inputs)[inputs["attention_mask"].bool()] - want).abs().max() > 1e-3


def test_moe_export_round_trips(tokenizer_dir, tmp_path):
    """The remote-code export carries `moe`; the experts and routers come back in our MoE layers."""
    moe = MoESpec(experts={"text": 2, "image": 2}, top_k=1)
    model, processor = build_extended(tokenizer_dir, "clip-qwen2", moe=moe)
    out = save_export(model, processor, tmp_path / "moe", format="mllm")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] in ("mllm_llava", "mllm_mma_llava") and raw["moe"] == model.config.moe
    loaded, loaded_processor = load_llava_as_mllm(out)
    assert loaded.config.moe == model.config.moe and loaded.config.attention is None
    assert_same_function(model, processor, loaded, loaded_processor)


# ----------------------------------------------------------------------------- layouts, shards, dtype


def test_export_writes_the_legacy_layout_and_our_names_load_too(clip_qwen2_export, tmp_path):
    model, processor, export = clip_qwen2_export
    with safe_open(export / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(tuple(OUR_TO_DISK.values())) for k in keys)
    assert "language_model.lm_head.weight" not in keys  # tied (qwen2 case): not saved
    # A checkpoint with in-memory names (what transformers 4.52-4.57 wrote) loads the same.
    folder = shutil.copytree(export, tmp_path / "ours")
    disk_to_ours = {to_disk_name(k): k for k in model.state_dict()}
    rewrite_weights(folder, lambda tensors: {disk_to_ours[k]: v for k, v in tensors.items()})
    assert_same_function(model, processor, *load_llava_as_mllm(folder))


def test_sharded_export_loads(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, "clip-qwen2")
    out = save_as_llava(model, processor, tmp_path / "llava", max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) >= 2
    assert_same_function(model, processor, *load_llava_as_mllm(out))


def test_dtype_argument(clip_qwen2_export):
    loaded, _ = load_llava_as_mllm(clip_qwen2_export[2], dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.config.dtype == torch.bfloat16
    # Built under the default dtype, as from_pretrained builds: rotary frequencies stay float32.
    assert loaded.model.language_model.rotary_emb.inv_freq.dtype == torch.float32


# ----------------------------------------------------------------------------- bad folders


def test_folders_that_are_not_exports(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_llava_as_mllm(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"no config.json \(found: \['notes.txt'\]\)"):
        load_llava_as_mllm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=f"{tmp_path} is not a Llava export: config.json has model_type 'bert'"):
        load_llava_as_mllm(tmp_path)
    assert not is_llava_export(tmp_path) and not is_llava_export(tmp_path / "absent")


def test_mllm_folder_loads_directly(clip_qwen2_export, tmp_path):
    model, processor, _ = clip_qwen2_export
    model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    assert not is_llava_export(tmp_path / "run")
    assert_same_function(model, processor, *load_llava_as_mllm(tmp_path / "run"))


def test_export_without_weights(clip_qwen2_export, tmp_path):
    folder = shutil.copytree(clip_qwen2_export[2], tmp_path / "copy")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_llava_as_mllm(folder)


MISSING = "language_model.model.layers.1.mlp.up_proj.weight"
CORRUPTIONS = {
    "missing": (lambda t: {k: v for k, v in t.items() if k != MISSING},
                r"missing \(1\): \['model.language_model.layers.1.mlp.up_proj.weight'\]"),
    "unexpected": (lambda t: {**t, "multi_modal_projector.linear_3.weight": torch.zeros(2, 2)},
                   r"unexpected \(1\): \['multi_modal_projector.linear_3.weight'\]"),
    "shape": (lambda t: {**t, MISSING: t[MISSING][:-1]},
              r"shape mismatch \(1\): \['language_model.model.layers.1.mlp.up_proj.weight: \(127, 64\) on disk, "
              r"\(128, 64\) in the model'\]"),
    "not llava": (lambda t: {**t, "visual.proj": torch.zeros(2)}, r"unexpected \(1\): \['visual.proj'\]"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_export_names_the_key(clip_qwen2_export, tmp_path, corruption):
    edit, message = CORRUPTIONS[corruption]
    folder = shutil.copytree(clip_qwen2_export[2], tmp_path / "copy")
    rewrite_weights(folder, edit)
    with pytest.raises(ValueError, match=message):
        load_llava_as_mllm(folder)


def test_sharded_export_with_a_tensor_dropped_from_its_shard(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, "clip-qwen2")
    out = save_as_llava(model, processor, tmp_path / "llava", max_shard_size="100KB")
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shard = out / weight_map[MISSING]
    with safe_open(shard, framework="pt") as f:
        kept = {key: f.get_tensor(key) for key in f.keys() if key != MISSING}
    save_file(kept, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing \(1\).*up_proj.*index lists keys absent from their shard: "
                                         rf"\['{MISSING}'\]"):
        load_llava_as_mllm(out)


def test_unsupported_configs_are_rejected(clip_qwen2_export, tmp_path):
    folder = shutil.copytree(clip_qwen2_export[2], tmp_path / "copy")
    raw = json.loads((folder / "config.json").read_text())
    bad = {
        "vision_feature_layer": ([-2, -1], "selects one layer"),
        "image_seq_length": (7, "image_seq_length=7 but the tower gives 16"),
        "mma_mode": ("sideways", "mma_mode 'sideways' is unknown"),
    }
    for key, (value, message) in bad.items():
        (folder / "config.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(ValueError, match=message):
            load_llava_as_mllm(folder)
    siglip_default = {**raw, "vision_config": {**raw["vision_config"], "model_type": "siglip_vision_model"},
                      "vision_feature_select_strategy": "default"}
    (folder / "config.json").write_text(json.dumps(siglip_default))
    with pytest.raises(ValueError, match="drops the first patch token"):
        load_llava_as_mllm(folder)
