"""Routers for modality-aware MoE: which experts each token uses, with what weight, and the losses
that keep the experts balanced.

Every function here is written without host-device syncs (no `.item()`, no data-dependent Python
branches): counts stay on the device and shapes depend only on the batch shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RoutingContext:
    """What routed modules need besides the hidden states: the modality of every token (0 text, 1 image)
    and which positions are real (padding is never counted in the balance statistics)."""

    modality: torch.Tensor  # [B, T] long
    valid: torch.Tensor  # [B, T] bool


def set_routing_context(modules, context: RoutingContext | None) -> None:
    for module in modules:
        module.routing_context = context


def context_for(hidden: torch.Tensor, context: RoutingContext | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (modality [N], valid [N]) for hidden states [B, T, D]; without a context every token is
    a valid text token."""
    n = hidden.shape[0] * hidden.shape[1]
    if context is None:
        return (torch.zeros(n, dtype=torch.long, device=hidden.device),
                torch.ones(n, dtype=torch.bool, device=hidden.device))
    if context.modality.shape != hidden.shape[:2]:
        raise ValueError(f"routing context is for tokens of shape {tuple(context.modality.shape)} but the layer "
                         f"got hidden states {tuple(hidden.shape)}; the model must set it every forward")
    return context.modality.reshape(-1).to(hidden.device), context.valid.reshape(-1).to(hidden.device)


@dataclass
class Routing:
    """Fixed-slot assignments (capacity, expert choice): `slot_token` [E, C] is the token index per slot,
    `slot_weight` [E, C] its weight (0 = empty slot). Dropless token choice needs no slots."""

    slot_token: torch.Tensor
    slot_weight: torch.Tensor
    kept: torch.Tensor  # [N] float: how many of the token's assignments were computed


def router_logits(x: torch.Tensor, weight: torch.Tensor, allowed: torch.Tensor, jitter: float = 0.0,
                  noise: float = 0.0, training: bool = False) -> torch.Tensor:
    """fp32 logits [N, E]; experts outside the token's group are -inf (`allowed` [N, E] bool).

    The router runs in fp32 whatever the model dtype: bf16 logits flip near-tied top-k choices."""
    x = x.float()
    if training and jitter > 0:
        x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
    logits = F.linear(x, weight.float())
    if training and noise > 0:
        logits = logits + torch.randn_like(logits) * noise
    return logits.masked_fill(~allowed, float("-inf"))


def token_choice(probs: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token; weights renormalised over the k (so k copies of one FFN equal that FFN)."""
    weights, experts = probs.topk(k, dim=-1)  # [N, k]
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return experts, weights


def capacity_slots(experts: torch.Tensor, weights: torch.Tensor, group_of_expert: torch.Tensor,
                   group_tokens: torch.Tensor, group_sizes: torch.Tensor, capacity_factor: float,
                   num_experts: int, max_capacity: int) -> Routing:
    """Token choice with a per-expert capacity: assignments beyond it are dropped (Switch / GShard).

    First choices of all tokens take priority over second choices. Capacity of an expert in group g is
    ceil(cf * k * N_g / E_g), computed on device; `max_capacity` is the static slot count."""
    n, k = experts.shape
    flat_expert = experts.t().reshape(-1)  # [k*N]: all first choices, then all second choices
    flat_token = torch.arange(n, device=experts.device).repeat(k)
    flat_weight = weights.t().reshape(-1)
    one_hot = F.one_hot(flat_expert, num_experts)  # [k*N, E]
    position = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)  # rank of the assignment within its expert
    capacity = torch.ceil(capacity_factor * k * group_tokens.float() / group_sizes.float()).long()  # [G]
    keep = position < capacity[group_of_expert[flat_expert]].clamp(max=max_capacity)
    return _slots(flat_expert, flat_token, flat_weight, position, keep, n, num_experts, max_capacity)


def _slots(flat_expert, flat_token, flat_weight, position, keep, n, num_experts, max_capacity) -> Routing:
    dump = num_experts * max_capacity  # dropped assignments write to one extra slot that is never read
    slot = torch.where(keep, flat_expert * max_capacity + position, torch.full_like(position, dump))
    slot_token = torch.zeros(dump + 1, dtype=torch.long, device=flat_expert.device)
    slot_weight = torch.zeros(dump + 1, dtype=flat_weight.dtype, device=flat_expert.device)
    slot_token = slot_token.scatter(0, slot, flat_token)
    slot_weight = slot_weight.scatter(0, slot, torch.where(keep, flat_weight, torch.zeros_like(flat_weight)))
    kept = torch.zeros(n, device=flat_expert.device).index_add(0, flat_token, keep.float())
    return Routing(slot_token=slot_token[:dump].view(num_experts, max_capacity),
                   slot_weight=slot_weight[:dump].view(num_experts, max_capacity), kept=kept)


def expert_choice(probs: torch.Tensor, routable: torch.Tensor, group_of_expert: torch.Tensor,
                  group_tokens: torch.Tensor, group_sizes: torch.Tensor, capacity_factor: float, k: int,
                  max_capacity: int) -> Routing:
    """Each expert takes its top-capacity tokens among those of its group (Zhou et al. 2022; MoMa).

    `routable` [N, E]: token is in the expert's group and not padding. Weight = the token's router
    probability for that expert. Sees the whole sequence, so it is not causal: inference uses the
    auxiliary token-choice router instead."""
    scores = probs.masked_fill(~routable, -1.0).t()  # [E, N]
    top_scores, top_tokens = scores.topk(max_capacity, dim=-1)  # [E, C]
    capacity = torch.ceil(capacity_factor * k * group_tokens.float() / group_sizes.float()).long()  # [G]
    rank = torch.arange(max_capacity, device=probs.device)
    keep = (rank[None, :] < capacity[group_of_expert][:, None]) & (top_scores >= 0)
    slot_weight = torch.where(keep, top_scores, torch.zeros_like(top_scores))
    kept = torch.zeros(probs.shape[0], device=probs.device).index_add(0, top_tokens.reshape(-1),
                                                                      keep.float().reshape(-1))
    return Routing(slot_token=top_tokens, slot_weight=slot_weight, kept=kept)


def static_capacity(capacity_factor: float, k: int, n: int, smallest_group: int) -> int:
    """Slots per expert: enough for a group that holds every token (shape depends on N only)."""
    return max(1, min(n * k, math.ceil(capacity_factor * k * n / smallest_group)))


def load_balancing_loss(probs: torch.Tensor, assignment: torch.Tensor, group_onehot: torch.Tensor,
                        allowed_by_group: torch.Tensor) -> torch.Tensor:
    """Switch / GShard balance loss per modality group:
    E_g * sum_{i in g} f_i * P_i, with f_i the fraction of the group's assignments sent to expert i and
    P_i the group's mean router probability for i, averaged over the groups that have tokens in the batch.
    Equals 1 when the router is uniform or the load perfectly balanced.

    probs [N, E]; assignment [N, E] (how many of the token's slots went to each expert);
    group_onehot [N, G] (valid tokens only); allowed_by_group [G, E]."""
    tokens = group_onehot.sum(0)  # [G]
    prob_mean = group_onehot.t() @ probs / tokens.clamp_min(1)[:, None]  # [G, E]
    counts = group_onehot.t() @ assignment  # [G, E]
    fraction = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    sizes = allowed_by_group.sum(-1).float()  # [G]
    per_group = sizes * (fraction * prob_mean * allowed_by_group).sum(-1)
    present = (tokens > 0).float()
    return (per_group * present).sum() / present.sum().clamp_min(1)


def z_loss(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2 (keeps logits small)."""
    lse = torch.logsumexp(logits, dim=-1)
    return (lse.square() * valid).sum() / valid.sum().clamp_min(1)
