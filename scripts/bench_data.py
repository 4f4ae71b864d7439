"""Data pipeline benchmark: loader throughput per DataLoader worker count, and padding per batching mode.

On a recipe stage's mixture (default: the demo's instruct mix of synthetic shapes-world data, VQA
LLaVA JSON : caption shards = 3 : 1) it runs the stage loader as the trainer does.

1. Throughput: samples/s of read + decode + preprocess + tokenize + pack + collate, packed rows with a
   `--buffer`-sample window, in the training process (0 workers) and with 1, 2, 4 DataLoader workers,
   over `--throughput-samples` samples (worker start-up included; the epoch order is computed before).
   The main process only consumes batches, so this is what the workers can deliver, not a training
   step rate; scaling stops at the machine's free cores. CPU ms/sample (this process plus its joined
   workers) does not depend on how busy the machine is: free cores / it ~ the reachable samples/s.
2. Padding: the share of token slots that are padding, over all micro-batches of `--steps` steps:
   padded (unpacked), length-grouped over the `--buffer` window, packed per micro-batch (the old
   behaviour) and packed over the window, for each row length in `--pack-lengths`.

  ./scripts/demo.sh (or mllm data synth --out data/demo) first, then
  nice .venv/bin/python scripts/bench_data.py [--steps 16] [--micro-batch 32] [--buffer 256]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import warnings

from mllm.builder import build_model_and_processor
from mllm.data.loader import Batching, MixtureStream, StageLoader
from mllm.data.sources import open_source
from mllm.train.config import load_run_config
from mllm.train.objectives import LMObjective
from mllm.train.trainer import source_spec


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished (joined) children: the workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(stream, objective, stage, batching: Batching, steps: int, workers: int = 0) -> tuple[float, float, float]:
    """(samples/s over `steps` steps, worker start-up included; CPU seconds per sample, all processes;
    padding fraction over those steps)."""
    objective.packing = batching.mode == "packed"
    loader = StageLoader(stream, objective.encode, objective.collate, micro_batch_size=stage.micro_batch_size,
                         grad_accum=1, batching=batching, num_workers=workers)
    real = slots = 0
    started, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        for batch in loader.next_step():
            real += int(batch["attention_mask"].sum())
            slots += batch["attention_mask"].numel()
    elapsed = time.perf_counter() - started
    loader.close()  # joins the workers, so their CPU time is counted
    samples = steps * stage.micro_batch_size
    return samples / elapsed, (cpu_seconds() - cpu) / samples, 1 - real / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/recipes/demo.yaml")
    parser.add_argument("--stage", default="instruct")
    parser.add_argument("--steps", type=int, default=16, help="steps per padding measurement (whole windows)")
    parser.add_argument("--throughput-samples", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--buffer", type=int, default=256, help="samples per window (data.buffer_size)")
    parser.add_argument("--workers", default="0,1,2,4")
    parser.add_argument("--pack-lengths", default="128,256")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*worker.*")  # torch's "more workers than CPUs" notice
    cfg = load_run_config(args.recipe, [])
    stage = next(s for s in cfg.stages if s.name == args.stage)
    stage.micro_batch_size = args.micro_batch
    window = max(1, -(-args.buffer // args.micro_batch))
    steps = -(-args.steps // window) * window
    model, processor = build_model_and_processor(cfg.model)
    started = time.perf_counter()
    sources = [open_source(source_spec(s)) for s in stage.data]
    stream = MixtureStream(sources, [s.weight for s in stage.data], seed=0)
    stream[0]  # the epoch's order, before any worker forks
    opened = time.perf_counter() - started
    print(f"{args.recipe} stage {stage.name}: {', '.join(f'{s.path} x{s.weight:g}' for s in stage.data)} "
          f"({stream.epoch_len} samples per epoch, sources indexed in {opened:.1f} s); {args.micro_batch} samples "
          f"per micro-batch, {steps} timed steps; {os.cpu_count()} CPUs")

    length = cfg.data.max_length
    objective = LMObjective(model, processor, length, stage)
    timed = -(-args.throughput_samples // (window * args.micro_batch)) * window
    print(f"\nloader throughput, packed rows of {length}, windows of {window * args.micro_batch} samples, "
          f"{timed * args.micro_batch} samples")
    print(f"{'workers':<10} {'samples/s':>10} {'CPU ms/sample':>14}")
    for workers in (int(w) for w in args.workers.split(",")):
        rate, cpu, _ = run(stream, objective, stage, Batching("packed", window, length), timed, workers)
        print(f"{workers:<10} {rate:>10.0f} {cpu * 1e3:>14.2f}")

    print(f"\npadding (share of token slots), {steps} steps of {args.micro_batch} samples")
    print(f"{'batching':<44} {'padding':>8}")
    for length in (int(x) for x in args.pack_lengths.split(",")):
        objective = LMObjective(model, processor, length, stage)
        rows = [("padded (unpacked)", Batching("fixed", window, length)),
                (f"length-grouped, windows of {window * args.micro_batch}", Batching("grouped", window, length)),
                ("packed per micro-batch", Batching("packed", 1, length)),
                (f"packed, windows of {window * args.micro_batch}", Batching("packed", window, length))]
        for name, batching in rows:
            if batching.mode != "packed" and length != cfg.data.max_length:
                continue  # padded batches do not depend on the row length
            _, _, padding = run(stream, objective, stage, batching, steps)
            label = name if batching.mode != "packed" else f"{name}, rows of {length}"
            print(f"{label:<44} {padding:>8.1%}")


if __name__ == "__main__":
    main()
