"""The default export format: Llava weights + mllm's flat remote code, for models Llava cannot express.

MoE models (modality-aware token choice with a shared expert, expert choice with its auxiliary router,
MoT, BAM attention experts) and MoE + MMA are exported, reloaded with `trust_remote_code=True` and
compared with our model on a left-padded batch (fp32 logits) and in cached greedy generation. The
remote files are mllm's own sources with relative imports: every import in them is torch, transformers
or the standard library. A dense model exported this way still loads, and `--format llava` refuses MoE.
Compressed models (every method, CLS kept or not, SigLIP) and in-LLM pruning (fastv, exit) are exported and
compared the same way.
"""

import json
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mllm.builder import AttentionSpec, ModelSpec, ProjectorSpec, TextSpec, VisionSpec, build_model_and_processor
from mllm.export import export_model, save_export, verify_export
from mllm.export.remote_code import ALLOWED_PACKAGES, flatten_imports, imported_packages
from mllm.sparse import MoESpec

from test_export_llava import CASES, images, perturb, prompts  # noqa: E402  (shared tiny cases)

MOE_VARIANTS = {
    "token_choice_shared": dict(experts={"text": 2, "image": 3}, top_k=2, shared_experts=1),
    "expert_choice": dict(experts={"text": 2, "image": 2}, top_k=1, routing="expert_choice", capacity_factor=1.0),
    "mot_every_other": dict(experts={"text": 2, "image": 2}, top_k=1, mot=True, layers="every_other"),
    "bam_pool": dict(modality_aware=False, num_experts=3, top_k=2, attention_experts=2, share_kv=True),
}


def build(tokenizer_dir, moe: dict | None, case: str = "open_clip-llama", mma: bool = False, **sections):
    vision, text = CASES[case]
    spec = ModelSpec(vision=VisionSpec(**vision), projector=ProjectorSpec(depth=2), text=TextSpec(config=dict(text)),
                     tokenizer=tokenizer_dir, moe=MoESpec(**moe) if moe else None,
                     attention=AttentionSpec(mode="mma", backend="sdpa") if mma else AttentionSpec(), **sections)
    model, processor = build_model_and_processor(spec)
    perturb(model)
    return model.eval(), processor


def assert_remote_matches(model, processor, out):
    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    exported_processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(exported).__name__ == "MLLMLlavaForConditionalGeneration"
    ours = processor(images=images(2), text=prompts(processor))
    theirs = exported_processor(images=images(2), text=prompts(exported_processor), return_tensors="pt", padding=True)
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    real = ours["attention_mask"].bool()
    with torch.no_grad():
        want = model(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"],
                     attention_mask=ours["attention_mask"]).logits
        got = exported(**theirs).logits
        assert want[real].std() > 0.1
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
        kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
        ours_out = model.generate(**{k: v for k, v in ours.items() if k != "modality_ids"}, **kwargs)
        assert torch.equal(exported.generate(**theirs, **kwargs), ours_out)
    return exported


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_moe_export_matches_our_model(tokenizer_dir, tmp_path, variant):
    model, processor = build(tokenizer_dir, MOE_VARIANTS[variant])
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = export_model(tmp_path / "model", tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mllm_llava" and config["moe"] == model.config.moe and config["mma_mode"] is None
    assert config["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_mllm_llava.")
    assert verify_export(out, tmp_path / "model") < 1e-4
    exported = assert_remote_matches(model, processor, out)
    # The experts really are in use: perturbing one expert of the exported model moves its logits.
    inputs = AutoProcessor.from_pretrained(out)(images=images(1), text=prompts(processor)[:1], return_tensors="pt")
    with torch.no_grad():
        before = exported(**inputs).logits
        block = next(m for m in exported.modules() if type(m).__name__ == "MoEBlock")
        block.experts.down_proj.mul_(3.0)
        assert (exported(**inputs).logits - before).abs().max() > 1e-3


def test_moe_with_mma_export(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, MOE_VARIANTS["token_choice_shared"], mma=True)
    out = save_export(model, processor, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["mma_mode"] == "mma" and config["moe"]["shared_experts"] == 1
    exported = assert_remote_matches(model, processor, out)
    inputs = AutoProcessor.from_pretrained(out)(images=images(1), text=prompts(processor)[:1], return_tensors="pt")
    with torch.no_grad():
        want = exported(**inputs).logits
        exported.config.mma_mode = "causal"  # control: the same weights with causal attention differ
        assert (exported(**inputs).logits - want).abs().max() > 1e-3


def test_dense_model_exports_with_remote_code_and_as_plain_llava(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, None, case="clip-qwen2")
    out = save_export(model, processor, tmp_path / "remote")
    assert json.loads((out / "config.json").read_text())["moe"] is None
    assert_remote_matches(model, processor, out)
    plain = save_export(model, processor, tmp_path / "plain", format="llava")
    assert json.loads((plain / "config.json").read_text())["model_type"] == "llava"
    assert not (plain / "modeling_mllm_llava.py").exists()


def test_plain_llava_format_refuses_moe_naming_the_way_out(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, MOE_VARIANTS["token_choice_shared"])
    with pytest.raises(ValueError, match="'moe' section.*--format mllm"):
        save_export(model, processor, tmp_path / "export", format="llava")
    assert list(tmp_path.iterdir()) == []


def test_bf16_export_is_verified_against_rounded_weights(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, MOE_VARIANTS["token_choice_shared"])
    out = save_export(model, processor, tmp_path / "export", dtype="bf16")
    exported = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert next(exported.parameters()).dtype == torch.bfloat16
    assert verify_export(out, (model, processor)) < 1e-4


def test_remote_files_import_only_torch_transformers_and_each_other(tokenizer_dir, tmp_path):
    model, processor = build(tokenizer_dir, MOE_VARIANTS["bam_pool"])
    out = save_export(model, processor, tmp_path / "export")
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    files = sorted(out.glob("*.py"))
    assert {f.name for f in files} >= {"modeling_mllm_llava.py", "configuration_mllm_llava.py", "mma_layout.py",
                                       "sparse_moe.py", "sparse_experts.py", "sparse_routing.py", "mllm_schema.py"}
    for file in files:
        text = file.read_text()
        assert "mllm." not in "".join(line for line in text.splitlines() if "import" in line), file.name
        assert imported_packages(text) - stdlib <= ALLOWED_PACKAGES, file.name


def test_flatten_imports_rewrites_and_refuses():
    text = "from mllm.sparse.moe import MoEBlock\n    from mllm.schema import ConfigError\n"
    assert flatten_imports(text, "x") == "from .sparse_moe import MoEBlock\n    from .mllm_schema import ConfigError\n"
    with pytest.raises(RuntimeError, match="mllm.kernels"):
        flatten_imports("from mllm.kernels import rms_norm\n", "x")
    with pytest.raises(RuntimeError, match="SPARSE_MODULES"):
        flatten_imports("from mllm.sparse.experimental import Thing\n", "x")


def test_export_folder_has_card_metadata_generation_config_and_shards(tokenizer_dir, tmp_path):
    import yaml

    model, processor = build(tokenizer_dir, MOE_VARIANTS["token_choice_shared"])
    out = save_export(model, processor, tmp_path / "my-moe", max_shard_size="300KB", base_model="me/base-vlm",
                      base_model_relation="finetune", datasets=["me/shapes"], license="apache-2.0",
                      recipe="stages:\n  - name: moe\n", metrics={"overall": 0.9})
    front, body = (out / "README.md").read_text()[4:].split("\n---\n", 1)
    metadata = yaml.safe_load(front)
    assert metadata["pipeline_tag"] == "image-text-to-text" and metadata["library_name"] == "transformers"
    assert metadata["base_model"] == "me/base-vlm" and metadata["base_model_relation"] == "finetune"
    assert metadata["datasets"] == ["me/shapes"] and metadata["license"] == "apache-2.0"
    assert "trust_remote_code=True" in body and "## Training recipe" in body and "| overall | 0.9 |" in body
    assert "modality-aware MoE" in body
    assert (out / "generation_config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert_remote_matches(model, processor, out)
    with pytest.raises(ValueError, match="base_model_relation"):
        save_export(model, processor, tmp_path / "bad", base_model="x", base_model_relation="cousin")
    assert not (tmp_path / "bad").exists()


def test_pad_trained_processor_exports_as_llava_padding_and_anyres_is_refused(tokenizer_dir, tmp_path):
    """`data.image_aspect: pad` travels into the export (LlavaImageProcessor do_pad): same pixels on a
    non-square image; `anyres` cannot be expressed by LlavaProcessor and is refused before writing."""
    from PIL import Image

    model, processor = build(tokenizer_dir, None, case="clip-qwen2")
    processor.configure_images("pad")
    out = save_export(model, processor, tmp_path / "pad")
    exported = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    wide = Image.new("RGB", (96, 40), (200, 30, 30))
    ours = processor(images=[wide], text=prompts(processor)[:1])["pixel_values"]
    theirs = exported(images=[wide], text=prompts(processor)[:1], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    resized = processor.preprocess_images([wide], aspect="resize")
    assert (resized - ours).abs().max() > 0.5  # padding really changed the pixels
    processor.configure_images("anyres")
    with pytest.raises(ValueError, match="anyres"):
        save_export(model, processor, tmp_path / "anyres")
    assert not (tmp_path / "anyres").exists()


# ---------------------------------------------------------------------------------------- compression


COMPRESSED = {  # 9 patch tokens per image (a 3 x 3 grid)
    "pool": ("open_clip-llama", dict(method="pool", ratio=0.5)),
    "pixel_shuffle-full": ("clip-full-qwen2", dict(method="pixel_shuffle", ratio=0.25)),  # CLS kept, zero-padded
    "tome": ("clip-qwen2", dict(method="tome", ratio=0.5)),
    "vmtc-cls": ("open_clip-llama", dict(method="vmtc", ratio=0.5, saliency="cls")),  # needs the CLS state
    "vmtc-siglip": ("siglip-llama", dict(method="vmtc", ratio=0.5, saliency="norm")),
}


@pytest.mark.parametrize("variant", list(COMPRESSED))
def test_compressed_export_matches_our_model_and_reads_back(tokenizer_dir, tmp_path, variant):
    """The export's processor expands <image> to the compressed count, and its model merges the tokens
    around the projector exactly as ours (logits on a left-padded batch, cached generation)."""
    from mllm.compression import CompressionSpec
    from mllm.export.from_llava import load_llava_as_mllm

    case, section = COMPRESSED[variant]
    model, processor = build(tokenizer_dir, None, case=case, compression=CompressionSpec(**section))
    assert processor.num_image_tokens == model.config.num_image_tokens < 10
    out = save_export(model, processor, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["compression"] == model.config.compression
    assert_remote_matches(model, processor, out)
    back, back_processor = load_llava_as_mllm(out)
    assert back.config.compression == model.config.compression
    assert back_processor.num_image_tokens == processor.num_image_tokens
    inputs = processor(images=images(2), text=prompts(processor))
    inputs.pop("modality_ids")
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["fastv", "exit"])
def test_token_pruning_export_matches_our_model(tokenizer_dir, tmp_path, method):
    """fastv after layer 1 / exit gates (opened on one layer so tokens really leave) run in the export by
    the same code; logits and cached generation match ours."""
    from mllm.compression.pruning import TokenPruningSpec

    spec = TokenPruningSpec(method=method, layer=1, keep=0.5, query_tokens=4)
    model, processor = build(tokenizer_dir, None, token_pruning=spec)
    if method == "exit":
        gate = model.model.language_model.layers[1].exit_gate
        torch.nn.init.constant_(gate.bias, 4.0)  # open: every row's image tokens leave after layer 1
    out = save_export(model, processor, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["token_pruning"] == model.config.token_pruning
    exported = assert_remote_matches(model, processor, out)
    stats = [m.pruning_stats for m in exported.modules() if getattr(m, "pruning_stats", None) is not None]
    assert stats and all(float(s[1]) < float(s[0]) for s in stats)  # image tokens really left


def test_token_pruning_with_mma_is_refused_before_writing(tokenizer_dir, tmp_path):
    from mllm.compression.pruning import TokenPruningSpec

    model, processor = build(tokenizer_dir, None, mma=True, token_pruning=TokenPruningSpec(method="fastv", layer=1))
    with pytest.raises(ValueError, match="token_pruning together with the attention section"):
        save_export(model, processor, tmp_path / "export")
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.tmp").exists()
