"""A bank of E gated (SwiGLU-style) FFN experts stored as stacked weights, and the two ways to run it.

- dropless: assignments sorted by expert, then grouped matmuls (`torch._grouped_mm` with cumulative
  offsets) or, where that cannot run, a per-expert loop over the sorted rows;
- slots: a fixed [E, C, D] buffer per expert (capacity / expert choice), one batched matmul.

Weights keep nn.Linear's [out, in] layout per expert, so upcycling copies a dense FFN verbatim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor, explicit: bool = False) -> bool:
    """Whether `torch._grouped_mm` can run: 16-byte aligned strides; on CUDA, Hopper+ and bf16.

    On CPU it runs (and equals the loop, tested), but `auto` does not pick it there: it was no faster
    than the loop (BENCHMARKS.md) and under DeepSpeed ZeRO-3 with 2 gloo ranks it aborted the process
    intermittently (SIGABRT, about 1 run in 8 under load). `explicit=True` asks whether it *can* run."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any((w.shape[-1] * w.element_size()) % 16 or (w.shape[-2] * w.element_size()) % 16 for w in weights):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return explicit and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


class Experts(nn.Module):
    """E experts, each down(act(gate(x)) * up(x)); parameters [E, F, D], [E, F, D], [E, D, F]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: nn.Module,
                 implementation: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = act
        self.implementation = implementation

    def forward(self, x: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """`counts` given: dropless rows [M, D] grouped by expert; None: fixed slots [E, C, D].

        Callers go through `forward` (not the methods below) so wrappers that reparametrise the
        stacked weights, e.g. PEFT's LoRA on `target_parameters`, are in the path."""
        return self.slots(x) if counts is None else self.dropless(x, counts)

    def dropless(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, D] rows grouped by expert (counts [E] rows each, in order) -> [M, D]."""
        use_grouped = self.implementation == "grouped_mm" or (
            self.implementation == "auto" and grouped_mm_supported(x_sorted, self.gate_proj, self.down_proj))
        if use_grouped:
            return self._grouped(x_sorted, counts)
        return self._loop(x_sorted, counts)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)  # the last offset is M: no row is left out
        gate = torch._grouped_mm(x, self.gate_proj.transpose(1, 2), offs=offsets)  # [M, F]
        up = torch._grouped_mm(x, self.up_proj.transpose(1, 2), offs=offsets)
        return torch._grouped_mm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)

    def _loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # The reference path (and the fallback off Hopper): one host sync for the split sizes. Every
        # expert runs, even on 0 rows, so every expert gets a (zero) gradient on every rank.
        outputs = []
        for e, rows in enumerate(torch.split(x, counts.tolist())):
            h = self.act_fn(F.linear(rows, self.gate_proj[e])) * F.linear(rows, self.up_proj[e])
            outputs.append(F.linear(h, self.down_proj[e]))
        return torch.cat(outputs)

    def slots(self, x_slots: torch.Tensor) -> torch.Tensor:
        """x_slots [E, C, D] -> [E, C, D]: each expert on its fixed number of slots (empty slots are 0 and
        stay 0: act(0) * 0 = 0)."""
        gate = torch.bmm(x_slots, self.gate_proj.transpose(1, 2))
        up = torch.bmm(x_slots, self.up_proj.transpose(1, 2))
        return torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))

    def extra_repr(self) -> str:
        e, f, d = self.gate_proj.shape
        return f"num_experts={e}, hidden_size={d}, intermediate_size={f}, implementation={self.implementation}"


class GatedMLP(nn.Module):
    """A dense SwiGLU FFN with the transformers Llama names (the shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def check_gated_mlp(mlp: nn.Module, where: str) -> None:
    """MoE blocks replace gated FFNs (Llama, Mistral, Qwen2/3, Gemma: gate_proj/up_proj/down_proj, no bias)."""
    names = ("gate_proj", "up_proj", "down_proj")
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names) or not hasattr(mlp, "act_fn"):
        raise ValueError(f"{where}: {type(mlp).__name__} is not a gated FFN with gate_proj / up_proj / down_proj "
                         "and act_fn; MoE upcycling supports Llama-style backbones (Llama, Mistral, Qwen2/3, Gemma)")
    if any(getattr(mlp, n).bias is not None for n in names):
        raise ValueError(f"{where}: {type(mlp).__name__} has biased projections; MoE experts have none")
