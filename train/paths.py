"""Checks that a recipe's data paths exist, before any stage spends time training."""

from __future__ import annotations

import os

from mllm.data.sources import expand_shards


def missing_data_paths(cfg) -> list[str]:
    """One line per stage source (and the eval source) whose files are not there."""
    missing = []
    specs = [(f"stages.{i}({stage.name}).data.{j}", s) for i, stage in enumerate(cfg.stages)
             for j, s in enumerate(stage.data)]
    if cfg.eval.source is not None:
        specs.append(("eval.source", cfg.eval.source))
    for where, spec in specs:
        if spec.type == "webdataset":
            try:  # some missing shards are skipped and counted when the source opens; none at all fails here
                expand_shards(spec.path, allow_missing=True)
            except FileNotFoundError as e:
                missing.append(f"{where}: {e}")
        elif not os.path.isfile(spec.path):
            missing.append(f"{where}: LLaVA JSON file not found: {spec.path}")
        elif spec.image_root is not None and not os.path.isdir(spec.image_root):
            missing.append(f"{where}: image_root folder not found: {spec.image_root}")
    return missing
