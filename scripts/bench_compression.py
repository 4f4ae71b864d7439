"""Visual-token compression trade-off on the demo: held-out accuracy vs training throughput and prefill latency.

1. Base: one dense model trained like the demo (CLIP stage -> align -> instruct) but with 64 image tokens
   per image (`--patch-size 6` on the 48 px images; the demo's 16 px patches give 9, too few to compress).
   Written to <out>/base and reused by later invocations.
2. Every configuration continue-trains the base for `--steps` steps on the demo's instruct mix (VQA 3 :
   captions 1), everything trainable (`--frozen-tower`: the projector and the LLM), through `mllm train`
   (model.init_from = the base; the method comes in as the stage's `compression:` / `token_pruning:`
   transformation, so pixel_shuffle's widened projector starts as average pooling). The 100% row
   continue-trains the same steps without compression, so every row has seen the same data. Each run's
   recipe is <out>/<run>/recipe.yaml (`mllm train` reproduces it); held-out exact match comes from the
   trainer's eval (greedy decoding with the KV cache).
   - before the LLM (fixed K per image): pool, pixel_shuffle, tome, vmtc at each budget;
   - inside the LLM: fastv (text-guided, image tokens cut to `budget` from decoder layer `--prune-layer`);
     exit (DyVTE-style visual-token exit: the base's exit gates train for `--steps` steps with the LLM
     frozen; its budget is learned: the table reports the measured share of image tokens x layers).
   `--from-clip` instead trains each method the way a model is trained with it from the start: the base's
   align and instruct stages again, from the base's CLIP-stage weights, with the method applied from the
   align stage's first step (the tower stays frozen, as in the base's stages). The 100% row is then the
   base itself, so every row has the same schedule. (exit is not available here: its gates train on a
   trained model.)
3. Timing, in this process, interleaved over the configurations so background load hits them all alike:
   a training step (forward + backward + AdamW, fp32) of each run's trained model on the same real
   training batches, and a prefill (prompt + image into the KV cache, batch 1). For exit the training
   step is the base model's (DyVTE trains only the gates; the LLM trains without exits), so its gain is
   in prefill only.

Throughput is per sample (samples/s and the speed-up over 100%); `llm tok/s` counts the LLM-side tokens
like the trainer's `tokens_per_s`, which fall with compression by construction, so it is printed for
reference only. Runs are independent processes: `--jobs 2` trains two at once (one thread each); the base,
trained alone first, gets `--jobs` threads.

  nice -n 10 .venv/bin/python scripts/bench_compression.py --jobs 2                 # small (~40 min on 2 cores)
  nice -n 10 .venv/bin/python scripts/bench_compression.py --size full --out runs/bench_compression_full
  nice -n 10 .venv/bin/python scripts/bench_compression.py --methods pool,fastv --budgets 1,0.25 --steps 100
  nice -n 10 .venv/bin/python scripts/bench_compression.py --size full --from-clip --methods pool,pixel_shuffle \
      --budgets 1,0.25 --jobs 2 --out runs/bench_compression_p6c   # <out>/base: trained first, or a link to one
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mllm.builder import load_trained
from mllm.schema import dump_yaml, load_yaml

BEFORE_LLM = ("pool", "pixel_shuffle", "tome", "vmtc")
INSIDE_LLM = ("fastv", "exit")
METHODS = BEFORE_LLM + INSIDE_LLM
BUDGETS = (1.0, 0.5, 0.25, 0.125)
SIZES = {
    # Model widths / depths and schedules. `small` shrinks the demo's tower and LLM widths (4 LLM layers, so
    # in-LLM pruning after layer 2 has layers to save); `full` is the demo's model.
    "small": dict(vit_width=64, vit_layers=2, text_hidden=128, text_layers=4, clip_steps=300, align_steps=200,
                  base_steps=1500, steps=300, batch=32, lr=5e-4, eval_samples=1000),
    "full": dict(vit_width=128, vit_layers=4, text_hidden=256, text_layers=4, clip_steps=500, align_steps=200,
                 base_steps=2000, steps=500, batch=32, lr=5e-4, eval_samples=1000),
}


# ---------------------------------------------------------------------------------------- recipes


def run_name(method: str, budget: float | None) -> str:
    if method == "exit":
        return "exit"
    return "full" if budget == 1.0 else f"{method}-{budget:g}"


def base_recipe(args, size: dict, out_dir: Path) -> dict:
    """The demo recipe with 64 image tokens per image and the bench size's widths and schedule."""
    recipe = load_yaml(args.base)
    model = recipe["model"]
    vision = model["vision"]
    vision["name"] = f"mllm-bench-vit-p{args.patch_size}-w{size['vit_width']}"  # open_clip registry key
    vision["model_cfg"]["vision_cfg"].update(patch_size=args.patch_size, width=size["vit_width"],
                                             layers=size["vit_layers"])
    vision["model_cfg"]["embed_dim"] = size["vit_width"]
    vision["model_cfg"]["text_cfg"]["width"] = size["vit_width"]
    model["text"]["config"].update(hidden_size=size["text_hidden"], intermediate_size=3 * size["text_hidden"],
                                   num_hidden_layers=size["text_layers"])
    image_size = vision["model_cfg"]["vision_cfg"]["image_size"]
    recipe["data"]["max_length"] += (image_size // args.patch_size) ** 2  # the demo's text budget + image tokens
    text = model["text"]["config"]
    text["max_position_embeddings"] = max(text.get("max_position_embeddings", 0), recipe["data"]["max_length"])
    recipe["eval"]["max_samples"] = args.eval_samples or size["eval_samples"]
    steps = {"clip": size["clip_steps"], "align": size["align_steps"], "instruct": size["base_steps"]}
    for stage in recipe["stages"]:
        stage["steps"] = steps[stage["name"]]
        stage["save_every"] = 0
    # The base trains alone, so it gets one thread per job; the method runs train `--jobs` at a time, one each.
    recipe["run"].update(output_dir=str(out_dir), seed=args.seed, log_every=25, threads=max(1, args.jobs))
    return recipe


def continue_recipe(base: dict, out_dir: Path, *, steps: int, batch: int, lr: float, frozen_tower: bool,
                    seed: int, transform: dict | None = None) -> dict:
    """Continue-train the trained run `base` (its resolved config) on its instruct mix for `steps` steps, with
    the stage transformation `transform` (compression / token_pruning / mod ...) applied when the stage starts."""
    instruct = next(s for s in base["stages"] if s["name"] == "instruct")
    trainable = ["model.multi_modal_projector.*", "model.language_model.*", "lm_head.*"] if frozen_tower else ["*"]
    stage = {"name": "finetune", "data": instruct["data"], "trainable": [{"params": trainable}], "steps": steps,
             "micro_batch_size": batch, "lr": lr, "warmup_steps": 10, "save_every": 0, **(transform or {})}
    return {"run": {"output_dir": str(out_dir), "seed": seed, "deepspeed": base["run"]["deepspeed"],
                    "log_every": 25, "threads": 1},
            "model": {"init_from": str(Path(base["run"]["output_dir"]) / "model")},
            "data": copy.deepcopy(base["data"]), "eval": copy.deepcopy(base["eval"]), "stages": [stage]}


def from_clip_recipe(base: dict, out_dir: Path, *, seed: int, transform: dict) -> dict:
    """The base's stages after its CLIP stage, trained again from the CLIP stage's weights with `transform`
    applied from the first of them: the method is in place from the projector's first step, as when a
    model is trained with it from the start (the 100% row of this mode is the base itself)."""
    clip = next((i for i, s in enumerate(base["stages"]) if s.get("objective") == "contrastive"), None)
    stages = copy.deepcopy(base["stages"][clip + 1:]) if clip is not None else []
    if not stages:
        raise ValueError("--from-clip needs a base recipe with a CLIP (objective: contrastive) stage followed by "
                         f"others; its stages: {[s['name'] for s in base['stages']]}")
    stages[0].update(transform)
    clip_weights = Path(base["run"]["output_dir"]) / f"stage{clip}-{base['stages'][clip]['name']}" / "final"
    return {"run": {**copy.deepcopy(base["run"]), "output_dir": str(out_dir), "seed": seed, "threads": 1},
            "model": {"init_from": str(clip_weights)},
            "data": copy.deepcopy(base["data"]), "eval": copy.deepcopy(base["eval"]), "stages": stages}


def method_transform(args, method: str, budget: float) -> dict:
    """The stage transformation that applies `method` at `budget`."""
    if method in BEFORE_LLM and budget < 1.0:
        return {"compression": {"method": method, "ratio": budget}}
    if method == "fastv":
        return {"token_pruning": {"method": "fastv", "layer": args.prune_layer, "keep": budget}}
    if method == "exit":
        return {"token_pruning": {"method": "exit"}}
    return {}


def finetune_recipe(args, size: dict, base: dict, method: str, budget: float, out_dir: Path) -> dict:
    """Continue-train the base model with the method applied when the stage starts."""
    transform = method_transform(args, method, budget)
    recipe = continue_recipe(base, out_dir, steps=args.steps or size["steps"], batch=size["batch"], lr=size["lr"],
                             frozen_tower=args.frozen_tower, seed=args.seed, transform=transform)
    if method == "exit":  # the gates learn with the LLM frozen (DyVTE)
        recipe["stages"][0].update(trainable=[{"params": ["*exit_gate*"]}], lr=1e-2)
    return recipe


def train(recipe: dict, out_dir: Path) -> dict:
    """`mllm train` in a subprocess (one thread); returns the held-out report (a finished run is read)."""
    report = out_dir / "eval.json"
    if not report.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(dump_yaml(recipe))
        env = {**os.environ, "OMP_NUM_THREADS": str(recipe["run"]["threads"])}
        with open(out_dir / "train.log", "w") as log:
            proc = subprocess.run([sys.executable, "-m", "mllm.train.cli", "train", str(out_dir / "recipe.yaml")],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"training {out_dir} failed ({proc.returncode}); see {out_dir / 'train.log'}")
    trained_with = load_yaml(out_dir / "recipe.yaml")["eval"]["max_samples"]
    wanted = recipe["eval"]["max_samples"]
    if trained_with != wanted:  # a run from an invocation with another --eval-samples: evaluate it again
        report = out_dir / f"eval-{wanted}.json"
        if not report.exists():
            subprocess.run([sys.executable, "-m", "mllm.train.cli", "eval", "--model", str(out_dir / "model"),
                            "--data", recipe["eval"]["source"]["path"], "--max-samples", str(wanted),
                            "--batch-size", str(recipe["eval"].get("batch_size", 64)), "--out", str(report)],
                           check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = json.loads(report.read_text())
    result["final_loss"] = metrics[-1]["loss"] if metrics else float("nan")
    return result


# ---------------------------------------------------------------------------------------- timing


def open_spec(spec: dict):
    """A recipe's data source, as the trainer opens it (a resolved config's spec lists every key)."""
    from mllm.data.sources import open_source
    from mllm.schema import from_dict
    from mllm.train.config import SourceSpec
    from mllm.train.trainer import source_spec

    return open_source(source_spec(from_dict(SourceSpec, spec, "source")))


def real_batches(model, processor, recipe: dict, batch: int, count: int) -> list[dict]:
    """`count` training batches of real demo samples (the same samples for every configuration)."""
    from mllm.processing import SampleError
    from mllm.train.objectives import LMObjective

    objective = LMObjective(model, processor, recipe["data"]["max_length"])
    source = open_spec(recipe["stages"][0]["data"][0])
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
    from mllm.data.sources import decode_image
    from mllm.processing import llava_to_messages

    source = open_spec(recipe["eval"]["source"])
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
    """One run's trained model, optimizer and inputs; each call times one training step or prefill."""

    def __init__(self, run_dir: Path, recipe: dict, batches_count: int, seed: int, frozen_tower: bool):
        torch.manual_seed(seed)
        self.model, processor = load_trained(str(run_dir / "model"))
        self.model.train()
        for name, param in self.model.named_parameters():  # exit: the LLM trains without exits, gates apart
            param.requires_grad_(".exit_gate." not in name and not (frozen_tower and ".vision_tower." in f".{name}"))
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
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


def time_all(runs: dict[str, tuple[Path, dict]], warmup: int, repeats: int, seed: int,
             frozen_tower: bool) -> dict[str, dict]:
    timed = {name: Timed(folder, recipe, max(1, warmup + repeats), seed, frozen_tower)
             for name, (folder, recipe) in runs.items()}
    for rep in range(warmup + repeats):  # interleaved: a burst of background load hits every config alike
        for t in timed.values():
            t.train_step(rep, record=rep >= warmup)
            t.prefill(rep, record=rep >= warmup)
    return {name: t.summary() for name, t in timed.items()}


# ---------------------------------------------------------------------------------------- report


def layer_share(report: dict, num_layers: int) -> float:
    """Image tokens present, averaged over the LLM's layers (1.0 without in-LLM pruning), from the eval's
    per-layer kept fraction (layers before the first pruning layer keep everything)."""
    kept = report.get("pruning", {}).get("kept_fraction", [])
    return (num_layers - len(kept) + sum(kept)) / num_layers


def table(rows: list[dict]) -> str:
    head = (f"{'method':<14} {'budget':>7} {'img tok':>7} {'x layers':>8} {'accuracy':>8} {'vs 100%':>7} "
            f"{'samples/s':>9} {'speed-up':>8} {'llm tok/s':>9} {'prefill ms':>10} {'final loss':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        budget = "learned" if r["method"] == "exit" else f"{r['budget']:.1%}"
        lines.append(f"{r['method']:<14} {budget:>7} {r['image_tokens']:>7d} {r['layer_share']:>8.1%} "
                     f"{r['accuracy']:>8.3f} {r['relative_accuracy']:>7.1%} {r['samples_per_s']:>9.1f} "
                     f"{r['speedup']:>7.2f}x {r['llm_tokens_per_s']:>9.0f} {r['prefill_ms']:>10.1f} "
                     f"{r['final_loss']:>10.4f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    base = next(r for r in rows if r["run"] == "full")
    for ax, key, label in ((axes[0], "samples_per_s", "training throughput (samples/s, higher is better)"),
                           (axes[1], "prefill_ms", "prefill latency, batch 1 (ms, lower is better)")):
        ax.scatter([base[key]], [base["accuracy"]], color="black", marker="*", s=140, label="100% (no compression)",
                   zorder=3)
        for method in METHODS:
            points = sorted((r for r in rows if r["method"] == method and r["run"] != "full"),
                            key=lambda r: -r["layer_share"])
            if not points:
                continue
            xs, ys = [base[key]] + [r[key] for r in points], [base["accuracy"]] + [r["accuracy"] for r in points]
            ax.plot(xs, ys, marker="o", linestyle="--" if method in INSIDE_LLM else "-", label=method)
            for r in points:
                ax.annotate("learned" if method == "exit" else f"{100 * r['budget']:g}%", (r[key], r["accuracy"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
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
    parser.add_argument("--prune-layer", type=int, default=2, help="fastv: first decoder layer without the pruned tokens")
    parser.add_argument("--steps", type=int, default=None, help="continue-training steps per run (default: the size's)")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out samples (default: the size's)")
    parser.add_argument("--frozen-tower", action="store_true",
                        help="continue-train the projector and the LLM only (LLaVA's instruction tuning); timed alike")
    parser.add_argument("--from-clip", action="store_true",
                        help="train each method from the base's CLIP-stage weights through the base's align and "
                             "instruct stages (the method in place from the start); the 100%% row is the base")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each)")
    parser.add_argument("--timing-warmup", type=int, default=2)
    parser.add_argument("--timing-repeats", type=int, default=6)
    parser.add_argument("--base", default="configs/recipes/demo.yaml", help="recipe to derive the runs from")
    parser.add_argument("--out", default="runs/bench_compression")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    size = SIZES[args.size]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    if args.from_clip and "exit" in methods:
        parser.error("--from-clip: exit trains its gates on a trained model; run it without --from-clip")
    budgets = sorted({float(b) for b in args.budgets.split(",")} | {1.0}, reverse=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # timing on one thread: two threads on a shared 2-core machine wait for each other

    started = time.perf_counter()
    base = base_recipe(args, size, out / "base")
    base_report = train(base, out / "base")
    print(f"[base] accuracy {base_report['accuracy']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    configs = {"full": ("(none)", 1.0)}
    for m in methods:
        if m == "exit":
            configs["exit"] = ("exit", float("nan"))
        else:
            configs.update({run_name(m, b): (m, b) for b in budgets if b < 1.0})
    # Every row's continuation recipe; it also gives the timing its batches (the instruct mix).
    recipes = {name: finetune_recipe(args, size, base, m, b, out / name) for name, (m, b) in configs.items()}
    folders = {name: out / name for name in configs}
    if args.from_clip:  # the methods train from the CLIP stage instead; the 100% row is the base
        training = {name: from_clip_recipe(base, out / name, seed=args.seed, transform=method_transform(args, m, b))
                    for name, (m, b) in configs.items() if name != "full"}
        folders["full"] = out / "base"
    else:
        training = recipes

    def one(name: str) -> tuple[str, dict]:
        t0 = time.perf_counter()
        report = train(training[name], out / name)
        print(f"[{name}] accuracy {report['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return name, report

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        reports = dict(pool.map(one, training))
    reports.setdefault("full", base_report)
    timings = time_all({name: (folders[name], recipes[name]) for name in configs}, args.timing_warmup,
                       args.timing_repeats, args.seed, args.frozen_tower or args.from_clip)

    layers = size["text_layers"]
    base_accuracy, base_speed = reports["full"]["accuracy"], timings["full"]["samples_per_s"]
    rows = []
    for name, (method, budget) in configs.items():
        r = {"run": name, "method": method, "budget": budget, **timings[name],
             "layer_share": layer_share(reports[name], layers), "accuracy": reports[name]["accuracy"],
             "per_type": reports[name]["per_type"], "final_loss": reports[name]["final_loss"]}
        r["relative_accuracy"] = r["accuracy"] / base_accuracy if base_accuracy else float("nan")
        r["speedup"] = r["samples_per_s"] / base_speed
        rows.append(r)
    steps, batch = recipes["full"]["stages"][0]["steps"], recipes["full"]["stages"][0]["micro_batch_size"]
    device = platform.processor() or platform.machine()
    schedule = ("each method trained from the base's CLIP stage through its align and instruct stages; 100% = "
                "the base" if args.from_clip else f"then {steps} steps x {batch} per method")
    title = (f"{args.size}: base {base_report['accuracy']:.3f} (demo pipeline, {timings['full']['image_tokens']} "
             f"image tokens), {schedule}; 1 thread, {device}")
    print(f"\n{title}; total {time.perf_counter() - started:.0f} s")
    print(table(rows))
    plot(rows, out / "bench_compression.png", title)
    (out / "results.json").write_text(json.dumps({"title": title, "args": vars(args), "base": base_report["accuracy"],
                                                  "rows": rows}, indent=2))
    print(f"plot: {out / 'bench_compression.png'}; results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
