"""`MoEBlock`: a modality-aware Mixture-of-Experts FFN that replaces a decoder layer's `mlp`.

Experts are grouped by modality (MoMa): with `experts: {text: 4, image: 4}` experts 0-3 serve text
tokens and 4-7 image tokens; a token's router softmax covers its own group only, so a token can never
reach the other modality's experts. A shared pool (`modality_aware: false`) is the MoE-LLaVA layout.

The block reads the tokens' modalities from `routing_context`, which the model sets before every
forward (the decoder layer calls `mlp(hidden_states)` with nothing else). After a training forward,
`aux_loss` holds this layer's weighted balance + z (+ auxiliary-router) losses, `aux_terms` the
unweighted parts for logging, and `stats` the accumulated per-modality expert load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mllm.sparse.config import NUM_MODALITIES, MoESpec
from mllm.sparse.experts import Experts, GatedMLP, check_gated_mlp
from mllm.sparse.routing import (Routing, RoutingContext, capacity_slots, context_for, expert_choice,
                                 load_balancing_loss, router_logits, static_capacity, token_choice, z_loss)



class MoEBlock(nn.Module):
    def __init__(self, spec: MoESpec, hidden_size: int, intermediate_size: int, act: nn.Module):
        super().__init__()
        self.spec = spec
        self.num_experts = spec.num_total_experts
        self.top_k = spec.top_k
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False)
        self.experts = Experts(self.num_experts, hidden_size, intermediate_size, act, spec.implementation)
        if spec.routing == "expert_choice":
            # Predicts whether expert e would pick the token (sigmoid), from the token alone: causal.
            self.aux_router = nn.Linear(hidden_size, self.num_experts, bias=False)
        if spec.shared_experts:
            self.shared_expert = GatedMLP(hidden_size, intermediate_size * spec.shared_experts, act)
        self.routing_context: RoutingContext | None = None
        self.aux_loss: torch.Tensor | None = None
        self.aux_terms: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor] | None = None

    # -- structure -------------------------------------------------------------------------------
    def group_of_expert(self, device) -> torch.Tensor:
        """[E] group index of each expert (built on device from the config: no host->device copy)."""
        experts = torch.arange(self.num_experts, device=device)
        if not self.spec.modality_aware:
            return torch.zeros_like(experts)
        return (experts >= self.spec.group_sizes[0]).long()

    @property
    def num_groups(self) -> int:
        return NUM_MODALITIES if self.spec.modality_aware else 1

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = hidden.shape
        x = hidden.reshape(-1, dim)  # [N, D]
        modality, valid = context_for(hidden, self.routing_context)
        group = modality if self.spec.modality_aware else torch.zeros_like(modality)
        group_of_expert = self.group_of_expert(x.device)
        allowed_by_group = group_of_expert[None, :] == torch.arange(self.num_groups, device=x.device)[:, None]
        allowed = allowed_by_group[group]  # [N, E]
        logits = router_logits(x, self.router.weight, allowed, self.spec.router_jitter, self.spec.router_noise,
                               self.training)
        probs = logits.softmax(-1)  # [N, E], zero outside the token's group
        group_onehot = F.one_hot(group, self.num_groups).float() * valid[:, None]  # [N, G]
        group_tokens = group_onehot.sum(0)  # [G]
        group_sizes = allowed_by_group.sum(-1)  # [G]
        n = x.shape[0]
        aux_logits = None
        if self.spec.routing == "expert_choice":
            aux_logits = F.linear(x.detach().float(), self.aux_router.weight.float()).masked_fill(~allowed, -1e4)

        if self.spec.routing == "expert_choice" and self.training:
            capacity = static_capacity(self.spec.capacity_factor, self.top_k, n, min(self.spec.group_sizes))
            routing = expert_choice(probs, allowed & valid[:, None], group_of_expert, group_tokens, group_sizes,
                                    self.spec.capacity_factor, self.top_k, capacity)
            out = self._run_slots(x, routing)
            slot_expert = torch.arange(self.num_experts, device=x.device)[:, None].expand_as(routing.slot_token)
            assignment = torch.zeros_like(probs).index_put_(
                (routing.slot_token.reshape(-1), slot_expert.reshape(-1)),
                (routing.slot_weight > 0).float().reshape(-1), accumulate=True)
        else:
            if aux_logits is not None:  # expert choice at inference: the causal auxiliary router decides
                experts = aux_logits.topk(self.top_k, dim=-1).indices
                weights = probs.gather(1, experts)
            else:
                experts, weights = token_choice(probs, self.top_k)
            assignment = torch.zeros_like(probs).scatter_add_(1, experts, torch.ones_like(weights))
            # Capacity applies in training only: at inference a token's drop would depend on the other
            # tokens in the batch, so cached and uncached decoding would disagree.
            if self.spec.capacity_factor is None or not self.training or aux_logits is not None:
                out = self._run_dropless(x, experts, weights)
                routing = None
            else:
                capacity = static_capacity(self.spec.capacity_factor, self.top_k, n, min(self.spec.group_sizes))
                routing = capacity_slots(experts, weights, group_of_expert, group_tokens, group_sizes,
                                         self.spec.capacity_factor, self.num_experts, capacity)
                out = self._run_slots(x, routing)
        if self.spec.shared_experts:
            out = out + self.shared_expert(x)

        kept = routing.kept if routing is not None else None
        self._record(modality, valid, assignment, kept)
        if self.training:
            self._losses(logits, probs, assignment, group_onehot, allowed_by_group, valid, aux_logits, allowed)
        return out.view(batch, seq, dim)

    def _run_dropless(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = experts.shape
        flat_expert = experts.reshape(-1)  # [N*k], index i = token * k + choice
        order = flat_expert.argsort(stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert))  # scatter_add, not bincount: bincount syncs on CUDA
        y = self.experts(x[order // k], counts)  # [N*k, D], sorted by expert
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        return y[inverse].view(n, k, -1).sum(1)  # a fixed-order sum: deterministic, no atomics

    def _run_slots(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        y = self.experts(x[routing.slot_token])  # [E, C, D]
        y = y * routing.slot_weight[..., None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, routing.slot_token.reshape(-1), y.reshape(-1, x.shape[-1]))

    # -- losses and statistics -------------------------------------------------------------------
    def _losses(self, logits, probs, assignment, group_onehot, allowed_by_group, valid, aux_logits, allowed):
        balance = load_balancing_loss(probs, assignment, group_onehot, allowed_by_group.float())
        z = z_loss(logits, valid.float())
        total = self.spec.aux_loss_coef * balance + self.spec.z_loss_coef * z
        terms = {"balance_loss": balance.detach(), "z_loss": z.detach()}
        if aux_logits is not None:
            mask = (allowed & valid[:, None]).float()
            bce = F.binary_cross_entropy_with_logits(aux_logits, (assignment > 0).float(), reduction="none")
            aux_router = (bce * mask).sum() / mask.sum().clamp_min(1)
            total = total + self.spec.aux_router_loss_coef * aux_router
            terms["aux_router_loss"] = aux_router.detach()
        self.aux_loss, self.aux_terms = total, terms

    @torch.no_grad()
    def _record(self, modality, valid, assignment, kept):
        """Accumulate per-modality expert load and dropped assignments (device tensors, no sync)."""
        onehot = F.one_hot(modality, NUM_MODALITIES).float() * valid[:, None]  # [N, M]
        if self.stats is None or self.stats["load"].device != assignment.device:
            self.reset_stats(assignment.device)
        requested = onehot.sum(0) * self.top_k
        self.stats["load"] += onehot.t() @ assignment
        self.stats["requested"] += requested
        if kept is not None:
            self.stats["dropped"] += onehot.t() @ (self.top_k - kept).clamp_min(0)

    def reset_stats(self, device=None) -> None:
        device = device or self.router.weight.device
        self.stats = {"load": torch.zeros(NUM_MODALITIES, self.num_experts, device=device),
                      "requested": torch.zeros(NUM_MODALITIES, device=device),
                      "dropped": torch.zeros(NUM_MODALITIES, device=device)}

    # -- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_dense(self, mlp: nn.Module, noise: float = 0.0, generator: torch.Generator | None = None):
        """Every expert = the dense FFN (plus optional relative noise). With a shared expert, routed and
        shared halves each carry half of the down projection, so the sum still equals the dense FFN."""
        scale = 0.5 if self.spec.shared_experts else 1.0
        for name in ("gate_proj", "up_proj", "down_proj"):
            dense = getattr(mlp, name).weight
            bank = getattr(self.experts, name)
            bank.copy_(dense.expand_as(bank) * (scale if name == "down_proj" else 1.0))
            if noise > 0:
                bank.add_(torch.randn(bank.shape, generator=generator).to(bank) * noise * dense.float().std().to(bank))
        if self.spec.shared_experts:
            n = self.spec.shared_experts
            self.shared_expert.gate_proj.weight.copy_(torch.cat([mlp.gate_proj.weight] * n, 0))
            self.shared_expert.up_proj.weight.copy_(torch.cat([mlp.up_proj.weight] * n, 0))
            self.shared_expert.down_proj.weight.copy_(torch.cat([mlp.down_proj.weight] * n, 1) * (scale / n))

    @torch.no_grad()
    def init_random(self, std: float, generator: torch.Generator | None = None):
        for p in self.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).to(p) * std)


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(language_model).__name__} has no `layers` ModuleList of decoder layers; "
                         "MoE supports transformers decoder-only backbones (Llama, Mistral, Qwen2/3, Gemma)")
    return layers


def apply_moe(language_model: nn.Module, spec: MoESpec, init: str = "copy", noise: float = 0.0,
              std: float = 0.02, seed: int = 0) -> list[int]:
    """Replace the `mlp` of the selected decoder layers by MoE blocks; returns the layer indices.

    `init="copy"`: experts start as copies of that layer's dense FFN (upcycling); `"random"`: N(0, std)."""
    layers = decoder_layers(language_model)
    generator = torch.Generator().manual_seed(seed)
    chosen = spec.layer_indices(len(layers))
    for i in chosen:
        mlp = layers[i].mlp
        if isinstance(mlp, MoEBlock):
            raise ValueError(f"decoder layer {i} is already an MoE block; upcycle a dense model")
        check_gated_mlp(mlp, f"decoder layer {i} mlp")
        weight = mlp.gate_proj.weight
        block = MoEBlock(spec, weight.shape[1], weight.shape[0], mlp.act_fn).to(weight.device, weight.dtype)
        if init == "copy":
            block.init_from_dense(mlp, noise, generator)
            block.router.weight.data.copy_(torch.randn(block.router.weight.shape, generator=generator) * std)
        else:
            block.init_random(std, generator)
        layers[i].mlp = block.train(mlp.training)  # a module built mid-run keeps the model's mode
    return chosen


def moe_blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEBlock)]


def routing_counts(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The MoE layers' accumulated counts since the last call, stacked over layers, then reset:
    `load` [L, 2, E] (assignments per modality and expert), `requested` [L, 2], `dropped` [L, 2]."""
    blocks = moe_blocks(model)
    if not blocks:
        return None
    for _, block in blocks:
        if block.stats is None:
            block.reset_stats()
    counts = {key: torch.stack([block.stats[key] for _, block in blocks]) for key in ("load", "requested", "dropped")}
    for _, block in blocks:
        block.reset_stats()
    return counts


def load_summary(counts: dict[str, torch.Tensor], spec: MoESpec, layer_names: list[str]) -> dict:
    """Per-layer expert load as fractions of each modality's assignments, plus the max/mean load ratio
    (1.0 = perfectly balanced; E_group = everything on one expert) and the dropped-assignment rate."""
    load = counts["load"].double().cpu()  # [L, 2, E]
    fractions = load / load.sum(-1, keepdim=True).clamp_min(1)
    summary: dict = {"layers": layer_names, "expert_load": fractions.tolist()}
    sizes = spec.group_sizes
    ratios = []
    for m, name in enumerate(("text", "image")):
        if load[:, m].sum() == 0:
            continue
        group_size = sizes[m] if spec.modality_aware else sizes[0]
        ratio = fractions[:, m].max(-1).values * group_size  # max / mean over the group's experts
        ratios.append(ratio)
        summary[f"max_load_{name}"] = float(ratio.max())
        summary[f"mean_max_load_{name}"] = float(ratio.mean())
    if ratios:
        summary["max_load"] = float(torch.cat(ratios).max())
    requested = counts["requested"].double().sum()
    summary["dropped_rate"] = float(counts["dropped"].double().sum() / requested.clamp_min(1))
    return summary
