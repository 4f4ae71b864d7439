"""The multi-modal projector: LLaVA-1.5's MLP (Linear-GELU-Linear), with configurable depth.

Module names follow transformers' `LlavaMultiModalProjector` (`linear_1`, `act`, `linear_2`), so a
depth-2 projector loads Llava checkpoints unchanged. Depth 1 is LLaVA-1.0's single linear layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class MultiModalProjector(nn.Module):
    def __init__(self, vision_hidden_size: int, text_hidden_size: int, depth: int = 2,
                 act: str = "gelu", bias: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        self.depth = depth
        self.act = ACT2FN[act]
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size, bias=bias)
        for i in range(2, depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(text_hidden_size, text_hidden_size, bias=bias))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(image_features)  # [N, P, D_text]
        for i in range(2, self.depth + 1):
            hidden = getattr(self, f"linear_{i}")(self.act(hidden))
        return hidden
