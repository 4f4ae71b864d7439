"""Mixture-of-Depths over image tokens: training throughput and held-out accuracy, dense vs MoD, one run.

Part 1, `step` (always): training steps (forward + backward + AdamW) of the same model dense and
converted to MoD (capacity `--capacity` of the image tokens in every layer after the first), on identical
LLaVA-style batches of `image tokens + text tokens`. Printed: tokens/s of each and the ratio MoD / dense.
The configurations are scripts/bench_train.py's:
  cpu576 (CPU default)  256-wide 4-layer Llama, a 1-layer CLIP tower with 576 image tokens (48 px, patch 2),
                        2 samples x (576 + 64) tokens
  tiny                  the demo's size (9 image tokens per sample): what MoD can buy when images are short
  1b     (CUDA default) ~1.1B Llama + ViT-L/14-336 (576 image tokens), 4 x (576 + 256) tokens, bf16

Part 2, `--demo-run RUN` (optional): the trained demo model RUN/model is continue-trained `--demo-steps`
steps twice through `mllm train` (model.init_from), once dense and once converted to MoD, on the demo's
VQA + caption mix; printed: held-out exact match of each (the recipe's eval) and median training
tokens/s from metrics.jsonl.

  nice .venv/bin/python scripts/bench_mod.py                                   # CPU, part 1
  nice .venv/bin/python scripts/bench_mod.py --demo-run runs/demo --demo-steps 300   # + part 2
  python scripts/bench_mod.py --config 1b                                        # H100
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

import bench_train  # the model configurations and batches (scripts/ is on sys.path when this runs)
from mllm.modeling import MLLMForConditionalGeneration, causal_lm_loss_sum
from mllm.sparse.depth import convert
from mllm.sparse.mod import MoDSpec

ROOT = Path(__file__).resolve().parents[1]


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
    """Continue-train the trained demo model dense and MoD through `mllm train`; eval both."""
    base = yaml.safe_load((ROOT / "configs" / "recipes" / "demo.yaml").read_text())
    stage = copy.deepcopy(base["stages"][2])
    stage.update(name="continue", steps=args.demo_steps, warmup_steps=10, lr=2e-4, save_every=0)
    # The run's own data settings (a demo variant with more image tokens has a longer max_length).
    resolved = Path(args.demo_run) / "config.yaml"
    data = yaml.safe_load(resolved.read_text())["data"] if resolved.is_file() else base["data"]
    out = {}
    for variant in ("dense", "mod"):
        run = Path(args.out) / f"bench_mod_{variant}"
        recipe = {"run": {"output_dir": str(run), "seed": 0, "log_every": 10}, "model": {"init_from": args.demo_run},
                  "data": data, "eval": base["eval"], "stages": [dict(stage)]}
        if variant == "mod":
            recipe["stages"][0]["mod"] = {"capacity": args.capacity, "skip_first": 1}
        path = Path(args.out) / f"bench_mod_{variant}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe))
        subprocess.run([sys.executable, "-m", "mllm.train.cli", "train", str(path)], check=True, cwd=ROOT)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        tps = statistics.median(r["tokens_per_s"] for r in records if r.get("stage") == "continue")
        report = json.loads((run / "eval.json").read_text())
        out[variant] = {"accuracy": report["accuracy"], "tokens_per_s": tps,
                        "per_type": {k: v["accuracy"] for k, v in report["per_type"].items()}}
    print(f"[demo] {args.demo_run}/model continue-trained {args.demo_steps} steps (held-out exact match, median "
          "training tokens/s):")
    for variant, row in out.items():
        print(f"  {variant:<6} accuracy {row['accuracy']:.3f}  {row['tokens_per_s']:>8.0f} tok/s  {row['per_type']}")
    out["speedup"] = out["mod"]["tokens_per_s"] / out["dense"]["tokens_per_s"]
    out["accuracy_drop_points"] = 100 * (out["dense"]["accuracy"] - out["mod"]["accuracy"])
    print(f"  MoD / dense tokens/s {out['speedup']:.2f}x, accuracy drop {out['accuracy_drop_points']:.1f} points")
    return out


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(bench_train.CONFIGS), default="1b" if cuda else "cpu576")
    parser.add_argument("--capacity", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=20 if cuda else 6)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 2)
    parser.add_argument("--demo-run", default=None, help="a trained demo run folder (part 2)")
    parser.add_argument("--demo-steps", type=int, default=300)
    parser.add_argument("--out", default="runs", help="where part 2's run folders go")
    parser.add_argument("--json", default=None, help="write all figures here")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    results = {"step": step_benchmark(args, device, dtype)}
    if args.demo_run:
        results["demo"] = demo_benchmark(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
