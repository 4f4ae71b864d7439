"""The staged trainer: one generic loop on a DeepSpeed engine, applied to every stage of a recipe.

A stage is data (objective, mixture, trainable globs, schedule). Each stage starts from the previous
stage's committed weights, trains, and commits its own; a re-run skips committed stages and resumes
the interrupted one from its latest committed checkpoint, reproducing the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from mllm.builder import build_model_and_processor
from mllm.data.loader import DataQualityError, MixtureStream, StageLoader
from mllm.data.sources import open_source
from mllm.schema import dump_yaml
from mllm.train import checkpoint as ckpt
from mllm.train.config import RunConfig, StageSpec
from mllm.train.distributed import DistInfo, all_reduce, barrier, init_distributed
from mllm.train.metrics import MetricsLogger, plot_losses
from mllm.train.objectives import build_objective
from mllm.train.engine import build_engine, gathered_state_dict
from mllm.train.parameters import apply_trainable, param_table
from mllm.train.paths import missing_data_paths

logger = logging.getLogger("mllm.train")


class NonFiniteLossError(RuntimeError):
    pass


def lr_lambda(stage: StageSpec):
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak."""

    def fn(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def stage_dir(cfg: RunConfig, index: int) -> Path:
    return Path(cfg.run.output_dir) / f"stage{index}-{cfg.stages[index].name}"


def run_recipe(cfg: RunConfig, max_steps: int | None = None) -> Path | None:
    """Train every stage in order; returns the trained model's folder (`run/model`), None if stopped early."""
    missing = missing_data_paths(cfg)
    if missing:  # fail before stage 0 spends its time, not when stage 2 opens its data
        raise FileNotFoundError("missing data:\n  " + "\n  ".join(missing))
    info = init_distributed(cfg.run.dist_timeout_s)
    threads = cfg.run.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)
    out = Path(cfg.run.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
    barrier()
    metrics = MetricsLogger(out, enabled=info.is_main)
    previous = None
    for index, stage in enumerate(cfg.stages):
        final = stage_dir(cfg, index) / "final"
        if ckpt.is_committed(final):
            logger.info("stage %d (%s) already committed at %s; skipping", index, stage.name, final)
        elif not train_stage(cfg, index, previous, info, metrics, max_steps=max_steps):
            logger.info("stopped in stage %s after --max-steps %d; re-run to continue", stage.name, max_steps)
            metrics.close()
            return None
        previous = final
    if info.is_main:
        save_model_folder(cfg, previous, out / "model")
        plot_losses(metrics.path, out / "loss.png")
        if cfg.eval.source is not None:
            evaluate_run(cfg, out)
    barrier()
    metrics.close()
    return out / "model"


def build_stage_model(cfg: RunConfig, index: int, init_from: Path | None):
    """The model as stage `index` trains it (index = len(stages): the final model).

    Earlier stages' transformations (e.g. upcycle) are applied for their structure only, since their
    weights come from `init_from`; this stage's transformation is applied to the loaded weights."""
    model, processor = build_model_and_processor(cfg.model)
    for earlier in cfg.stages[:index]:
        apply_transformations(model, earlier, cfg.run.seed)
    if init_from is not None:
        ckpt.load_weights(model, init_from)
    if index < len(cfg.stages):
        layers = apply_transformations(model, cfg.stages[index], cfg.run.seed + index)
        if layers:
            logger.info("stage %s: upcycled the FFNs of decoder layers %s into MoE blocks", cfg.stages[index].name,
                        layers)
    return model, processor


def apply_transformations(model, stage: StageSpec, seed: int) -> list[int]:
    """A stage's declared model transformations (today: `upcycle`); returns the converted layers."""
    if stage.upcycle is None:
        return []
    from mllm.sparse import upcycle

    return upcycle(model, stage.upcycle, seed=seed)


def save_model_folder(cfg: RunConfig, weights: Path, folder: Path) -> None:
    """The trained model in transformers layout (config + safetensors + processor) for eval / export."""
    model, processor = build_stage_model(cfg, len(cfg.stages), weights)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def evaluate_run(cfg: RunConfig, out: Path) -> None:
    """Held-out exact match of the trained model (the recipe's `eval:` section) -> `<run>/eval.json`."""
    from mllm.train.evaluate import evaluate, format_report, load_for_inference, write_expert_load_plot

    model, processor = load_for_inference(out / "model")
    report = evaluate(model, processor, cfg.eval.source.path, max_samples=cfg.eval.max_samples,
                      batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
    write_expert_load_plot(report, out / "expert_load.png")
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    logger.info("held-out evaluation (%s):\n%s", cfg.eval.source.path, format_report(report))


def train_stage(cfg: RunConfig, index: int, init_from: Path | None, info: DistInfo, metrics: MetricsLogger,
                max_steps: int | None = None) -> bool:
    """Train one stage; True when it finished (and committed `final/`), False when stopped by max_steps."""
    stage = cfg.stages[index]
    folder = stage_dir(cfg, index)
    torch.manual_seed(cfg.run.seed + index)
    model, processor = build_stage_model(cfg, index, init_from)
    objective = build_objective(stage.objective, model, processor, cfg.data.max_length, stage)
    groups = apply_trainable(objective.module, stage)
    if info.is_main:
        logger.info("stage %d (%s): %s\n%s", index, stage.name, stage.objective, param_table(objective.module))
    engine = build_engine(objective.module, groups, stage, cfg, info, lr_lambda(stage))
    loader = make_loader(cfg, stage, objective, info)

    step = 0
    latest = ckpt.committed_checkpoints(folder / "checkpoints")
    if latest:
        state = ckpt.load_checkpoint(engine, latest[-1], info)
        step = state["step"]
        loader.load_state_dict(state["data"])
        logger.info("resumed stage %s from %s (step %d)", stage.name, latest[-1], step)

    last_step = stage.steps if max_steps is None else min(stage.steps, max_steps)
    progress = make_progress(info, stage, step, last_step)
    while step < last_step:
        started = time.perf_counter()
        loss, tokens = train_step(engine, objective, loader)
        step += 1
        elapsed = time.perf_counter() - started
        record = {"stage": stage.name, "step": step, "loss": loss, "lr": engine.get_lr()[0],
                  "tokens_per_s": all_reduce(tokens) / elapsed, "samples": loader.position,
                  "rejected": all_reduce(sum(loader.rejected.values()))}
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if step % cfg.run.log_every == 0 or step == last_step:
            record.update(objective.metrics())  # collective on every rank (MoE load and losses)
            metrics.log(record, global_step=step)
        if stage.save_every and step % stage.save_every == 0 and step < last_step:
            ckpt.save_checkpoint(engine, folder / "checkpoints", step, {"step": step, "data": loader.state_dict()}, info)
    if progress is not None:
        progress.close()
    if step >= stage.steps:
        state = gathered_state_dict(engine, objective)
        ckpt.save_weights(state, folder / "final", info, {"stage": stage.name, "steps": step,
                                                          "rejected": dict(loader.rejected)})
    else:  # stopped early on request (max_steps): checkpoint so a re-run continues from here
        ckpt.save_checkpoint(engine, folder / "checkpoints", step, {"step": step, "data": loader.state_dict()}, info)
    del engine
    barrier()
    return step >= stage.steps


def train_step(engine, objective, loader: StageLoader) -> tuple[float, int]:
    """One optimizer step over `grad_accum` micro-batches; returns (global mean loss, this rank's tokens)."""
    micro_batches = loader.next_step()
    problem = loader.quality_problem()
    if all_reduce(1.0 if problem else 0.0, "max") > 0:
        raise DataQualityError(problem or "another rank rejected too many samples (see its log)")
    # Normalise by the target count of the whole global batch: the result does not depend on how the
    # batch is split over micro-batches and ranks. DeepSpeed divides by grad_accum and averages over
    # ranks, which the scale undoes.
    global_count = all_reduce(sum(objective.count(b) for b in micro_batches))
    if global_count == 0:
        raise DataQualityError("a global batch without a single target token; check the labels / data")
    scale = engine.gradient_accumulation_steps() * engine.world_size / global_count
    total, tokens = 0.0, 0
    for batch in micro_batches:
        tokens += objective.tokens(batch)
        loss_sum, aux_loss = objective.loss(engine, batch)
        finite = bool(torch.isfinite(loss_sum)) and (aux_loss is None or bool(torch.isfinite(aux_loss)))
        if all_reduce(0.0 if finite else 1.0, "max") > 0:
            raise NonFiniteLossError(
                f"non-finite loss at sample position {loader.position}; the optimizer step was not taken. "
                "Lower the learning rate or check the data; resume from the last checkpoint."
            )
        # Auxiliary losses (MoE balance / z) are per-micro-batch means: DeepSpeed's 1/grad_accum and the
        # rank average turn them into the mean over the global batch.
        engine.backward(loss_sum * scale if aux_loss is None else loss_sum * scale + aux_loss)
        engine.step()
        total += float(loss_sum.detach())
    return all_reduce(total) / global_count, tokens


def make_loader(cfg: RunConfig, stage: StageSpec, objective, info: DistInfo) -> StageLoader:
    sources = [open_source(source_spec(s)) for s in stage.data]
    stream = MixtureStream(sources, [s.weight for s in stage.data], seed=cfg.run.seed)
    return StageLoader(stream, objective.encode, objective.collate,
                       micro_batch_size=stage.micro_batch_size, grad_accum=stage.grad_accum,
                       world_size=info.world_size, rank=info.rank,
                       max_bad_fraction=cfg.data.max_bad_fraction,
                       min_samples_before_abort=cfg.data.min_samples_before_abort)


def source_spec(spec) -> dict:
    out = {"type": spec.type, "path": spec.path}
    if spec.image_root is not None:
        out["image_root"] = spec.image_root
    return out


def make_progress(info: DistInfo, stage: StageSpec, start: int, total: int):
    if not info.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=stage.name, dynamic_ncols=True, mininterval=2.0)
