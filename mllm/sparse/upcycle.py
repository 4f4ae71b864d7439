"""Upcycling (Komatsuzaki et al. 2023; MoE-LLaVA): turn a trained dense model into an MoE model.

Each selected FFN becomes N experts that start as exact copies of it; with renormalised top-k weights
any router then reproduces the dense output, so the upcycled model's logits equal the dense model's
before training (tested). Optional relative noise on the copies breaks their symmetry. With `mot`
the attention projections and norms of those layers get per-modality copies as well; with
`attention_experts` (BAM) the attention becomes a router-weighted mixture of attention experts copied
from the dense attention (optionally sharing K/V).
"""

from __future__ import annotations

from torch import nn

from mllm.sparse.attention_experts import apply_attention_experts
from mllm.sparse.config import MoESpec, UpcycleSpec
from mllm.sparse.moe import apply_moe
from mllm.sparse.mot import apply_mot


def upcycle(model: nn.Module, spec: UpcycleSpec, seed: int = 0) -> list[int]:
    """Upcycle `model` (an MLLMForConditionalGeneration) in place; returns the converted layer indices.

    The MoE settings go into `model.config.moe`, so `save_pretrained` / `from_pretrained` rebuild them."""
    if model.config.moe is not None:
        raise ValueError("the model already has MoE layers (config.moe is set); upcycle a dense model")
    language_model = model.model.language_model
    std = getattr(model.config.text_config, "initializer_range", 0.02)
    layers = apply_moe(language_model, spec, init="copy", noise=spec.noise, std=std, seed=seed)
    _attention_side(language_model, spec, layers, std, seed)
    model.config.moe = MoESpec.to_config(spec)
    return layers


def build_moe_layers(language_model: nn.Module, moe: dict, std: float) -> None:
    """Structure for a config that already has `moe` (from_pretrained / from-scratch MoE): random init."""
    spec = MoESpec.from_config(moe)
    layers = apply_moe(language_model, spec, init="random", std=std)
    _attention_side(language_model, spec, layers, std, 0)


def _attention_side(language_model: nn.Module, spec: MoESpec, layers: list[int], std: float, seed: int) -> None:
    if spec.mot:
        apply_mot(language_model, layers)
    if spec.attention_experts:
        apply_attention_experts(language_model, layers, spec.attention_experts, spec.attention_top_k,
                                spec.share_kv, std=std, seed=seed)
