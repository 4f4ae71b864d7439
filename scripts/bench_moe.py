"""Benchmark the modality-aware MoE layer against a FLOP-matched dense SwiGLU MLP.

The MoE layer has E experts of intermediate size F and routes each token to k of them inside its
modality group; the dense baseline is one SwiGLU MLP of intermediate size k*F, so both spend the
same activated FFN FLOPs per token (the router's D*E is extra, < 1%). The batch mixes modalities
like a LLaVA sample: `--image-fraction` of the tokens are image tokens (576 of ~740 by default).
Forward and forward+backward are timed (median of --repeats after --warmup; CUDA-synchronised) for
the dropless MoE with each expert implementation it can run (`grouped_mm`: torch._grouped_mm;
`loop`: one matmul per expert), and printed as time ratios MoE / dense (1.0 = as fast as dense).

The issue's target on an H100 is <= 1.3x. Commands:
  # H100 (defaults on CUDA: bf16, D 2048, F 1408 (8 experts of a 5632 FFN / 4), 16k tokens)
  python scripts/bench_moe.py --json runs/bench_moe_h100.json
  # CPU (defaults without CUDA: fp32, D 256, F 384, 4k tokens): a smoke test of the script
  nice -n 19 .venv/bin/python scripts/bench_moe.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from mllm.sparse.config import MoESpec
from mllm.sparse.experts import GatedMLP, grouped_mm_supported
from mllm.sparse.moe import MoEBlock
from mllm.sparse.routing import RoutingContext


def timed(fn, warmup: int, repeats: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048 if cuda else 256)
    parser.add_argument("--intermediate", type=int, default=1408 if cuda else 384, help="per expert")
    parser.add_argument("--experts-per-modality", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16384 if cuda else 4096)
    parser.add_argument("--image-fraction", type=float, default=576 / 740)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if cuda else "fp32")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2)
    parser.add_argument("--repeats", type=int, default=20 if cuda else 5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    d, f, k, n = args.hidden, args.intermediate, args.top_k, args.tokens
    act = torch.nn.SiLU()
    dense = GatedMLP(d, k * f, act).to(device, dtype)
    x = torch.randn(1, n, d, device=device, dtype=dtype)
    modality = (torch.rand(1, n, device=device) < args.image_fraction).long()
    context = RoutingContext(modality, torch.ones(1, n, dtype=torch.bool, device=device))
    e = args.experts_per_modality

    def fwd(module):
        with torch.no_grad():
            module(x)

    def fwd_bwd(module):
        xi = x.detach().requires_grad_()
        out = module(xi)
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)

    results = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
               "torch": torch.__version__, "dtype": args.dtype, "hidden": d, "intermediate_per_expert": f,
               "experts": f"{e} text + {e} image", "top_k": k, "tokens": n, "image_fraction": args.image_fraction,
               "dense_intermediate": k * f, "rows": []}
    dense_fwd = timed(lambda: fwd(dense), args.warmup, args.repeats, cuda)
    dense_fb = timed(lambda: fwd_bwd(dense), args.warmup, args.repeats, cuda)
    print(f"{results['device']} {args.dtype}: D={d}, {e}+{e} experts x F={f}, top-{k}, {n} tokens "
          f"({args.image_fraction:.0%} image); dense SwiGLU F={k * f}")
    print(f"{'layer':<24} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd ratio':>10} {'fwd+bwd ratio':>14}")
    print(f"{'dense (FLOP-matched)':<24} {dense_fwd * 1e3:>9.2f} {dense_fb * 1e3:>11.2f} {'1.00':>10} {'1.00':>14}")
    for implementation in ("grouped_mm", "loop"):
        spec = MoESpec(experts={"text": e, "image": e}, top_k=k, implementation=implementation)
        moe = MoEBlock(spec, d, f, act).to(device, dtype)
        moe.init_random(0.02)
        if implementation == "grouped_mm" and not grouped_mm_supported(x[0], moe.experts.gate_proj,
                                                                       moe.experts.down_proj, explicit=True):
            print(f"{'moe grouped_mm':<24} (torch._grouped_mm cannot run here: {device} {args.dtype})")
            continue
        moe.routing_context = context
        moe.train()  # training path: routing losses included, as in a training step
        t_fwd = timed(lambda: fwd(moe), args.warmup, args.repeats, cuda)
        t_fb = timed(lambda: fwd_bwd(moe), args.warmup, args.repeats, cuda)
        row = {"layer": f"moe {implementation}", "fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_fb * 1e3,
               "fwd_ratio": t_fwd / dense_fwd, "fwd_bwd_ratio": t_fb / dense_fb}
        results["rows"].append(row)
        print(f"{row['layer']:<24} {t_fwd * 1e3:>9.2f} {t_fb * 1e3:>11.2f} {row['fwd_ratio']:>10.2f} "
              f"{row['fwd_bwd_ratio']:>14.2f}")
    results["dense_fwd_ms"], results["dense_fwd_bwd_ms"] = dense_fwd * 1e3, dense_fb * 1e3
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
