"""Typed visual-token compression settings: the `model.compression:` section of a recipe, and the plain
dict stored in `MLLMConfig.compression` (so `from_pretrained` rebuilds the same compressor).

Every method turns the P patch tokens of one image into a fixed number K of LLM-side tokens, so the
processor can expand `<image>` to exactly K. `output_tokens(P)` is that K; `MLLMConfig.num_image_tokens`
and the FLOP accounting read it from here, so there is one definition of the count.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from mllm.schema import ConfigError, from_dict, to_dict

METHODS = ("pool", "pixel_shuffle", "tome", "vmtc")
# Methods that shrink the patch grid by an integer window (their K follows from the grid, not a free count).
GRID_METHODS = ("pool", "pixel_shuffle")


@dataclass
class CompressionSpec:
    """`method`:
    - pool: average over (kh x kw) windows of the patch grid (after the projector);
    - pixel_shuffle: concatenate the channels of each (kh x kw) window (before the projector, whose input
      width grows kh*kw times);
    - tome: ToMe bipartite soft matching, merging the most similar pairs until K tokens remain;
    - vmtc: keep the `primary` fraction of K by saliency, k-means the rest into the remaining clusters.

    Budget: `ratio` (K / P; 1.0 is the identity) or, for tome / vmtc, an exact `tokens: K`.
    For the grid methods the ratio must be 1/n (0.5, 0.25, 0.125, 1/9, ...): the window is the most
    square factorisation kh x kw = n with kh <= kw, and odd grid sides get a partial last window.
    """

    method: Literal["pool", "pixel_shuffle", "tome", "vmtc"] = "pool"
    ratio: float | None = None
    tokens: int | None = None
    # vmtc: fraction of the K outputs that are kept patch tokens; the rest are cluster means, at least one,
    # so every patch reaches the LLM either as itself or inside a cluster.
    primary: float = 0.5
    # vmtc: auto = similarity to the tower's [CLS] token where it has one (CLIP, open_clip), else the
    # feature norm (SigLIP has no CLS). Neither needs attention probabilities from the LLM.
    saliency: Literal["auto", "cls", "norm"] = "auto"
    iterations: int = 3  # vmtc: k-means iterations (each one assignment + one centroid update)

    def validate(self):
        if (self.ratio is None) == (self.tokens is None):
            raise ConfigError(f"give exactly one of ratio (output / input tokens, e.g. 0.25) or tokens (K); got "
                              f"ratio={self.ratio}, tokens={self.tokens}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio must be in (0, 1] (1.0 = no compression), got {self.ratio}")
        if self.tokens is not None:
            if self.method in GRID_METHODS:
                raise ConfigError(f"method {self.method!r} shrinks the grid by a whole window; give ratio as 1/n "
                                  "(e.g. 0.25 for 2x2), or use tome / vmtc for an exact token count")
            if self.tokens < 1:
                raise ConfigError(f"tokens must be >= 1, got {self.tokens}")
        if self.method in GRID_METHODS:
            grid_window(self.ratio, self.method)  # raises when the ratio is not 1/n
        if not 0 <= self.primary < 1:
            raise ConfigError(f"primary must be in [0, 1) (the fraction of the output tokens kept as they are; "
                              f"the rest are cluster means), got {self.primary}")
        if self.iterations < 0:
            raise ConfigError(f"iterations must be >= 0, got {self.iterations}")

    @property
    def window(self) -> tuple[int, int]:
        """(kh, kw) of the grid methods: the most square factorisation of n = 1 / ratio."""
        return grid_window(self.ratio, self.method)

    @property
    def channel_factor(self) -> int:
        """How many times wider the projector's input is (pixel_shuffle concatenates a window's channels)."""
        if self.method != "pixel_shuffle":
            return 1
        kh, kw = self.window
        return kh * kw

    def output_tokens(self, num_patches: int) -> int:
        """K: LLM-side tokens for an image of `num_patches` patch tokens (a CLS token is counted apart)."""
        if self.method in GRID_METHODS:
            side = square_side(num_patches)
            kh, kw = self.window
            return math.ceil(side / kh) * math.ceil(side / kw)
        k = self.tokens if self.tokens is not None else max(1, round(self.ratio * num_patches))
        if k > num_patches:
            raise ConfigError(f"compression.tokens={k} is more than the {num_patches} patch tokens per image; "
                              f"choose tokens <= {num_patches} or a ratio")
        return k

    def to_config(self) -> dict:
        """The plain dict stored in `MLLMConfig.compression`."""
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, data: dict) -> "CompressionSpec":
        return from_dict(cls, data, "compression")


def grid_window(ratio: float, method: str = "pool") -> tuple[int, int]:
    """(kh, kw) with kh * kw = n = 1 / ratio, as square as possible (kh <= kw): 0.25 -> 2x2, 0.125 -> 2x4."""
    n = round(1 / ratio)
    if abs(n * ratio - 1) > 1e-6:
        raise ConfigError(f"ratio {ratio} is not 1/n for a whole n; method {method!r} merges whole windows of n "
                          "patches (0.5 = 1x2, 0.25 = 2x2, 0.125 = 2x4, 0.111.. = 3x3)")
    kh = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return kh, n // kh


def square_side(num_patches: int) -> int:
    """The side g of a square g x g patch grid (every tower we build makes square images)."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ConfigError(f"{num_patches} patch tokens do not form a square grid; the grid methods (pool, "
                          "pixel_shuffle) need square images, tome / vmtc do not")
    return side


__all__ = ["CompressionSpec", "GRID_METHODS", "METHODS", "grid_window", "square_side"]
