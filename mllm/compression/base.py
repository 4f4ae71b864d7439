"""The compressor interface and where it sits between the vision tower, the projector and the LLM.

A compressor maps the P patch tokens of each image to K tokens ([N, P, D] -> [N, K, D]) and reports how
many patches each output token stands for (`sizes`; a merged token's features are the size-weighted
mean of its members, so sum(sizes * features) is the sum of the input features). It has no
parameters: the checkpoint layout does not change, only `MLLMConfig.compression` and the token count.

Placement (`compress_and_project`):
- after the projector (pool, tome, vmtc; DESIGN.md §5 "between projector and LLM"): the projector runs
  on every patch, and the compressor merges the projected tokens. Similarity (tome, vmtc) is measured
  on the tower's features at the selected layer, the space ToMe / VMTC match in.
- before the projector (pixel_shuffle): concatenating a window's channels changes the width, so the
  projector's first layer takes `channel_factor` times the tower's width.

A CLS token that the feature-select strategy keeps ("full") is not compressed: it stays the first
token, so K_total = 1 + K. Before a widened projector it is zero-padded ([cls, 0, 0, 0]), exactly like
a window that runs off the edge of the grid.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mllm.compression.config import CompressionSpec


class CompressedTokens(NamedTuple):
    features: torch.Tensor  # [N, K, D]
    sizes: torch.Tensor  # [N, K] float: input patches merged into each output token


class TokenCompressor(nn.Module):
    """Base class: subclasses implement `compress` for images with more than K patch tokens."""

    placement = "after_projector"

    def __init__(self, spec: CompressionSpec):
        super().__init__()
        self.spec = spec

    def extra_repr(self) -> str:
        budget = f"ratio={self.spec.ratio}" if self.spec.ratio is not None else f"tokens={self.spec.tokens}"
        return f"method={self.spec.method}, {budget}, placement={self.placement}"

    def output_tokens(self, num_patches: int) -> int:
        return self.spec.output_tokens(num_patches)

    def is_identity(self, num_patches: int) -> bool:
        return self.output_tokens(num_patches) == num_patches and self.spec.channel_factor == 1

    def forward(self, features: torch.Tensor, metric: torch.Tensor | None = None,
                cls_state: torch.Tensor | None = None) -> CompressedTokens:
        """features [N, P, D] -> K tokens each. `metric` [N, P, Dm]: where similarity and saliency are measured
        (default: the features); `cls_state` [N, Dm]: the tower's CLS token in that space, if it has one."""
        n, p = features.shape[:2]
        if self.is_identity(p):  # ratio 1.0: the very same tensor, so the model is bit-exact
            return CompressedTokens(features, features.new_ones(n, p, dtype=torch.float32))
        metric = features if metric is None else metric
        return self.compress(features, metric.detach(), None if cls_state is None else cls_state.detach())

    def compress(self, features: torch.Tensor, metric: torch.Tensor,
                 cls_state: torch.Tensor | None) -> CompressedTokens:
        raise NotImplementedError

    def compress_and_project(self, features: torch.Tensor, projector: nn.Module, cls_state: torch.Tensor | None,
                             keeps_cls: bool) -> torch.Tensor:
        """Selected tower features [N, (1 +) P, D_vision] -> LLM-side tokens [N, (1 +) K, D_text].

        `keeps_cls`: features[:, 0] is the CLS token (strategy "full"); it passes through uncompressed.
        `cls_state` [N, D_vision]: the CLS token at the feature layer (for saliency), None for SigLIP.
        """
        patches = features[:, 1:] if keeps_cls else features  # [N, P, D_vision]
        if self.is_identity(patches.shape[1]):
            return projector(features)
        if self.placement == "before_projector":
            merged = self(patches, cls_state=cls_state).features  # [N, K, factor * D_vision]
            if keeps_cls:
                cls = F.pad(features[:, :1], (0, merged.shape[-1] - features.shape[-1]))
                merged = torch.cat([cls, merged], dim=1)
            return projector(merged)
        projected = projector(features)  # [N, (1 +) P, D_text]
        merged = self(projected[:, 1:] if keeps_cls else projected, metric=patches, cls_state=cls_state).features
        return torch.cat([projected[:, :1], merged], dim=1) if keeps_cls else merged


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [N, T, ...] at index [N, K] -> [N, K, ...] (per row)."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(*index.shape, *x.shape[2:]))


def sort_by_position(positions: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reorder each row's tokens by their (unique) position: the raster order of the patches they represent."""
    order = positions.argsort(dim=-1)
    return tuple(gather_tokens(t, order) for t in (positions, *tensors))


__all__ = ["CompressedTokens", "TokenCompressor", "gather_tokens", "sort_by_position"]
