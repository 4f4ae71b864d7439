"""Visual-token compression trade-off on the demo: held-out accuracy vs training throughput and prefill latency.

For every method (pool, pixel_shuffle, tome, vmtc) and budget (100%, 50%, 25%, 12.5% of the image
tokens) the script
  1. trains the demo model with the trainer (`mllm.train.trainer.run_recipe`, in this process) on a
     recipe derived from configs/recipes/demo.yaml (written to <out>/<run>/recipe.yaml, so
     `mllm train <out>/<run>/recipe.yaml` reproduces a run), and reads the held-out exact match that
     the trainer's evaluation writes (`eval.json`: greedy decoding with the KV cache);
  2. times, in this one process, interleaved over the configurations so background load hits them
     all alike: a training step (forward + backward + AdamW, fp32) on the same real training batches,
     and a prefill (the forward over prompt + image that fills the KV cache, batch 1).
100% is one run: every method at ratio 1.0 is the identity (tested), so it is the shared baseline.

Why not the demo as is: its 48 px images with 16 px patches give 9 image tokens, too few to compress.
The bench uses `--patch-size 6` (8 x 8 = 64 image tokens; 8 -> 36). There is no CLIP stage (the demo
spends 500 steps on it): the tower trains from scratch with the LM loss in one stage whose data mix is
the demo's instruct stage (VQA 3 : captions 1), everything trainable.

Throughput is reported per sample (samples/s, and the speed-up over 100%); `llm tok/s` counts the
LLM-side tokens like the trainer's `tokens_per_s`, which fall with compression by construction (an image
is fewer tokens), so it cannot show a speed-up and is printed for reference only.

Sizes: `small` (the default, ~15 min on 2 shared CPU cores, short schedule: accuracies are far from
converged) and `full` (the demo's model widths and a longer schedule; hours on CPU).

  nice -n 10 .venv/bin/python scripts/bench_compression.py                        # small
  nice -n 10 .venv/bin/python scripts/bench_compression.py --size full --out runs/bench_compression_full
  nice -n 10 .venv/bin/python scripts/bench_compression.py --methods pool,tome --budgets 1,0.25 --steps 100
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from mllm.builder import ModelSpec, build_model_and_processor
from mllm.schema import dump_yaml, from_dict, load_yaml

METHODS = ("pool", "pixel_shuffle", "tome", "vmtc")
BUDGETS = (1.0, 0.5, 0.25, 0.125)
SIZES = {
    # Model widths / depths, schedule and evaluation size. `small` shrinks the tower and the LLM so a step
    # at 64 image tokens takes ~0.15 s on one CPU thread; `full` is the demo's model.
    "small": dict(vit_width=64, vit_layers=2, text_hidden=128, text_layers=2, steps=500, batch=16, lr=2e-3,
                  warmup=10, eval_samples=100),
    "full": dict(vit_width=128, vit_layers=4, text_hidden=256, text_layers=4, steps=1500, batch=32, lr=1e-3,
                 warmup=50, eval_samples=400),
}


# ---------------------------------------------------------------------------------------- recipes


def run_name(method: str, budget: float) -> str:
    return "full" if budget == 1.0 else f"{method}-{budget:g}"


def bench_recipe(args, size: dict, method: str, budget: float, out_dir: Path) -> dict:
    """The demo recipe with more image tokens, one from-scratch stage, and the compression section."""
    base = load_yaml(args.base)
    model = copy.deepcopy(base["model"])
    vision = model["vision"]
    vision["name"] = f"mllm-bench-vit-p{args.patch_size}-w{size['vit_width']}"  # open_clip registry key
    vision["model_cfg"]["vision_cfg"].update(patch_size=args.patch_size, width=size["vit_width"],
                                             layers=size["vit_layers"])
    vision["model_cfg"]["embed_dim"] = size["vit_width"]
    vision["model_cfg"]["text_cfg"]["width"] = size["vit_width"]
    text = model["text"]["config"]
    text.update(hidden_size=size["text_hidden"], intermediate_size=3 * size["text_hidden"],
                num_hidden_layers=size["text_layers"])
    if budget < 1.0:
        model["compression"] = {"method": method, "ratio": budget}
    instruct = next(s for s in base["stages"] if s["name"] == "instruct")
    stage = {"name": "train", "data": instruct["data"], "trainable": [{"params": ["*"]}],
             "steps": args.steps or size["steps"], "micro_batch_size": size["batch"], "lr": size["lr"],
             "warmup_steps": size["warmup"], "save_every": 0}
    eval_section = copy.deepcopy(base["eval"])
    eval_section["max_samples"] = args.eval_samples or size["eval_samples"]
    data = copy.deepcopy(base["data"])
    image_size = vision["model_cfg"]["vision_cfg"]["image_size"]
    data["max_length"] += (image_size // args.patch_size) ** 2  # the demo's text budget plus the image tokens
    return {"run": {"output_dir": str(out_dir), "seed": args.seed, "deepspeed": base["run"]["deepspeed"],
                    "log_every": 10, "threads": args.threads},
            "model": model, "data": data, "eval": eval_section, "stages": [stage]}


def train_and_evaluate(recipe: dict, out_dir: Path) -> dict:
    """Train with the trainer and return its held-out report (a finished run is read, not retrained)."""
    from mllm.train.config import RunConfig
    from mllm.train.trainer import run_recipe

    report = out_dir / "eval.json"
    if not report.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(dump_yaml(recipe))
        run_recipe(from_dict(RunConfig, recipe))
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = json.loads(report.read_text())
    result["final_loss"] = metrics[-1]["loss"] if metrics else float("nan")
    return result


# ---------------------------------------------------------------------------------------- timing


def real_batches(model, processor, recipe: dict, batch: int, count: int) -> list[dict]:
    """`count` training batches of real demo samples (the same samples for every configuration)."""
    from mllm.data.sources import open_source
    from mllm.processing import SampleError
    from mllm.train.objectives import LMObjective

    objective = LMObjective(model, processor, recipe["data"]["max_length"])
    source = open_source({k: v for k, v in recipe["stages"][0]["data"][0].items() if k != "weight"})
    samples = []
    for i in range(len(source)):
        if len(samples) == batch * count:
            break
        try:
            samples.append(objective.encode(source[i]))
        except SampleError:  # skipped, as the trainer's loader skips it
            continue
    batches = [objective.collate(samples[i * batch:(i + 1) * batch]) for i in range(count)]
    for b in batches:
        b.pop("keys")
    return batches


def prefill_inputs(processor, recipe: dict, count: int) -> list[dict]:
    """Single held-out prompts (the first question of each sample, with its image), as generation sees them."""
    from mllm.data.sources import decode_image, open_source
    from mllm.processing import llava_to_messages

    source = open_source(recipe["eval"]["source"])
    out = []
    for i in range(count):
        record = source[i]
        messages = llava_to_messages(record.meta["conversations"])[:1]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[decode_image(record)], text=[prompt])
        inputs.pop("modality_ids")
        out.append(dict(inputs))
    return out


class Timed:
    """One configuration's model, optimizer and inputs; each call times one training step or prefill."""

    def __init__(self, recipe: dict, batches_count: int, seed: int):
        torch.manual_seed(seed)
        self.model, processor = build_model_and_processor(from_dict(ModelSpec, recipe["model"]))
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        batch = recipe["stages"][0]["micro_batch_size"]
        self.batches = real_batches(self.model, processor, recipe, batch, batches_count)
        self.prompts = prefill_inputs(processor, recipe, batches_count)
        self.image_tokens = self.model.config.num_image_tokens
        self.step_s, self.prefill_s, self.tokens, self.samples = [], [], [], batch

    def train_step(self, i: int, record: bool) -> None:
        batch = self.batches[i % len(self.batches)]
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        start = time.perf_counter()
        loss = self.model(**inputs, labels=labels, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if record:
            self.step_s.append(time.perf_counter() - start)
            self.tokens.append(int(batch["attention_mask"].sum()))

    @torch.no_grad()
    def prefill(self, i: int, record: bool) -> None:
        self.model.eval()
        start = time.perf_counter()
        self.model(**self.prompts[i % len(self.prompts)], use_cache=True)
        if record:
            self.prefill_s.append(time.perf_counter() - start)
        self.model.train()

    def summary(self) -> dict:
        step = statistics.median(self.step_s)
        return {"image_tokens": self.image_tokens, "step_s": step, "samples_per_s": self.samples / step,
                "llm_tokens_per_s": statistics.mean(self.tokens) / step,
                "prefill_ms": 1e3 * statistics.median(self.prefill_s)}


def time_all(recipes: dict[str, dict], warmup: int, repeats: int, seed: int) -> dict[str, dict]:
    timed = {name: Timed(recipe, max(1, warmup + repeats), seed) for name, recipe in recipes.items()}
    for rep in range(warmup + repeats):  # interleaved: a burst of background load hits every config alike
        for t in timed.values():
            t.train_step(rep, record=rep >= warmup)
            t.prefill(rep, record=rep >= warmup)
    return {name: t.summary() for name, t in timed.items()}


# ---------------------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    head = (f"{'method':<14} {'budget':>6} {'img tok':>7} {'accuracy':>8} {'vs 100%':>7} {'samples/s':>9} "
            f"{'speed-up':>8} {'llm tok/s':>9} {'prefill ms':>10} {'final loss':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<14} {r['budget']:>6.1%} {r['image_tokens']:>7d} {r['accuracy']:>8.3f} "
                     f"{r['relative_accuracy']:>7.1%} {r['samples_per_s']:>9.1f} {r['speedup']:>7.2f}x "
                     f"{r['llm_tokens_per_s']:>9.0f} {r['prefill_ms']:>10.1f} {r['final_loss']:>10.4f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    base = next(r for r in rows if r["budget"] == 1.0)
    for ax, key, label in ((axes[0], "samples_per_s", "training throughput (samples/s, higher is better)"),
                           (axes[1], "prefill_ms", "prefill latency, batch 1 (ms, lower is better)")):
        ax.scatter([base[key]], [base["accuracy"]], color="black", marker="*", s=140, label="100% (no compression)",
                   zorder=3)
        for method in METHODS:
            points = sorted((r for r in rows if r["method"] == method and r["budget"] < 1.0),
                            key=lambda r: -r["budget"])
            if not points:
                continue
            xs, ys = [base[key]] + [r[key] for r in points], [base["accuracy"]] + [r["accuracy"] for r in points]
            ax.plot(xs, ys, marker="o", label=method)
            for r in points:
                ax.annotate(f"{100 * r['budget']:g}%", (r[key], r["accuracy"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out exact match")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS), help="fractions of image tokens")
    parser.add_argument("--patch-size", type=int, default=6, help="48 px images: 6 -> 64 image tokens, 8 -> 36")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the size's)")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out samples (default: the size's)")
    parser.add_argument("--timing-warmup", type=int, default=2)
    parser.add_argument("--timing-repeats", type=int, default=6)
    parser.add_argument("--base", default="configs/recipes/demo.yaml", help="recipe to derive the runs from")
    parser.add_argument("--out", default="runs/bench_compression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for training and timing; 0 = all cores. On a 2-core machine shared with "
                             "other jobs, 2 threads were 10-20x slower than 1 (they wait for each other)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    size = SIZES[args.size]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    budgets = sorted({float(b) for b in args.budgets.split(",")} | {1.0}, reverse=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    configs = {"full": ("(none)", 1.0)} | {run_name(m, b): (m, b) for m in methods for b in budgets if b < 1.0}
    recipes = {name: bench_recipe(args, size, m, b, out / name) for name, (m, b) in configs.items()}
    started = time.perf_counter()
    reports = {}
    for i, (name, recipe) in enumerate(recipes.items()):
        t0 = time.perf_counter()
        reports[name] = train_and_evaluate(recipe, out / name)
        print(f"[{i + 1}/{len(recipes)}] {name}: accuracy {reports[name]['accuracy']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    timings = time_all(recipes, args.timing_warmup, args.timing_repeats, args.seed)

    base = reports["full"]["accuracy"], timings["full"]["samples_per_s"]
    rows = []
    for name, (method, budget) in configs.items():
        r = {"run": name, "method": method, "budget": budget, **timings[name],
             "accuracy": reports[name]["accuracy"], "per_type": reports[name]["per_type"],
             "final_loss": reports[name]["final_loss"]}
        r["relative_accuracy"] = r["accuracy"] / base[0] if base[0] else float("nan")
        r["speedup"] = r["samples_per_s"] / base[1]
        rows.append(r)
    steps = recipes["full"]["stages"][0]["steps"]
    batch = recipes["full"]["stages"][0]["micro_batch_size"]
    device = platform.processor() or platform.machine()
    title = (f"{args.size}: {steps} steps x {batch} samples from scratch, patch {args.patch_size} "
             f"({timings['full']['image_tokens']} image tokens at 100%), {torch.get_num_threads()} threads, {device}")
    print(f"\n{title}; total {time.perf_counter() - started:.0f} s")
    print(table(rows))
    plot(rows, out / "bench_compression.png", title)
    (out / "results.json").write_text(json.dumps({"title": title, "args": vars(args), "rows": rows}, indent=2))
    print(f"plot: {out / 'bench_compression.png'}; results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
