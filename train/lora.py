"""LoRA / DoRA stages (PEFT): a stage's `peft:` section wraps the model before training.

Targets are anchored on the language model: short names like `q_proj` also name the vision tower's
projections (CLIP / SigLIP), so `targets` become the regex `model\\.language_model\\..*\\.(q_proj|...)` and
any adapter that lands outside the language model is refused. MoE experts keep their weights stacked
[E, F, D]; PEFT's `target_parameters` puts a LoRA on each stacked tensor (`expert_targets`).
The projector, routers or resized embeddings train fully through `modules_to_save`.

The stage's result (`final/`) holds the merged weights in the base layout, so later stages, the run's
`model/` folder and the export see a plain model; the adapter itself is saved beside it (`adapter/`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Literal

from mllm.schema import ConfigError

logger = logging.getLogger(__name__)

LANGUAGE_MODEL = "model.language_model"
EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # where PeftModel puts the wrapped model's module names


@dataclass
class PeftSpec:
    method: Literal["lora", "dora"] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # Module names (last component) inside the language model; anchored there, never the vision tower.
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
    # Instead of `targets`: a regex that must match whole module names (still only inside the language model).
    target_regex: str | None = None
    # MoE experts' stacked weights to adapt (PEFT target_parameters): any of gate_proj, up_proj, down_proj.
    expert_targets: list[str] = field(default_factory=list)
    # Modules trained in full and saved with the adapter (suffix match): projector, routers, embeddings.
    modules_to_save: list[str] = field(default_factory=lambda: ["multi_modal_projector"])
    # QLoRA: the frozen base in 4-bit / 8-bit (bitsandbytes, CUDA only).
    quantize: Literal["none", "4bit", "8bit"] = "none"

    def validate(self):
        if self.r < 1:
            raise ConfigError(f"r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.expert_targets if t not in EXPERT_PARAMS]
        if bad:
            raise ConfigError(f"expert_targets {bad} unknown; valid: {', '.join(EXPERT_PARAMS)}")
        if self.method == "dora" and self.expert_targets:
            raise ConfigError("DoRA does not support expert_targets (PEFT target_parameters); use method: lora")
        if self.target_regex is not None:
            try:
                re.compile(self.target_regex)
            except re.error as e:
                raise ConfigError(f"target_regex {self.target_regex!r} is not a valid regex: {e}") from None
        elif not self.targets and not self.expert_targets:
            raise ConfigError("give targets, target_regex or expert_targets: nothing would be adapted")

    def target_pattern(self) -> str | None:
        if self.target_regex is not None:
            return self.target_regex
        if not self.targets:
            return None
        names = "|".join(re.escape(t) for t in self.targets)
        return rf"{re.escape(LANGUAGE_MODEL)}\..*\.({names})"


def check_quantization(spec: PeftSpec) -> None:
    """QLoRA needs CUDA and bitsandbytes; say so before anything is built."""
    if spec.quantize == "none":
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"peft.quantize: {spec.quantize} (QLoRA) needs a CUDA GPU and bitsandbytes; this machine "
                          "has no GPU. Use peft.quantize: none (plain LoRA) here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"peft.quantize: {spec.quantize} needs bitsandbytes: pip install bitsandbytes")


def quantize_language_model(model, bits: str) -> None:
    """Replace the language model's Linear layers by bitsandbytes 4/8-bit ones (frozen base for QLoRA).

    GPU only; the LM head and the vision side stay in full precision, as in QLoRA."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    language_model = model.get_submodule(LANGUAGE_MODEL)
    for name, module in list(language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            if bits == "4bit":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False)
                new.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False)
            if child.bias is not None:
                new.bias = child.bias
            setattr(module, child_name, new.cuda())


def apply_peft(model, spec: PeftSpec):
    """Wrap `model` (an MLLMForConditionalGeneration) into a PeftModel with the stage's adapters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_quantization(spec)
    if spec.quantize != "none":
        quantize_language_model(model, spec.quantize)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    pattern = spec.target_pattern()
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=pattern,
        target_parameters=[f"experts.{p}" for p in spec.expert_targets] or None,
        modules_to_save=list(spec.modules_to_save) or None,
        use_dora=spec.method == "dora",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"peft: {e} (targets {pattern!r}, expert_targets {spec.expert_targets})") from None
    outside = sorted({name.removeprefix(PEFT_PREFIX).rsplit(".lora_A", 1)[0]
                      for name, _ in peft_model.named_modules()
                      if name.endswith("lora_A") and not name.removeprefix(PEFT_PREFIX).startswith(LANGUAGE_MODEL + ".")})
    if outside:
        raise ConfigError(f"peft targets matched modules outside the language model: {outside[:5]}; anchor "
                          f"target_regex on {LANGUAGE_MODEL!r} (the vision tower has q_proj/v_proj too)")
    return peft_model


def lora_module_names(peft_model) -> list[str]:
    """Names (in the wrapped model's namespace) of the modules that carry a LoRA adapter."""
    return sorted({name.removeprefix(PEFT_PREFIX).rsplit(".lora_A", 1)[0]
                   for name, _ in peft_model.named_modules() if name.endswith("lora_A")})


def merged_and_adapter(peft_model, adapter_dir=None) -> dict:
    """Save the adapter (when `adapter_dir`) and return the merged base state dict.

    `peft_model` holds full (gathered) tensors; it is consumed (merged in place)."""
    if adapter_dir is not None:
        peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()
    return merged.state_dict()
