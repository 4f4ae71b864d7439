"""MMA-trained models export as Llava weights + flat remote code (torch + transformers only).

The exported folder is reloaded with `AutoModelForImageTextToText(..., trust_remote_code=True)` and
must compute exactly what our model computes with modality-mutual attention, on a left-padded batch
and in cached greedy generation; with its attention switched back to causal it must differ (so the
remote attention is really in use).
"""

import json
import re

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mllm.builder import AttentionSpec, ModelSpec, ProjectorSpec, TextSpec, VisionSpec, build_model_and_processor
from mllm.export import export_model, verify_export

from test_export_llava import CASES, images, perturb, prompts  # noqa: E402  (shared tiny cases)


def build_mma(tokenizer_dir):
    vision, text = CASES["open_clip-llama"]
    spec = ModelSpec(vision=VisionSpec(**vision), projector=ProjectorSpec(depth=2), text=TextSpec(config=dict(text)),
                     tokenizer=tokenizer_dir, attention=AttentionSpec(mode="mma", backend="sdpa"))
    model, processor = build_model_and_processor(spec)
    perturb(model)
    return model.eval(), processor


def test_mma_export_matches_our_model(tokenizer_dir, tmp_path):
    model, processor = build_mma(tokenizer_dir)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = export_model(tmp_path / "model", tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mllm_llava" and config["mma_mode"] == "mma"
    for name in ("modeling_mllm_llava.py", "configuration_mllm_llava.py", "mma_layout.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", (out / name).read_text(), re.M)
        assert {i.split(".")[0] for i in imports} <= {"torch", "transformers", "huggingface_hub", "dataclasses",
                                                      "__future__", ""}, (name, imports)
    assert verify_export(out, tmp_path / "model") < 1e-4

    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    exported_processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = exported_processor(images=images(2), text=prompts(exported_processor), return_tensors="pt",
                                padding=True)
    ours = processor(images=images(2), text=prompts(processor))
    assert torch.equal(inputs["input_ids"], ours["input_ids"])
    with torch.no_grad():
        want = model(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"],
                     attention_mask=ours["attention_mask"]).logits
        got = exported(**inputs).logits
        real = ours["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
        kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
        ours_out = model.generate(**{k: v for k, v in ours.items() if k != "modality_ids"}, **kwargs)
        assert torch.equal(exported.generate(**inputs, **kwargs), ours_out)
        # Control: the same weights with causal attention compute something else.
        exported.config.mma_mode = "causal"
        assert (exported(**inputs).logits[real] - want[real]).abs().max() > 1e-3
