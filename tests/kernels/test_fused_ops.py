"""Fused training ops: RMSNorm, RoPE and SwiGLU Triton kernels against their twins, the twins against
transformers (LlamaRMSNorm, apply_rotary_pos_emb), and fused linear cross-entropy against the full
logits, plus dispatch and input errors.

The Triton kernels run on CPU through the interpreter (TRITON_INTERPRET=1), so shapes are tiny but
awkward: hidden sizes 48 and 96 (not powers of two: masked columns), 33 rows (ragged backward
strips), batch 2 x T = 7, GQA with 4 query and 2 kv heads, head dims 16 and 32.

Tolerances are relative to the largest reference value (see `assert_rel_close`):
  * fp32, 1e-5: kernels and twins do the same fp32 math; only summation order differs (measured
    <= 3e-7).
  * bf16, 3e-2: bf16 keeps 8 significant bits, and the interpreter rounds fp32 -> bf16 by
    truncation (triton/runtime/interpreter.py `cast_impl` ignores the rounding mode; the GPU rounds
    to nearest), so every rounding can be off by a whole ulp (2^-7 = 0.8% relative) against
    PyTorch's half ulp. The kernels round two or three times in a row (e.g. silu(gate), then the
    product), measured <= 1.3%; a real bug (a wrong half, head or row) shows up at O(1).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from mllm.kernels import (  # noqa: E402
    apply_rope,
    apply_rope_reference,
    apply_rope_triton,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    rms_norm,
    rms_norm_reference,
    rms_norm_triton,
    swiglu,
    swiglu_reference,
    swiglu_triton,
)
from mllm.kernels.dispatch import select_op_backend  # noqa: E402
from tests.kernels.hopper import assert_compiles_for_hopper  # noqa: E402

# the package re-exports the functions, which shadow the submodules' names
rms_mod = importlib.import_module("mllm.kernels.rms_norm")
rope_mod = importlib.import_module("mllm.kernels.rope")
swiglu_mod = importlib.import_module("mllm.kernels.swiglu")


def _kernels_interpreted() -> bool:
    if not rms_mod.HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return all(isinstance(k, InterpretedFunction) for k in (
        rms_mod._rms_norm_fwd_kernel, rope_mod._rope_kernel, swiglu_mod._swiglu_fwd_kernel))


needs_triton = pytest.mark.skipif(
    not _kernels_interpreted(),
    reason="triton is not installed, or mllm.kernels was imported before TRITON_INTERPRET=1 was set")
triton_installed = pytest.mark.skipif(not rms_mod.HAS_TRITON, reason="triton is not installed")
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # why: see the module docstring


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def assert_rel_close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max |expected|; refuses an all-zero reference (proves nothing)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert scale > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol} * max |ref| {scale:.3e}"


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0, shift=0.0, grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale + shift).to(dtype)
    return x.requires_grad_() if grad else x


def outputs_and_grads(fn, inputs, seed=100):
    """fn's output(s) and the gradients of every input for fixed random upstream gradients."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    return (*outs, *torch.autograd.grad(outs, inputs, upstream))


def compare(fn, twin, inputs, tol, names):
    """fn vs twin on every output and every input gradient, named by `names` (one name per tensor)."""
    got, want = outputs_and_grads(fn, inputs), outputs_and_grads(twin, inputs)
    assert len(got) == len(want) == len(names)
    for name, got, want in zip(names, got, want):
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != twin's {want.dtype}"
        assert_rel_close(got, want, tol, name)


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 48), (2, 7, 96)])
def test_rms_norm_triton_matches_twin(shape, dtype):
    x = randn(*shape, dtype=dtype, seed=1, shift=0.5)  # a mean offset: rstd is not ~1
    weight = randn(shape[-1], dtype=dtype, seed=2, scale=0.2, shift=1.0)
    fn = lambda x, w: rms_norm(x, w, eps=1e-5, backend="triton")  # noqa: E731
    compare(fn, lambda x, w: rms_norm_reference(x, w, 1e-5), (x, weight), TOL[dtype], ("y", "dx", "dweight"))


@needs_triton
def test_rms_norm_triton_strided_rows_and_mixed_dtypes():
    # rows 80 apart in memory (a column slice), and an fp32 weight on bf16 x: fp32 output, as in transformers
    x = randn(33, 80, dtype=torch.bfloat16, seed=3, grad=False)[:, :48].requires_grad_()
    weight = randn(48, seed=4, scale=0.2, shift=1.0)
    assert x.stride() == (80, 1)
    compare(lambda x, w: rms_norm_triton(x, w), rms_norm_reference, (x, weight), TOL[torch.bfloat16],
            ("y", "dx", "dweight"))
    assert rms_norm_triton(x, weight).dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_twin_equals_llama_rmsnorm(dtype):
    """Bit-exact: the twin must keep LlamaRMSNorm's casting order (round h to x.dtype, then weight)."""
    norm = LlamaRMSNorm(96, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(96, seed=5, scale=0.2, shift=1.0, grad=False))
    x = randn(2, 7, 96, dtype=dtype, seed=6, shift=0.3)
    weight = norm.weight.detach().clone().requires_grad_()
    got = outputs_and_grads(lambda x, w: rms_norm_reference(x, w, 1e-6), (x, weight))
    want = outputs_and_grads(lambda x, w: norm(x), (x, norm.weight))
    for name, a, b in zip(("y", "dx", "dweight"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert want[0].abs().max() > 0.1


def test_rms_norm_twin_normalises():
    """First principles: with a unit weight every output row has RMS 1 (up to eps)."""
    x = randn(5, 48, seed=7, scale=3.0, grad=False)
    y = rms_norm_reference(x, torch.ones(48))
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(5), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------
def make_qk(B, Hq, Hkv, T, D, dtype, seed=0):
    """q as attention layers produce it, a [B, T, H, D] projection viewed as [B, H, T, D]; k contiguous
    [B, H, T, D]. Two layouts, so a kernel reading k with q's strides fails."""
    q = randn(B, T, Hq, D, dtype=dtype, seed=seed, grad=False).transpose(1, 2).requires_grad_()
    k = randn(B, Hkv, T, D, dtype=dtype, seed=seed + 1)
    return q, k


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 32])
def test_rope_triton_matches_twin(D, dtype):
    q, k = make_qk(2, 4, 2, 7, D, dtype, seed=10)  # GQA, non-contiguous q/k
    # random cos/sin whose halves differ: the kernel must use c1/c2 and s1/s2 where the formula does
    cos, sin = randn(2, 7, D, dtype=dtype, seed=12, grad=False), randn(2, 7, D, dtype=dtype, seed=13, grad=False)
    fn = lambda q, k: apply_rope(q, k, cos, sin, backend="triton")  # noqa: E731
    compare(fn, lambda q, k: apply_rope_reference(q, k, cos, sin), (q, k), TOL[dtype], ("q_out", "k_out", "dq", "dk"))


@needs_triton
def test_rope_triton_broadcasts_cos_over_batch():
    q, k = make_qk(2, 4, 2, 7, 16, torch.float32, seed=14)
    cos, sin = randn(1, 7, 16, seed=15, grad=False), randn(1, 7, 16, seed=16, grad=False)
    compare(lambda q, k: apply_rope_triton(q, k, cos, sin), lambda q, k: apply_rope_reference(q, k, cos, sin),
            (q, k), TOL[torch.float32], ("q_out", "k_out", "dq", "dk"))


def llama_cos_sin(B, T, D, dtype, offset=0):
    config = LlamaConfig(hidden_size=4 * D, num_attention_heads=4, head_dim=D, max_position_embeddings=64)
    positions = torch.arange(offset, offset + T)[None].expand(B, T)
    return LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=dtype), positions)  # [B, T, D] each


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_twin_equals_transformers(dtype):
    q, k = make_qk(2, 4, 2, 7, 32, dtype, seed=17)
    cos, sin = llama_cos_sin(2, 7, 32, dtype)
    got = outputs_and_grads(lambda q, k: apply_rope_reference(q, k, cos, sin), (q, k))
    want = outputs_and_grads(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), (q, k))
    for name, a, b in zip(("q_out", "k_out", "dq", "dk"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (got[0] - q).abs().max() > 0.1  # positions 1..6 really rotate


def test_rope_twin_scores_depend_on_relative_position_only():
    """First principles: <rope(q, m), rope(k, n)> depends on m - n, so shifting both positions by 5
    keeps every score; and rotations keep each head vector's norm."""
    q, k = (x.detach() for x in make_qk(1, 2, 2, 7, 16, torch.float32, seed=18))
    scores = []
    for offset in (0, 5):
        cos, sin = llama_cos_sin(1, 7, 16, torch.float32, offset)
        q_rot, k_rot = apply_rope_reference(q, k, cos, sin)
        scores.append(q_rot @ k_rot.transpose(-1, -2))  # [1, 2, 7, 7]
        assert torch.allclose(q_rot.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    assert torch.allclose(scores[0], scores[1], atol=1e-4)
    assert not torch.allclose(scores[0], q @ k.transpose(-1, -2), atol=1e-2)  # and it does change them


def test_rope_cos_requiring_grad_stays_on_the_twin():
    q, k = make_qk(1, 2, 2, 3, 16, torch.float32)
    cos, sin = randn(1, 3, 16, seed=19), randn(1, 3, 16, seed=20)  # requires_grad: only the twin differentiates them
    assert select_op_backend(q, "auto", op="apply_rope", unsupported=rope_mod._triton_unsupported(q, k, cos, sin)) \
        == "reference"
    if _kernels_interpreted():
        with pytest.raises(RuntimeError, match="cos/sin require grad"):
            apply_rope(q, k, cos, sin, backend="triton")


# ------------------------------------------------------------------------------------------------
# SwiGLU
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 96), (2, 7, 48)])
def test_swiglu_triton_matches_twin(shape, dtype):
    gate = randn(*shape, dtype=dtype, seed=21, scale=3.0)  # wide range: saturated and linear silu
    up = randn(*shape, dtype=dtype, seed=22)
    compare(lambda g, u: swiglu(g, u, backend="triton"), swiglu_reference, (gate, up), TOL[dtype],
            ("out", "dgate", "dup"))


@needs_triton
def test_swiglu_triton_non_contiguous_inputs():
    gate = randn(96, 33, seed=23, grad=False).T.requires_grad_()  # [33, 96], column-major
    up = randn(96, 33, seed=24, grad=False).T.requires_grad_()
    compare(swiglu_triton, swiglu_reference, (gate, up), TOL[torch.float32], ("out", "dgate", "dup"))


def test_swiglu_twin_matches_float64_formula():
    gate, up = randn(33, 48, seed=25, scale=3.0), randn(33, 48, seed=26)
    got = outputs_and_grads(swiglu_reference, (gate, up))
    want = outputs_and_grads(lambda g, u: (g.double() * torch.sigmoid(g.double()) * u.double()).float(), (gate, up))
    for name, a, b in zip(("out", "dgate", "dup"), got, want):
        assert_rel_close(a, b, 1e-6, name)


# ------------------------------------------------------------------------------------------------
# Fused linear cross-entropy
# ------------------------------------------------------------------------------------------------
N_TOKENS, HIDDEN, VOCAB = 37, 48, 211


def make_lm_head_inputs(dtype, seed=30):
    hidden = randn(N_TOKENS, HIDDEN, dtype=dtype, seed=seed)
    weight = randn(VOCAB, HIDDEN, dtype=dtype, seed=seed + 1, scale=3 * HIDDEN**-0.5)  # logits ~ N(0, 9)
    labels = torch.randint(0, VOCAB, (N_TOKENS,), generator=torch.Generator().manual_seed(seed + 2))
    labels[::5] = -100  # scattered ignored labels (prompt tokens, padding)
    labels[8:16] = -100  # with chunk_size 8, the second chunk is all ignored
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, grad_scale=0.37, **kwargs):
    """loss_sum, count and the gradients of grad_scale * loss_sum (grad_output != 1 is exercised)."""
    loss_sum, count = fn(hidden, weight, labels, **kwargs)
    grads = torch.autograd.grad(loss_sum * grad_scale, (hidden, weight))
    return loss_sum, count, *grads


@pytest.mark.parametrize("chunk_size", [None, 8, 5, 64])  # automatic, all-ignored chunk, ragged, one chunk
def test_flce_matches_full_logits_fp32(chunk_size):
    hidden, weight, labels = make_lm_head_inputs(torch.float32)
    got = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, chunk_size=chunk_size)
    want = loss_and_grads(fused_linear_cross_entropy_reference, hidden, weight, labels)
    assert got[1].item() == want[1].item() == int((labels != -100).sum()) == 23
    # fp32 throughout; only the summation order over chunks differs
    for name, a, b in zip(("loss_sum", "dhidden", "dweight"), (got[0], *got[2:]), (want[0], *want[2:])):
        assert a.dtype == b.dtype
        assert_rel_close(a, b, 1e-5, name)
    assert got[2][labels == -100].abs().max() == 0  # ignored tokens get no gradient
    assert got[2][labels != -100].abs().min() > 0


def test_flce_matches_full_logits_bf16():
    hidden, weight, labels = make_lm_head_inputs(torch.bfloat16, seed=40)
    got = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, chunk_size=8)
    want = loss_and_grads(fused_linear_cross_entropy_reference, hidden, weight, labels)
    assert got[0].dtype == torch.float32 and got[2].dtype == got[3].dtype == torch.bfloat16
    # The logits are the same bf16 GEMM outputs and the loss is fp32 math on them: tight.
    assert_rel_close(got[0], want[0], 1e-5, "loss_sum")
    # dweight: each chunk's bf16 GEMM result is rounded (2^-9 relative) before the fp32 sum, where the
    # reference rounds once after one GEMM over all tokens; dhidden rounds once like the reference
    # but the grad_output scaling rounds again in bf16. Measured <= 6.2e-3 (3 seeds): 2e-2 leaves ~3x.
    assert_rel_close(got[2], want[2], 2e-2, "dhidden")
    assert_rel_close(got[3], want[3], 2e-2, "dweight")


def test_flce_leading_dims_and_partial_requires_grad():
    hidden, weight, labels = make_lm_head_inputs(torch.float32, seed=50)
    hidden3 = hidden.detach()[:36].view(2, 18, HIDDEN).requires_grad_()
    labels3 = labels[:36].view(2, 18).int()  # int32 labels are accepted too
    weight_frozen = weight.detach()  # e.g. a frozen lm_head: only dhidden is computed
    loss_sum, count = fused_linear_cross_entropy(hidden3, weight_frozen, labels3, chunk_size=8)
    want_sum, want_count = fused_linear_cross_entropy_reference(hidden3, weight_frozen, labels3)
    assert count.item() == want_count.item()
    assert_rel_close(loss_sum, want_sum, 1e-5, "loss_sum")
    (grad,) = torch.autograd.grad(loss_sum, hidden3)
    assert_rel_close(grad, torch.autograd.grad(want_sum, hidden3)[0], 1e-5, "dhidden [B, T, D]")
    with torch.no_grad():  # evaluation: no gradient buffers, same loss
        assert_rel_close(fused_linear_cross_entropy(hidden, weight, labels)[0],
                         fused_linear_cross_entropy_reference(hidden, weight, labels)[0], 1e-5, "no_grad loss")


def test_flce_all_labels_ignored():
    hidden, weight, labels = make_lm_head_inputs(torch.float32, seed=60)
    labels = torch.full_like(labels, -1)
    loss_sum, count, dhidden, dweight = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels,
                                                       ignore_index=-1, chunk_size=8)
    ref = fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index=-1)
    assert loss_sum.item() == ref[0].item() == 0 and count.item() == ref[1].item() == 0
    assert dhidden.abs().max() == 0 and dweight.abs().max() == 0


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements any ATen op produced while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_flce_never_materialises_the_logits():
    n_tokens = 200  # more tokens than the hidden size, so dweight [V, D] is smaller than [N, V]
    hidden, weight = randn(n_tokens, HIDDEN, seed=70), randn(VOCAB, HIDDEN, seed=71, scale=HIDDEN**-0.5)
    labels = torch.randint(0, VOCAB, (n_tokens,), generator=torch.Generator().manual_seed(72))
    logits_size = n_tokens * VOCAB
    for fn, kwargs in ((fused_linear_cross_entropy, {"chunk_size": 8}), (fused_linear_cross_entropy_reference, {})):
        with LargestOutput() as mode:
            loss_and_grads(fn, hidden, weight, labels, **kwargs)
        if fn is fused_linear_cross_entropy:  # largest: dweight [V, D], or hidden-sized tensors
            assert mode.largest == max(VOCAB * HIDDEN, n_tokens * HIDDEN, 8 * VOCAB) < logits_size / 4
        else:  # the check itself works: the reference does build [N, V]
            assert mode.largest >= logits_size


def test_flce_second_backward_is_refused():
    hidden, weight, labels = make_lm_head_inputs(torch.float32, seed=80)
    loss_sum, _ = fused_linear_cross_entropy(hidden, weight, labels)
    loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss_sum.backward()


@pytest.mark.parametrize("change,match", [
    ({"labels": torch.full((N_TOKENS,), VOCAB)}, r"label 211 at \(0,\) is outside the vocabulary \[0, 211\)"),
    ({"labels": torch.zeros(N_TOKENS, 1, dtype=torch.long)}, "labels must be an int64/int32 tensor of shape"),
    ({"weight": torch.zeros(VOCAB, 8)}, r"weight must be the lm_head weight \[V, D\] with D = 48"),
    ({"weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.float64)}, "must share dtype and device"),
    ({"chunk_size": 0}, "chunk_size must be a positive int"),
])
def test_flce_invalid_inputs_raise_clear_errors(change, match):
    hidden, weight, labels = make_lm_head_inputs(torch.float32)
    args = {"hidden": hidden, "weight": weight, "labels": labels, **change}
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(**args)


COMPILE_FOR_HOPPER = """
import importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mods = {n: importlib.import_module(f"mllm.kernels.{n}") for n in ("rms_norm", "rope", "swiglu")}
FP32_POINTERS = {"RSTD", "DW_PARTIAL"}  # the other pointers (upper-case names but T) hold the input dtype
for dtype in ("bf16", "fp32"):
    cases = [  # (kernel, constexprs, num_warps) at Llama-3-8B widths: hidden 4096, 32 q / 8 kv heads of 128
        (mods["rms_norm"]._rms_norm_fwd_kernel, dict(BLOCK_N=4096), 8),
        (mods["rms_norm"]._rms_norm_bwd_kernel, dict(BLOCK_N=4096), 8),
        (mods["rope"]._rope_kernel, dict(BACKWARD=False, BLOCK_HQ=32, BLOCK_HKV=8, BLOCK_HALF=64), 8),
        (mods["rope"]._rope_kernel, dict(BACKWARD=True, BLOCK_HQ=32, BLOCK_HKV=8, BLOCK_HALF=64), 8),
        (mods["swiglu"]._swiglu_fwd_kernel, dict(BLOCK_SIZE=1024), 4),
        (mods["swiglu"]._swiglu_bwd_kernel, dict(BLOCK_SIZE=1024), 4),
    ]
    for kernel, consts, warps in cases:
        names = kernel.arg_names
        sig = {n: "constexpr" if n in consts else ("*fp32" if n in FP32_POINTERS else "*" + dtype)
               if n.isupper() and n != "T" else "fp32" if n == "eps" else "i32" for n in names}
        src = ASTSource(kernel, sig, {(names.index(n),): v for n, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
print("compiled")
"""


@triton_installed
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The interpreter accepts code the GPU compiler rejects: compile every kernel to a cubin for
    sm_90 with the compiler bundled in the triton wheel."""
    assert_compiles_for_hopper(COMPILE_FOR_HOPPER, tmp_path)


# ------------------------------------------------------------------------------------------------
# Dispatch and validation
# ------------------------------------------------------------------------------------------------
def _refuse(*args, **kwargs):
    raise AssertionError("auto must not pick the Triton kernel for CPU tensors")


def test_auto_picks_the_twin_on_cpu(monkeypatch):
    monkeypatch.setattr(rms_mod, "rms_norm_triton", _refuse)
    monkeypatch.setattr(rope_mod, "apply_rope_triton", _refuse)
    monkeypatch.setattr(swiglu_mod, "swiglu_triton", _refuse)
    x, w = randn(3, 48, grad=False), randn(48, grad=False)
    assert torch.equal(rms_norm(x, w), rms_norm_reference(x, w))
    q, k = make_qk(1, 4, 2, 3, 16, torch.float32)
    cos, sin = llama_cos_sin(1, 3, 16, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(apply_rope(q, k, cos, sin), apply_rope_reference(q, k, cos, sin)))
    assert torch.equal(swiglu(x, x), swiglu_reference(x, x))


@needs_triton
def test_explicit_triton_runs_under_interpreter_on_cpu():
    assert select_op_backend(torch.zeros(3, 48), "triton", op="rms_norm") == "triton"


@pytest.mark.parametrize("call,match", [
    (lambda: rms_norm(torch.zeros(3, 48, dtype=torch.float64), torch.ones(48, dtype=torch.float64),
                      backend="triton"), r"rms_norm\(backend='triton'\) cannot run: dtype torch.float64"),
    (lambda: rms_norm(torch.zeros(3, 48), torch.ones(48, dtype=torch.float64), backend="triton"),
     "weight dtype torch.float64"),
    (lambda: swiglu(torch.zeros(3, 48, dtype=torch.float64), torch.zeros(3, 48, dtype=torch.float64),
                    backend="triton"), r"swiglu\(backend='triton'\) cannot run: dtype torch.float64"),
])
@needs_triton
def test_explicit_triton_refuses_unsupported_inputs(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_explicit_triton_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="need CUDA tensors|not importable"):
        swiglu(torch.zeros(3, 48), torch.zeros(3, 48), backend="triton")


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown rms_norm backend 'flex'; valid backends: \('auto', 'triton'"):
        rms_norm(torch.zeros(3, 48), torch.ones(48), backend="flex")


@pytest.mark.parametrize("call,match", [
    (lambda: rms_norm(torch.zeros(3, 48), torch.ones(47)), r"weight must have shape \[N\] = \[48\]"),
    (lambda: swiglu(torch.zeros(3, 48), torch.zeros(3, 47)), "gate and up must share shape"),
    (lambda: apply_rope(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 4, 16), torch.zeros(1, 3, 16),
                        torch.zeros(1, 3, 16)), r"k \(1, 2, 4, 16\) must match q"),
    (lambda: apply_rope(torch.zeros(1, 2, 3, 15), torch.zeros(1, 2, 3, 15), torch.zeros(1, 3, 15),
                        torch.zeros(1, 3, 15)), "head dim must be even"),
    (lambda: apply_rope(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), torch.zeros(3, 16),
                        torch.zeros(3, 16)), r"cos must be \[B, T, D\] = \[2, 3, 16\]"),
])
def test_invalid_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
