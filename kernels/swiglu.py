"""SwiGLU activation silu(gate) * up, fused: one read of gate and up, one write, forward and backward.

Unfused, PyTorch writes silu(gate) to memory and reads it back for the product (and keeps it for
the backward); the kernel keeps it in registers and recomputes it in the backward. The MLP's
`down_proj(swiglu(gate_proj(x), up_proj(x)))` is the Llama / Qwen2 MLP.

Contents, twin next to kernel (STYLE.md point 5):
  * `swiglu_reference`: the PyTorch twin, `F.silu(gate) * up`.
  * Triton kernels over the flattened tensors, fp32 math; silu(gate) is rounded to the input dtype
    before the product, as the twin's two separate ops round it.
  * `SwiGLUFunction` (autograd) and its launcher `swiglu_triton`.
  * `swiglu`: validation + dispatch (kernels/dispatch.py) to one of the above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import check_launchable, select_op_backend

try:  # optional: `import mllm.kernels` must work without Triton (STYLE.md point 5)
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

HAS_TRITON = triton is not None
BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8 values, 16-byte vector loads of bf16


# ------------------------------------------------------------------------------------------------
# Reference twin
# ------------------------------------------------------------------------------------------------
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, as transformers' LlamaMLP computes act_fn(gate_proj(x)) * up_proj(x)."""
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(GATE, UP, OUT, n, BLOCK_SIZE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # int64: n may pass 2^31
        mask = offs < n
        gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(OUT.dtype.element_ty).to(tl.float32)  # the twin's F.silu output
        tl.store(OUT + offs, (silu * up).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, n, BLOCK_SIZE: tl.constexpr):
        """dup = dout * silu(gate); dgate = dout * up * silu'(gate), silu' = sig * (1 + gate * (1 - sig))."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = (gate * sig).to(DUP.dtype.element_ty).to(tl.float32)
        # the twin's autograd rounds dL/dsilu = dout * up to the input dtype before silu's backward
        dsilu = (dout * up).to(DGATE.dtype.element_ty).to(tl.float32)
        tl.store(DUP + offs, (dout * silu).to(DUP.dtype.element_ty), mask=mask)
        tl.store(DGATE + offs, (dsilu * sig * (1.0 + gate * (1.0 - sig))).to(DGATE.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers and autograd
# ------------------------------------------------------------------------------------------------
class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; gate and up are contiguous, same shape and dtype."""

    @staticmethod
    def forward(ctx, gate, up):
        check_launchable(_swiglu_fwd_kernel, gate)
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK_SIZE=BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dout.contiguous(), gate, up, dgate, dup, n, BLOCK_SIZE=BLOCK)
        return dgate, dup


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Triton path; inputs must pass `check_inputs`."""
    if gate.numel() == 0:  # a zero-size grid is not launchable
        return swiglu_reference(gate, up)
    return SwiGLUFunction.apply(gate.contiguous(), up.contiguous())


# ------------------------------------------------------------------------------------------------
# Validation and public entry point
# ------------------------------------------------------------------------------------------------
def check_inputs(gate, up) -> None:
    """Raise ValueError naming the offending argument when (gate, up) is not a valid call."""
    for name, x in (("gate", gate), ("up", up)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up must share shape, dtype and device, got gate {tuple(gate.shape)} "
                         f"{gate.dtype} {gate.device} and up {tuple(up.shape)} {up.dtype} {up.device}")


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype.

    backend: "auto" (Triton on CUDA when supported, else the reference), "triton" or "reference".
    """
    check_inputs(gate, up)
    if select_op_backend(gate, backend, op="swiglu") == "triton":
        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)


__all__ = ["HAS_TRITON", "SwiGLUFunction", "check_inputs", "swiglu", "swiglu_reference", "swiglu_triton"]
