"""Grid compressors: average pooling and the pixel-shuffle merge over (kh x kw) windows of the patch grid.

Both cut the g x g grid into windows of kh x kw patches, in raster order (output token i is window
(i // ceil(g / kw), i % ceil(g / kw))), so spatial order is kept and K = ceil(g / kh) * ceil(g / kw).
An odd side (7 x 7 with 2 x 2 windows -> 4 x 4) gets a partial last row / column of windows:
- pool averages only the real patches of a partial window (its size is 2 or 1, not 4), so the
  size-weighted mean of the output is the mean of the input;
- pixel_shuffle fills the missing neighbours' channels with zeros (as a zero-padded image would).

pool follows LLaVA-OneVision / LLaVA-Video's 2 x 2 pooling of projected tokens; pixel_shuffle is
InternVL's pixel shuffle / Qwen2-VL's 2 x 2 patch merger: neighbours are concatenated (channel order:
the window's patches in raster order, each with its D channels) and the projector learns the mixing,
so its input is kh * kw times wider and the merge must sit before it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mllm.compression.base import CompressedTokens, TokenCompressor
from mllm.compression.config import square_side


def grid_windows(x: torch.Tensor, kh: int, kw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, g*g, D] -> windows [N, K, kh*kw, D] (zeros outside the grid) and their real sizes [K]."""
    n, p, d = x.shape
    side = square_side(p)
    rows, cols = math.ceil(side / kh), math.ceil(side / kw)
    grid = x.reshape(n, side, side, d)
    grid = F.pad(grid, (0, 0, 0, cols * kw - side, 0, rows * kh - side))  # [N, rows*kh, cols*kw, D]
    windows = grid.reshape(n, rows, kh, cols, kw, d).permute(0, 1, 3, 2, 4, 5).reshape(n, rows * cols, kh * kw, d)
    heights = torch.clamp(side - torch.arange(rows) * kh, max=kh)  # [rows] real patches per window row
    widths = torch.clamp(side - torch.arange(cols) * kw, max=kw)  # [cols]
    sizes = (heights[:, None] * widths[None, :]).flatten().to(x.device, torch.float32)  # [K]
    return windows, sizes


class AveragePool(TokenCompressor):
    """Mean of each window's real patches (runs after the projector)."""

    def compress(self, features, metric, cls_state) -> CompressedTokens:
        windows, sizes = grid_windows(features, *self.spec.window)  # [N, K, kh*kw, D], [K]
        pooled = windows.float().sum(dim=2) / sizes[:, None]  # fp32 sum: bf16 would round each partial sum
        return CompressedTokens(pooled.to(features.dtype), sizes.expand(features.shape[0], -1))


class PixelShuffle(TokenCompressor):
    """Concatenate each window's patch channels: [N, P, D] -> [N, K, kh*kw*D] (runs before the projector)."""

    placement = "before_projector"

    def compress(self, features, metric, cls_state) -> CompressedTokens:
        windows, sizes = grid_windows(features, *self.spec.window)  # [N, K, kh*kw, D]
        return CompressedTokens(windows.flatten(2), sizes.expand(features.shape[0], -1))


__all__ = ["AveragePool", "PixelShuffle", "grid_windows"]
