"""Rotary position embedding (RoPE) for q and k in one kernel launch, forward and backward.

Equal to transformers' `apply_rotary_pos_emb` (the rotate_half convention, used by Llama, Qwen2,
Mistral): with x = [x1, x2] split in halves of the head dim and cos = [c1, c2], sin = [s1, s2],

    out = x * cos + rotate_half(x) * sin = [x1 * c1 - x2 * s1,  x2 * c2 + x1 * s2].

The backward is the transposed rotation: dx = [g1 * c1 + g2 * s2,  g2 * c2 - g1 * s1], i.e. a
rotation by -sin when both halves of cos/sin are equal (as transformers builds them); the kernel
uses the general form, so any cos/sin works.

Shapes: q [B, Hq, T, D], k [B, Hkv, T, D] (GQA: Hq and Hkv are independent), cos/sin [B, T, D]
(or [1, T, D], broadcast over the batch), unsqueezed over the heads as transformers does.

Contents, twin next to kernel (STYLE.md point 5):
  * `apply_rope_reference`: the PyTorch twin, transformers' formula line for line.
  * Triton kernel: one program per (batch, position) rotates every q and k head there, so cos/sin
    are read once per position; the same kernel with BACKWARD=True rotates the gradients back.
  * `RoPEFunction` (autograd) and its launcher `apply_rope_triton`.
  * `apply_rope`: validation + dispatch (kernels/dispatch.py) to one of the above.
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


# ------------------------------------------------------------------------------------------------
# Reference twin
# ------------------------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (transformers' rotate_half)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)."""
    cos = cos.unsqueeze(1)  # [B, 1, T, D]: the same rotation for every head
    sin = sin.unsqueeze(1)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


# ------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rotate_heads(X, O, stride_xh, stride_oh, n_heads, half, c1, c2, s1, s2,
                      BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """Rotate the n_heads rows [n_heads, 2 * half] of one position; X, O point at head 0."""
        heads = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_HALF)
        mask = (heads[:, None] < n_heads) & (d[None, :] < half)
        x_ptrs = X + heads[:, None] * stride_xh + d[None, :]
        o_ptrs = O + heads[:, None] * stride_oh + d[None, :]
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
        x2 = tl.load(x_ptrs + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose of the forward's rotation
            o1 = x1 * c1[None, :] + x2 * s2[None, :]
            o2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(o_ptrs, o1.to(O.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + half, o2.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(Q, K, COS, SIN, QO, KO,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot,
                     stride_cb, stride_ct, stride_sb, stride_st, T, n_q_heads, n_kv_heads, half,
                     BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                     BLOCK_HALF: tl.constexpr):
        """One (batch b, position t): every q and k head at (b, t), rotated by cos/sin[b, t]."""
        pid = tl.program_id(0)
        b = (pid // T).to(tl.int64)  # int64: b * stride passes 2^31 on large batches
        t = (pid % T).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)
        dmask = d < half
        cs = COS + b * stride_cb + t * stride_ct
        sn = SIN + b * stride_sb + t * stride_st
        c1 = tl.load(cs + d, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cs + half + d, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sn + d, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sn + half + d, mask=dmask, other=0.0).to(tl.float32)
        _rotate_heads(Q + b * stride_qb + t * stride_qt, QO + b * stride_qob + t * stride_qot, stride_qh, stride_qoh,
                      n_q_heads, half, c1, c2, s1, s2, BACKWARD, BLOCK_HQ, BLOCK_HALF)
        _rotate_heads(K + b * stride_kb + t * stride_kt, KO + b * stride_kob + t * stride_kot, stride_kh, stride_koh,
                      n_kv_heads, half, c1, c2, s1, s2, BACKWARD, BLOCK_HKV, BLOCK_HALF)


# ------------------------------------------------------------------------------------------------
# Launcher and autograd
# ------------------------------------------------------------------------------------------------
def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope_launch(q, k, cos, sin, out_dtype: torch.dtype, backward: bool):
    """Rotate q [B, Hq, T, D] and k [B, Hkv, T, D] (any strides with a unit last one) by cos/sin
    [B, T, D] -> new contiguous tensors in out_dtype; backward=True applies the transposed rotation."""
    check_launchable(_rope_kernel, q)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    q_out = torch.empty(q.shape, device=q.device, dtype=out_dtype)
    k_out = torch.empty(k.shape, device=k.device, dtype=out_dtype)
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_hq, block_hkv = triton.next_power_of_2(Hq), triton.next_power_of_2(Hkv)
    # [BLOCK_HQ, BLOCK_HALF] fp32 tiles; 4 warps hold 32 heads x 64 halves at 16 values a thread
    warps = 4 if block_hq * block_half <= 2048 else 8
    _rope_kernel[(B * T,)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), T, Hq, Hkv, half,
        BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half, num_warps=warps)
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernel; no gradient for cos/sin (the caller makes sure none is needed)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype = q.dtype  # k shares it (check_inputs)
        out_dtype = torch.promote_types(q.dtype, cos.dtype)  # as the twin's q * cos
        return _rope_launch(q, k, cos, sin, out_dtype, backward=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(_unit_stride_last(dq_out), _unit_stride_last(dk_out), cos, sin, ctx.in_dtype,
                              backward=True)
        return dq, dk, None, None


def apply_rope_triton(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path; inputs must pass `check_inputs`, and cos/sin must not require grad."""
    if q.numel() == 0 or k.numel() == 0:  # a zero-size grid is not launchable
        return apply_rope_reference(q, k, cos, sin)
    B, _, T, D = q.shape
    cos, sin = (_unit_stride_last(x.expand(B, T, D)) for x in (cos, sin))  # a [1, T, D] batch: stride 0
    return RoPEFunction.apply(_unit_stride_last(q), _unit_stride_last(k), cos, sin)


# ------------------------------------------------------------------------------------------------
# Validation and public entry point
# ------------------------------------------------------------------------------------------------
def check_inputs(q, k, cos, sin) -> None:
    """Raise ValueError naming the offending argument when the inputs do not form a valid call."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a [B, H, T, D] tensor, got {shape}")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in B (dim 0), T (dim 2) and D (dim 3)")
    if D % 2:
        raise ValueError(f"the head dim must be even (rotate_half splits it in halves), got {D}")
    for name, x in (("cos", cos), ("sin", sin)):
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[0] not in (1, B) or x.shape[1:] != (T, D):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be [B, T, D] = [{B}, {T}, {D}] (or [1, {T}, {D}]), got {shape}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    if k.dtype != q.dtype or cos.dtype != sin.dtype:
        raise ValueError(f"q and k must share one dtype, and cos and sin one dtype; got q {q.dtype}, k {k.dtype}, "
                         f"cos {cos.dtype}, sin {sin.dtype}")


def _triton_unsupported(q, k, cos, sin) -> str | None:
    if cos.dtype not in TRITON_DTYPES:  # q's dtype is checked by the dispatcher, k shares it
        return f"cos/sin dtype {cos.dtype} is not supported by the Triton kernels (supported: {TRITON_DTYPES})"
    if cos.requires_grad or sin.requires_grad:
        return "cos/sin require grad, and the Triton kernel differentiates only q and k"
    return None


def apply_rope(q, k, cos, sin, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated by cos/sin, equal to transformers' apply_rotary_pos_emb(q, k, cos, sin).

    q [B, Hq, T, D], k [B, Hkv, T, D], cos/sin [B, T, D] or [1, T, D].
    backend: "auto" (Triton on CUDA when supported, else the reference), "triton" or "reference".
    """
    check_inputs(q, k, cos, sin)
    unsupported = _triton_unsupported(q, k, cos, sin)
    if select_op_backend(q, backend, op="apply_rope", unsupported=unsupported) == "triton":
        return apply_rope_triton(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


__all__ = ["HAS_TRITON", "RoPEFunction", "apply_rope", "apply_rope_reference", "apply_rope_triton",
           "check_inputs", "rotate_half"]
