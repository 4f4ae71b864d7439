"""DeepSpeed engine construction from an explicit JSON preset plus the stage's batch settings."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from mllm.schema import ConfigError

logger = logging.getLogger(__name__)

# Keys the trainer owns: the preset must not disagree with the stage about them.
TRAINER_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping")


def load_deepspeed_config(path: str, stage, dtype: str, world_size: int) -> dict:
    file = Path(path)
    if not file.exists():
        presets = sorted(p.name for p in Path("configs/deepspeed").glob("*.json"))
        raise ConfigError(f"DeepSpeed config {path} not found; presets in configs/deepspeed: {presets}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    for key in TRAINER_KEYS:
        config.pop(key, None)
    config.update(
        train_micro_batch_size_per_gpu=stage.micro_batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        train_batch_size=stage.micro_batch_size * stage.grad_accum * world_size,
        gradient_clipping=stage.max_grad_norm,
    )
    config["bf16"] = {"enabled": dtype == "bf16"}
    config.setdefault("steps_per_print", 10**9)  # our own logger reports progress
    config.setdefault("wall_clock_breakdown", False)
    # We pass a torch optimizer (DeepSpeed's fused ones need CUDA); ZeRO-Offload would otherwise refuse it.
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    # ZeRO checks the optimizer's exact class; ours is torch AdamW with a step veto (GuardedAdamW).
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def build_engine(module, groups: list[dict], stage, cfg, info, lr_fn):
    import deepspeed

    ds_config = load_deepspeed_config(stage.deepspeed or cfg.run.deepspeed, stage, cfg.run.dtype, info.world_size)
    from mllm.train.reliability import GuardedAdamW

    optimizer = GuardedAdamW(
        [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in groups],
        betas=tuple(stage.betas),
    )
    scheduler = LambdaLR(optimizer, lr_fn)
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        declare_zero3_leaf_modules(module)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    engine.guarded_optimizer = optimizer  # the trainer vetoes a step on it (non-finite guard)
    return engine


def declare_zero3_leaf_modules(module) -> list:
    """Mark the module classes the model declares (`zero3_leaf_modules`, e.g. MoE blocks) as ZeRO-3 leaves:
    their parameters are gathered on entry, whichever experts this rank's tokens reach."""
    from deepspeed.utils import set_z3_leaf_modules

    names = list(getattr(module, "zero3_leaf_modules", ()))
    return set_z3_leaf_modules(module, names, raise_if_not_found=False) if names else []


def gathered_state_dict(engine, objective) -> dict:
    """The full model state dict on every rank (ZeRO-3 partitions parameters; gather them first)."""
    import deepspeed

    params = list(objective.model.parameters())
    zero3 = engine.zero_optimization_stage() == 3
    context = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
    with context:
        return {k: v.detach().clone() for k, v in objective.trained_state().items()}
