"""Visual-token compression inside the LLM (DESIGN.md §5): the sequence shrinks mid-network.

Two methods (`model.token_pruning` / a recipe stage's `token_pruning:`):
- `fastv` (FastV: half of the image tokens dropped after layer 2, -45% FLOPs): at decoder layer `layer`
  the image tokens are scored by how much the prompt attends to them, and only the top `keep` fraction of
  each row's image tokens stays in the sequence from that layer on. Scores come from a cheap pass that
  never builds the attention probabilities of the layer (fused kernels do not expose them): the layer's
  own q/k projections, queries of the last `query_tokens` prompt tokens only, keys of the image tokens
  only ([B, H, query_tokens, T] logits, softmax over the image keys, mean over heads and queries).
- `exit` (DyVTE, visual-token exit): at each candidate layer a small learned gate reads the prompt's
  hidden states and decides whether the row's image tokens can leave; from the first layer whose gate
  fires (probability > `threshold`) the row runs without any image token. Gates start closed (the
  converted model is the dense one) and are trained in a recipe stage: with the gates trainable, every
  training forward also runs the model with the image tokens exiting at each candidate layer (no grad)
  and labels a gate 1 when that exit leaves every target-token prediction unchanged (binary
  cross-entropy, weight `exit_loss_weight`).

The prompt tokens that score / gate are the last `query_tokens` text tokens up to and including the
first `<|assistant|>` header: exactly what generation's prefill holds, so training and inference select
alike, and answers never steer the selection. Rows without an assistant turn use their last text tokens.

Mechanics. Every layer from the first pruning layer on is class-swapped (parameter names unchanged) to
gather the tokens still present, run the backbone's own layer on that shorter sequence and scatter the
result back; dropped tokens keep the hidden state they had when they left. Kept tokens keep their
original position ids (rotary tables gathered). The attention windows of the compacted sequence are
the full layout's windows renumbered (kept keys are a subsequence, so a window stays one interval), so
MMA and packing hold; with the backbone's SDPA / eager attention they become a [B, Tk, Tk] mask. With a
KV cache, pruned layers cache only the kept tokens' keys and values; which cached slots are real is
stored on the cache (`cache.pruned_key_valid`), and decode steps in those layers mask with it, so cached
and uncached generation agree (tested). Nothing dropped (keep 1.0, closed gates) runs the dense layer
itself: bit-exact.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mllm.attention.layout import AttentionLayout, compute_layout, dense_mask
from mllm.schema import ConfigError, from_dict, to_dict
from mllm.sparse.mod import (MoDLayer, _mixed, check_llama_style_layer, first_positions, flat_rows, gather_rows,
                              take_rows, top_fraction)

MASKABLE = ("sdpa", "eager", "mllm_interval")  # attention implementations a pruned layer can give its own mask


@dataclass
class TokenPruningSpec:
    method: Literal["fastv", "exit"] = "fastv"
    layer: int = 2  # fastv: the first decoder layer that runs without the pruned image tokens
    keep: float = 0.5  # fastv: fraction of each row's image tokens that stays (rounded up)
    # exit: the layers at which image tokens may leave ("all": every layer but the first)
    exit_layers: Literal["all"] | list[int] = "all"
    threshold: float = 0.5  # exit: gate probability above which the row's image tokens leave
    exit_loss_weight: float = 1.0  # exit: weight of the gates' binary cross-entropy when they train
    query_tokens: int = 8  # prompt tokens whose queries score (fastv) / whose states gate (exit)
    # The `<|assistant|>` header's id (the end of the prompt); the builder fills it from the tokenizer.
    assistant_token_id: int | None = None

    def validate(self):
        if self.layer < 1:
            raise ConfigError(f"token_pruning.layer must be >= 1 (layer 0 sees no context to score with), got "
                              f"{self.layer}")
        if not 0 < self.keep <= 1:
            raise ConfigError(f"token_pruning.keep must be in (0, 1] (the fraction of image tokens kept), got {self.keep}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"token_pruning.threshold must be in (0, 1), got {self.threshold}")
        if self.query_tokens < 1:
            raise ConfigError(f"token_pruning.query_tokens must be >= 1, got {self.query_tokens}")
        if isinstance(self.exit_layers, list) and (not self.exit_layers or min(self.exit_layers) < 1):
            raise ConfigError(f"token_pruning.exit_layers must be 'all' or a non-empty list of layers >= 1, got "
                              f"{self.exit_layers}")

    def candidate_layers(self, num_layers: int) -> list[int]:
        """Where image tokens may leave: [layer] for fastv, the exit layers for exit."""
        if self.method == "fastv":
            layers = [self.layer]
        elif self.exit_layers == "all":
            layers = list(range(1, num_layers))
        else:
            layers = sorted(set(self.exit_layers))
        bad = [i for i in layers if i >= num_layers]
        if bad or not layers:
            raise ConfigError(f"token_pruning: layer(s) {bad or layers} do not exist; the backbone has {num_layers} "
                              f"decoder layers (valid: 1..{num_layers - 1})")
        return layers

    def to_config(self) -> dict:
        return {k: to_dict(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_config(cls, data: dict) -> "TokenPruningSpec":
        return from_dict(cls, data, "token_pruning")


@dataclass
class Compacted:
    """The tokens still in the sequence, first in each row in their original order."""

    index: torch.Tensor  # [B, Tk] original positions (slots past a row's count hold dropped tokens)
    slot_valid: torch.Tensor  # [B, Tk] bool
    layout: AttentionLayout  # the windows renumbered for the compacted sequence


@dataclass
class PruningState:
    """What the pruned layers of one prefill forward share (created by the model, passed down the backbone as
    the `token_pruning` keyword)."""

    image: torch.Tensor  # [B, T] bool: real image tokens
    valid: torch.Tensor  # [B, T] bool: real (not padding) tokens
    query_index: torch.Tensor  # [B, n] positions of the scoring / gating prompt tokens
    query_valid: torch.Tensor  # [B, n] bool
    layout: AttentionLayout  # the full sequence's windows
    pass_layout: bool  # the backbone runs mllm_interval attention: hand it the compacted layout
    force_exit: int | None = None  # exit supervision: every row's image tokens leave at this layer
    keep: torch.Tensor | None = None  # [B, T] bool, None: every token is present
    gate_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # exit: layer -> [B] fp32
    _compacted: Compacted | None = None

    def drop(self, dropped: torch.Tensor) -> None:
        """Remove the tokens of `dropped` [B, T] bool from this layer on."""
        keep = ~dropped if self.keep is None else self.keep & ~dropped
        if self.keep is None or not torch.equal(keep, self.keep):
            self.keep, self._compacted = keep, None

    def compacted(self) -> Compacted | None:
        """The compacted sequence, or None while nothing was dropped (the dense layer runs)."""
        if self.keep is None:
            return None
        if self._compacted is None:
            if bool(self.keep.all()):  # one host sync per change of the kept set
                return None
            self._compacted = compact(self.keep, self.layout)
        return self._compacted


def compact(keep: torch.Tensor, layout: AttentionLayout) -> Compacted:
    """Gather index and renumbered windows for the tokens of `keep` [B, T] bool."""
    count = keep.sum(1)  # [B]
    kept_len = int(count.max())
    index = first_positions(keep, kept_len)
    slot = torch.arange(kept_len, device=keep.device)
    slot_valid = slot[None] < count[:, None]
    # before[b, p]: kept tokens at positions < p. A window [s, e) holds exactly the kept keys in slots
    # [before[s], before[e]): kept keys are a subsequence, so a window stays one interval.
    before = F.pad(keep.long().cumsum(1), (1, 0))  # [B, T + 1]
    start = before.gather(1, layout.kv_start.long().gather(1, index))
    end = before.gather(1, layout.kv_end.long().gather(1, index))
    empty = slot.expand_as(index)
    start, end = torch.where(slot_valid, start, empty), torch.where(slot_valid, end, empty)
    dense = None
    if layout.dense_mask is not None:  # mma_aki: rows and columns of the full mask
        rows = layout.dense_mask.gather(1, index[..., None].expand(-1, -1, keep.shape[1]))
        dense = rows.gather(2, index[:, None, :].expand(-1, kept_len, -1))
        dense = dense & slot_valid[:, :, None] & slot_valid[:, None, :]
    return Compacted(index, slot_valid, AttentionLayout(start.to(torch.int32), end.to(torch.int32), layout.mode,
                                                        dense))


def prompt_tokens(input_ids: torch.Tensor, image: torch.Tensor, valid: torch.Tensor, assistant_token_id: int | None,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `n` text tokens up to and including each row's first assistant header (rows without one: the
    last `n` text tokens): (index [B, n], valid [B, n])."""
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device).expand(B, T)
    text = valid & ~image
    if assistant_token_id is not None:
        header = (input_ids == assistant_token_id) & valid
        first = torch.where(header, pos, torch.full_like(pos, T)).min(1).values  # [B], T: none
        text = text & (pos <= first[:, None])
    from_end = text.flip(1).long().cumsum(1).flip(1)  # text tokens at or after t
    chosen = text & (from_end <= n)
    index = first_positions(chosen, n)
    return index, torch.arange(index.shape[1], device=pos.device)[None] < chosen.sum(1, keepdim=True)


def pruning_state(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int,
                  spec: TokenPruningSpec, layout: AttentionLayout | None, force_exit: int | None = None
                  ) -> PruningState:
    """A prefill's shared state. `layout`: the model's interval layout (None: the backbone's own causal
    attention, whose windows are rebuilt here)."""
    B, T = input_ids.shape
    valid = attention_mask[:, -T:].bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    image = (input_ids == image_token_id) & valid
    index, qvalid = prompt_tokens(input_ids, image, valid, spec.assistant_token_id, spec.query_tokens)
    full = layout if layout is not None else compute_layout(valid.long(), None, None, "causal")
    return PruningState(image, valid, index, qvalid, full, pass_layout=layout is not None, force_exit=force_exit)


class PrunedLayer:
    """Mixin swapped into the decoder layers from the first pruning layer on (see the module docstring).
    Needs Llama-style layers (input_layernorm, self_attn with q/k_proj, head_dim, scaling)."""

    pruning: TokenPruningSpec
    pruning_candidate: bool  # image tokens may leave here (fastv's layer, an exit layer)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        state: PruningState | None = kwargs.pop("token_pruning", None)
        layer_idx = self.self_attn.layer_idx
        if state is None or state.image.shape != hidden_states.shape[:2]:
            stored = getattr(cache, "pruned_key_valid", {}).get(layer_idx) if cache is not None else None
            if stored is not None and cache.get_seq_length(layer_idx) > 0:  # decoding after a pruned prefill
                attention_mask = self._decode_mask(stored, cache.get_seq_length(layer_idx), hidden_states)
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        if self.pruning_candidate:
            self._prune(hidden_states, state, position_embeddings)
        self._record(state)
        compacted = state.compacted()
        if compacted is None:  # nothing dropped: the dense layer, bit for bit
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        return self._compacted_forward(hidden_states, state, compacted, position_ids, cache, use_cache,
                                       position_embeddings, **kwargs)

    # -- which tokens leave

    def _prune(self, hidden: torch.Tensor, state: PruningState, position_embeddings) -> None:
        if self.pruning.method == "fastv":
            with torch.no_grad():
                state.drop(self._text_guided_drop(hidden, state, position_embeddings))
            return
        normed = self.input_layernorm(gather_rows(hidden, state.query_index)).detach()  # [B, n, D]
        weights = state.query_valid.to(normed.dtype)[..., None]
        summary = (normed * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, D]
        logit = self.exit_gate(summary.to(self.exit_gate.weight.dtype)).squeeze(-1).float()  # [B]
        state.gate_logits[self.self_attn.layer_idx] = logit
        if state.force_exit is not None:
            leave = torch.full_like(logit, state.force_exit == self.self_attn.layer_idx, dtype=torch.bool)
        elif self.training:
            return  # gates train on the full forward (their labels come from forced exits)
        else:
            leave = torch.sigmoid(logit) > self.pruning.threshold
        state.drop(state.image & leave[:, None])

    def _text_guided_drop(self, hidden: torch.Tensor, state: PruningState, position_embeddings) -> torch.Tensor:
        """[B, T] bool: the image tokens outside each row's top `keep` by prompt attention."""
        attn = self.self_attn
        B, T, _ = hidden.shape
        d = attn.head_dim
        normed = self.input_layernorm(hidden)
        rows = state.query_index
        q = attn.q_proj(gather_rows(normed, rows)).view(B, rows.shape[1], -1, d)
        k = attn.k_proj(normed).view(B, T, -1, d)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, n, d], [B, Hkv, T, d]
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        cos, sin = position_embeddings
        q, _ = rotary(q, q, gather_rows(cos, rows), gather_rows(sin, rows))
        _, k = rotary(k, k, cos.expand(B, -1, -1), sin.expand(B, -1, -1))
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # [B, H, n, T]: image keys only matter
        logits = logits.masked_fill(~state.image[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows without image tokens: 0
        weights = state.query_valid.float()[:, None, :, None]
        score = (probs * weights).sum((1, 2))  # [B, T]: attention the prompt pays each image token
        present = state.image if state.keep is None else state.image & state.keep
        return present & ~top_fraction(score, present, self.pruning.keep)

    # -- running on the kept tokens

    def _compacted_forward(self, hidden_states, state: PruningState, c: Compacted, position_ids, cache, use_cache,
                           position_embeddings, **kwargs):
        B, T, D = hidden_states.shape
        flat = flat_rows(c.index, T)
        kept = take_rows(hidden_states, flat, (*c.index.shape, D))  # [B, Tk, D]
        cos, sin = position_embeddings
        kwargs.pop("attention_layout", None)
        mask = None
        if state.pass_layout:
            kwargs["attention_layout"] = c.layout
        else:
            mask = self._mask(dense_mask(c.layout), kept.dtype)
        routed = [m for m in self.modules() if hasattr(m, "routing_context") and m.routing_context is not None]
        saved = [m.routing_context for m in routed]
        for m in routed:  # MoE / MoH modules inside the layer see the compacted tokens' modalities
            m.routing_context = type(m.routing_context)(m.routing_context.modality.gather(1, c.index),
                                                        m.routing_context.valid.gather(1, c.index) & c.slot_valid)
        try:
            out = super().forward(kept, attention_mask=mask,
                                  position_ids=None if position_ids is None else gather_rows(position_ids, c.index),
                                  cache=cache, use_cache=use_cache,
                                  position_embeddings=(gather_rows(cos, c.index), gather_rows(sin, c.index)), **kwargs)
        finally:
            for m, context in zip(routed, saved):
                m.routing_context = context
        if cache is not None:  # the cached slots this layer holds: real kept tokens only
            if not hasattr(cache, "pruned_key_valid"):
                cache.pruned_key_valid = {}
            cache.pruned_key_valid[self.self_attn.layer_idx] = c.slot_valid & state.valid.gather(1, c.index)
        # Slots past a row's kept count hold dropped tokens: write them back unchanged (a row's indices are
        # distinct, so index_copy writes each position once).
        update = torch.where(c.slot_valid[..., None], out, kept).reshape(-1, D)
        return hidden_states.reshape(B * T, D).index_copy(0, flat, update).view(B, T, D)

    def _mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, Tq, Tk] bool -> the 4-D mask the backbone's attention takes (bool for SDPA, additive for eager).
        Queries without any key (padding, empty slots) see themselves / the first key instead of nothing, which
        would make SDPA return NaN; their outputs are discarded."""
        empty = ~allowed.any(-1, keepdim=True)
        first = torch.zeros_like(allowed)
        first[..., 0] = True
        allowed = (allowed | (empty & first)).unsqueeze(1)
        if self.self_attn.config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    def _decode_mask(self, stored: torch.Tensor, cached: int, hidden: torch.Tensor) -> torch.Tensor:
        """New tokens after a pruned prefill: the stored real slots, every later cached token, causal among
        the new ones."""
        B, t = hidden.shape[:2]
        if stored.shape[0] != B:
            raise ValueError(f"the KV cache was filled by a pruned prefill of batch {stored.shape[0]}, but this step "
                             f"has batch {B}; token pruning cannot follow a cache whose rows were regrouped")
        keys = torch.arange(cached + t, device=hidden.device)
        prefix = F.pad(stored, (0, cached + t - stored.shape[1]), value=True)  # [B, S + t]
        causal = keys[None, :] <= (cached + torch.arange(t, device=hidden.device))[:, None]  # [t, S + t]
        return self._mask(prefix[:, None, :] & causal[None], hidden.dtype)

    def _record(self, state: PruningState) -> None:
        if state.force_exit is not None:  # the exit gates' label runs are not what the model does
            return
        with torch.no_grad():  # image tokens present in this layer vs all: masked sums, no host sync
            present = state.image if state.keep is None else state.image & state.keep
            stats = torch.stack([state.image.sum().float(), present.sum().float()])
            self.pruning_stats = stats if getattr(self, "pruning_stats", None) is None else self.pruning_stats + stats

    def reset_stats(self) -> None:
        self.pruning_stats = None


def apply_pruning(layers: nn.ModuleList, spec: TokenPruningSpec, attn_implementation: str | None) -> list[int]:
    """Class-swap the layers from the first candidate on; exit candidates get a gate that starts closed.
    Returns the candidate layers."""
    spec.validate()
    if attn_implementation not in MASKABLE:
        raise ConfigError(f"token_pruning needs one of the attention implementations {', '.join(MASKABLE)} (a pruned "
                          f"layer hands the attention its own mask); the backbone uses {attn_implementation!r}")
    candidates = spec.candidate_layers(len(layers))
    for i in range(candidates[0], len(layers)):
        layer = layers[i]
        check_llama_style_layer(layer, f"decoder layer {i}")
        if isinstance(layer, MoDLayer):
            raise ConfigError(f"decoder layer {i} already runs Mixture-of-Depths; token pruning and MoD both compact "
                              "the sequence and cannot share a layer")
        if isinstance(layer, PrunedLayer):
            raise ValueError(f"decoder layer {i} already prunes image tokens")
        layer.__class__ = _mixed(type(layer), PrunedLayer)
        layer.pruning, layer.pruning_candidate, layer.pruning_stats = spec, i in candidates, None
        if spec.method == "exit" and i in candidates:
            weight = layer.input_layernorm.weight
            layer.exit_gate = nn.Linear(weight.shape[0], 1).to(weight.device, weight.dtype)
            nn.init.zeros_(layer.exit_gate.weight)
            nn.init.constant_(layer.exit_gate.bias, -4.0)  # p = 0.018: closed, the dense model
    return candidates


def convert(model, spec: TokenPruningSpec) -> list[int]:
    """Prune a trained MLLMForConditionalGeneration's image tokens inside its LLM from now on (a recipe stage's
    `token_pruning:`); records the section in its config. Returns the candidate layers."""
    if model.config.token_pruning is not None:
        raise ValueError(f"the model already prunes image tokens inside the LLM ({model.config.token_pruning})")
    section = spec.to_config()
    candidates = model.model.apply_token_pruning(section)
    model.config.token_pruning = section
    return candidates


def pruned_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PrunedLayer)]


def exit_supervision(model, inputs: dict, labels: torch.Tensor, gate_logits: dict[int, torch.Tensor],
                     reference: torch.Tensor | None, spec: TokenPruningSpec) -> torch.Tensor:
    """The exit gates' loss: BCE against "exiting here changes no target-token prediction", measured by
    re-running the model with every row's image tokens leaving at each gated layer (no grad).
    `reference` [B, T, V]: the full forward's logits (None: recomputed)."""
    targets = labels[:, 1:] != -100  # position t predicts token t + 1
    with torch.no_grad():
        if reference is None:
            reference = model(**inputs).logits
        full = reference[:, :-1].argmax(-1)
        same = []
        for layer in sorted(gate_logits):
            pred = model(**inputs, prune_force_exit=layer).logits[:, :-1].argmax(-1)
            same.append(((pred == full) | ~targets).all(1))
    logits = torch.stack([gate_logits[layer] for layer in sorted(gate_logits)], 1)  # [B, L]
    labels01 = torch.stack(same, 1).float()
    return spec.exit_loss_weight * F.binary_cross_entropy_with_logits(logits, labels01)


def pruning_stats(model: nn.Module) -> torch.Tensor | None:
    """[L, 2] counters since the last reset (image tokens, those still present) per layer from the first pruning
    layer on; sum them over ranks before `pruning_summary`. Resets them. None without token pruning."""
    layers = pruned_layers(model)
    if not layers:
        return None
    rows = []
    for _, layer in layers:
        rows.append(torch.zeros(2) if layer.pruning_stats is None else layer.pruning_stats.detach().float().cpu())
        layer.reset_stats()
    return torch.stack(rows)


def pruning_summary(model: nn.Module, stats: torch.Tensor) -> dict:
    """Per pruned layer: the fraction of image tokens still in the sequence."""
    return {"layers": [name for name, _ in pruned_layers(model)],
            "kept_fraction": (stats[:, 1] / stats[:, 0].clamp(min=1)).tolist()}


__all__ = ["PrunedLayer", "PruningState", "TokenPruningSpec", "apply_pruning", "compact", "convert", "exit_supervision",
           "pruned_layers", "pruning_state", "pruning_stats", "pruning_summary"]
