"""Route the language model's RMSNorm, SwiGLU and RoPE through our fused kernels (`mllm.kernels`), in place.

`apply_fused_kernels(model)` walks `model.model.language_model` once:

  * RMSNorm: a Llama-style norm (class name ending in "RMSNorm", `.weight`, `.variance_epsilon`)
    becomes `FusedRMSNorm`, holding the *same* Parameter under the same name `weight`: state_dict
    keys, tied weights and optimizer state are unchanged.
  * SwiGLU: a gated MLP (`gate_proj`, `up_proj`, `down_proj`, `act_fn` = SiLU, nothing else)
    becomes `FusedGatedMLP` over the same three projection modules (whatever modules they are).
  * RoPE: transformers' attention calls the `apply_rotary_pos_emb` of its own modeling module, a
    global name lookup. Patching that module would change every model of that family in the process
    (a plain Llama beside ours, the Llava export twin in tests). Instead each attention instance gets
    a subclass whose `forward` is the *same code* with a globals dict in which that one name is our
    `apply_rope`; the instance's class is swapped as `torch.nn.utils.parametrize` does, so
    `isinstance(attn, LlamaAttention)` still holds (transformers records outputs by class) and no
    parameter moves. The globals dict is a copy of the modeling module's, taken at the first swap: a
    later patch of that module (another library patching transformers) does not reach these layers.
    Our BAM `AttentionExperts` takes the function as an attribute and gets it there.

Before swapping a module we check that the fused version computes what it computes (a two-row probe
on a random input, the kernels' reference backend): a norm or MLP with another formula (Gemma's
`1 + weight`, a GELU MLP, another casting order) is skipped and reported, never silently changed.
MoE blocks (`mllm.sparse.moe.MoEBlock`) are left alone: their experts run grouped matmuls of their own.
The vision tower (LayerNorm + GELU MLPs) has nothing these kernels fuse.

Call it after the weights are loaded and before ZeRO-3 / FSDP shard them or `torch.compile` traces
the model (the probes need materialised weights). Calling it again is a no-op (or switches backend).
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import types

import torch
from torch import nn

from mllm.kernels import apply_rope, apply_rope_reference, rms_norm, swiglu
from mllm.kernels.dispatch import OP_BACKENDS
from mllm.sparse.moe import MoEBlock

OPS = ("rms_norm", "swiglu", "rope")
ROPE_NAME = "apply_rotary_pos_emb"  # the module-level function transformers' Llama-family attention calls
MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


# ------------------------------------------------------------------------------------------------
# Fused modules
# ------------------------------------------------------------------------------------------------
class FusedRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm through `mllm.kernels.rms_norm` (equal to it, casting order included)."""

    def __init__(self, weight: nn.Parameter, eps: float, backend: str = "auto"):
        super().__init__()
        self.weight = weight  # the original Parameter object, not a copy
        self.variance_epsilon = eps  # LlamaRMSNorm's name: code that reads it keeps working
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, backend={self.backend}"


class FusedGatedMLP(nn.Module):
    """down_proj(swiglu(gate_proj(x), up_proj(x))) over the original projection modules."""

    def __init__(self, mlp: nn.Module, backend: str = "auto"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn  # unused here, kept for code that inspects it (MoE upcycling copies it)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))


# ------------------------------------------------------------------------------------------------
# Equivalence probes
# ------------------------------------------------------------------------------------------------
def _unmaterialised(weight: torch.Tensor) -> str | None:
    if weight.is_meta or weight.numel() == 0:
        return ("weights are not materialised (meta device, or partitioned by ZeRO-3 / FSDP): apply fused "
                "kernels after loading and before sharding")
    return None


def _mismatch(original, fused, x: torch.Tensor) -> str | None:
    """None when both modules give the same output on x (torch's per-dtype tolerances), else why not."""
    with torch.no_grad():
        want, got = original(x), fused(x)
    try:
        torch.testing.assert_close(got, want)
    except AssertionError as exc:
        return f"its forward is not the fused op's formula ({str(exc).splitlines()[0]})"
    return None


def _probe_input(width: int, like: torch.Tensor) -> torch.Tensor:
    # A private generator: applying the kernels must not move the global RNG (training reproducibility).
    return torch.randn(2, width, generator=torch.Generator().manual_seed(0)).to(like.device, like.dtype)


def _norm_reason(norm: nn.Module) -> str | None:
    """Probe on a bf16 CPU copy with a random weight: bf16 exposes a different casting order (weight
    applied before rounding, as OLMo-2 does) and a non-unit weight exposes Gemma's `1 + weight`."""
    reason = _unmaterialised(norm.weight)
    if reason is not None:
        return reason
    probe = copy.deepcopy(norm).to("cpu", torch.bfloat16)
    with torch.no_grad():
        probe.weight.normal_(1.0, 0.5, generator=torch.Generator().manual_seed(0))
    fused = FusedRMSNorm(probe.weight, probe.variance_epsilon, backend="reference")
    return _mismatch(probe, fused, _probe_input(probe.weight.shape[-1], probe.weight))


def _mlp_reason(mlp: nn.Module) -> str | None:
    """Probe the real module (two rows: negligible work, nothing copied)."""
    weight = getattr(mlp.gate_proj, "weight", None)
    if weight is None:
        return "gate_proj has no weight to size the probe"
    reason = _unmaterialised(weight)
    if reason is not None:
        return reason
    return _mismatch(mlp, FusedGatedMLP(mlp, backend="reference"), _probe_input(weight.shape[-1], weight))


def _rope_reason(function) -> str | None:
    """transformers' rotate_half formula with unsqueeze_dim=1, as `apply_rope` implements it?"""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 1, 3, 8, generator=g)
    cos, sin = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    try:
        for got, want in zip(function(q, k, cos, sin), apply_rope_reference(q, k, cos, sin)):
            torch.testing.assert_close(got, want)
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
        return f"{ROPE_NAME} is not transformers' rotate_half RoPE ({str(exc).splitlines()[0]})"
    return None


# ------------------------------------------------------------------------------------------------
# RoPE: the attention's own forward, reading our function under the name it looks up
# ------------------------------------------------------------------------------------------------
def fused_rotary_pos_emb(original, backend: str):
    """A drop-in for transformers' `apply_rotary_pos_emb` that runs `apply_rope`."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
        if unsqueeze_dim != 1:  # a [B, T, H, D] caller; the kernel takes [B, H, T, D]
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return apply_rope(q, k, cos, sin, backend=backend)

    apply_rotary_pos_emb.fused_backend = backend
    return apply_rotary_pos_emb


def _cell_holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _with_globals(fn, overrides: dict):
    """A copy of `fn` whose global names resolve to `overrides` first, then to fn's module (a snapshot).

    A decorator built with functools.wraps (transformers' `deprecate_kwarg` on `forward`) is copied too,
    closing over the rebound function instead of the original; anything else raises ValueError.
    """
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        new = types.FunctionType(fn.__code__, {**fn.__globals__, **overrides}, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
    else:
        cells = fn.__closure__ or ()
        if not any(_cell_holds(c, inner) for c in cells):
            raise ValueError(f"{fn.__qualname__} is wrapped by a decorator that does not close over the function")
        rebound = _with_globals(inner, overrides)
        closure = tuple(types.CellType(rebound) if _cell_holds(c, inner) else c for c in cells)
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__dict__.update(fn.__dict__)
    new.__kwdefaults__, new.__qualname__, new.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
    if inner is None:
        new.__dict__.pop("__wrapped__", None)
    else:
        new.__wrapped__ = rebound
    return new


_FUSED_ATTENTION: dict[tuple[type, str], type] = {}


def fused_attention_class(cls: type, backend: str) -> type:
    """The subclass of attention class `cls` whose forward calls `apply_rope` (cached per class and backend).

    Raises ValueError saying why when `cls` does not call a compatible module-level `apply_rotary_pos_emb`.
    """
    key = (cls, backend)
    if key in _FUSED_ATTENTION:
        return _FUSED_ATTENTION[key]
    original = getattr(sys.modules[cls.__module__], ROPE_NAME, None)
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    if original is None or code is None or ROPE_NAME not in code.co_names:
        raise ValueError(f"{cls.__name__}.forward does not call a module-level {ROPE_NAME}")
    reason = _rope_reason(original)
    if reason is not None:
        raise ValueError(reason)
    forward = _with_globals(cls.forward, {ROPE_NAME: fused_rotary_pos_emb(original, backend)})
    name = f"Fused{cls.__name__}_{backend}"
    fused = type(name, (cls,), {"forward": forward, "__module__": __name__, "__qualname__": name,
                                "fused_base": cls, "fused_backend": backend})
    setattr(sys.modules[__name__], name, fused)  # importable by name, so a pickled model loads
    _FUSED_ATTENTION[key] = fused
    return fused


def _route_rope(attn: nn.Module, backend: str) -> bool:
    """Point one attention module at `apply_rope`; True when it was not routed before. Raises ValueError."""
    own = attn.__dict__.get(ROPE_NAME)
    if callable(own):  # our AttentionExperts keeps the function as an attribute: set it there
        original = getattr(own, "__wrapped__", own) if hasattr(own, "fused_backend") else own
        reason = _rope_reason(original)
        if reason is not None:
            raise ValueError(reason)
        setattr(attn, ROPE_NAME, fused_rotary_pos_emb(original, backend))
        return not hasattr(own, "fused_backend")
    routed = hasattr(type(attn), "fused_base")
    attn.__class__ = fused_attention_class(type(attn).fused_base if routed else type(attn), backend)
    return not routed


def _calls_rope(module: nn.Module) -> bool:
    if callable(module.__dict__.get(ROPE_NAME)):
        return True
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return code is not None and ROPE_NAME in code.co_names


# ------------------------------------------------------------------------------------------------
# The walk
# ------------------------------------------------------------------------------------------------
def _is_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)
            and hasattr(module, "variance_epsilon"))


def _is_gated_mlp(module: nn.Module) -> bool:
    """Exactly the four children and no tensors of its own, so the replacement keeps every state_dict key."""
    return (set(module._modules) == MLP_CHILDREN and not module._parameters and not module._buffers
            and all(module._modules[name] is not None for name in MLP_CHILDREN))


def _language_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    language_model = getattr(inner, "language_model", None)
    if not isinstance(language_model, nn.Module):
        raise TypeError(f"apply_fused_kernels expects an MLLMForConditionalGeneration (or MLLMModel); "
                        f"{type(model).__name__} has no model.language_model")
    return language_model


def _replace(root: nn.Module, name: str, old: nn.Module, new: nn.Module, reason) -> str | None:
    """Swap root.<name> for `new` unless `reason()` objects or the swap would lose hooks or state_dict keys."""
    if old._forward_hooks or old._forward_pre_hooks or old._backward_hooks:
        return "it has hooks (PEFT / DeepSpeed / user) that a new module would lose: apply fused kernels first"
    why = reason()
    if why is not None:
        return why
    if set(old.state_dict()) != set(new.state_dict()):  # a guard: the structural checks should rule it out
        return "the fused module would change its state_dict keys"
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new.train(old.training))
    return None


def _fuse(root: nn.Module, name: str, module: nn.Module, ops: tuple[str, ...], backend: str):
    """(op, None) when `module` was swapped / routed, (None, reason) when it qualified but was skipped,
    (None, None) when there is nothing to do (not a candidate, or already fused: then only the backend moves)."""
    if isinstance(module, FusedRMSNorm | FusedGatedMLP):
        if ("rms_norm" if isinstance(module, FusedRMSNorm) else "swiglu") in ops:
            module.backend = backend
        return None, None
    if "rms_norm" in ops and _is_rms_norm(module):
        fused = FusedRMSNorm(module.weight, module.variance_epsilon, backend)
        reason = _replace(root, name, module, fused, lambda: _norm_reason(module))
        return ("rms_norm", None) if reason is None else (None, reason)
    if "swiglu" in ops and _is_gated_mlp(module):
        fused = FusedGatedMLP(module, backend)
        reason = _replace(root, name, module, fused, lambda: _mlp_reason(module))
        return ("swiglu", None) if reason is None else (None, reason)
    if "rope" in ops and _calls_rope(module):
        try:
            return ("rope" if _route_rope(module, backend) else None), None
        except ValueError as exc:
            return None, str(exc)
    return None, None


def apply_fused_kernels(model: nn.Module, ops: tuple[str, ...] | list[str] = OPS, backend: str = "auto") -> dict:
    """Swap the language model's RMSNorms / gated MLPs / RoPE calls for the fused kernels, in place.

    `model`: an `MLLMForConditionalGeneration` (or `MLLMModel`). `ops`: any of "rms_norm", "swiglu",
    "rope". `backend`: the kernels' backend, "auto" (Triton on CUDA, the PyTorch twin elsewhere),
    "triton" or "reference". Returns {op: [module names swapped by this call], "skipped": {name: reason}}.
    state_dict keys and values are unchanged; a second call swaps nothing (it only applies `backend`).
    """
    ops = tuple(ops)
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown fused op(s) {unknown}; valid ops: {', '.join(OPS)}")
    if backend not in OP_BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; valid backends: {', '.join(OP_BACKENDS)}")
    language_model = _language_model(model)
    prefix = next(n for n, m in model.named_modules() if m is language_model)
    summary: dict = {op: [] for op in OPS} | {"skipped": {}}
    moe_blocks: list[str] = []
    for name, module in list(language_model.named_modules()):  # a list: the walk replaces modules
        full = f"{prefix}.{name}".strip(".")
        if any(name.startswith(block + ".") for block in moe_blocks):
            continue
        if isinstance(module, MoEBlock):
            moe_blocks.append(name)
            summary["skipped"][full] = "MoE block: left alone (its experts run grouped matmuls of their own)"
            continue
        op, reason = _fuse(language_model, name, module, ops, backend)
        if op is not None:
            summary[op].append(full)
        elif reason is not None:
            summary["skipped"][full] = reason
    return summary


__all__ = ["OPS", "FusedGatedMLP", "FusedRMSNorm", "apply_fused_kernels", "fused_attention_class",
           "fused_rotary_pos_emb"]
