"""Exports load where only torch + transformers + pillow are installed (tests/export/clean_env.py).

First the harness itself: the clean interpreter imports torch, transformers and PIL but cannot find
our package or any training-only dependency. Then, end to end, a saved run folder is exported and
reloaded in that interpreter with nothing but the Auto classes (a dense model as plain Llava and
in the default remote-code format, an MMA model with `trust_remote_code=True`); its logits and
greedy tokens on one synthetic image + chat prompt must equal our in-package model's.
"""

import importlib.metadata
import json

import pytest
import torch

from mllm.export import export_model, verification_inputs
from tests.export.clean_env import FORBIDDEN_MODULES, REPO, CleanRunError, clean_python, run_clean

from test_export_llava import build, tokenizer_dir  # noqa: F401  (tiny cases; module-scoped tokenizer fixture)
from test_export_mma import build_mma

# fp32 on both sides, same ops in the same order except CLIP's attention split (see test_export_llava).
ATOL = 1e-5
NEW_TOKENS = 5

PROBE = """
import importlib.metadata, importlib.util, json, sys
import torch, transformers, PIL
from transformers.utils import is_accelerate_available, is_torchvision_available

print(json.dumps({
    "found": {name: importlib.util.find_spec(name) is not None for name in sys.argv[1:]},
    "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers", "pillow")},
    "torchvision_available": is_torchvision_available(), "accelerate_available": is_accelerate_available(),
    "sys_path": sys.path,
}))
"""

LOAD_AND_GENERATE = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, image, messages, out, remote = sys.argv[1:]
remote = remote == "trust_remote_code"
model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote)
prompt = processor.apply_chat_template(json.loads(open(messages).read()), add_generation_prompt=True)
inputs = processor(images=[Image.open(image)], text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=%d, min_new_tokens=%d, do_sample=False)
torch.save({"input_ids": inputs["input_ids"], "logits": logits, "generated": generated,
            "model_class": f"{type(model).__module__}.{type(model).__name__}",
            "modules": sorted({name.split(".")[0] for name in sys.modules})}, out)
""" % (NEW_TOKENS, NEW_TOKENS)


def test_clean_env_has_torch_transformers_pillow_only():
    # A PYTHONPATH leaking in from the caller must not expose the repo either (`-I` ignores it).
    proc = run_clean(PROBE, "torch", "transformers", "PIL", *FORBIDDEN_MODULES, env={"PYTHONPATH": str(REPO)})
    report = json.loads(proc.stdout)
    assert report["found"] == {"torch": True, "transformers": True, "PIL": True,
                               **{name: False for name in FORBIDDEN_MODULES}}
    assert report["versions"] == {name: importlib.metadata.version(name)
                                  for name in ("torch", "transformers", "pillow")}
    assert not report["torchvision_available"] and not report["accelerate_available"]
    assert not any(path.startswith(str(REPO)) for path in report["sys_path"]), report["sys_path"]


def test_run_clean_reports_failures_with_output():
    with pytest.raises(CleanRunError, match=r"exited with 3(.|\n)*to stdout(.|\n)*to stderr"):
        run_clean("import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)")
    with pytest.raises(CleanRunError, match="timed out after 0.5s"):
        run_clean("import time; time.sleep(30)", timeout=0.5)
    with pytest.raises(ValueError, match="inside the repository"):
        run_clean("pass", cwd=REPO / "tests")


def test_clean_python_is_reused(tmp_path):
    python = clean_python(tmp_path)
    clean_python.cache_clear()  # a new session: the stamp, not the in-process cache, decides
    (python.parent.parent / "marker").touch()
    assert clean_python(tmp_path) == python and (python.parent.parent / "marker").exists()


def reload_in_clean_env(model, processor, tmp_path, format: str) -> None:
    """Save -> export_model -> reload in the clean interpreter; compare with `model` in this process."""
    model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    out = export_model(tmp_path / "run", tmp_path / "export", format=format)
    remote = format != "llava"

    size = model.config.vision_config.image_size
    image, messages = verification_inputs(size if isinstance(size, int) else size[0])
    image.save(tmp_path / "image.png")  # lossless: both sides see the same pixels
    (tmp_path / "messages.json").write_text(json.dumps(messages))
    run_clean(LOAD_AND_GENERATE, out, tmp_path / "image.png", tmp_path / "messages.json", tmp_path / "theirs.pt",
              "trust_remote_code" if remote else "-")
    theirs = torch.load(tmp_path / "theirs.pt")

    ours = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True))
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    inputs = dict(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"], attention_mask=ours["attention_mask"])
    with torch.no_grad():
        want = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert want.std() > 0.1  # not two near-constant tensors
    torch.testing.assert_close(theirs["logits"], want, atol=ATOL, rtol=0)
    assert torch.equal(theirs["generated"], generated)
    assert not set(theirs["modules"]) & set(FORBIDDEN_MODULES)

    if remote:  # the class named in config.json's auto_map, imported from the folder's own files
        auto_map = json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"]
        assert theirs["model_class"].startswith("transformers_modules.")
        assert theirs["model_class"].endswith(auto_map), (theirs["model_class"], auto_map)
    else:
        assert theirs["model_class"] == "transformers.models.llava.modeling_llava.LlavaForConditionalGeneration"


@pytest.mark.parametrize("format", ["llava", "mllm"])
def test_dense_export_loads_without_our_package(tokenizer_dir, tmp_path, format):  # noqa: F811
    model, processor = build(tokenizer_dir, "clip-qwen2")
    reload_in_clean_env(model, processor, tmp_path, format)


def test_mma_export_loads_without_our_package(tokenizer_dir, tmp_path):  # noqa: F811
    """The remote-code files import nothing beyond torch + transformers."""
    model, processor = build_mma(tokenizer_dir)
    reload_in_clean_env(model, processor, tmp_path, "mllm")


@pytest.mark.parametrize("variant, mma", [("token_choice_shared", True), ("expert_choice", False), ("bam_pool", False)])
def test_moe_export_loads_without_our_package(tokenizer_dir, tmp_path, variant, mma):  # noqa: F811
    """MoE layers (and MMA) come from mllm's own sources flattened into the folder: no mllm import."""
    from test_export_remote import MOE_VARIANTS, build as build_moe

    model, processor = build_moe(tokenizer_dir, MOE_VARIANTS[variant], mma=mma)
    reload_in_clean_env(model, processor, tmp_path, "mllm")


def test_lora_merged_export_loads_without_our_package(tokenizer_dir, tmp_path):  # noqa: F811
    """LoRA adapters (attention, FFN and MoE experts) merged into the weights, then exported."""
    from test_export_remote import MOE_VARIANTS, build as build_moe

    from mllm.train.lora import PeftSpec, apply_peft

    model, processor = build_moe(tokenizer_dir, MOE_VARIANTS["token_choice_shared"])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_peft(model, PeftSpec(dropout=0.0, expert_targets=["gate_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    merged = peft_model.merge_and_unload().eval()
    moved = [k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])]
    assert any("experts.gate_proj" in k for k in moved) and any("self_attn.q_proj" in k for k in moved)
    reload_in_clean_env(merged, processor, tmp_path, "mllm")


def test_compressed_and_pruned_export_loads_without_our_package(tokenizer_dir, tmp_path):  # noqa: F811
    """pixel_shuffle before the projector and fastv inside the LLM, from the folder's own flat files."""
    from test_export_remote import build as build_remote

    from mllm.compression import CompressionSpec
    from mllm.compression.pruning import TokenPruningSpec

    model, processor = build_remote(tokenizer_dir, None, case="clip-qwen2",
                                    compression=CompressionSpec(method="pixel_shuffle", ratio=0.5),
                                    token_pruning=TokenPruningSpec(method="fastv", layer=1, keep=0.5))
    reload_in_clean_env(model, processor, tmp_path, "mllm")
