"""Mixture-of-Head attention (MoH, Jin et al. 2024): attention heads as experts.

Each token weights the heads' outputs before the output projection: `shared_heads` heads are always on
with weight 1; a router picks the token's top-k of the remaining heads, whose weights are the
renormalised router probabilities times k (so they average 1). A model converted from dense starts
with a zero router: uniform probabilities, weight exactly 1 on every selected head; with top_k = all
routed heads it equals the dense attention (tested).

What gets faster: nothing yet. Every head is computed and the unselected ones are multiplied by 0;
the FLOP saving of MoH needs an attention kernel that skips a token's unselected heads, which neither
SDPA nor our interval kernels do. MoH here is for quality (the paper reports MHA-level accuracy with
50-90% of the heads) and for training the routing that such a kernel would exploit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from mllm.schema import ConfigError, from_dict, to_dict
from mllm.sparse.config import select_layers


@dataclass
class MoHSpec:
    top_k: int = 4  # routed heads each token uses
    shared_heads: int = 0  # always-on heads (the first ones)
    layers: Literal["all", "every_other"] | list[int] = "all"

    def validate(self):
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.shared_heads < 0:
            raise ConfigError(f"shared_heads must be >= 0, got {self.shared_heads}")
        if isinstance(self.layers, list) and not self.layers:
            raise ConfigError("layers is an empty list; use 'all', 'every_other' or layer indices")

    def layer_indices(self, num_layers: int) -> list[int]:
        return select_layers(self.layers, num_layers, "moh")

    def to_config(self) -> dict:
        return {k: to_dict(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_config(cls, data: dict) -> "MoHSpec":
        return from_dict(cls, data, "moh")


class MoHAttention:
    """Mixin swapped into an attention module's class (parameter names stay, plus `moh_router`)."""

    moh_top_k: int
    moh_shared: int
    routing_context = None

    def head_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H] fp32: 1 for shared heads, k * renormalised top-k probabilities for routed heads."""
        probs = F.linear(hidden.float(), self.moh_router.weight.float()).softmax(-1)  # [B, T, H_routed]
        routed = probs.shape[-1]
        if self.moh_top_k < routed:
            top = probs.topk(self.moh_top_k, dim=-1)
            probs = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
        weights = probs / probs.sum(-1, keepdim=True) * self.moh_top_k
        self._record(weights > 0)
        shared = torch.ones(*weights.shape[:-1], self.moh_shared, dtype=weights.dtype, device=weights.device)
        return torch.cat([shared, weights], dim=-1)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) is not None else {}
        out, _ = interface(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                           scaling=self.scaling, **extra, **kwargs)  # [B, T, H, d]
        out = out * self.head_weights(hidden_states).to(out.dtype)[..., None]
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None

    def _record(self, chosen: torch.Tensor) -> None:
        context = self.routing_context
        valid = context.valid.to(chosen.device) if context is not None and \
            context.valid.shape == chosen.shape[:2] else torch.ones(chosen.shape[:2], dtype=torch.bool,
                                                                    device=chosen.device)
        with torch.no_grad():
            counts = (chosen & valid[..., None]).sum((0, 1)).float()  # [H_routed]: tokens per head
            self.moh_usage = counts if getattr(self, "moh_usage", None) is None else self.moh_usage + counts

    def reset_stats(self) -> None:
        self.moh_usage = None


def apply_moh(layers: nn.ModuleList, spec: MoHSpec) -> list[int]:
    """Make the selected layers' attention MoH; routers start at zero (uniform over the heads)."""
    from mllm.sparse.mod import _mixed, check_llama_style_layer

    chosen = spec.layer_indices(len(layers))
    for i in chosen:
        check_llama_style_layer(layers[i], f"decoder layer {i}")
        attn = layers[i].self_attn
        if isinstance(attn, MoHAttention):
            raise ValueError(f"decoder layer {i} already has Mixture-of-Head attention")
        heads = attn.q_proj.weight.shape[0] // attn.head_dim
        routed = heads - spec.shared_heads
        if not 1 <= spec.top_k <= routed:
            raise ConfigError(f"moh.top_k must be in [1, {routed}] (heads {heads} - shared_heads "
                              f"{spec.shared_heads}), got {spec.top_k}")
        weight = attn.q_proj.weight
        attn.moh_router = nn.Linear(weight.shape[1], routed, bias=False).to(weight.device, weight.dtype)
        nn.init.zeros_(attn.moh_router.weight)
        attn.__class__ = _mixed(type(attn), MoHAttention)
        attn.moh_top_k, attn.moh_shared = spec.top_k, spec.shared_heads
        attn.routing_context = None
        attn.moh_usage = None
    return chosen


def moh_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoHAttention)]
