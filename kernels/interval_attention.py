"""Interval attention: query t sees exactly the keys in one window [kv_start[t], kv_end[t]).

One contiguous window per query expresses every pattern we train with (DESIGN.md §3): causal text,
packed documents, left padding (empty windows), sliding windows and modality-mutual attention
(image tokens also see the question that follows them, up to the assistant turn), with two int32
vectors instead of an O(T^2) mask.

Tensors are packed: q [T, Hq, D], k/v [T, Hkv, D], with Hq % Hkv == 0 (GQA: query head h reads
kv head h // (Hq // Hkv)). Rows whose window is empty output zeros and get zero gradients.

Contents, twin next to kernel (STYLE.md point 5):
  * `interval_attention_reference`: exact PyTorch twin, the ground truth (fp32 math).
  * Triton kernels, FlashAttention-2 style (online softmax in fp32; backward = delta preprocessing,
    dK/dV per key block, dQ per query block). Per query block the union of its rows' windows bounds
    the key loop, so key blocks no row can see are never loaded, and the per-row mask is applied
    only on boundary blocks (blocks not inside every row's window).
  * `IntervalAttentionFunction` (autograd) and its launcher `interval_attention_triton`.
  * `interval_attention_flex`: FlexAttention with a block mask built from the same two vectors.
  * `interval_attention`: validation + dispatch (kernels/dispatch.py) to one of the above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .dispatch import TRITON_DTYPES, select_backend

try:  # optional: `import mllm.kernels` must work without Triton (STYLE.md point 5)
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

HAS_TRITON = triton is not None
LOG2E = 1.4426950408889634  # kernels use exp2 (one MUFU op); logits are pre-scaled by log2(e)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def check_inputs(q, k, v, kv_start, kv_end, check_bounds: bool = True) -> None:
    """Raise ValueError naming the offending argument when the inputs do not form a valid call."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a packed [T, H, D] tensor, got {shape}")
    T, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in T (dim 0) and D (dim 2)")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({k.shape[1]}) for GQA")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in TRITON_DTYPES:
        raise ValueError(f"q, k, v must share one dtype among {TRITON_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.numel() >= 2**31 or k.numel() >= 2**31:
        raise ValueError(f"q/k/v have >= 2^31 elements ({q.numel()}); kernel offsets are int32: split the batch")
    for name, x in (("k", k), ("v", v), ("kv_start", kv_start), ("kv_end", kv_end)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    for name, vec in (("kv_start", kv_start), ("kv_end", kv_end)):
        if vec.shape != (T,) or vec.dtype != torch.int32:
            raise ValueError(f"{name} must be an int32 vector of shape [T]=[{T}], got {vec.dtype} {tuple(vec.shape)}")
    if check_bounds:
        _check_window_bounds(kv_start, kv_end, T)


def _check_window_bounds(kv_start, kv_end, T: int) -> None:
    # One host sync: callers that validated the layout once per batch pass check_bounds=False.
    bad = (kv_start < 0) | (kv_start > T) | (kv_end < 0) | (kv_end > T)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"window of query {t} is [{int(kv_start[t])}, {int(kv_end[t])}), "
                         f"but kv_start and kv_end must lie in [0, T={T}]")


def _default_scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


# ------------------------------------------------------------------------------------------------
# Reference twin
# ------------------------------------------------------------------------------------------------
def interval_attention_reference(q, k, v, kv_start, kv_end, scale=None, chunk_size: int | None = None):
    """Exact PyTorch interval attention: fp32 math, output in the input dtype, autograd-differentiable.

    Queries are processed in chunks so the dense [H, chunk, T] logits never exceed ~64M floats; with
    several chunks and grad enabled each chunk is checkpointed, so backward memory stays O(chunk * T)
    too (at the cost of recomputing the chunk).
    """
    T, Hq, D = q.shape
    if T == 0:
        return q.new_zeros(q.shape)
    scale = _default_scale(scale, D)
    chunk = chunk_size or max(1, 2**26 // (Hq * T))
    keys = torch.arange(T, device=q.device)
    outs = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        args = (q[s:e], k, v, kv_start[s:e], kv_end[s:e], keys, scale)
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        outs.append(checkpoint(_reference_chunk, *args, use_reentrant=False) if grad and chunk < T
                    else _reference_chunk(*args))
    return torch.cat(outs).to(q.dtype)


def _reference_chunk(q, k, v, kv_start, kv_end, keys, scale):
    """Attention of C queries q [C, Hq, D] over all keys k/v [T, Hkv, D] -> fp32 [C, Hq, D]."""
    C, Hq, D = q.shape
    Hkv = k.shape[1]
    qf = q.float().view(C, Hkv, Hq // Hkv, D).permute(1, 2, 0, 3)  # [Hkv, G, C, D]
    kf = k.float().permute(1, 0, 2)[:, None]  # [Hkv, 1, T, D]: each kv head serves its G query heads
    vf = v.float().permute(1, 0, 2)[:, None]  # [Hkv, 1, T, D]
    logits = (qf @ kf.transpose(-1, -2)) * scale  # [Hkv, G, C, T]
    visible = (keys[None, :] >= kv_start[:, None]) & (keys[None, :] < kv_end[:, None])  # [C, T]
    empty = ~visible.any(-1)  # [C]: rows with no key
    # Empty rows get finite logits (softmax of all -inf is NaN, and NaN grads), then zero weights.
    logits = logits.masked_fill(~(visible | empty[:, None]), float("-inf"))
    probs = torch.softmax(logits, dim=-1).masked_fill(empty[:, None], 0.0)
    out = probs @ vf  # [Hkv, G, C, D]
    return out.permute(2, 0, 1, 3).reshape(C, Hq, D)


# ------------------------------------------------------------------------------------------------
# Host-side block tables (O(T) work, shared by forward and backward)
# ------------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _query_block_windows(kv_start, kv_end, block_m: int) -> torch.Tensor:
    """[4, n_qblocks] int32: per query block the union [lo, hi) of its rows' windows and their
    intersection [ilo, ihi). Empty rows and rows past T do not widen the union; empty rows empty
    the intersection (so such a block is masked everywhere)."""
    T = kv_start.numel()
    n, pad = _cdiv(T, block_m), _cdiv(T, block_m) * block_m - T
    start, end = kv_start.long(), kv_end.long()
    nonempty = start < end
    lo = F.pad(torch.where(nonempty, start, T), (0, pad), value=T).view(n, block_m).amin(1)
    hi = F.pad(torch.where(nonempty, end, 0), (0, pad), value=0).view(n, block_m).amax(1)
    lo = torch.minimum(lo, hi)  # a block of empty rows: lo = hi = 0, an empty key loop
    ilo = F.pad(start, (0, pad), value=0).view(n, block_m).amax(1)
    ihi = F.pad(end, (0, pad), value=T).view(n, block_m).amin(1)
    return torch.stack([lo, hi, ilo, ihi]).to(torch.int32).contiguous()


def _key_loop_bounds(windows: torch.Tensor, block_n: int) -> torch.Tensor:
    """[4, n_qblocks] int32 (first, full_lo, full_hi, hi): a query block loops over key blocks from
    `first` to `hi`; [full_lo, full_hi) holds the blocks inside every row's window (no mask), the
    rest of the range is boundary blocks (masked)."""
    lo, hi, ilo, ihi = windows.long()
    first = lo // block_n * block_n
    full_lo = (ilo + block_n - 1) // block_n * block_n
    full_hi = ihi // block_n * block_n
    has_full = full_hi > full_lo  # implies first <= full_lo < full_hi <= hi
    full_lo = torch.where(has_full, full_lo, first)
    full_hi = torch.where(has_full, full_hi, first)
    return torch.stack([first, full_lo, full_hi, hi]).to(torch.int32).contiguous()


def _query_block_ranges(windows: torch.Tensor, block_n: int, T: int) -> torch.Tensor:
    """[2, n_kblocks] int32: per key block, [first, end) of the query blocks whose union window
    meets it. Windows are arbitrary, so query blocks inside the range may still miss the key block:
    the dK/dV kernel re-checks each one and skips it."""
    lo, hi = windows[0].long(), windows[1].long()
    k0 = torch.arange(_cdiv(T, block_n), device=windows.device) * block_n  # [n_kblocks]
    meets = (lo[:, None] < k0[None, :] + block_n) & (hi[:, None] > k0[None, :])  # [n_qblocks, n_kblocks]
    seen = meets.any(0)
    first = meets.to(torch.int32).argmax(0)
    end = meets.shape[0] - meets.flip(0).to(torch.int32).argmax(0)
    return torch.stack([torch.where(seen, first, 0), torch.where(seen, end, 0)]).to(torch.int32).contiguous()


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        # DOT_FP32: the CPU interpreter computes bf16 tl.dot wrongly (numpy has no bf16), so under
        # TRITON_INTERPRET bf16 operands are upcast; on GPUs the operands go to the tensor cores as is.
        if DOT_FP32:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
        else:
            out = tl.dot(a, b, input_precision=PRECISION)
        return out

    @triton.jit
    def _load_windows(KV_START, KV_END, offs_m, T):
        """kv_start, kv_end [BLOCK_M] of rows offs_m; rows past T get the empty window [0, 0)."""
        start = tl.load(KV_START + offs_m, mask=offs_m < T, other=0)
        end = tl.load(KV_END + offs_m, mask=offs_m < T, other=0)
        return start, end

    @triton.jit
    def _visible(start, end, offs_n):
        """[BLOCK_M, BLOCK_N] bool: key offs_n lies in the row's window [start, end)."""
        return (offs_n[None, :] >= start[:, None]) & (offs_n[None, :] < end[:, None])

    @triton.jit
    def _fwd_inner(acc, m_i, l_i, q, K, V, start, end, offs_d, n_lo, n_hi,
                   stride_kt, T, qk_scale,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """Online softmax over key blocks [n_lo, n_hi); K/V already point at this kv head."""
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_ptrs = offs_n[:, None] * stride_kt + offs_d[None, :]
            k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < T, other=0.0)  # [BN, D]
            v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < T, other=0.0)  # [BN, D]
            s = _dot(q, tl.trans(k), DOT_FP32, PRECISION) * qk_scale  # [BM, BN], log2 units
            if MASKED:
                s = tl.where(_visible(start, end, offs_n), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: avoid inf - inf
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32, PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, KV_START, KV_END, BOUNDS,
                    stride_qt, stride_qh, stride_kt, stride_kh, T, n_qblocks, qk_scale,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """One (query block, query head): O [T, Hq, D] and LSE [Hq, T] (log2 units, +inf if empty)."""
        pid_m, head = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :]  # O shares q's layout
        q = tl.load(Q + q_ptrs, mask=offs_m[:, None] < T, other=0.0)  # [BM, D]
        start, end = _load_windows(KV_START, KV_END, offs_m, T)
        K += (head // GROUP) * stride_kh
        V += (head // GROUP) * stride_kh
        first = tl.load(BOUNDS + pid_m)
        full_lo = tl.load(BOUNDS + n_qblocks + pid_m)
        full_hi = tl.load(BOUNDS + 2 * n_qblocks + pid_m)
        hi = tl.load(BOUNDS + 3 * n_qblocks + pid_m)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # boundary blocks, blocks every row sees whole (no mask), boundary blocks again
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, start, end, offs_d, first, full_lo,
                                   stride_kt, T, qk_scale, BLOCK_N, True, DOT_FP32, PRECISION)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, start, end, offs_d, full_lo, full_hi,
                                   stride_kt, T, qk_scale, BLOCK_N, False, DOT_FP32, PRECISION)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, start, end, offs_d, full_hi, hi,
                                   stride_kt, T, qk_scale, BLOCK_N, True, DOT_FP32, PRECISION)
        has_keys = l_i > 0.0
        l_safe = tl.where(has_keys, l_i, 1.0)
        out = acc / l_safe[:, None]  # empty rows: acc = 0 -> zeros
        # +inf LSE makes p = exp2(s - lse) = 0 for empty rows in the backward, whatever s is.
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("inf"))
        tl.store(O + q_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
        tl.store(LSE + head * T + offs_m, lse, mask=offs_m < T)

    @triton.jit
    def _bwd_delta_kernel(O, DO, DELTA, stride_t, stride_h, T,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """delta [Hq, T] = rowsum(dO * O) in fp32: the softmax-backward term shared by dQ and dK."""
        pid_m, head = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ptrs = offs_m[:, None] * stride_t + head * stride_h + tl.arange(0, HEAD_DIM)[None, :]
        o = tl.load(O + ptrs, mask=offs_m[:, None] < T, other=0.0).to(tl.float32)
        do = tl.load(DO + ptrs, mask=offs_m[:, None] < T, other=0.0).to(tl.float32)
        tl.store(DELTA + head * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KV_START, KV_END, WINDOWS, RANGES,
                         stride_qt, stride_qh, stride_kt, stride_kh, T, n_qblocks, n_kblocks, qk_scale, sm_scale,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """One (key block, kv head): dK, dV [T, Hkv, D], summed over the GROUP query heads of the kv
        head inside the program (deterministic, no atomics)."""
        pid_n, kv_head = tl.program_id(0), tl.program_id(1)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kv_ptrs = offs_n[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :]
        k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < T, other=0.0)  # [BN, D]
        v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < T, other=0.0)  # [BN, D]
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        qb_first = tl.load(RANGES + pid_n)
        qb_end = tl.load(RANGES + n_kblocks + pid_n)
        for g in range(GROUP):
            head = kv_head * GROUP + g
            for qb in range(qb_first, qb_end):
                lo = tl.load(WINDOWS + qb)
                hi = tl.load(WINDOWS + n_qblocks + qb)
                if (lo < n0 + BLOCK_N) & (hi > n0):  # else no row of this query block sees the key block
                    ilo = tl.load(WINDOWS + 2 * n_qblocks + qb)
                    ihi = tl.load(WINDOWS + 3 * n_qblocks + qb)
                    boundary = (ilo > n0) | (ihi < n0 + BLOCK_N)
                    dk, dv = _bwd_dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, KV_START, KV_END, qb, head, offs_n,
                                            offs_d, boundary, stride_qt, stride_qh, T, qk_scale,
                                            BLOCK_M, DOT_FP32, PRECISION)
        tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < T)
        tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < T)

    @triton.jit
    def _bwd_dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, KV_START, KV_END, qb, head, offs_n, offs_d, boundary,
                       stride_qt, stride_qh, T, qk_scale,
                       BLOCK_M: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """Add one query block's contribution to dK, dV [BN, D] (dK still lacks the softmax scale)."""
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        q_ptrs = offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :]  # dO shares q's layout
        q = tl.load(Q + q_ptrs, mask=offs_m[:, None] < T, other=0.0)  # [BM, D]
        do = tl.load(DO + q_ptrs, mask=offs_m[:, None] < T, other=0.0)  # [BM, D]
        lse = tl.load(LSE + head * T + offs_m, mask=offs_m < T, other=float("inf"))  # rows past T: p = 0
        delta = tl.load(DELTA + head * T + offs_m, mask=offs_m < T, other=0.0)
        s = _dot(q, tl.trans(k), DOT_FP32, PRECISION) * qk_scale  # [BM, BN], log2 units
        if boundary:
            start, end = _load_windows(KV_START, KV_END, offs_m, T)
            s = tl.where(_visible(start, end, offs_n), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])  # the forward's probabilities, recomputed
        dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32, PRECISION)
        dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32, PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_dq_inner(dq, q, do, lse, delta, K, V, start, end, offs_d, n_lo, n_hi,
                      stride_kt, T, qk_scale,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """Accumulate dQ [BM, D] (without the softmax scale) over key blocks [n_lo, n_hi)."""
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_ptrs = offs_n[:, None] * stride_kt + offs_d[None, :]
            k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < T, other=0.0)  # [BN, D]
            v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < T, other=0.0)  # [BN, D]
            s = _dot(q, tl.trans(k), DOT_FP32, PRECISION) * qk_scale  # [BM, BN]
            if MASKED:
                s = tl.where(_visible(start, end, offs_n), s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, DOT_FP32, PRECISION)
        return dq

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KV_START, KV_END, BOUNDS,
                       stride_qt, stride_qh, stride_kt, stride_kh, T, n_qblocks, qk_scale, sm_scale,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """One (query block, query head): dQ [T, Hq, D], same key loop as the forward."""
        pid_m, head = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
        q = tl.load(Q + q_ptrs, mask=offs_m[:, None] < T, other=0.0)
        do = tl.load(DO + q_ptrs, mask=offs_m[:, None] < T, other=0.0)
        lse = tl.load(LSE + head * T + offs_m, mask=offs_m < T, other=float("inf"))
        delta = tl.load(DELTA + head * T + offs_m, mask=offs_m < T, other=0.0)
        start, end = _load_windows(KV_START, KV_END, offs_m, T)
        K += (head // GROUP) * stride_kh
        V += (head // GROUP) * stride_kh
        first = tl.load(BOUNDS + pid_m)
        full_lo = tl.load(BOUNDS + n_qblocks + pid_m)
        full_hi = tl.load(BOUNDS + 2 * n_qblocks + pid_m)
        hi = tl.load(BOUNDS + 3 * n_qblocks + pid_m)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, start, end, offs_d, first, full_lo,
                           stride_kt, T, qk_scale, BLOCK_N, True, DOT_FP32, PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, start, end, offs_d, full_lo, full_hi,
                           stride_kt, T, qk_scale, BLOCK_N, False, DOT_FP32, PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, start, end, offs_d, full_hi, hi,
                           stride_kt, T, qk_scale, BLOCK_N, True, DOT_FP32, PRECISION)
        tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < T)


# ------------------------------------------------------------------------------------------------
# Launchers and autograd
# ------------------------------------------------------------------------------------------------
def default_blocks(dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n). Untuned (no GPU at hand when written): FA2-typical 64 x 64 tiles for
    16-bit inputs; fp32 tiles take twice the shared memory per element and 64 x 64 at D = 128
    needs ~210 KB (over an A100's 164 KB, per a compile for sm_90), so fp32 uses 32 x 32."""
    return (32, 32) if dtype == torch.float32 else (64, 64)


def kernels_interpreted() -> bool:
    """True when the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_fwd_kernel, InterpretedFunction)


def _launch_options(q: torch.Tensor) -> dict:
    interpreted = kernels_interpreted()
    if not q.is_cuda and not interpreted:
        raise RuntimeError("the Triton kernels were compiled for the GPU but got CPU tensors: set "
                           "TRITON_INTERPRET=1 before mllm.kernels is first imported to run them on CPU")
    # fp32 inputs keep full fp32 products ("ieee"), so the fp32 twin matches to ~1e-6; 16-bit inputs
    # use the tensor cores as usual (the flag only affects fp32 operands).
    precision = "ieee" if q.dtype == torch.float32 or interpreted else "tf32"
    return dict(DOT_FP32=interpreted and q.dtype == torch.bfloat16, PRECISION=precision,
                num_warps=4 if q.shape[-1] <= 64 else 8)


def _triton_forward(q, k, v, kv_start, kv_end, scale, block_m, block_n):
    """-> out [T, Hq, D] (input dtype), lse [Hq, T] fp32 (log2 units)."""
    T, Hq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(Hq, T, device=q.device, dtype=torch.float32)
    bounds = _key_loop_bounds(_query_block_windows(kv_start, kv_end, block_m), block_n)
    n_qblocks = _cdiv(T, block_m)
    _fwd_kernel[(n_qblocks, Hq)](
        q, k, v, out, lse, kv_start, kv_end, bounds, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        T, n_qblocks, scale * LOG2E, GROUP=Hq // k.shape[1], HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        **_launch_options(q))
    return out, lse


def _triton_backward(dout, q, k, v, out, lse, kv_start, kv_end, scale, block_m, block_n):
    """-> dq, dk, dv shaped like q, k, v."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    options = _launch_options(q)
    n_qblocks, n_kblocks = _cdiv(T, block_m), _cdiv(T, block_n)
    delta = torch.empty_like(lse)  # [Hq, T]
    _bwd_delta_kernel[(n_qblocks, Hq)](out, dout, delta, out.stride(0), out.stride(1), T,
                                       HEAD_DIM=D, BLOCK_M=block_m)
    windows = _query_block_windows(kv_start, kv_end, block_m)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, **options)
    _bwd_dkdv_kernel[(n_kblocks, Hkv)](
        q, k, v, dout, dk, dv, lse, delta, kv_start, kv_end, windows, _query_block_ranges(windows, block_n, T),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), T, n_qblocks, n_kblocks, scale * LOG2E, scale,
        **common)
    _bwd_dq_kernel[(n_qblocks, Hq)](
        q, k, v, dout, dq, lse, delta, kv_start, kv_end, _key_loop_bounds(windows, block_n),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), T, n_qblocks, scale * LOG2E, scale, **common)
    return dq, dk, dv


class IntervalAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; inputs are contiguous and validated by the caller."""

    @staticmethod
    def forward(ctx, q, k, v, kv_start, kv_end, scale, block_m, block_n):
        out, lse = _triton_forward(q, k, v, kv_start, kv_end, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse, kv_start, kv_end)
        ctx.config = (scale, block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kv_start, kv_end = ctx.saved_tensors
        dq, dk, dv = _triton_backward(dout.contiguous(), q, k, v, out, lse, kv_start, kv_end, *ctx.config)
        return dq, dk, dv, None, None, None, None, None


def interval_attention_triton(q, k, v, kv_start, kv_end, scale=None,
                              block_m: int | None = None, block_n: int | None = None):
    """The Triton path, optionally with explicit tile sizes (powers of two >= 16); inputs must have
    passed `check_inputs` (the public `interval_attention` does both)."""
    default_m, default_n = default_blocks(q.dtype)
    block_m, block_n = block_m or default_m, block_n or default_n
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {size}")
    if q.shape[0] == 0:
        return torch.zeros_like(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    scale = _default_scale(scale, q.shape[-1])
    return IntervalAttentionFunction.apply(q, k, v, kv_start.contiguous(), kv_end.contiguous(),
                                           scale, block_m, block_n)


# ------------------------------------------------------------------------------------------------
# FlexAttention backend
# ------------------------------------------------------------------------------------------------
def make_flex_block_mask(kv_start, kv_end):
    """A FlexAttention BlockMask for the windows; build it once per batch and share it across layers."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= kv_start[q_idx]) & (kv_idx < kv_end[q_idx])

    T = kv_start.numel()
    return create_block_mask(mask_mod, None, None, T, T, device=kv_start.device)


def interval_attention_flex(q, k, v, kv_start, kv_end, scale=None, block_mask=None):
    """FlexAttention backend (eager here; wrap flex_attention in torch.compile on GPUs for speed).

    On CPU this torch runs the forward only (flex raises for backward on CPU).
    """
    from torch.nn.attention.flex_attention import flex_attention

    T, Hq, D = q.shape
    if block_mask is None:
        block_mask = make_flex_block_mask(kv_start, kv_end)
    as_bhtd = lambda x: x.transpose(0, 1).unsqueeze(0)  # [T, H, D] -> [1, H, T, D]  # noqa: E731
    out = flex_attention(as_bhtd(q), as_bhtd(k), as_bhtd(v), block_mask=block_mask,
                         scale=_default_scale(scale, D), enable_gqa=Hq != k.shape[1])
    return out[0].transpose(0, 1)  # [T, Hq, D]


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def interval_attention(q, k, v, kv_start, kv_end, scale=None, backend: str = "auto", *, check_bounds: bool = True):
    """Packed interval attention: out[t] = softmax(q[t] k[s:e]^T * scale) v[s:e], s, e = kv_start[t], kv_end[t].

    q [T, Hq, D], k/v [T, Hkv, D] (Hq % Hkv == 0), kv_start/kv_end int32 [T] with values in [0, T];
    returns [T, Hq, D] in q's dtype; empty windows give zero rows. `scale` defaults to D ** -0.5.
    backend: "auto" (Triton on CUDA when supported, else the reference), "triton", "reference" or
    "flex". `check_bounds=False` skips the window-bounds check (one host sync) when the caller
    already validated the layout, e.g. once per batch for all layers.
    """
    check_inputs(q, k, v, kv_start, kv_end, check_bounds=check_bounds)
    chosen = select_backend(q, backend)
    if chosen == "triton":
        return interval_attention_triton(q, k, v, kv_start, kv_end, scale)
    if chosen == "flex":
        return interval_attention_flex(q, k, v, kv_start, kv_end, scale)
    return interval_attention_reference(q, k, v, kv_start, kv_end, scale)


__all__ = [
    "HAS_TRITON",
    "IntervalAttentionFunction",
    "check_inputs",
    "interval_attention",
    "interval_attention_flex",
    "interval_attention_reference",
    "interval_attention_triton",
    "make_flex_block_mask",
]
