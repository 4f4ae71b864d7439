"""Mixture-of-Depths over image tokens: training throughput and held-out accuracy, dense vs MoD, one run.

Part 1, `step` (always): training steps (forward + backward + AdamW) of the same model dense and
converted to MoD (capacity `--capacity` of the image tokens in every layer after the first), on identical
LLaVA-style batches of `image tokens + text tokens`. Printed: tokens/s of each and the ratio MoD / dense.
The configurations are scripts/bench_train.py's:
  cpu576 (CPU default)  256-wide 4-layer Llama, a 1-layer CLIP tower with 576 image tokens (48 px, patch 2),
                        2 samples x (576 + 64) tokens
  tiny                  the demo's size (9 image tokens per sample): what MoD can buy when images are short
  1b     (CUDA default) ~1.1B Llama + ViT-L/14-336 (576 image tokens), 4 x (576 + 256) tokens, bf16

Part 2, `--demo-run RUN` (optional): the trained model RUN/model (e.g. bench_compression's base, 64 image
tokens per image) is continue-trained `--demo-steps` steps through `mllm train` (model.init_from) on its
instruct mix, once dense and once per `--skip-first` value converted to MoD (the stage's `mod:`
transformation). Printed per variant: held-out exact match (the trainer's eval), and training tokens/s and
prefill latency of the trained models timed in this process on the same real batches, interleaved over
the variants, on one thread (scripts/bench_compression.py's timing). MoD keeps every token in the
sequence, so the tokens/s ratio is the samples/s ratio. Runs are reused when their folder holds an eval.

  nice .venv/bin/python scripts/bench_mod.py                                   # CPU, part 1
  nice .venv/bin/python scripts/bench_mod.py --demo-run runs/bench_compression_p6/base --frozen-tower --skip-first 0,1
      --jobs 2                                                                 # + part 2
  python scripts/bench_mod.py --config 1b                                        # H100
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import bench_train  # the model configurations and batches (scripts/ is on sys.path when this runs)
from mllm.modeling import MLLMForConditionalGeneration, causal_lm_loss_sum
from mllm.schema import load_yaml
from mllm.sparse.depth import convert
from mllm.sparse.mod import MoDSpec


def build(name: str) -> MLLMForConditionalGeneration:
    return bench_train.build(name, None)


def make_step(model, dtype, device):
    model = model.to(device, dtype).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = device.type == "cuda"

    def step(batch) -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        labels = batch["labels"]
        total, _ = causal_lm_loss_sum(model(**{k: v for k, v in batch.items() if k != "labels"},
                                            use_cache=False).logits, labels)
        loss = total / (labels[:, 1:] != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, float(loss.detach())

    return step


def step_benchmark(args, device, dtype) -> dict:
    dense = build(args.config)
    routed = copy.deepcopy(dense)
    convert(routed, mod=MoDSpec(capacity=args.capacity, skip_first=1))
    spec = bench_train.CONFIGS[args.config]
    data = bench_train.batches(dense, args.config, args.steps + args.warmup, device)
    tokens = int(data[0]["attention_mask"].sum())
    print(f"[step] {args.config}: {dense.config.num_image_tokens} image + {spec['text_tokens'] + 1} text tokens x "
          f"{spec['batch']} samples, MoD capacity {args.capacity} after layer 0, {args.steps} steps, {dtype}, "
          f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    # The two models step in turn on the same batch, so drifting machine load hits both alike.
    steps = {"dense": make_step(dense, dtype, device), "mod": make_step(routed, dtype, device)}
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    for i, batch in enumerate(data):
        for name, step in steps.items():
            seconds, loss = step(batch)
            if i >= args.warmup:
                times[name].append(seconds)
                losses[name].append(loss)
    results = {}
    for name in steps:
        step_s = statistics.median(times[name])
        results[name] = {"step_s": step_s, "tokens_per_s": tokens / step_s, "loss": statistics.mean(losses[name])}
        print(f"  {name:<6} {results[name]['tokens_per_s']:>10.0f} tok/s  median step {step_s * 1e3:8.1f} ms  "
              f"mean loss {results[name]['loss']:.4f}")
    results["speedup"] = results["mod"]["tokens_per_s"] / results["dense"]["tokens_per_s"]
    print(f"  MoD / dense training tokens/s: {results['speedup']:.2f}x")
    return results


def demo_benchmark(args) -> dict:
    """Continue-train a trained run dense and with MoD through `mllm train` (bench_compression's machinery:
    held-out accuracy from the trainer's eval, then training steps and prefills of the trained models timed
    here, interleaved, on the same real batches)."""
    import bench_compression as bc
    from concurrent.futures import ThreadPoolExecutor

    base = load_yaml(Path(args.demo_run) / "config.yaml")
    base["run"]["output_dir"] = args.demo_run  # init_from: the run's model/
    if args.eval_samples:
        base["eval"]["max_samples"] = args.eval_samples
    batch = next(s for s in base["stages"] if s["name"] == "instruct")["micro_batch_size"]
    variants = {"dense": None}
    variants.update({f"mod-skip{k}": {"capacity": args.capacity, "skip_first": k} for k in args.skip_first})
    out = Path(args.out)
    recipes = {name: bc.continue_recipe(base, out / name, steps=args.demo_steps, batch=batch, lr=args.demo_lr,
                                        frozen_tower=args.frozen_tower, seed=args.seed,
                                        transform={"mod": spec} if spec else None)
               for name, spec in variants.items()}

    def one(name: str) -> tuple[str, dict]:
        t0 = time.perf_counter()
        report = bc.train(recipes[name], out / name)
        print(f"[demo] {name}: accuracy {report['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return name, report

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        reports = dict(pool.map(one, recipes))
    timings = bc.time_all({name: (out / name, recipe) for name, recipe in recipes.items()}, args.timing_warmup,
                          args.timing_repeats, args.seed, args.frozen_tower)
    dense = timings["dense"]
    rows = {}
    for name in recipes:
        t, r = timings[name], reports[name]
        rows[name] = {"accuracy": r["accuracy"], "per_type": {k: v["accuracy"] for k, v in r["per_type"].items()},
                      "kept_fraction": r.get("mod", {}).get("kept_fraction"), "tokens_per_s": t["llm_tokens_per_s"],
                      "speedup": t["samples_per_s"] / dense["samples_per_s"],
                      "prefill_speedup": dense["prefill_ms"] / t["prefill_ms"], "prefill_ms": t["prefill_ms"],
                      "accuracy_drop_points": 100 * (reports["dense"]["accuracy"] - r["accuracy"]),
                      "final_loss": r["final_loss"]}
    what = "projector + LLM" if args.frozen_tower else "everything"
    print(f"[demo] {args.demo_run}/model ({dense['image_tokens']} image tokens per image) continue-trained "
          f"{args.demo_steps} steps x {batch} ({what} trainable), MoD capacity {args.capacity}; held-out exact "
          f"match ({base['eval']['max_samples']} images); training step and prefill timed on one thread, "
          f"interleaved, median of {args.timing_repeats}:")
    print(f"  {'variant':<10} {'accuracy':>8} {'drop':>6} {'train tok/s':>11} {'speed-up':>8} {'prefill ms':>10} "
          f"{'speed-up':>8}  per type")
    for name, row in rows.items():
        types = " ".join(f"{k} {v:.3f}" for k, v in row["per_type"].items())
        print(f"  {name:<10} {row['accuracy']:>8.3f} {row['accuracy_drop_points']:>6.1f} {row['tokens_per_s']:>11.0f} "
              f"{row['speedup']:>7.2f}x {row['prefill_ms']:>10.1f} {row['prefill_speedup']:>7.2f}x  {types}")
    return rows


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(bench_train.CONFIGS), default="1b" if cuda else "cpu576")
    parser.add_argument("--capacity", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=20 if cuda else 6)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 2)
    parser.add_argument("--demo-run", default=None, help="a trained run folder (part 2), e.g. bench_compression's base")
    parser.add_argument("--demo-steps", type=int, default=300)
    parser.add_argument("--eval-samples", type=int, default=None, help="part 2: held-out images (default: the run's)")
    parser.add_argument("--demo-lr", type=float, default=2e-4)
    parser.add_argument("--skip-first", type=lambda s: [int(k) for k in s.split(",")], default=[1],
                        help="part 2: MoD variants, comma list of skip_first (layers below it are never routed)")
    parser.add_argument("--frozen-tower", action="store_true",
                        help="part 2: continue-train the projector and the LLM only; timed alike")
    parser.add_argument("--jobs", type=int, default=1, help="part 2: runs trained at once (one thread each)")
    parser.add_argument("--timing-warmup", type=int, default=2)
    parser.add_argument("--timing-repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_mod", help="where part 2's run folders go")
    parser.add_argument("--json", default=None, help="write all figures here (default with --demo-run: <out>/results.json)")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    results = {"step": step_benchmark(args, device, dtype)}
    if args.demo_run:
        results["demo"] = demo_benchmark(args)
    path = args.json or (Path(args.out) / "results.json" if args.demo_run else None)
    if path:
        Path(path).write_text(json.dumps(results, indent=2))
        print(f"results: {path}")


if __name__ == "__main__":
    main()
