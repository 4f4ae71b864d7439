"""Trainable parameters from a stage's globs: freeze everything, unfreeze the matches, group by lr."""

from __future__ import annotations

from collections import OrderedDict
from fnmatch import fnmatchcase

from torch import nn

from mllm.schema import ConfigError


def apply_trainable(module: nn.Module, stage) -> list[dict]:
    """Set `requires_grad` from the stage's groups; returns optimizer param groups (first match wins).

    A PEFT stage without `trainable` globs trains what PEFT left trainable (adapters, modules_to_save)."""
    if not stage.trainable and getattr(stage, "peft", None) is not None:
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return [{"params": [p for _, p in params], "names": [n for n, _ in params], "lr": stage.lr,
                 "weight_decay": stage.weight_decay}]
    groups = [{"params": [], "names": [], "lr": g.lr if g.lr is not None else stage.lr,
               "weight_decay": g.weight_decay if g.weight_decay is not None else stage.weight_decay}
              for g in stage.trainable]
    matched_patterns: set[str] = set()
    for name, param in module.named_parameters():
        param.requires_grad_(False)
        for group, spec in zip(groups, stage.trainable):
            hit = next((p for p in spec.params if fnmatchcase(name, p)), None)
            if hit is not None:
                matched_patterns.add(hit)
                param.requires_grad_(True)
                group["params"].append(param)
                group["names"].append(name)
                break
    unmatched = [p for spec in stage.trainable for p in spec.params if p not in matched_patterns]
    if unmatched:
        examples = ", ".join(n for n, _ in list(module.named_parameters())[:4])
        raise ConfigError(
            f"stage {stage.name!r}: trainable pattern(s) {unmatched} match no parameter of "
            f"{type(module).__name__} (parameter names look like: {examples}, ...)"
        )
    return [g for g in groups if g["params"]]


def param_table(module: nn.Module, depth: int = 3) -> str:
    """Frozen / trainable parameter counts per module prefix (first `depth` name components)."""
    counts: OrderedDict[str, list[int]] = OrderedDict()
    for name, param in module.named_parameters():
        key = ".".join(name.split(".")[:depth])
        row = counts.setdefault(key, [0, 0])
        row[1 if param.requires_grad else 0] += param.numel()
    width = max([len(k) for k in counts] + [6])
    lines = [f"{'module':<{width}}  {'frozen':>12}  {'trainable':>12}"]
    for key, (frozen, trainable) in counts.items():
        lines.append(f"{key:<{width}}  {frozen:>12,}  {trainable:>12,}")
    total_frozen = sum(r[0] for r in counts.values())
    total_trainable = sum(r[1] for r in counts.values())
    lines.append(f"{'total':<{width}}  {total_frozen:>12,}  {total_trainable:>12,}")
    return "\n".join(lines)
