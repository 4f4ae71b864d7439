"""Plugging interval attention into any transformers backbone.

We register an attention implementation, "mllm_interval", with both of transformers' registries:
the attention function (our op) and the mask function (transformers' SDPA mask). Registering only
the attention function would make transformers drop the mask, silently losing causality; with both,
decode steps and any call without a layout get the backbone's usual causal/padding mask.

At prefill the model passes an `attention_layout` keyword down the backbone (transformers forwards
extra keywords from the model to every attention call); the attention function then runs the
interval op on the padded batch flattened to packed tokens. Decode steps are plain causal over the
cache: the cached image keys/values already saw the question at prefill, exactly as in training.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mllm.attention.layout import AttentionLayout, dense_mask

IMPLEMENTATION = "mllm_interval"
BACKENDS = ("auto", "triton", "flex", "sdpa", "reference")


def interval_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, attention_layout: AttentionLayout | None = None,
                               attention_backend: str = "auto", **kwargs):
    """query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] -> ([B, Tq, Hq, D], None)."""
    B, Hq, Tq, D = query.shape
    if attention_layout is None or Tq != key.shape[2]:
        # Decode (queries shorter than the cache) or no layout: the backbone's causal/padding mask.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if attention_layout.dense_mask is not None or attention_backend == "sdpa":
        return _masked_sdpa(module, query, key, value, dense_mask(attention_layout), dropout, scaling)
    from mllm.kernels import interval_attention

    offsets = (torch.arange(B, device=query.device, dtype=torch.int32) * Tq).view(B, 1)
    kv_start = (attention_layout.kv_start + offsets).reshape(-1)  # packed: row b's keys start at b*T
    kv_end = (attention_layout.kv_end + offsets).reshape(-1)
    q = query.transpose(1, 2).reshape(B * Tq, Hq, D)  # [B*T, Hq, D]
    k = key.transpose(1, 2).reshape(B * Tq, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * Tq, value.shape[1], D)
    out = interval_attention(q, k, v, kv_start, kv_end, scale=scaling, backend=attention_backend,
                             check_bounds=False)
    return out.view(B, Tq, Hq, D), None


def _masked_sdpa(module, query, key, value, mask, dropout, scaling):
    """SDPA with a materialised [B, 1, T, T] boolean mask; fully masked rows (padding) give zeros."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    mask = mask.unsqueeze(1)
    empty = ~mask.any(-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask | empty, dropout_p=dropout if module.training else 0.0, scale=scaling)
    out = out.masked_fill(empty, 0.0)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    AttentionInterface.register(IMPLEMENTATION, interval_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION


register()
