"""Visual-token compression as recipe stages: a trained dense model is compressed before the LLM
(pixel_shuffle: the projector widens) and pruned inside it (fastv) when a stage starts; the exit gates of
visual-token exit train in a stage of their own with everything else frozen. The saved model, its
processor, metrics and eval carry the new token counts."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.train.test_train_integration import mllm, tiny_recipe, world, write_recipe  # noqa: F401


def eval_section(world) -> dict:
    return {"source": {"type": "webdataset", "path": str(world / "data" / "wds" / "heldout-vqa-*.tar")},
            "max_samples": 4, "batch_size": 4, "max_new_tokens": 4}


def test_compression_and_fastv_stage_converts_trains_and_reports(world):
    recipe = tiny_recipe(world, "run_compress", steps=2, save_every=0)
    recipe["eval"] = eval_section(world)
    recipe["stages"].append({
        "name": "compress", "steps": 2, "micro_batch_size": 4, "lr": 1e-3, "data": recipe["stages"][0]["data"],
        "compression": {"method": "pixel_shuffle", "ratio": 0.25},  # 3x3 patches -> 2x2 windows -> 4 tokens
        "token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5},  # then 2 of the 4 after layer 0
        "trainable": [{"params": ["*"]}],
    })
    mllm("train", str(write_recipe(world, "compress", recipe)))
    run = world / "run_compress"
    records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r.get("stage") == "compress"]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["pruning_kept_fraction"] == [0.5] for r in records)  # layer 1 keeps ceil(0.5 * 4) of 4
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["compression"]["method"] == "pixel_shuffle" and config["token_pruning"]["keep"] == 0.5
    assert config["token_pruning"]["assistant_token_id"] is not None  # the prompt's end, from the tokenizer
    processor = json.loads((run / "model" / "processor_config.json").read_text())
    assert processor["num_image_tokens"] == 4
    dense = load_file(run / "stage0-instruct" / "final" / "model.safetensors")
    final = load_file(run / "stage1-compress" / "final" / "model.safetensors")
    key = "model.multi_modal_projector.linear_1.weight"
    assert final[key].shape[1] == 4 * dense[key].shape[1]  # the widened projector trained on
    report = json.loads((run / "eval.json").read_text())
    assert report["pruning"]["kept_fraction"] == [0.5]
    assert (run / "dynamic_compute.png").stat().st_size > 1000


def test_exit_gates_train_in_their_own_stage_from_a_trained_model(world):
    """From a trained model (model.init_from: from_pretrained hands it over in eval mode, and the stage must
    still train in training mode, or the gates get no supervision)."""
    dense = tiny_recipe(world, "run_exit_base", steps=2, save_every=0)
    mllm("train", str(write_recipe(world, "exit_base", dense)))
    recipe = tiny_recipe(world, "run_exit", steps=3, micro_batch_size=4, lr=0.05, save_every=0,
                         token_pruning={"method": "exit"},
                         trainable=[{"params": ["*exit_gate*"]}])  # the LLM stays as trained: only the gates learn
    recipe["stages"][0]["name"] = "exit"
    recipe["model"] = {"init_from": str(world / "run_exit_base")}
    recipe["eval"] = eval_section(world)
    mllm("train", str(write_recipe(world, "exit", recipe)))
    run = world / "run_exit"
    before = load_file(world / "run_exit_base" / "stage0-instruct" / "final" / "model.safetensors")
    after = load_file(run / "stage0-exit" / "final" / "model.safetensors")
    gate = "model.language_model.layers.1.exit_gate.bias"
    assert gate not in before and after[gate].item() != -4.0  # the gate started closed and trained
    assert all(torch.equal(after[k], before[k]) for k in before)  # nothing else moved
    records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("stage") == "exit"]
    assert len(records) == 3 and all(r["exit_gate_loss"] > 0 for r in records)
    report = json.loads((run / "eval.json").read_text())
    assert len(report["pruning"]["kept_fraction"]) == 1  # layer 1 of the 2-layer LLM is the only exit layer
