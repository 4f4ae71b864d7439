"""Every shipped recipe parses and validates (typed, strict): a renamed key or a stale value in
configs/recipes/ fails here, not in a user's first run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm.train.config import load_run_config

RECIPES = sorted((Path(__file__).parents[1] / "configs" / "recipes").glob("*.yaml"))


def test_the_recipes_are_found():
    assert {"demo", "demo_exit", "demo_fastv", "demo_lora", "demo_mod"} <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads(path):
    cfg = load_run_config(path)
    assert cfg.stages and all(stage.data for stage in cfg.stages)
