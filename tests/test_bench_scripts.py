"""The benchmark scripts' recipes are valid run configs, and part 1 of bench_mod runs: a renamed config key
or a stale helper fails here, not an hour into a benchmark."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from mllm.schema import from_dict, to_dict
from mllm.train.config import RunConfig

SCRIPTS = Path(__file__).parents[1] / "scripts"


def load_script(name: str):
    sys.path.insert(0, str(SCRIPTS))  # the scripts import each other, as when run from scripts/
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def bench_compression():
    return load_script("bench_compression")


def compression_args(**overrides) -> argparse.Namespace:
    args = dict(base=str(Path(__file__).parents[1] / "configs" / "recipes" / "demo.yaml"), patch_size=6,
                eval_samples=None, seed=0, jobs=2, prune_layer=1, steps=None, frozen_tower=False)
    return argparse.Namespace(**{**args, **overrides})


@pytest.mark.parametrize("frozen_tower", [False, True])
def test_bench_compression_recipes_are_valid_run_configs(bench_compression, tmp_path, frozen_tower):
    args = compression_args(frozen_tower=frozen_tower)
    size = bench_compression.SIZES["full"]
    base = bench_compression.base_recipe(args, size, tmp_path / "base")
    cfg = from_dict(RunConfig, base)
    assert cfg.model.vision.model_cfg["vision_cfg"]["patch_size"] == 6
    assert cfg.model.text.config["max_position_embeddings"] >= cfg.data.max_length
    assert cfg.data.max_length == from_dict(RunConfig, bench_compression.load_yaml(args.base)).data.max_length + 64
    for method in bench_compression.METHODS:
        for budget in (1.0, 0.25):
            recipe = bench_compression.finetune_recipe(args, size, base, method, budget, tmp_path / method)
            stage = from_dict(RunConfig, recipe).stages[0]
            params = [p for group in stage.trainable for p in group.params]
            if method == "exit":
                assert stage.token_pruning.method == "exit" and params == ["*exit_gate*"]
                continue
            assert params == (["model.multi_modal_projector.*", "model.language_model.*", "lm_head.*"]
                              if frozen_tower else ["*"])
            if budget == 1.0 and method in bench_compression.BEFORE_LLM:
                assert stage.compression is None and stage.token_pruning is None
            elif method in bench_compression.BEFORE_LLM:
                assert (stage.compression.method, stage.compression.ratio) == (method, budget)
            else:
                assert (stage.token_pruning.method, stage.token_pruning.keep) == ("fastv", budget)


def test_continue_recipe_from_a_resolved_config_and_its_sources_open(bench_compression, synth_world, tmp_path):
    """bench_mod continues a trained run from its config.yaml (every key present, unset ones null)."""
    base = bench_compression.base_recipe(compression_args(), bench_compression.SIZES["small"], tmp_path / "base")
    for source in [s for stage in base["stages"] for s in stage["data"]] + [base["eval"]["source"]]:
        source["path"] = source["path"].replace("data/demo", str(synth_world))  # the demo's data, small
    resolved = to_dict(from_dict(RunConfig, base))
    recipe = bench_compression.continue_recipe(resolved, tmp_path / "mod", steps=5, batch=4, lr=1e-4,
                                               frozen_tower=True, seed=0,
                                               transform={"mod": {"capacity": 0.2, "skip_first": 0}})
    stage = from_dict(RunConfig, recipe).stages[0]
    assert (stage.mod.capacity, stage.mod.skip_first, stage.steps) == (0.2, 0, 5)
    assert recipe["model"]["init_from"] == str(tmp_path / "base" / "model")
    assert len(bench_compression.open_spec(recipe["stages"][0]["data"][0])) > 0
    assert len(bench_compression.open_spec(recipe["eval"]["source"])) > 0


def test_bench_mod_step_part_runs(capsys):
    bench_mod = load_script("bench_mod")
    args = argparse.Namespace(config="tiny", capacity=0.2, steps=1, warmup=0)
    import torch

    results = bench_mod.step_benchmark(args, torch.device("cpu"), torch.float32)
    assert results["dense"]["tokens_per_s"] > 0 and results["mod"]["tokens_per_s"] > 0
    assert abs(results["dense"]["loss"] - results["mod"]["loss"]) < 1.0  # a converted model starts near dense
    assert "MoD / dense training tokens/s" in capsys.readouterr().out


def test_from_clip_recipes_retrain_the_base_stages_after_clip(bench_compression, tmp_path):
    """--from-clip: each method trains the base's align + instruct stages again from its CLIP-stage weights,
    the method's transformation on the first of them."""
    args = compression_args(frozen_tower=True)
    base = bench_compression.base_recipe(args, bench_compression.SIZES["full"], tmp_path / "base")
    for method in ("pool", "fastv"):
        recipe = bench_compression.from_clip_recipe(base, tmp_path / method, seed=0,
                                                    transform=bench_compression.method_transform(args, method, 0.25))
        cfg = from_dict(RunConfig, recipe)
        assert [s.name for s in cfg.stages] == ["align", "instruct"]
        assert [s.steps for s in cfg.stages] == [s["steps"] for s in base["stages"][1:]]
        assert cfg.model.init_from == str(tmp_path / "base" / "stage0-clip" / "final")
        first, second = cfg.stages
        if method == "pool":
            assert (first.compression.method, first.compression.ratio) == ("pool", 0.25)
        else:
            assert (first.token_pruning.method, first.token_pruning.keep) == ("fastv", 0.25)
        assert second.compression is None and second.token_pruning is None  # set once, kept by later stages
        assert cfg.run.output_dir == str(tmp_path / method) and cfg.run.threads == 1
