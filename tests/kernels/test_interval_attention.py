"""Interval attention: the Triton kernels against their reference twin, the twin against independent
ground truths (a per-row softmax loop, SDPA), FlexAttention, dispatch and input errors.

Runs on CPU through the Triton interpreter (TRITON_INTERPRET=1), hence tiny shapes and 16-wide
tiles: every layout below still spans several query and key blocks, so skipped blocks, unmasked
full blocks, boundary blocks and the ragged last block are all exercised.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mllm.kernels import (  # noqa: E402
    interval_attention,
    interval_attention_flex,
    interval_attention_reference,
    interval_attention_triton,
    select_backend,
)
from tests.kernels.hopper import assert_compiles_for_hopper  # noqa: E402

# the package re-exports the function `interval_attention`, which shadows the submodule's name
ia = importlib.import_module("mllm.kernels.interval_attention")
# The kernels are built for the interpreter only if TRITON_INTERPRET was set when they were first
# imported (the test runner sets it; importlib.reload does not rebuild nested jit helpers properly).
needs_triton = pytest.mark.skipif(
    not ia.HAS_TRITON or not ia.kernels_interpreted(),
    reason="triton is not installed, or mllm.kernels was imported before TRITON_INTERPRET=1 was set")
triton_installed = pytest.mark.skipif(not ia.HAS_TRITON, reason="triton is not installed")
BLOCK = 16  # smallest tile tl.dot accepts; keeps the interpreter fast


# ------------------------------------------------------------------------------------------------
# Layouts, built here from first principles (DESIGN.md §3), independent of the library's builder
# ------------------------------------------------------------------------------------------------
def build_layout(docs, pad: int = 0, window: int | None = None):
    """kv_start, kv_end int32 [T] for `pad` left-padding rows (empty windows) then packed documents.

    A document is a list of (kind, length) with kind in text / image / assistant. Text and assistant
    tokens are causal within their document (optionally a sliding window). Image tokens see their
    whole image span and the user text after it up to the next assistant turn of the document
    (no assistant turn: just the image span).
    """
    starts, ends = [0] * pad, [0] * pad
    t = pad
    for doc in docs:
        doc_start, spans = t, []
        for kind, n in doc:
            spans.append((kind, t, t + n))
            t += n
        for i, (kind, s, e) in enumerate(spans):
            reach = e
            if kind == "image":
                reach = next((s2 for kind2, s2, _ in spans[i + 1:] if kind2 == "assistant"), e)
            for tok in range(s, e):
                starts.append(doc_start if window is None else max(doc_start, tok - window + 1))
                ends.append(max(tok + 1, reach) if kind == "image" else tok + 1)
    return torch.tensor(starts, dtype=torch.int32), torch.tensor(ends, dtype=torch.int32)


LAYOUTS = {  # name -> (docs, pad, window); lengths chosen so T is never a multiple of 16
    "causal": ([[("text", 45)]], 0, None),
    "packed_3_docs": ([[("text", 13)], [("text", 20)], [("text", 17)]], 0, None),
    "image_at_start": ([[("image", 18), ("text", 9), ("assistant", 14)]], 0, None),
    "image_in_middle": ([[("text", 7), ("image", 16), ("text", 8), ("assistant", 12)]], 0, None),
    "image_at_end": ([[("text", 20), ("image", 17)]], 0, None),
    "several_images": ([[("text", 3), ("image", 10), ("text", 4), ("image", 9), ("text", 6),
                         ("assistant", 9)]], 0, None),
    "several_turns": ([[("image", 10), ("text", 6), ("assistant", 8), ("text", 5), ("image", 8),
                        ("text", 4), ("assistant", 7)]], 0, None),
    "packed_mma": ([[("image", 9), ("text", 5), ("assistant", 6)], [("text", 8)],
                    [("text", 3), ("image", 12), ("text", 4), ("assistant", 5)]], 0, None),
    "left_padding": ([[("image", 8), ("text", 6), ("assistant", 12)]], 21, None),
    "sliding_window": ([[("text", 30)], [("text", 40)]], 0, 9),
    "long_mma": ([[("text", 20), ("image", 64), ("text", 30), ("assistant", 36)]], 0, None),  # T = 150
}


def test_build_layout_matches_hand_written_mma_windows():
    # text, image x2, question, assistant x2: image tokens see up to the assistant turn (5)
    kv_start, kv_end = build_layout([[("text", 1), ("image", 2), ("text", 1), ("assistant", 2)]], pad=1)
    assert kv_start.tolist() == [0, 1, 1, 1, 1, 1, 1]
    assert kv_end.tolist() == [0, 2, 5, 5, 5, 6, 7]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def make_qkv(T, Hq, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, D, generator=g).to(dtype).requires_grad_() for h in (Hq, Hkv, Hkv)]


def forward_backward(fn, q, k, v, kv_start, kv_end, seed=1):
    """Output and (dq, dk, dv) for a fixed random upstream gradient."""
    out = fn(q, k, v, kv_start, kv_end)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_rel_close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max |expected| (relative to the tensor's scale, so near-zero
    entries do not demand impossible per-element precision)."""
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert scale > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol} * max |ref| {scale:.3e}"


def triton_blocks(q, k, v, kv_start, kv_end):
    return interval_attention_triton(q, k, v, kv_start, kv_end, block_m=BLOCK, block_n=BLOCK)


def loop_attention(q, k, v, kv_start, kv_end, scale=None):
    """Ground truth written the obvious way: one float64 softmax per query row over its window."""
    T, Hq, D = q.shape
    scale = D**-0.5 if scale is None else scale
    group = Hq // k.shape[1]
    k64, v64 = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)  # [T, Hq, D]
    rows = []
    for t in range(T):
        s, e = int(kv_start[t]), int(kv_end[t])
        if s >= e:
            rows.append(q[t].double() * 0)  # empty window: zero row, zero gradient
            continue
        probs = (torch.einsum("hd,shd->hs", q[t].double(), k64[s:e]) * scale).softmax(-1)  # [Hq, e - s]
        rows.append(torch.einsum("hs,shd->hd", probs, v64[s:e]))
    return torch.stack(rows)  # [T, Hq, D]


# ------------------------------------------------------------------------------------------------
# Triton vs reference
# ------------------------------------------------------------------------------------------------
HEAD_DIMS = (16, 32, 64)


@needs_triton
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_triton_matches_reference_fp32(name):
    docs, pad, window = LAYOUTS[name]
    kv_start, kv_end = build_layout(docs, pad, window)
    D = HEAD_DIMS[sorted(LAYOUTS).index(name) % 3]  # every head dim sees several layouts
    q, k, v = make_qkv(kv_start.numel(), 4, 2, D)  # GQA: 2 query heads per kv head
    got = forward_backward(triton_blocks, q, k, v, kv_start, kv_end)
    want = forward_backward(interval_attention_reference, q, k, v, kv_start, kv_end)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_rel_close(a, b, 1e-4, f"{name} {what}")
    if pad:  # padding rows: zero output, zero dq
        assert got[0][:pad].abs().max() == 0 and got[1][:pad].abs().max() == 0


@needs_triton
@pytest.mark.parametrize("Hq,Hkv,D", [(3, 3, 32), (2, 1, 16)])  # MHA and MQA next to the GQA above
def test_triton_matches_reference_head_layouts(Hq, Hkv, D):
    kv_start, kv_end = build_layout(*LAYOUTS["packed_mma"])
    q, k, v = make_qkv(kv_start.numel(), Hq, Hkv, D, seed=3)
    got = forward_backward(triton_blocks, q, k, v, kv_start, kv_end)
    want = forward_backward(interval_attention_reference, q, k, v, kv_start, kv_end)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_rel_close(a, b, 1e-4, what)


@needs_triton
def test_triton_arbitrary_windows_with_empty_rows():
    """Random, non-monotone windows (some empty, some reversed): nothing relies on causal order."""
    T = 61
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, T + 1, (2, T), generator=g)
    kv_start, kv_end = torch.minimum(a, b).int(), torch.maximum(a, b).int()
    kv_start[::7], kv_end[::7] = kv_end[::7].clone(), kv_start[::7].clone()  # reversed -> empty
    kv_end[3] = kv_start[3]  # zero-width
    q, k, v = make_qkv(T, 4, 2, 32, seed=4)
    got = forward_backward(triton_blocks, q, k, v, kv_start, kv_end)
    want = forward_backward(interval_attention_reference, q, k, v, kv_start, kv_end)
    for what, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert_rel_close(x, y, 1e-4, what)
    empty = kv_start >= kv_end
    assert empty.sum() >= 9 and got[0][empty].abs().max() == 0 and got[1][empty].abs().max() == 0


@needs_triton
def test_triton_bf16_within_bf16_tolerance():
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%). The kernel rounds the probabilities to
    # bf16 before the P @ V product and rounds the output; the reference rounds only the output, so
    # the forward differs by ~1 bf16 ulp of the largest output (measured 4-6e-3 of its scale). The
    # backward also rounds P and dS = P * (dP - delta) before its matmuls (measured 5-9e-3). A
    # ~4x margin: 2e-2 and 3e-2; a real bug (a wrong mask or head) shows up at O(1).
    kv_start, kv_end = build_layout(*LAYOUTS["several_images"])
    q, k, v = make_qkv(kv_start.numel(), 4, 2, 32, dtype=torch.bfloat16, seed=6)
    got = forward_backward(triton_blocks, q, k, v, kv_start, kv_end)
    want = forward_backward(interval_attention_reference, q, k, v, kv_start, kv_end)
    assert got[0].dtype == torch.bfloat16
    assert_rel_close(got[0], want[0], 2e-2, "bf16 out")
    for what, x, y in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        assert_rel_close(x, y, 3e-2, f"bf16 {what}")


@needs_triton
def test_public_api_triton_default_tiles_and_custom_scale():
    kv_start, kv_end = build_layout(*LAYOUTS["image_in_middle"])
    q, k, v = make_qkv(kv_start.numel(), 2, 2, 16, seed=7)
    fn = lambda *args: interval_attention(*args, scale=0.3, backend="triton")  # noqa: E731
    ref = lambda *args: interval_attention_reference(*args, scale=0.3)  # noqa: E731
    for what, x, y in zip(("out", "dq", "dk", "dv"), forward_backward(fn, q, k, v, kv_start, kv_end),
                          forward_backward(ref, q, k, v, kv_start, kv_end)):
        assert_rel_close(x, y, 1e-4, what)


def test_block_tables_skip_invisible_blocks_and_mask_only_boundaries():
    # causal, T = 64, 16-wide tiles: query block 3 loops over keys [0, 64) with [0, 48) unmasked
    kv_start, kv_end = build_layout([[("text", 64)]])
    windows = ia._query_block_windows(kv_start, kv_end, 16)
    assert ia._key_loop_bounds(windows, 16)[:, 3].tolist() == [0, 0, 48, 64]
    assert ia._query_block_ranges(windows, 16, 64)[:, 0].tolist() == [0, 4]  # key block 0: all q blocks
    # packed [20, 44]: query block 3 (rows 48-63, second doc) starts at key block 1, never reads block 0
    kv_start, kv_end = build_layout([[("text", 20)], [("text", 44)]])
    first, full_lo, full_hi, hi = ia._key_loop_bounds(ia._query_block_windows(kv_start, kv_end, 16), 16)[:, 3]
    assert (first, full_lo, full_hi, hi) == (16, 32, 48, 64)
    # a query block of padding rows only has an empty key loop
    kv_start, kv_end = build_layout([[("text", 10)]], pad=20)
    assert ia._key_loop_bounds(ia._query_block_windows(kv_start, kv_end, 16), 16)[:, 0].tolist() == [0, 0, 0, 0]


COMPILE_FOR_HOPPER = """
import importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ia = importlib.import_module("mllm.kernels.interval_attention")
if ia.HAS_TRITON and not ia.kernels_interpreted():
    # imported before TRITON_INTERPRET was set (e.g. by another test module): rebuild the kernels
    # for the interpreter; reload re-executes in the same module dict, so re-exports see them too
    ia = importlib.reload(ia)
POINTER_ELEMENTS = {"LSE": "fp32", "DELTA": "fp32", "KV_START": "i32", "KV_END": "i32", "BOUNDS": "i32",
                    "WINDOWS": "i32", "RANGES": "i32"}  # Q, K, V, O, DO, DQ, DK, DV: the input dtype
TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"} | set(POINTER_ELEMENTS)
for dtype, head_dim in (("bf16", 128), ("fp32", 64)):
    torch_dtype = {"bf16": ia.torch.bfloat16, "fp32": ia.torch.float32}[dtype]
    block_m, block_n = ia.default_blocks(torch_dtype)
    consts = dict(GROUP=2, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, DOT_FP32=False,
                  PRECISION="ieee" if dtype == "fp32" else "tf32")
    for kernel in (ia._fwd_kernel, ia._bwd_delta_kernel, ia._bwd_dkdv_kernel, ia._bwd_dq_kernel):
        names = kernel.arg_names
        sig = {n: "constexpr" if n in consts else "*" + POINTER_ELEMENTS.get(n, dtype) if n in TENSORS
               else "fp32" if n.endswith("scale") else "i32" for n in names}  # scalars: T, strides, counts
        src = ASTSource(kernel, sig, {(names.index(n),): v for n, v in consts.items() if n in names})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        # 160 KB: fits an A100 (164 KB per block) as well as an H100 (227 KB)
        assert compiled.metadata.shared <= 160 * 1024, (kernel, dtype, compiled.metadata.shared)
print("compiled")
"""


@triton_installed
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The interpreter accepts code the GPU compiler rejects (and ignores shared memory): compile
    every kernel to a cubin for sm_90 with the compiler bundled in the triton wheel."""
    assert_compiles_for_hopper(COMPILE_FOR_HOPPER, tmp_path)


# ------------------------------------------------------------------------------------------------
# Reference vs independent ground truths
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["packed_mma", "left_padding", "sliding_window", "several_turns"])
@pytest.mark.parametrize("chunk_size", [None, 7])  # one chunk, and checkpointed chunks
def test_reference_matches_per_row_loop(name, chunk_size):
    kv_start, kv_end = build_layout(*LAYOUTS[name])
    q, k, v = make_qkv(kv_start.numel(), 4, 2, 8, seed=8)
    ref = lambda *a: interval_attention_reference(*a, chunk_size=chunk_size)  # noqa: E731
    for what, x, y in zip(("out", "dq", "dk", "dv"), forward_backward(ref, q, k, v, kv_start, kv_end),
                          forward_backward(loop_attention, q, k, v, kv_start, kv_end)):
        assert_rel_close(x, y, 1e-5, what)


def test_reference_causal_equals_sdpa():
    kv_start, kv_end = build_layout(*LAYOUTS["causal"])
    q, k, v = make_qkv(kv_start.numel(), 4, 2, 16, seed=9)
    bhtd = lambda x: x.transpose(0, 1)[None]  # noqa: E731  [T, H, D] -> [1, H, T, D]
    sdpa = F.scaled_dot_product_attention(bhtd(q), bhtd(k), bhtd(v), is_causal=True, enable_gqa=True)
    assert_rel_close(interval_attention_reference(q, k, v, kv_start, kv_end), sdpa[0].transpose(0, 1), 1e-5)


def test_mma_layout_changes_the_output():
    """Guards the layouts themselves: an MMA layout that silently equalled causal would test nothing."""
    kv_start, kv_end = build_layout(*LAYOUTS["image_in_middle"])
    q, k, v = make_qkv(kv_start.numel(), 2, 2, 8, seed=10)
    causal_end = torch.arange(1, kv_start.numel() + 1, dtype=torch.int32)
    mma = interval_attention_reference(q, k, v, kv_start, kv_end)
    causal = interval_attention_reference(q, k, v, kv_start, causal_end)
    image = slice(7, 23)
    assert (mma[image] - causal[image]).abs().max() > 1e-2  # image tokens see the question
    assert torch.equal(mma[23:], causal[23:])  # text stays causal


# ------------------------------------------------------------------------------------------------
# FlexAttention (forward only on CPU: this torch raises for flex backward on CPU)
# ------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")  # "flex_attention called without torch.compile"
def test_flex_forward_matches_reference():
    kv_start, kv_end = build_layout(*LAYOUTS["packed_mma"])
    kv_start, kv_end = torch.cat([torch.zeros(5, dtype=torch.int32), kv_start + 5]), torch.cat(
        [torch.zeros(5, dtype=torch.int32), kv_end + 5])  # 5 padding rows in front
    q, k, v = (x.detach() for x in make_qkv(kv_start.numel(), 4, 2, 16, seed=11))
    out = interval_attention_flex(q, k, v, kv_start, kv_end)
    assert_rel_close(out, interval_attention_reference(q, k, v, kv_start, kv_end), 1e-5)
    assert out[:5].abs().max() == 0
    assert torch.equal(interval_attention(q, k, v, kv_start, kv_end, backend="flex"), out)


# ------------------------------------------------------------------------------------------------
# Dispatch and validation
# ------------------------------------------------------------------------------------------------
def test_dispatch_auto_picks_reference_on_cpu_and_matches_it():
    kv_start, kv_end = build_layout(*LAYOUTS["image_at_end"])
    q, k, v = make_qkv(kv_start.numel(), 2, 1, 24)  # D = 24: no Triton kernel for it anywhere
    assert select_backend(q) == "reference"
    assert torch.equal(interval_attention(q, k, v, kv_start, kv_end),
                       interval_attention_reference(q, k, v, kv_start, kv_end))


@needs_triton
def test_dispatch_triton_under_interpreter_on_cpu():
    assert select_backend(torch.zeros(4, 2, 16), "triton") == "triton"


@pytest.mark.parametrize("q,match", [
    (torch.zeros(4, 2, 24), "head dim 24"),
    (torch.zeros(4, 2, 16, dtype=torch.float64), "dtype torch.float64"),
])
@needs_triton
def test_dispatch_triton_refuses_unsupported_inputs(q, match):
    with pytest.raises(RuntimeError, match=match):
        select_backend(q, "triton")


def test_dispatch_triton_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="need CUDA tensors|not importable"):
        select_backend(torch.zeros(4, 2, 16), "triton")


def test_dispatch_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="valid backends"):
        select_backend(torch.zeros(4, 2, 16), "cuda")


def test_import_and_fallback_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, mllm.kernels as K\n"
        "q = torch.randn(5, 2, 16); e = torch.arange(1, 6, dtype=torch.int32)\n"
        "assert not K.HAS_TRITON and K.select_backend(q) == 'reference'\n"
        "K.interval_attention(q, q, q, e * 0, e)\n"
        "try:\n    K.select_backend(q, 'triton')\nexcept RuntimeError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Triton is not importable" in result.stdout and "mllm[kernels]" in result.stdout


def _bad(**changes):
    T = 6
    args = dict(q=torch.zeros(T, 4, 16), k=torch.zeros(T, 2, 16), v=torch.zeros(T, 2, 16),
                kv_start=torch.zeros(T, dtype=torch.int32), kv_end=torch.arange(1, T + 1, dtype=torch.int32))
    return {**args, **changes}


@pytest.mark.parametrize("args,match", [
    (_bad(q=torch.zeros(6, 64)), r"q must be a packed \[T, H, D\]"),
    (_bad(k=torch.zeros(5, 2, 16), v=torch.zeros(5, 2, 16)), "must match q"),
    (_bad(k=torch.zeros(6, 3, 16), v=torch.zeros(6, 3, 16)), "multiple of kv heads"),
    (_bad(v=torch.zeros(6, 2, 8)), "same shape"),
    (_bad(q=torch.zeros(6, 4, 16, dtype=torch.float16)), "share one dtype"),
    (_bad(kv_start=torch.zeros(6, dtype=torch.int64)), "kv_start must be an int32"),
    (_bad(kv_end=torch.ones(5, dtype=torch.int32)), r"kv_end must be an int32 vector of shape \[T\]"),
    (_bad(kv_end=torch.full((6,), 7, dtype=torch.int32)), r"window of query 0 is \[0, 7\)"),
    (_bad(kv_start=torch.full((6,), -1, dtype=torch.int32)), r"must lie in \[0, T=6\]"),
])
def test_invalid_inputs_raise_clear_errors(args, match):
    with pytest.raises(ValueError, match=match):
        interval_attention(**args)
