"""Memory savers applied to the model a stage trains: activation checkpointing and torch.compile.

Both wrap modules from outside (the model code stays the eager reference). Activation checkpointing
uses non-reentrant `torch.utils.checkpoint`: `full` recomputes whole decoder layers (every k-th one
with `checkpoint_every: k`; transformers' own layer checkpointing), `selective` only the FFN / MoE blocks, whose [tokens, intermediate]
activations dominate a layer's memory. Checkpoints and state-dict keys are unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return wrapper


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    from mllm.sparse.moe import decoder_layers as layers_of

    return layers_of(model.model.language_model)


def apply_activation_checkpointing(model: nn.Module, policy: str, every: int = 1) -> list[str]:
    """Wrap the chosen modules' forward in activation checkpointing; returns their names."""
    if policy == "none":
        return []
    if policy not in ("full", "selective"):
        raise ValueError(f"unknown activation_checkpointing policy {policy!r}; valid: none, full, selective")
    wrapped = []
    if policy == "full":
        # transformers' own layer checkpointing: it also drops the KV cache inside checkpointed layers
        # (a replayed layer would append its keys twice).
        model.model.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every)
        return [f"layers.{i}" for i, layer in enumerate(decoder_layers(model)) if layer.gradient_checkpointing]
    for i, layer in enumerate(decoder_layers(model)):  # selective: the FFN only (no cache inside)
        layer.mlp.forward = _checkpointed(layer.mlp.forward)
        wrapped.append(f"layers.{i}.mlp")
    return wrapped


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """`torch.compile` every decoder layer in place (the layer stays the same module for state dicts)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
