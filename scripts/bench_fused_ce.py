"""Peak memory of one lm_head + cross-entropy loss step: full logits vs fused_linear_cross_entropy.

One step = forward and backward of the summed cross-entropy of `hidden @ weight.T`, hidden [N, D]
and weight [V, D] both requiring grad (so the step also creates hidden.grad [N, D] and weight.grad
[V, D], as training does):
  * full:  logits = hidden @ weight.T; F.cross_entropy(logits, labels, reduction="sum").backward()
  * fused: mllm.kernels.fused_linear_cross_entropy(hidden, weight, labels)[0].backward()

How the memory is measured: each method runs in a fresh subprocess (no allocator state, cache or
earlier peak carried over from the other). The worker imports everything and builds the inputs,
then reads its resident set size (VmRSS in /proc/self/status) as the baseline and resets the
kernel's high-water mark (writing 5 to /proc/self/clear_refs sets VmHWM to the current RSS), runs
the step, and reads VmHWM: peak = VmHWM - baseline is the most memory the step ever had resident
at once, counted by the OS page by page, whatever allocated it (torch, oneDNN, Python). Where
clear_refs is not writable, the worker falls back to getrusage's ru_maxrss (the process-lifetime
peak, valid here because the step is by far the largest thing the worker does). The workers run
with MALLOC_MMAP_THRESHOLD_=65536, which pins glibc's mmap threshold (by default it grows up to
32 MB after the first frees), so every buffer above 64 KB is its own mapping and goes back to the
OS when freed: RSS then follows the live tensors instead of the allocator's cache. Both methods
run under the same settings.

What to expect (fp32, N = 4096, D = 1024, V = 32000): the full logits alone are N * V * 4 = 524 MB,
and unfused cross-entropy keeps about three such tensors alive at once (logits, log-softmax, their
gradient); the fused step's extra memory is the gradients themselves (V * D * 4 = 131 MB and
N * D * 4 = 17 MB, which every method must produce) plus one chunk's logits (128 x V: 16 MB).
The target of the "training throughput" issue is >= 4x less peak memory.

Afterwards the losses and gradients of the two runs are compared (relative to their largest
value; fp32, so 1e-4); a mismatch, or a ratio below --target, makes the script exit 1.

  nice -n 10 .venv/bin/python scripts/bench_fused_ce.py            # CPU, fp32 defaults
  python scripts/bench_fused_ce.py --tokens 16384 --hidden 4096 --vocab 128256   # bigger (GPU box CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("full", "fused")
MB = 1e6


def rss_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak() -> bool:
    """Set VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    """Run one loss step of args.worker ("full" or "fused") and write its peak, loss and grads."""
    import gc

    import torch
    import torch.nn.functional as F

    from mllm.kernels import fused_linear_cross_entropy  # imported by both methods: equal baselines

    g = torch.Generator().manual_seed(0)
    N, D, V = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * D**-0.5).requires_grad_()  # logits ~ N(0, 1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.1] = -100  # ~10% ignored (prompt / padding tokens)

    gc.collect()
    baseline = rss_bytes("VmRSS")
    exact = reset_peak()
    start = time.perf_counter()
    if args.worker == "full":
        loss = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    else:
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=args.chunk_size)
    loss.backward()
    seconds = time.perf_counter() - start
    # ru_maxrss is in kB on Linux; it cannot be reset, so it is the fallback only
    peak = rss_bytes("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"loss": loss.detach(), "dhidden": hidden.grad, "dweight": weight.grad}, args.out + ".pt")
    Path(args.out).write_text(json.dumps({"peak": peak - baseline, "baseline": baseline, "seconds": seconds,
                                          "exact": exact}))


def run_worker(method: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, method)
    cmd = [sys.executable, __file__, "--worker", method, "--out", out, "--tokens", str(args.tokens),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # see the module docstring
    subprocess.run(cmd, check=True, env=env)
    return json.loads(Path(out).read_text())


def max_rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-size", type=int, default=None, help="fused only; default: automatic")
    parser.add_argument("--target", type=float, default=4.0, help="required full / fused peak ratio")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    N, D, V = args.tokens, args.hidden, args.vocab
    print(f"lm_head + cross-entropy, one step (forward + backward), fp32 on CPU: N={N} tokens, D={D}, V={V}")
    print(f"for scale: logits [N, V] = {N * V * 4 / MB:.0f} MB, weight.grad [V, D] = {V * D * 4 / MB:.0f} MB, "
          f"hidden.grad [N, D] = {N * D * 4 / MB:.0f} MB (fp32)")
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run_worker(m, args, tmp) for m in METHODS}
        tensors = {m: torch.load(os.path.join(tmp, m) + ".pt") for m in METHODS}
    print(f"{'method':<8} {'peak MB':>9} {'step s':>8}   (peak = VmHWM - VmRSS before the step"
          f"{'' if all(r['exact'] for r in results.values()) else '; ru_maxrss fallback'})")
    for m in METHODS:
        print(f"{m:<8} {results[m]['peak'] / MB:>9.1f} {results[m]['seconds']:>8.2f}")
    ratio = results["full"]["peak"] / results["fused"]["peak"]
    verdict = "met" if ratio >= args.target else "NOT met"
    print(f"peak ratio full / fused: {ratio:.2f}x (target >= {args.target:g}x: {verdict})")
    errors = {k: max_rel_err(tensors["fused"][k], tensors["full"][k]) for k in ("loss", "dhidden", "dweight")}
    ok = all(e <= 1e-4 for e in errors.values())
    print("fused vs full, max |diff| / max |full|: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items())
          + f" -> {'OK' if ok else 'FAILED (> 1e-4)'}")
    sys.exit(0 if ok and ratio >= args.target else 1)


if __name__ == "__main__":
    main()
