"""Vision towers: open_clip, transformers CLIP and SigLIP, behind one interface.

Every tower is called as `tower(pixel_values, output_hidden_states=True)` and returns HF-style
`hidden_states`; `select_image_features` applies LLaVA's layer / CLS conventions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig

from mllm.configuration import OpenCLIPVisionConfig

# model_type of the vision config -> how to build it. HF towers go through AutoModel.
HF_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
VISION_TYPES = HF_VISION_TYPES + ("open_clip_vision",)


def build_vision_tower(vision_config: PreTrainedConfig) -> nn.Module:
    """A randomly initialised tower for `vision_config` (weights are loaded by the caller)."""
    if isinstance(vision_config, OpenCLIPVisionConfig):
        from mllm.vision.open_clip_tower import OpenCLIPVisionTower

        return OpenCLIPVisionTower(vision_config)
    if vision_config.model_type in HF_VISION_TYPES:
        return AutoModel.from_config(vision_config)
    raise ValueError(
        f"unsupported vision tower type {vision_config.model_type!r}; supported: {', '.join(VISION_TYPES)}"
    )


def has_cls_token(vision_config: PreTrainedConfig) -> bool:
    return vision_config.model_type != "siglip_vision_model"


def select_image_features(
    hidden_states: tuple[torch.Tensor, ...], feature_layer: int, strategy: str, has_cls: bool
) -> torch.Tensor:
    """LLaVA-1.5 uses the penultimate layer and drops CLS ("default"); "full" keeps every token."""
    features = hidden_states[feature_layer]  # [N_img, 1 + P, D_vision]
    if strategy == "default" and has_cls:
        features = features[:, 1:]
    return features
