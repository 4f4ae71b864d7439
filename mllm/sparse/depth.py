"""Dynamic depth and heads as model transformations: Mixture-of-Depths over image tokens (`mod`) and
Mixture-of-Head attention (`moh`), applied to a trained dense model (a recipe stage's `mod:` / `moh:`)
or rebuilt from `MLLMConfig.mod` / `.moh` (from_pretrained). Both start at the dense model: routers at
zero, gate 1, unit head weights.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.sparse.mod import MoDSpec, apply_mod
from mllm.sparse.moe import decoder_layers
from mllm.sparse.moh import MoHSpec, apply_moh


def build_dynamic_layers(language_model: nn.Module, config) -> None:
    """Structure for a config with `mod` / `moh` sections (weights come from the checkpoint)."""
    layers = decoder_layers(language_model)
    if config.moh is not None:
        apply_moh(layers, MoHSpec.from_config(config.moh))
    if config.mod is not None:
        apply_mod(layers, MoDSpec.from_config(config.mod))


def convert(model: nn.Module, mod: MoDSpec | None = None, moh: MoHSpec | None = None) -> dict[str, list[int]]:
    """Convert an MLLMForConditionalGeneration in place; records the sections in its config."""
    layers = decoder_layers(model.model.language_model)
    done = {}
    if moh is not None:
        if model.config.moh is not None:
            raise ValueError("the model already has Mixture-of-Head attention (config.moh is set)")
        done["moh"] = apply_moh(layers, moh)
        model.config.moh = moh.to_config()
    if mod is not None:
        if model.config.mod is not None:
            raise ValueError("the model already has Mixture-of-Depths layers (config.mod is set)")
        done["mod"] = apply_mod(layers, mod)
        model.config.mod = mod.to_config()
    return done


def dynamic_stats(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Raw counters since the last reset (sum them over ranks before `dynamic_summary`), then reset:
    `mod` [L, 4] (image tokens, selected, gate sum, gate^2 sum), `moh` [L, H_routed] tokens per head."""
    from mllm.sparse.mod import mod_layers
    from mllm.sparse.moh import moh_modules

    out = {}
    for key, modules, attr in (("mod", mod_layers(model), "mod_stats"), ("moh", moh_modules(model), "moh_usage")):
        if not modules:
            continue
        rows = []
        for _, module in modules:
            value = getattr(module, attr, None)
            width = 4 if key == "mod" else module.moh_router.weight.shape[0]
            rows.append(torch.zeros(width) if value is None else value.detach().float().cpu())
            module.reset_stats()
        out[key] = torch.stack(rows)
    return out or None


def dynamic_summary(model: nn.Module, stats: dict[str, torch.Tensor]) -> dict:
    """Per layer: MoD kept fraction of image tokens (vs its capacity) and gate mean / std; MoH fraction of
    routed tokens each head served."""
    from mllm.sparse.mod import mod_layers
    from mllm.sparse.moh import moh_modules

    out = {}
    if "mod" in stats:
        s = stats["mod"]
        selected = s[:, 1].clamp(min=1)
        mean = s[:, 2] / selected
        out["mod"] = {
            "layers": [name for name, _ in mod_layers(model)],
            "capacity": [m.mod_capacity for _, m in mod_layers(model)],
            "kept_fraction": (s[:, 1] / s[:, 0].clamp(min=1)).tolist(),
            "gate_mean": mean.tolist(),
            "gate_std": (s[:, 3] / selected - mean ** 2).clamp(min=0).sqrt().tolist(),
        }
    if "moh" in stats:
        usage = stats["moh"]
        out["moh"] = {"layers": [name for name, _ in moh_modules(model)],
                      "head_usage": (usage / usage.sum(1, keepdim=True).clamp(min=1)).tolist()}
    return out
