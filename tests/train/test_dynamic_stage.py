"""MoD + MoH as a recipe stage: the dense stage's model is converted when the stage starts, trains, logs
the kept fraction / gates / head usage, and its eval writes them with dynamic_compute.png."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from tests.train.test_train_integration import mllm, tiny_recipe, world, write_recipe  # noqa: F401


def test_mod_moh_stage_converts_trains_and_reports(world):
    recipe = tiny_recipe(world, "run_dynamic", steps=2, save_every=0)
    recipe["eval"] = {"source": {"type": "webdataset", "path": str(world / "data" / "wds" / "heldout-vqa-*.tar")},
                      "max_samples": 4, "batch_size": 4, "max_new_tokens": 4}
    recipe["stages"].append({
        "name": "dynamic", "steps": 3, "micro_batch_size": 4, "lr": 1e-3, "data": recipe["stages"][0]["data"],
        "mod": {"capacity": 0.3, "skip_first": 0}, "moh": {"top_k": 2, "shared_heads": 1},
        "trainable": [{"params": ["model.language_model.*"]}],
    })
    mllm("train", str(write_recipe(world, "dynamic", recipe)))
    run = world / "run_dynamic"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    routed = [r for r in records if r.get("stage") == "dynamic"]
    assert [r["step"] for r in routed] == [1, 2, 3]
    for r in routed:
        kept = r["mod_kept_fraction"]  # both layers routed: ceil(0.3 * 9) / 9 of each image
        assert len(kept) == 2 and all(abs(k - 3 / 9) < 1e-6 for k in kept) and len(r["moh_head_usage"]) == 2
        assert all(abs(sum(layer) - 1) < 1e-6 for layer in r["moh_head_usage"])
    final = load_file(run / "stage1-dynamic" / "final" / "model.safetensors")
    # Routers start at zero; layer 0's trains (the last layer's image outputs reach no loss: no gradient).
    assert final["model.language_model.layers.0.mod_router.weight"].abs().max() > 0
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["mod"]["capacity"] == 0.3 and config["moh"]["top_k"] == 2
    report = json.loads((run / "eval.json").read_text())
    assert report["mod"]["capacity"] == [0.3, 0.3] and len(report["moh"]["head_usage"]) == 2
    assert (run / "dynamic_compute.png").stat().st_size > 1000
