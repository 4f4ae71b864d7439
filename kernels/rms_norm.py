"""RMSNorm over the last dim, fused: one read of x per row forward, one read of (x, dy) backward.

y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), with the normalisation in fp32: the exact
casting order of transformers' LlamaRMSNorm (the normalised row is rounded to x's dtype *before*
the weight multiplies it), so a model using this op trains like the transformers one.

Contents, twin next to kernel (STYLE.md point 5):
  * `rms_norm_reference`: the PyTorch twin, LlamaRMSNorm's forward line for line.
  * Triton kernels: forward (one row per program, rstd saved for the backward) and backward
    (a fixed number of programs, each walking a strip of rows and summing its share of dweight in
    fp32; the host sums the per-program partials: deterministic, no atomics).
  * `RMSNormFunction` (autograd) and its launcher `rms_norm_triton`.
  * `rms_norm`: validation + dispatch (kernels/dispatch.py) to one of the above.
"""

from __future__ import annotations

import torch

from .dispatch import TRITON_DTYPES, check_launchable, select_op_backend

try:  # optional: `import mllm.kernels` must work without Triton (STYLE.md point 5)
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

HAS_TRITON = triton is not None
# One row lives in one block: 64K elements is where Liger-Kernel stops fusing too (register spills
# make wider rows slower than the unfused twin); every current LLM width (<= 16384) fits.
MAX_FUSED_WIDTH = 65536


# ------------------------------------------------------------------------------------------------
# Reference twin
# ------------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward: fp32 statistics, rounded to x's dtype, then the weight.

    The output dtype is the promotion of x's and weight's dtypes, as in transformers.
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK_N: tl.constexpr):
        """One row: RSTD[row] = rsqrt(mean(x^2) + eps) (fp32), Y[row] = w * (x * rstd).to(x.dtype)."""
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 on large batches
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
        h = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # the twin's h.to(x.dtype)
        tl.store(Y + row * stride_y + cols, (w * h).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx,
                             n_rows, n_cols, rows_per_program, BLOCK_N: tl.constexpr):
        """Rows [pid * rows_per_program, +rows_per_program): DX, and this strip's sum of dw (fp32).

        With h = x * rstd and g = dL/dh = dy * w: dx = rstd * (g - h * mean(g * h)), dw = sum_rows dy * h.
        """
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        for i in range(0, rows_per_program):
            row = first + i
            mask = col_mask & (row < n_rows)  # the last strip may be short: its extra rows add zeros
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row, mask=row < n_rows, other=0.0)
            h = x * rstd
            dw += dy * h.to(X.dtype.element_ty).to(tl.float32)  # the forward multiplied w by the rounded h
            # autograd of the twin rounds dy * w to x's dtype (the gradient of h.to(x.dtype)); so do we
            g = (dy * w).to(X.dtype.element_ty).to(tl.float32)
            dx = rstd * (g - h * (tl.sum(g * h, 0) / n_cols))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


# ------------------------------------------------------------------------------------------------
# Launchers and autograd
# ------------------------------------------------------------------------------------------------
def _block_and_warps(n_cols: int) -> tuple[int, int]:
    """One power-of-two block per row; Liger-Kernel's warp counts (more warps for wider rows keep
    each thread at <= ~16 fp32 values, so no register spills)."""
    block = triton.next_power_of_2(n_cols)
    return block, 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def _backward_programs(x: torch.Tensor, n_rows: int) -> int:
    # One strip per SM on the GPU (each program keeps one dw partial: n_sm x N floats in total);
    # the interpreter runs programs one after another, so a few long strips are as fast as many.
    n = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(n, n_rows))


def _rms_norm_forward(x, weight, eps):
    """x [M, N] (unit stride on N) -> y [M, N] in promote(x, weight) dtype, rstd [M] fp32."""
    check_launchable(_rms_norm_fwd_kernel, x)
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    block, warps = _block_and_warps(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](x, weight, y, rstd, x.stride(0), y.stride(0), n_cols, eps,
                                    BLOCK_N=block, num_warps=warps)
    return y, rstd


def _rms_norm_backward(dy, x, weight, rstd):
    """-> dx [M, N] in x's dtype, dweight [N] in weight's dtype."""
    n_rows, n_cols = x.shape
    programs = _backward_programs(x, n_rows)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    dx = torch.empty_like(x)
    dw_partial = torch.empty(programs, n_cols, device=x.device, dtype=torch.float32)
    block, warps = _block_and_warps(n_cols)
    _rms_norm_bwd_kernel[(programs,)](dy, x, weight, rstd, dx, dw_partial, dy.stride(0), x.stride(0), dx.stride(0),
                                      n_rows, n_cols, rows_per_program, BLOCK_N=block, num_warps=warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; x is [M, N] with unit stride on N, checked by the caller."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = _rms_norm_backward(_unit_stride_rows(dy), x, weight, rstd)
        return dx, dweight, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The Triton path for x [..., N] and weight [N]; inputs must pass `check_inputs`."""
    if x.numel() == 0:  # a zero-size grid is not launchable; the twin handles empty rows exactly
        return rms_norm_reference(x, weight, eps)
    x2 = _unit_stride_rows(x.reshape(-1, x.shape[-1]))  # [M, N]
    return RMSNormFunction.apply(x2, weight.contiguous(), float(eps)).view(*x.shape[:-1], x.shape[-1])


# ------------------------------------------------------------------------------------------------
# Validation and public entry point
# ------------------------------------------------------------------------------------------------
def check_inputs(x, weight) -> None:
    """Raise ValueError naming the offending argument when (x, weight) is not a valid RMSNorm call."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if x.ndim == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape [N] = [{x.shape[-1] if x.ndim else '?'}] (x's last dim), "
                         f"got weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")


def _triton_unsupported(x, weight) -> str | None:
    if weight.dtype not in TRITON_DTYPES:
        return f"weight dtype {weight.dtype} is not supported by the Triton kernels (supported: {TRITON_DTYPES})"
    if x.shape[-1] > MAX_FUSED_WIDTH:
        return f"hidden size {x.shape[-1]} is above {MAX_FUSED_WIDTH}, the widest row one Triton block holds"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x [..., N] over N with weight [N], equal to transformers' LlamaRMSNorm.

    backend: "auto" (Triton on CUDA when supported, else the reference), "triton" or "reference".
    """
    check_inputs(x, weight)
    if select_op_backend(x, backend, op="rms_norm", unsupported=_triton_unsupported(x, weight)) == "triton":
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


__all__ = ["HAS_TRITON", "RMSNormFunction", "check_inputs", "rms_norm", "rms_norm_reference", "rms_norm_triton"]
