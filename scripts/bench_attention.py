"""Benchmark packed interval attention (our Triton kernel) against SDPA and FlexAttention.

The layout is a realistic packed multimodal batch (DESIGN.md §3): samples of 576 image tokens,
~60 question tokens and ~100 answer tokens (text lengths jittered with a fixed seed), packed back
to back until the token budget is reached (the last sample is truncated); each sample is its own
document. `--mode mma`: image tokens see their document from its start up to the assistant turn
(their image span and the question), text is causal; `--mode causal`: causal within each document.
The windows come from the project's own `mllm.attention.layout.compute_layout` (B=1, document_ids).

On CUDA, per (head dim D, tokens T) it times forward and forward+backward (median of --repeats
after --warmup, CUDA events) of:
  ours        interval_attention(..., backend="triton")
  sdpa-causal F.scaled_dot_product_attention(is_causal=True), flash backend, all T tokens as ONE
              sequence [1, H, T, D]: the FlashAttention-2 proxy. It computes every causal pair
              across document boundaries, i.e. MORE work than the packed layout needs.
  flex        torch.compile(flex_attention) with a block mask from the same kv_start/kv_end
              (mask built outside the timed region)
  sdpa-mask   SDPA with a materialised boolean [T, T] mask (skipped when T^2 bytes > --max-mask-gb)
and checks our output and gradients against the fp32 reference once per config, so a wrong kernel
cannot post a good time. Ratios are baseline time / our time (> 1: ours is faster).

Without CUDA it times the reference (and eager FlexAttention forward, and the Triton kernel in the
interpreter when TRITON_INTERPRET=1 is set, at T <= --interpret-max-tokens) at small sizes: those
figures say nothing about GPU speed.

Commands:
  # H100 / any CUDA GPU (defaults: bf16, D 64 128, T 2048..16384, 16 heads, MMA layout)
  python scripts/bench_attention.py --json runs/bench_attention_h100.json
  python scripts/bench_attention.py --mode causal --kv-heads 4        # causal packing, GQA 16/4
  # CPU (defaults: T 512 1024, D 64, 4 heads): reference only, a smoke test of the script
  nice -n 19 .venv/bin/python scripts/bench_attention.py
  TRITON_INTERPRET=1 nice -n 19 .venv/bin/python scripts/bench_attention.py --tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from mllm.attention.layout import compute_layout
from mllm.kernels import (
    interval_attention,
    interval_attention_flex,
    interval_attention_reference,
    make_flex_block_mask,
)
from mllm.kernels.dispatch import triton_import_error, triton_interpreting

IMAGE_TOKENS, QUESTION_TOKENS, ANSWER_TOKENS, TEXT_JITTER = 576, 60, 100, 0.3
# FLOP convention (FlashAttention's benchmarks): forward = 2 matmuls (QK^T, PV) = 4 * D flops per
# visible (q, k) pair per head; backward = 5 matmuls = 2.5x forward, so fwd+bwd = 3.5x forward.
FWD_FLOPS_PER_PAIR = 4
FWD_BWD_FACTOR = 3.5
FLOP_CONVENTION = ("TFLOP/s count visible (q, k) pairs of the packed interval layout only, for every method "
                   "(useful work): forward = 4 * D * Hq * pairs; fwd+bwd = 3.5x forward "
                   "(backward = 2.5x forward, FlashAttention's convention)")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative (to max |reference|) error allowed against the fp32 reference: bf16 keeps 8 mantissa
# bits (~4e-3 per rounding) and the kernel accumulates in fp32, so 2e-2 / 5e-2 leave a wide margin
# while any masking or indexing bug gives O(1) errors.
TOLERANCE = {"out": 2e-2, "grad": 5e-2}


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def packed_metadata(total_tokens: int, seed: int = 0):
    """Token metadata of packed samples [image | question | answer] -> (modality, assistant_start, doc_id)."""
    rng = np.random.default_rng(seed)
    modality, assistant, doc = [], [], []
    sample = 0
    while len(modality) < total_tokens:
        n_q = int(round(QUESTION_TOKENS * rng.uniform(1 - TEXT_JITTER, 1 + TEXT_JITTER)))
        n_a = int(round(ANSWER_TOKENS * rng.uniform(1 - TEXT_JITTER, 1 + TEXT_JITTER)))
        modality += [1] * IMAGE_TOKENS + [0] * (n_q + n_a)
        assistant += [False] * (IMAGE_TOKENS + n_q) + [True] + [False] * (n_a - 1)
        doc += [sample] * (IMAGE_TOKENS + n_q + n_a)
        sample += 1
    as_row = lambda x, dtype: torch.tensor(x[:total_tokens], dtype=dtype)[None]  # noqa: E731  [1, T]
    return as_row(modality, torch.long), as_row(assistant, torch.bool), as_row(doc, torch.long)


def packed_windows(total_tokens: int, mode: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_start, kv_end int32 [T] of the packed batch, from the project's layout code."""
    modality, assistant, doc = packed_metadata(total_tokens)
    layout = compute_layout(None, modality, assistant, mode=mode, document_ids=doc)
    return layout.kv_start[0].to(device), layout.kv_end[0].to(device)


def visible_pairs(kv_start: torch.Tensor, kv_end: torch.Tensor) -> int:
    return int((kv_end.long() - kv_start.long()).clamp(min=0).sum())


def dense_mask(kv_start: torch.Tensor, kv_end: torch.Tensor) -> torch.Tensor:
    keys = torch.arange(kv_start.numel(), device=kv_start.device)
    return (keys[None, :] >= kv_start[:, None]) & (keys[None, :] < kv_end[:, None])  # [T, T]


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def time_ms(fn, warmup: int, repeats: int, cuda: bool) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median([start.elapsed_time(end) for start, end in events])


def fwd_and_fwd_bwd(attn, inputs, grad_out):
    """(forward closure without autograd, forward+backward closure) for attn(*inputs)."""
    def forward():
        with torch.no_grad():
            return attn(*inputs)

    def forward_backward():
        out = attn(*inputs)
        return torch.autograd.grad(out, inputs, grad_out)

    return forward, forward_backward


def leaves(*tensors):
    return tuple(t.detach().clone().requires_grad_(True) for t in tensors)


# ------------------------------------------------------------------------------------------------
# Methods: each returns (attn(q, k, v) callable, inputs, grad_out) in its own tensor layout
# ------------------------------------------------------------------------------------------------
def as_bhtd(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[T, H, D] -> contiguous [1, heads, T, D] (kv heads repeated for GQA baselines)."""
    x = x.repeat_interleave(heads // x.shape[1], dim=1) if heads != x.shape[1] else x
    return x.transpose(0, 1).unsqueeze(0).contiguous()


def method_ours(q, k, v, grad, kv_start, kv_end, backend="triton"):
    attn = lambda q_, k_, v_: interval_attention(q_, k_, v_, kv_start, kv_end,  # noqa: E731
                                                 backend=backend, check_bounds=False)
    return attn, leaves(q, k, v), grad


def method_sdpa_causal(q, k, v, grad, kv_start, kv_end):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attn(q_, k_, v_):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)

    H = q.shape[1]
    return attn, leaves(*(as_bhtd(x, H) for x in (q, k, v))), as_bhtd(grad, H)


def method_sdpa_mask(q, k, v, grad, kv_start, kv_end):
    mask = dense_mask(kv_start, kv_end)[None, None]  # [1, 1, T, T] bool, True = visible
    attn = lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)  # noqa: E731
    H = q.shape[1]
    return attn, leaves(*(as_bhtd(x, H) for x in (q, k, v))), as_bhtd(grad, H)


_COMPILED_FLEX = None


def method_flex(q, k, v, grad, kv_start, kv_end):
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if _COMPILED_FLEX is None:
        for name in ("recompile_limit", "cache_size_limit"):  # one compile per shape; the default (8) is too few
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    block_mask = make_flex_block_mask(kv_start, kv_end)  # outside the timed region
    gqa = q.shape[1] != k.shape[1]
    attn = lambda q_, k_, v_: _COMPILED_FLEX(q_, k_, v_, block_mask=block_mask, enable_gqa=gqa)  # noqa: E731
    H, Hkv = q.shape[1], k.shape[1]
    return attn, leaves(as_bhtd(q, H), as_bhtd(k, Hkv), as_bhtd(v, Hkv)), as_bhtd(grad, H)


def method_flex_eager(q, k, v, grad, kv_start, kv_end):
    block_mask = make_flex_block_mask(kv_start, kv_end)
    attn = lambda q_, k_, v_: interval_attention_flex(q_, k_, v_, kv_start, kv_end,  # noqa: E731
                                                      block_mask=block_mask)
    return attn, leaves(q, k, v), grad


def method_reference(q, k, v, grad, kv_start, kv_end):
    attn = lambda q_, k_, v_: interval_attention_reference(q_, k_, v_, kv_start, kv_end)  # noqa: E731
    return attn, leaves(q, k, v), grad


# ------------------------------------------------------------------------------------------------
# One configuration
# ------------------------------------------------------------------------------------------------
def plan(cuda: bool, T: int, args) -> dict:
    """name -> (builder, label, time backward?, None or the reason it is skipped)."""
    if cuda:
        mask_gb = T * T / 1e9
        mask_skip = (f"[T, T] bool mask would be {mask_gb:.1f} GB > --max-mask-gb"
                     if mask_gb > args.max_mask_gb else None)
        return {"ours": (method_ours, "ours (triton)", True, None),
                "sdpa-causal": (method_sdpa_causal, "SDPA flash causal, 1 seq of T*", True, None),
                "flex": (method_flex, "FlexAttention (compiled)", True, None),
                "sdpa-mask": (method_sdpa_mask, "SDPA + bool [T,T] mask", True, mask_skip)}
    methods = {"reference": (method_reference, "reference (PyTorch, fp32 math)", True, None),
               "flex": (method_flex_eager, "FlexAttention (eager, fwd)", False, None)}
    if triton_interpreting() and triton_import_error() is None:
        skip = f"interpreter: only T <= {args.interpret_max_tokens}" if T > args.interpret_max_tokens else None
        methods["ours"] = (method_ours, "ours (triton, INTERPRETED)", True, skip)
    return methods


def check_against_reference(q, k, v, grad, kv_start, kv_end, backend: str, backward: bool) -> dict:
    """Max abs difference (and relative to max |ref|) of the output (and gradients) vs the fp32 reference."""
    (attn, ins, _), (ref_attn, ref_ins, _) = (method_ours(q, k, v, grad, kv_start, kv_end, backend),
                                              method_reference(q, k, v, grad, kv_start, kv_end))
    if not backward:  # e.g. FlexAttention on CPU, which refuses inputs that require grad
        ins = tuple(x.detach() for x in ins)
    out, ref = attn(*ins), ref_attn(*ref_ins)
    result = {"out": _diff(out, ref)}
    if backward:
        grads = torch.autograd.grad(out, ins, grad)
        ref_grads = torch.autograd.grad(ref, ref_ins, grad)
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            result[name] = _diff(g, r)
    result["ok"] = all(d["rel"] <= TOLERANCE["out" if name == "out" else "grad"]
                       for name, d in result.items() if isinstance(d, dict))
    return result


def _diff(x: torch.Tensor, ref: torch.Tensor) -> dict:
    abs_diff = (x.float() - ref.float()).abs().max().item()
    return {"max_abs": abs_diff, "rel": abs_diff / max(ref.float().abs().max().item(), 1e-12)}


def run_config(D: int, T: int, args, device, dtype) -> dict:
    cuda = device.type == "cuda"
    kv_start, kv_end = packed_windows(T, args.mode, device)
    gen = torch.Generator(device=device).manual_seed(D * 100003 + T)
    rand = lambda h: torch.randn(T, h, D, device=device, dtype=dtype, generator=gen)  # noqa: E731
    q, k, v, grad = rand(args.heads), rand(args.kv_heads), rand(args.kv_heads), rand(args.heads)
    pairs = visible_pairs(kv_start, kv_end)
    fwd_flops = FWD_FLOPS_PER_PAIR * D * args.heads * pairs
    config = {"head_dim": D, "tokens": T, "visible_pairs": pairs, "causal_pairs": T * (T + 1) // 2,
              "fwd_flops": fwd_flops, "fwd_bwd_flops": FWD_BWD_FACTOR * fwd_flops, "methods": {}, "checks": {}}

    methods = plan(cuda, T, args)
    for name in ("ours",) if cuda else ("ours", "flex"):  # flex on CUDA is the compiled one, timed only
        if name in methods and methods[name][3] is None:
            backend, backward = "triton" if name == "ours" else "flex", methods[name][2]
            config["checks"][name] = _safe(lambda: check_against_reference(
                q, k, v, grad, kv_start, kv_end, backend, backward))

    for name, (build, label, backward, skip) in methods.items():
        config["methods"][name] = {"label": label, **(
            {"skipped": skip} if skip else _time_method(build, q, k, v, grad, kv_start, kv_end, backward, args, cuda))}
        if cuda:
            torch.cuda.empty_cache()
    _add_rates(config)
    return config


def _time_method(build, q, k, v, grad, kv_start, kv_end, backward, args, cuda) -> dict:
    def measure():
        attn, inputs, grad_out = build(q, k, v, grad, kv_start, kv_end)
        if not backward:  # forward-only methods get plain inputs (CPU flex refuses requires_grad ones)
            inputs = tuple(x.detach() for x in inputs)
        forward, forward_backward = fwd_and_fwd_bwd(attn, inputs, grad_out)
        result = {"fwd_ms": time_ms(forward, args.warmup, args.repeats, cuda)}
        if backward:
            result["fwd_bwd_ms"] = time_ms(forward_backward, args.warmup, args.repeats, cuda)
        return result
    return _safe(measure)


def _safe(fn) -> dict:
    """fn() or {"error": ...}: one failing baseline (OOM, unsupported op) must not end the run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  reported in the table and the JSON
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"}


def _add_rates(config: dict) -> None:
    ours = config["methods"].get("ours", {})
    for result in config["methods"].values():
        for key, flops in (("fwd", config["fwd_flops"]), ("fwd_bwd", config["fwd_bwd_flops"])):
            ms = result.get(f"{key}_ms")
            if ms is None:
                continue
            result[f"{key}_tflops"] = flops / (ms * 1e-3) / 1e12
            if ours.get(f"{key}_ms") is not None:
                result[f"{key}_ratio"] = ms / ours[f"{key}_ms"]


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def print_config(config: dict, args) -> None:
    T, D = config["tokens"], config["head_dim"]
    print(f"\n== D={D}  T={T}  mode={args.mode}  Hq={args.heads}  Hkv={args.kv_heads}  {args.dtype}  "
          f"visible pairs {config['visible_pairs']:,} = {config['visible_pairs'] / config['causal_pairs']:.3f} "
          f"of full causal ({config['causal_pairs']:,})")
    print(f"{'method':<34}{'fwd ms':>10}{'TFLOP/s':>9}{'x ours':>8}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'x ours':>8}")
    for result in config["methods"].values():
        row = f"{result['label']:<34}"
        if "skipped" in result or "error" in result:
            status = "skipped" if "skipped" in result else "ERROR"
            print(row + f"  {status}: {result.get('skipped') or result['error']}")
            continue
        for key in ("fwd", "fwd_bwd"):
            row += _cell(result.get(f"{key}_ms"), 10 if key == "fwd" else 12, ".2f")
            row += _cell(result.get(f"{key}_tflops"), 9, ".1e" if result.get(f"{key}_tflops", 1) < 0.1 else ".1f")
            row += _cell(result.get(f"{key}_ratio"), 8, ".2f")
        print(row)
    for name, check in config["checks"].items():
        if "error" in check:
            print(f"check {name} vs reference: ERROR {check['error']}")
            continue
        diffs = "  ".join(f"{key} {d['max_abs']:.2e} (rel {d['rel']:.1e})"
                          for key, d in check.items() if isinstance(d, dict))
        print(f"check {name} vs fp32 reference: {diffs}  -> {'OK' if check['ok'] else 'FAILED'}")


def _cell(value, width: int, fmt: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'CPU'} ({os.cpu_count()} logical CPUs)"


def environment(device) -> dict:
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "triton_interpret": triton_interpreting()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--head-dims", type=int, nargs="+", help="default: 64 128 (CUDA), 64 (CPU)")
    p.add_argument("--tokens", type=int, nargs="+", help="default: 2048 4096 8192 16384 (CUDA), 512 1024 (CPU)")
    p.add_argument("--heads", type=int, help="query heads; default 16 (CUDA), 4 (CPU)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (GQA when < --heads); default = --heads")
    p.add_argument("--mode", choices=("mma", "causal"), default="mma")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (median); default 20 (CUDA), 5 (CPU)")
    p.add_argument("--warmup", type=int, help="untimed runs first (compile, autotune); default 5 (CUDA), 2 (CPU)")
    p.add_argument("--max-mask-gb", type=float, default=2.0, help="skip SDPA + dense mask above this T^2 bytes")
    p.add_argument("--interpret-max-tokens", type=int, default=256,
                   help="CPU with TRITON_INTERPRET=1: time the interpreted kernel only up to this T")
    p.add_argument("--json", metavar="OUT", help="write every number, the device and versions here")
    return p.parse_args()


def fill_defaults(args, cuda: bool) -> None:
    defaults = dict(head_dims=[64, 128], tokens=[2048, 4096, 8192, 16384], heads=16, repeats=20, warmup=5) if cuda \
        else dict(head_dims=[64], tokens=[512, 1024], heads=4, repeats=5, warmup=2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")


def main() -> int:
    args = parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    fill_defaults(args, cuda)
    env = environment(device)
    print("device: {device} | torch {torch} (CUDA build {cuda}) | triton {triton}".format(**env))
    if not cuda:
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # eager on purpose
        interpreted = "ours" in plan(False, 0, args)
        print("GPU figures need a CUDA device; this run measured the CPU reference only"
              + (" (plus the Triton interpreter, which says nothing about GPU speed)" if interpreted else ""))
    print(FLOP_CONVENTION)
    print("x ours = method time / our time (> 1: ours is faster)."
          + (" *SDPA causal runs the T packed tokens as one causal sequence: it computes all "
             "T(T+1)/2 pairs, across documents, i.e. more work than the packed layout." if cuda else ""))
    if cuda and args.kv_heads != args.heads:
        print("GQA: the SDPA baselines get K/V repeated to Hq heads before timing; FlexAttention uses enable_gqa.")
    configs = []
    for D in args.head_dims:
        for T in args.tokens:
            config = run_config(D, T, args, device, DTYPES[args.dtype])
            print_config(config, args)
            configs.append(config)
    failed = [f"D={c['head_dim']} T={c['tokens']} {n}" for c in configs for n, ch in c["checks"].items()
              if not ch.get("ok", False)]
    if failed:
        print(f"\nCORRECTNESS CHECK FAILED for {', '.join(failed)}: the corresponding times are not valid.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "flop_convention": FLOP_CONVENTION,
                       "tolerance": TOLERANCE, "configs": configs}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
