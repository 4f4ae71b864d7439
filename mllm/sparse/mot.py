"""Mixture-of-Transformers (Liang et al. 2024): per-modality copies of the attention projections and
norms. Attention itself stays global (every token attends over the whole sequence); only the weights
that produce q/k/v/o and the normalisations are chosen by the token's modality. The FFN side of MoT is
an MoE with one expert per modality (`experts: {text: 1, image: 1}, top_k: 1`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mllm.sparse.config import NUM_MODALITIES
from mllm.sparse.experts import grouped_mm_supported
from mllm.sparse.routing import RoutingContext, context_for

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
ATTENTION_NORMS = ("q_norm", "k_norm")  # Qwen3 / OLMo-2 per-head norms


class ModalityLinear(nn.Module):
    """A linear layer with one weight per modality: weight [M, out, in], bias [M, out] or None."""

    def __init__(self, linear: nn.Linear, num_modalities: int = NUM_MODALITIES):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().unsqueeze(0).repeat(num_modalities, 1, 1))
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().unsqueeze(0).repeat(num_modalities, 1))
        self.routing_context: RoutingContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        modality, _ = context_for(x.reshape(shape[0], -1, shape[-1]), self.routing_context)
        order = modality.argsort(stable=True)
        counts = torch.zeros(self.weight.shape[0], dtype=torch.long, device=x.device).scatter_add_(
            0, modality, torch.ones_like(modality))
        xs = flat[order]
        if grouped_mm_supported(xs, self.weight):
            y = torch._grouped_mm(xs, self.weight.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
        else:
            y = torch.cat([F.linear(rows, self.weight[m]) for m, rows in enumerate(torch.split(xs, counts.tolist()))])
        if self.bias is not None:
            y = y + self.bias[modality[order]]
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        return y[inverse].view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"modalities={self.weight.shape[0]}, in={self.in_features}, out={self.out_features}"


class ModalityNorm(nn.Module):
    """One copy of a norm module per modality; each token takes its modality's output."""

    def __init__(self, norm: nn.Module, num_modalities: int = NUM_MODALITIES):
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(norm) for _ in range(num_modalities))
        self.routing_context: RoutingContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing_context is None:
            return self.copies[0](x)
        modality = self.routing_context.modality.to(x.device)  # [B, T]
        while modality.dim() < x.dim():  # per-head norms see [B, T, H, d]
            modality = modality.unsqueeze(-1)
        out = self.copies[0](x)
        for m in range(1, len(self.copies)):
            out = torch.where(modality == m, self.copies[m](x), out)
        return out


def apply_mot(language_model: nn.Module, layer_indices: list[int]) -> None:
    """Per-modality q/k/v/o projections and norms in the given decoder layers (copies of the dense ones)."""
    from mllm.sparse.moe import decoder_layers

    layers = decoder_layers(language_model)
    for i in layer_indices:
        layer = layers[i]
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTENTION_PROJECTIONS):
            raise ValueError(f"decoder layer {i}: MoT needs self_attn with q_proj/k_proj/v_proj/o_proj Linear layers")
        for name in ATTENTION_PROJECTIONS:
            setattr(attn, name, ModalityLinear(getattr(attn, name)).train(attn.training))
        for name in ATTENTION_NORMS:
            if isinstance(getattr(attn, name, None), nn.Module):
                setattr(attn, name, ModalityNorm(getattr(attn, name)))
        for name in NORMS:
            if not isinstance(getattr(layer, name, None), nn.Module):
                raise ValueError(f"decoder layer {i} has no {name}; MoT expects Llama-style pre-norm layers")
            setattr(layer, name, ModalityNorm(getattr(layer, name)))
