"""A LoRA stage end to end: adapters train, `final/` holds the merged weights, the saved adapter reloads
to the same logits, resume mid-LoRA reproduces the uninterrupted run, ZeRO-2 / ZeRO-3 with 2 processes
gather the adapters for the merge, and a LoRA stage can start from an exported checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.test_train_integration import losses, mllm, tiny_recipe, world, write_recipe  # noqa: F401

ROOT = Path(__file__).parents[2]
ATOL = 1e-4  # fp32: merged W + BA vs the adapter's x W + (x A) B


def lora_recipe(world: Path, out: str, **lora) -> dict:
    recipe = tiny_recipe(world, out, steps=2, save_every=0, eval=True)
    recipe["eval"] = {"source": {"type": "webdataset", "path": str(world / "data" / "wds" / "heldout-vqa-*.tar")},
                      "max_samples": 4, "batch_size": 4, "max_new_tokens": 4}
    stage = {"name": "lora", "steps": 4, "micro_batch_size": 4, "lr": 5e-3, "min_lr_ratio": 1.0, "save_every": 2,
             "data": recipe["stages"][0]["data"], "peft": {"r": 4, "alpha": 8, "dropout": 0.0}}
    stage.update(lora)
    recipe["stages"].append(stage)
    return recipe


@pytest.fixture(scope="module")
def lora_run(world) -> Path:
    mllm("train", str(write_recipe(world, "lora", lora_recipe(world, "run_lora"))))
    return world / "run_lora"


def logits_on_images(model, processor, world: Path) -> torch.Tensor:
    from PIL import Image

    entries = json.loads((world / "data" / "llava" / "heldout_vqa.json").read_text())[:2]
    images = [Image.open(world / "data" / "llava" / e["image"]).convert("RGB") for e in entries]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in ("What color is the circle?", "How many shapes are there?")]
    batch = processor(images=images, text=prompts)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     attention_mask=batch["attention_mask"]).logits


def assert_adapter_reloads_to_merged(run: Path, world: Path) -> None:
    """PeftModel(previous stage's result + saved adapter) == the run's merged model."""
    from peft import PeftModel

    from mllm.export import load_mllm
    from mllm.export.inputs import load_export_source

    adapter = run / "stage1-lora" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (run / "stage0-instruct" / "final").resolve()
    tensors = load_file(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at 0: every adapter trained
    assert not any("vision_tower" in k for k in tensors)
    base = load_export_source(config["base_model_name_or_path"])
    merged, processor = load_mllm(run / "model")
    want = logits_on_images(merged, processor, world)
    assert (logits_on_images(base.model, processor, world) - want).abs().max() > 1e-3  # the adapter matters
    adapted = PeftModel.from_pretrained(base.model, str(adapter)).eval()  # wraps base.model in place
    torch.testing.assert_close(logits_on_images(adapted, processor, world), want, atol=ATOL, rtol=0)


def test_lora_stage_trains_adapters_and_final_holds_the_merge(world, lora_run):
    assert sorted(losses(lora_run, "lora")) == [1, 2, 3, 4]
    records = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(sum(r["data_mix"].values()) - 1) < 1e-9 for r in records if "data_mix" in r)
    assert any("data_mix" in r for r in records)
    # `eval: true` on the instruct stage: accuracy before the LoRA stage, beside the run's final eval.
    for report in (lora_run / "stage0-instruct" / "eval.json", lora_run / "eval.json"):
        assert json.loads(report.read_text())["n"] > 0
    before = load_file(lora_run / "stage0-instruct" / "final" / "model.safetensors")
    after = load_file(lora_run / "stage1-lora" / "final" / "model.safetensors")
    assert before.keys() == after.keys()  # the base layout: no lora_ / base_layer keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.language_model.layers.1.mlp.down_proj.weight" in changed
    assert "model.multi_modal_projector.linear_1.weight" in changed  # modules_to_save
    assert not any(k.startswith("model.vision_tower") or "embed_tokens" in k or "norm" in k for k in changed)
    assert_adapter_reloads_to_merged(lora_run, world)


def test_resume_mid_lora_reproduces_the_uninterrupted_run(world, lora_run):
    path = write_recipe(world, "lora_split", lora_recipe(world, "run_lora_split"))
    mllm("train", str(path), "--max-steps", "3")  # the instruct stage (2 steps) ends; LoRA stops at step 3
    assert (world / "run_lora_split" / "stage1-lora" / "checkpoints" / "step-00000003").is_dir()
    mllm("train", str(path))
    assert losses(world / "run_lora_split", "lora") == losses(lora_run, "lora")
    a = load_file(world / "run_lora_split" / "stage1-lora" / "final" / "model.safetensors")
    b = load_file(lora_run / "stage1-lora" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("zero", [2, 3])
def test_lora_under_zero_with_two_processes(world, zero):
    recipe = lora_recipe(world, f"run_lora_z{zero}", steps=2, save_every=0)
    recipe["run"]["deepspeed"] = str(ROOT / "configs" / "deepspeed" / f"zero{zero}.json")
    mllm("train", str(write_recipe(world, f"lora_z{zero}", recipe)), nproc=2)
    assert_adapter_reloads_to_merged(world / f"run_lora_z{zero}", world)


def test_lora_stage_from_an_exported_checkpoint(world, lora_run, tmp_path):
    """Export a trained model, LoRA-finetune the export, export the adapter merged into it."""
    mllm("export", str(lora_run / "stage0-instruct" / "final"), str(tmp_path / "base"))
    recipe = lora_recipe(world, "run_lora_from_export", steps=2, save_every=0)
    recipe["model"] = {"init_from": str(tmp_path / "base")}
    recipe["stages"] = recipe["stages"][1:]
    mllm("train", str(write_recipe(world, "lora_from_export", recipe)))
    run = world / "run_lora_from_export"
    adapter = run / "stage0-lora" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((tmp_path / "base").resolve())
    proc = mllm("export", str(adapter), str(tmp_path / "merged"), check=False)
    assert proc.returncode == 2 and "--merge-lora" in proc.stderr and not (tmp_path / "merged").exists()
    proc = mllm("export", str(adapter), str(tmp_path / "merged"), "--merge-lora")
    assert "verified" in proc.stdout
    from transformers import AutoModelForImageTextToText

    from mllm.export import load_mllm

    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", trust_remote_code=True).eval()
    ours, processor = load_mllm(run / "model")
    inputs = processor(images=[], text=["What color is the circle?"])
    with torch.no_grad():
        got = exported(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        want = ours(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_a_config_mixing_init_from_with_a_model_section_is_refused(world, tmp_path):
    recipe = lora_recipe(world, "run_bad", steps=2)
    recipe["model"]["init_from"] = str(tmp_path)
    proc = mllm("train", str(write_recipe(world, "bad_init", recipe)), check=False)
    assert proc.returncode == 2 and "init_from" in proc.stderr and "model.vision" in proc.stderr


def test_lora_stage_from_a_training_checkpoint(world, lora_run):
    """init_from a mid-LoRA checkpoint of another run: consolidated and merged as `mllm export --merge-lora`
    does, then a new LoRA stage trains on top."""
    recipe = lora_recipe(world, "run_lora_from_ckpt", steps=2, save_every=0)
    recipe["model"] = {"init_from": str(lora_run / "stage1-lora" / "checkpoints" / "step-00000002")}
    recipe["stages"] = recipe["stages"][1:]
    mllm("train", str(write_recipe(world, "lora_from_ckpt", recipe)))
    adapter = world / "run_lora_from_ckpt" / "stage0-lora" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"].endswith(
        "step-00000002")
