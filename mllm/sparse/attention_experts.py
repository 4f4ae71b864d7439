"""BAM-style attention experts (Zhang et al. 2024, "BAM! Just Like That"): the dense attention of a
decoder layer is upcycled into A attention experts with their own query and output projections and,
unless `share_kv`, their own key/value projections. A per-token router mixes the experts' outputs
(soft routing over all A by default, or renormalised top-k weights).

All experts run as one attention call: the experts' heads are stacked as extra heads, so the backbone's
attention function (eager, SDPA, our interval kernels) and its KV cache are used unchanged. With
shared K/V the query heads are ordered so that the backbone's grouped-query mapping (query head h reads
KV head h // groups) gives each expert's head its dense KV head; the cache then holds the dense number of
KV heads. Expert outputs are weighted by the router, so with identical copies and weights summing to 1
the layer equals the dense attention (tested). Top-k zeroes weights but still computes every expert:
BAM's soft mixture is the mode this is built for.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _stack(linear: nn.Linear, copies: int) -> tuple[nn.Parameter, nn.Parameter | None]:
    weight = nn.Parameter(linear.weight.detach().unsqueeze(0).repeat(copies, 1, 1).clone())
    bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().unsqueeze(0).repeat(copies, 1).clone())
    return weight, bias


class AttentionExperts(nn.Module):
    """Replaces a Llama-style `self_attn` (q/k/v/o projections, rotary embeddings from the layer)."""

    def __init__(self, attn: nn.Module, num_experts: int, top_k: int | None, share_kv: bool):
        super().__init__()
        for name in PROJECTIONS:
            if not isinstance(getattr(attn, name, None), nn.Linear):
                raise ValueError(f"attention experts need {type(attn).__name__}.{name} to be a Linear layer")
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            raise ValueError(f"{type(attn).__name__} has q/k norms; attention experts support Llama / Qwen2 style attention")
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.attention_dropout, self.is_causal = attn.attention_dropout, True
        self.sliding_window = getattr(attn, "sliding_window", None)
        self.num_experts, self.top_k, self.share_kv = num_experts, top_k, share_kv
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn.k_proj.out_features // self.head_dim
        # The backbone's attention functions repeat KV heads by this factor.
        self.num_key_value_groups = self.num_heads // self.num_kv_heads * (num_experts if share_kv else 1)
        # A plain attribute, never a submodule: with Hugging Face's `kernels` installed, transformers (>= 5.25)
        # makes apply_rotary_pos_emb an nn.Module, which nn.Module.__setattr__ would register as a child (and
        # mllm.fused, which routes RoPE through this attribute, would not find it).
        object.__setattr__(self, "apply_rotary_pos_emb", sys.modules[type(attn).__module__].apply_rotary_pos_emb)
        self.router = nn.Linear(attn.q_proj.in_features, num_experts, bias=False)
        self.q_weight, self.q_bias = _stack(attn.q_proj, num_experts)
        self.o_weight, self.o_bias = _stack(attn.o_proj, num_experts)
        if share_kv:
            self.k_proj, self.v_proj = attn.k_proj, attn.v_proj
        else:
            self.k_weight, self.k_bias = _stack(attn.k_proj, num_experts)
            self.v_weight, self.v_bias = _stack(attn.v_proj, num_experts)

    def _project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, A, out] with expert a's projection."""
        y = torch.einsum("btd,aod->btao", x, weight)
        return y if bias is None else y + bias

    def router_weights(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.linear(x.float(), self.router.weight.float()).softmax(-1)  # [B, T, A], fp32
        if self.top_k is None or self.top_k >= self.num_experts:
            return probs
        top = probs.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
        return weights / weights.sum(-1, keepdim=True)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        batch, seq, _ = hidden_states.shape
        a, h, hkv, d = self.num_experts, self.num_heads, self.num_kv_heads, self.head_dim
        q = self._project(hidden_states, self.q_weight, self.q_bias).view(batch, seq, a, hkv, h // hkv, d)
        if self.share_kv:
            # Head order (kv head, expert, group): query head // (A * groups) = its dense KV head.
            q = q.permute(0, 3, 2, 4, 1, 5).reshape(batch, a * h, seq, d)
            k = self.k_proj(hidden_states).view(batch, seq, hkv, d).transpose(1, 2)
            v = self.v_proj(hidden_states).view(batch, seq, hkv, d).transpose(1, 2)
        else:  # head order (expert, kv head, group); KV heads (expert, kv head)
            q = q.reshape(batch, seq, a * h, d).transpose(1, 2)
            k = self._project(hidden_states, self.k_weight, self.k_bias).reshape(batch, seq, a * hkv, d).transpose(1, 2)
            v = self._project(hidden_states, self.v_weight, self.v_bias).reshape(batch, seq, a * hkv, d).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        extra = {"sliding_window": self.sliding_window} if self.sliding_window is not None else {}
        out, _ = interface(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                           scaling=self.scaling, **extra, **kwargs)  # [B, T, A*H, d]
        if self.share_kv:
            out = out.view(batch, seq, hkv, a, h // hkv, d).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, seq, a, h * d)
        y = torch.einsum("btai,aoi->btao", out, self.o_weight)  # each expert's output projection
        if self.o_bias is not None:
            y = y + self.o_bias
        weights = self.router_weights(hidden_states).to(y.dtype)  # [B, T, A]
        return (y * weights[..., None]).sum(2), None


def apply_attention_experts(language_model: nn.Module, layer_indices: list[int], num_experts: int,
                            top_k: int | None, share_kv: bool, std: float = 0.02, seed: int = 0) -> None:
    from mllm.sparse.moe import decoder_layers

    layers = decoder_layers(language_model)
    generator = torch.Generator().manual_seed(seed + 1)
    for i in layer_indices:
        attn = layers[i].self_attn
        if isinstance(attn, AttentionExperts):
            raise ValueError(f"decoder layer {i} already has attention experts")
        experts = AttentionExperts(attn, num_experts, top_k, share_kv).to(attn.q_proj.weight.device)
        with torch.no_grad():
            experts.router.weight.copy_(torch.randn(experts.router.weight.shape, generator=generator) * std)
        layers[i].self_attn = experts.train(attn.training)
