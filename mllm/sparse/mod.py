"""Mixture-of-Depths over image tokens (VideoLLM-MoD, p-MoD): in a routed decoder layer only the top
`capacity` fraction of each row's image tokens runs the layer; text tokens always run; the other image
tokens pass through unchanged.

Variant (documented choice): skipped tokens stay in the context, as in VideoLLM-MoD. Their keys and
values are computed from their unchanged hidden states, so every layer's KV cache holds every token and
cached decoding is the backbone's own path; only the queries, the attention output projection and the
FFN run on the kept tokens. Dropping skipped tokens from the block (original MoD) would leave routed
layers with shorter caches than the others, which transformers' per-model masks cannot express.
Saved per skipped token: q/o projections, its attention row and the whole FFN (~75% of a Llama layer's
token FLOPs); the k/v projections (the rest) still run.

The kept tokens' update is scaled by the router: x + g * attn and then + g * ffn, with
g = 1 + tanh(router logit) for selected image tokens (1 for text). The router starts at zero, so g = 1
and a converted model computes the dense layer on the tokens it keeps (p-MoD normalises its router
weight with tanh for the same reason: a gate near 1 at conversion). With capacity 1 and `gate: none`
the layer equals the dense layer (tested). Original position ids are kept; the attention windows of
the kept queries are the rows of the full layout (causal, MMA or packed), so MMA and packing work.
Routing covers image tokens only, which are all present at prefill: generation selects the same top-k.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mllm.schema import ConfigError, from_dict, to_dict
from mllm.sparse.config import select_layers


@dataclass
class MoDSpec:
    capacity: float = 0.2  # fraction of each row's image tokens that runs a routed layer (first routed layer)
    # constant: every routed layer keeps `capacity`; cosine: p-MoD's shifted cosine from `capacity` in the
    # first routed layer down to `final_capacity` in the last.
    schedule: Literal["constant", "cosine"] = "constant"
    final_capacity: float | None = None
    layers: Literal["all", "every_other"] | list[int] = "all"
    skip_first: int = 1  # layers below this index are never routed ("all but the first k")
    gate: Literal["tanh", "none"] = "tanh"  # none: kept tokens' updates are not scaled (router only selects)

    def validate(self):
        if not 0 < self.capacity <= 1:
            raise ConfigError(f"capacity must be in (0, 1], got {self.capacity}")
        if self.schedule == "cosine":
            if self.final_capacity is None or not 0 < self.final_capacity <= 1:
                raise ConfigError(f"schedule cosine needs final_capacity in (0, 1], got {self.final_capacity}")
        elif self.final_capacity is not None:
            raise ConfigError("final_capacity applies to schedule: cosine only")
        if self.skip_first < 0:
            raise ConfigError(f"skip_first must be >= 0, got {self.skip_first}")
        if isinstance(self.layers, list) and not self.layers:
            raise ConfigError("layers is an empty list; use 'all', 'every_other' or layer indices")

    def layer_indices(self, num_layers: int) -> list[int]:
        return [i for i in select_layers(self.layers, num_layers, "mod") if i >= self.skip_first]

    def capacities(self, num_layers: int) -> dict[int, float]:
        """Layer index -> capacity, for the routed layers."""
        layers = self.layer_indices(num_layers)
        if self.schedule == "constant" or len(layers) == 1:
            return {i: self.capacity for i in layers}
        out = {}
        for j, i in enumerate(layers):
            t = j / (len(layers) - 1)  # 0 at the first routed layer, 1 at the last
            out[i] = self.final_capacity + (self.capacity - self.final_capacity) * (1 + math.cos(math.pi * t)) / 2
        return out

    def to_config(self) -> dict:
        return {k: to_dict(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_config(cls, data: dict) -> "MoDSpec":
        return from_dict(cls, data, "mod")


def first_positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n]: each row's positions where `mask` [B, T] holds, in order, then the others (a stable sort)."""
    return (~mask).to(torch.int8).argsort(dim=1, stable=True)[:, :n]


def flat_rows(index: torch.Tensor, T: int) -> torch.Tensor:
    """[B, K] positions -> [B x K] row indices into the [B x T] view (row b's offset by b x T)."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * T).reshape(-1)


def take_rows(x: torch.Tensor, flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """x [B, T, ...] at the row indices `flat` (from flat_rows), as `shape`. index_select on the [B x T, ...]
    view: on CPU ~3x faster than gather with an expanded index, forward and backward."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, flat).view(shape)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B or 1, T, ...] at index [B, K] -> [B, K, ...] (rotary tables come with batch 1: plain indices)."""
    shape = (*index.shape, *x.shape[2:])
    if x.shape[0] == 1:
        return x[0].index_select(0, index.reshape(-1)).view(shape)
    return take_rows(x, flat_rows(index, x.shape[1]), shape)


def top_fraction(scores: torch.Tensor, candidates: torch.Tensor, fraction: float) -> torch.Tensor:
    """[B, T] bool: each row's top ceil(fraction x its candidate count) candidates by `scores` [B, T] (ties: the
    earlier position), with no host sync."""
    quota = torch.ceil(candidates.sum(1) * fraction).long()  # [B]
    order = scores.masked_fill(~candidates, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))
    return candidates & (rank < quota[:, None])


class MoDLayer:
    """Mixin swapped into a decoder layer's class (so its parameter names stay the dense ones, plus
    `mod_router`); see the module docstring. Needs Llama-style layers (input_layernorm, self_attn with
    q/k/v/o_proj, post_attention_layernorm, mlp)."""

    mod_capacity: float
    mod_gate: str
    routing_context = None

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        context = self.routing_context
        decoding = cache is not None and cache.get_seq_length(self.self_attn.layer_idx) > 0
        if context is None or decoding or context.modality.shape != hidden_states.shape[:2]:
            # Decode steps (only new text tokens) and calls without image tokens: the dense layer.
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        return self._routed_forward(hidden_states, context, cache, position_embeddings, **kwargs)

    def _select(self, hidden: torch.Tensor, context):
        """(selected [B, T] bool: the image tokens that run, gate [B, T] fp32: 1 except on selected tokens,
        image [B, T] bool: the real image tokens)."""
        image = context.modality.to(hidden.device).bool() & context.valid.to(hidden.device)
        logits = F.linear(hidden.float(), self.mod_router.weight.float()).squeeze(-1)  # [B, T]
        selected = top_fraction(logits, image, self.mod_capacity)
        gate = torch.ones_like(logits)
        if self.mod_gate == "tanh":
            gate = torch.where(selected, 1 + torch.tanh(logits), gate)
        self._record(image, selected, gate)
        return selected, gate, image

    def _routed_forward(self, hidden_states, context, cache, position_embeddings, **kwargs):
        B, T, D = hidden_states.shape
        selected, gate, image = self._select(hidden_states, context)
        keep = ~image | selected  # text (and padding) always run
        count = keep.sum(1)  # [B]
        kept_len = int(count.max())  # one host sync per routed layer: the compacted length
        index = first_positions(keep, kept_len)  # kept first, in order
        slot_valid = torch.arange(kept_len, device=index.device)[None] < count[:, None]  # [B, Tk]
        flat = flat_rows(index, T)

        attn = self.self_attn
        normed = self.input_layernorm(hidden_states)  # every token: keys and values
        kept = take_rows(hidden_states, flat, (B, kept_len, D))  # the kept tokens
        attn_out = self._attention(attn, normed, take_rows(normed, flat, (B, kept_len, D)), index, cache,
                                   position_embeddings, context, **kwargs)
        g = take_rows(gate, flat, (B, kept_len, 1)).to(kept.dtype)
        x = kept + g * attn_out
        x = x + g * self.mlp(self.post_attention_layernorm(x))
        # Slots past a row's kept count hold skipped tokens: write them back unchanged. The indices of a row
        # are distinct, so index_copy writes each position once.
        update = torch.where(slot_valid[..., None], x, kept).reshape(-1, D)
        return hidden_states.reshape(B * T, D).index_copy(0, flat, update).view(B, T, D)

    def _attention(self, attn, normed, normed_kept, index, cache, position_embeddings, context, **kwargs):
        B, Tk, _ = normed_kept.shape
        T = normed.shape[1]
        d = attn.head_dim
        q = attn.q_proj(normed_kept).view(B, Tk, -1, d)
        k = attn.k_proj(normed).view(B, T, -1, d)
        v = attn.v_proj(normed).view(B, T, -1, d).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, d]
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        cos, sin = position_embeddings  # [B or 1, T, d]
        q, _ = rotary(q, q, gather_rows(cos, index), gather_rows(sin, index))
        _, k = rotary(k, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        allowed = self._key_windows(index, T, context, kwargs.get("attention_layout"))  # [B, Tk, T]
        empty = ~allowed.any(-1, keepdim=True)  # padding queries: no key, output 0
        mask = (allowed | empty).unsqueeze(1)
        # Grouped-query attention: on CPU without copying K/V per query head (the CPU flash kernel takes
        # enable_gqa with a mask); on CUDA the masked kernel (memory-efficient) may not, so K/V are repeated.
        groups = q.shape[1] // k.shape[1]
        gqa = groups > 1 and q.device.type == "cpu"
        if groups > 1 and not gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                             dropout_p=attn.attention_dropout if self.training else 0.0,
                                             enable_gqa=gqa)
        out = out.masked_fill(empty.unsqueeze(1), 0.0).transpose(1, 2)  # [B, Tk, H, d]
        if hasattr(attn, "head_weights"):  # Mixture-of-Head attention in the same layer
            out = out * attn.head_weights(normed_kept).to(out.dtype)[..., None]
        return attn.o_proj(out.reshape(B, Tk, -1))

    @staticmethod
    def _key_windows(index: torch.Tensor, T: int, context, layout) -> torch.Tensor:
        """The full attention pattern's rows at the kept queries: [B, Tk, T] bool."""
        B, Tk = index.shape
        keys = torch.arange(T, device=index.device).view(1, 1, T)
        if layout is not None:
            flat = flat_rows(index, T)
            if layout.dense_mask is not None:
                return take_rows(layout.dense_mask, flat, (B, Tk, T))
            start = take_rows(layout.kv_start.long(), flat, (B, Tk, 1))
            end = take_rows(layout.kv_end.long(), flat, (B, Tk, 1))
            return (keys >= start) & (keys < end)
        valid = context.valid.to(index.device).unsqueeze(1)  # [B, 1, T] padding keys are never seen
        return (keys <= index.unsqueeze(-1)) & valid

    def _record(self, image, selected, gate) -> None:
        with torch.no_grad():  # masked sums, not boolean indexing: no host sync
            chosen = selected.float()
            stats = torch.stack([image.sum().float(), chosen.sum(), (gate * chosen).sum(), (gate ** 2 * chosen).sum()])
            self.mod_stats = stats if getattr(self, "mod_stats", None) is None else self.mod_stats + stats

    def reset_stats(self) -> None:
        self.mod_stats = None


_CLASSES: dict[type, type] = {}


def _mixed(cls: type, mixin: type) -> type:
    """`cls` with `mixin`'s forward in front (cached, so every converted layer shares one class)."""
    if issubclass(cls, mixin):
        return cls
    if (cls, mixin) not in _CLASSES:
        _CLASSES[(cls, mixin)] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _CLASSES[(cls, mixin)]


def check_llama_style_layer(layer: nn.Module, where: str) -> None:
    attn = getattr(layer, "self_attn", None)
    missing = [n for n in ("input_layernorm", "post_attention_layernorm", "mlp") if not hasattr(layer, n)]
    missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
                if attn is None or not hasattr(attn, n)]
    if missing:
        raise ValueError(f"{where} ({type(layer).__name__}) is not a Llama-style decoder layer (missing "
                         f"{missing}); Mixture-of-Depths supports Llama, Mistral and Qwen2/3 backbones")


def apply_mod(layers: nn.ModuleList, spec: MoDSpec) -> list[int]:
    """Route the selected layers; routers start at zero (gate 1). Returns the routed layer indices."""
    capacities = spec.capacities(len(layers))
    for i, capacity in capacities.items():
        layer = layers[i]
        check_llama_style_layer(layer, f"decoder layer {i}")
        if isinstance(layer, MoDLayer):
            raise ValueError(f"decoder layer {i} is already routed (Mixture-of-Depths)")
        hidden = layer.input_layernorm.weight.shape[0]
        weight = layer.input_layernorm.weight
        layer.mod_router = nn.Linear(hidden, 1, bias=False).to(weight.device, weight.dtype)
        nn.init.zeros_(layer.mod_router.weight)
        layer.__class__ = _mixed(type(layer), MoDLayer)
        layer.mod_capacity, layer.mod_gate = float(capacity), spec.gate
        layer.routing_context = None
        layer.mod_stats = None
    return sorted(capacities)


def mod_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoDLayer)]
