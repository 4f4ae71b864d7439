"""open_clip vision towers behind the transformers vision-model interface.

`OpenCLIPVisionTower(pixel_values, output_hidden_states=True)` returns `hidden_states` with HF's
convention (embeddings after ln_pre, then each block's output), so feature-layer selection is the
same code for open_clip, CLIP and SigLIP towers. open_clip is imported lazily: it is an optional
extra, and exported checkpoints never need it (the tower is converted to `CLIPVisionModel`).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm.configuration import OpenCLIPVisionConfig
from mllm.export.open_clip_to_hf import open_clip_hidden_states


def import_open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "open_clip vision towers need open_clip_torch: pip install 'mllm[vision]'"
        ) from e
    return open_clip


def register_open_clip_config(model_name: str, model_cfg: dict) -> None:
    """Make a custom architecture known to open_clip's factory under `model_name` (offline)."""
    open_clip = import_open_clip()
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(model_cfg)
    if missing:
        raise ValueError(
            f"vision.model_cfg for open_clip model {model_name!r} lacks {sorted(missing)}; an open_clip "
            "model config needs embed_dim, vision_cfg and text_cfg"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{model_name}.json")
        with open(path, "w") as f:
            json.dump(model_cfg, f)
        open_clip.add_model_config(path)


def create_open_clip_model(config: OpenCLIPVisionConfig, load_pretrained: bool = True) -> nn.Module:
    """The full open_clip CLIP model (vision + text) described by `config`."""
    open_clip = import_open_clip()
    if config.model_cfg is not None:
        register_open_clip_config(config.model_name, config.model_cfg)
    elif config.model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {config.model_name!r}: give vision.model_cfg to define it, or one of "
            f"open_clip.list_models() (e.g. {', '.join(open_clip.list_models()[:5])}, ...)"
        )
    # transformers' from_pretrained builds the model under `torch.device("meta")` and then fills it from
    # the checkpoint; open_clip's factory moves the model to `device` (default "cpu"), which fails on
    # meta tensors, so create it where the caller's context puts new tensors (and load nothing on meta).
    device = torch.get_default_device()
    pretrained = config.pretrained if load_pretrained and device.type != "meta" else None
    if pretrained and os.path.sep in pretrained and not os.path.exists(pretrained):
        raise FileNotFoundError(f"open_clip pretrained weights not found: {pretrained}")
    return open_clip.create_model(config.model_name, pretrained=pretrained, device=device)


class OpenCLIPVisionTower(nn.Module):
    """Holds the open_clip `visual` module; `forward` returns all hidden states (CLS first)."""

    def __init__(self, config: OpenCLIPVisionConfig, visual: nn.Module | None = None):
        super().__init__()
        self.config = config
        if visual is None:
            visual = create_open_clip_model(config).visual
        self.visual = visual
        fill_open_clip_geometry(config, visual)
        # open_clip initialised (or loaded) these weights; keep transformers' post_init off them.
        for module in self.visual.modules():
            module._is_hf_initialized = True

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = True, **kwargs):
        states = open_clip_hidden_states(self.visual, pixel_values.to(self.dtype))
        return BaseModelOutputWithPooling(last_hidden_state=states[-1], hidden_states=states)


def fill_open_clip_geometry(config: OpenCLIPVisionConfig, visual: nn.Module) -> None:
    """Record width, image/patch size and normalisation in the config (read by processor and export)."""
    image_size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    patch_size = visual.patch_size if isinstance(visual.patch_size, int) else visual.patch_size[0]
    config.hidden_size = int(visual.conv1.out_channels)
    config.image_size = int(image_size)
    config.patch_size = int(patch_size)
    preprocess = getattr(visual, "preprocess_cfg", None) or {}
    # open_clip's default normalisation is OpenAI CLIP's mean/std.
    config.image_mean = list(preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    config.image_std = list(preprocess.get("std", (0.26862954, 0.26130258, 0.27577711)))
