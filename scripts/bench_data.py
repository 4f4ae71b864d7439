"""Data pipeline benchmark: loader throughput and padding, padded vs packed, on the demo's data.

For the demo recipe's instruct mixture (VQA : caption = 3 : 1) it runs the stage loader as the trainer
does (read, decode, preprocess, tokenize, collate / pack) and prints samples/s and the fraction of
token slots that are padding, for padded micro-batches and for packing at several row lengths.

  ./scripts/demo.sh (or mllm data synth --out data/demo) first, then
  nice .venv/bin/python scripts/bench_data.py [--steps 20] [--micro-batch 32]

The loader runs in the training process (no DataLoader workers yet), so there is no worker sweep.
"""

from __future__ import annotations

import argparse
import time

from mllm.builder import build_model_and_processor
from mllm.data.loader import MixtureStream, StageLoader
from mllm.data.packing import padding_fraction
from mllm.data.sources import open_source
from mllm.train.config import load_run_config
from mllm.train.objectives import LMObjective


def measure(cfg, stage, model, processor, packing: bool, max_length: int, steps: int) -> tuple[float, float]:
    objective = LMObjective(model, processor, max_length, stage, packing=packing)
    sources = [open_source({"type": s.type, "path": s.path}) for s in stage.data]
    stream = MixtureStream(sources, [s.weight for s in stage.data], seed=0)
    loader = StageLoader(stream, objective.encode, objective.collate, micro_batch_size=stage.micro_batch_size,
                         grad_accum=1)
    loader.next_step()  # warm-up (opens images, caches the epoch order)
    started, fractions = time.perf_counter(), []
    for _ in range(steps):
        fractions += [padding_fraction(b) for b in loader.next_step()]
    elapsed = time.perf_counter() - started
    return steps * stage.micro_batch_size / elapsed, sum(fractions) / len(fractions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/recipes/demo.yaml")
    parser.add_argument("--stage", default="instruct")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--pack-lengths", default="128,256,512,1024")
    args = parser.parse_args()
    cfg = load_run_config(args.recipe, [])
    stage = next(s for s in cfg.stages if s.name == args.stage)
    stage.micro_batch_size = args.micro_batch
    model, processor = build_model_and_processor(cfg.model)
    print(f"{args.recipe} stage {stage.name}: {', '.join(f'{s.path} x{s.weight:g}' for s in stage.data)}; "
          f"{args.micro_batch} samples per micro-batch, {args.steps} steps")
    print(f"{'batching':<22} {'samples/s':>10} {'padding':>8}")
    rate, pad = measure(cfg, stage, model, processor, False, cfg.data.max_length, args.steps)
    print(f"{'padded':<22} {rate:>10.0f} {pad:>8.1%}")
    for length in (int(x) for x in args.pack_lengths.split(",")):
        rate, pad = measure(cfg, stage, model, processor, True, length, args.steps)
        print(f"{f'packed, rows of {length}':<22} {rate:>10.0f} {pad:>8.1%}")


if __name__ == "__main__":
    main()
