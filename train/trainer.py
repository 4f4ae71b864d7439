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
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from mllm.builder import build_model_and_processor
from mllm.data.loader import Batching, DataQualityError, MixtureStream, StageLoader
from mllm.data.sources import open_source
from mllm.schema import ConfigError, dump_yaml
from mllm.train import checkpoint as ckpt
from mllm.train.config import RunConfig, StageSpec
from mllm.train.distributed import DistInfo, all_reduce, barrier, init_distributed
from mllm.train.memory import apply_activation_checkpointing, compile_decoder_layers
from mllm.train.metrics import MetricsLogger, plot_losses
from mllm.train.objectives import build_objective
from mllm.train.engine import build_engine, gathered_state_dict
from mllm.train.parameters import apply_trainable, param_table
from mllm.train.paths import missing_data_paths
from mllm.train.reliability import Heartbeat, NonFiniteGuard, NonFiniteLossError, Preemption, check_resumable

logger = logging.getLogger("mllm.train")


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


class Stopped(Exception):
    """The run stopped before the recipe's end on request (--max-steps, SIGTERM); a re-run continues."""


def stages_with_state(cfg: RunConfig) -> int:
    """How many leading stages have a committed result or checkpoints in the run folder."""
    count = 0
    for index in range(len(cfg.stages)):
        folder = stage_dir(cfg, index)
        if ckpt.is_committed(folder / "final") or ckpt.committed_checkpoints(folder / "checkpoints"):
            count = index + 1
    return count


def resolve_resume(cfg: RunConfig, resume: str) -> tuple[int, Path] | None:
    """`auto`: continue from the newest complete state. `never`: refuse a folder that has state.
    A checkpoint path: continue that stage from exactly that checkpoint."""
    with_state = stages_with_state(cfg)
    if resume == "auto":
        return None
    if resume == "never":
        if with_state:
            raise ConfigError(f"{cfg.run.output_dir} already holds checkpoints; pass --resume auto to continue "
                              "from them, or choose a new run.output_dir (nothing was changed)")
        return None
    path = Path(resume)
    for index in range(len(cfg.stages)):
        root = (stage_dir(cfg, index) / "checkpoints").resolve()
        if path.resolve().parent == root:
            if not ckpt.is_committed(path):
                raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {ckpt.COMMIT} marker)")
            if with_state > index + 1 or ckpt.is_committed(stage_dir(cfg, index) / "final"):
                raise ConfigError(f"--resume {resume}: stage {cfg.stages[index].name!r} or a later one already "
                                  "finished; resuming from an earlier checkpoint would mix two histories. "
                                  "Copy the run first if that is what you want")
            return index, path
    raise ConfigError(f"--resume {resume}: not a checkpoint of this run (expected "
                      f"{cfg.run.output_dir}/stage<N>-<name>/checkpoints/step-<step>), or use auto | never")


def run_recipe(cfg: RunConfig, max_steps: int | None = None, resume: str = "auto") -> Path | None:
    """Train every stage in order; returns the trained model's folder (`run/model`), None if stopped early
    (--max-steps or SIGTERM: the latest state is checkpointed and a re-run continues from it)."""
    missing = missing_data_paths(cfg)
    if missing:  # fail before stage 0 spends its time, not when stage 2 opens its data
        raise FileNotFoundError("missing data:\n  " + "\n  ".join(missing))
    out = Path(cfg.run.output_dir)
    check_resumable(out / "config.yaml", cfg, stages_with_state(cfg))
    start_from = resolve_resume(cfg, resume)
    info = init_distributed(cfg.run.dist_timeout_s)
    threads = cfg.run.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
    barrier()
    metrics = MetricsLogger(out, enabled=info.is_main)
    previous = None
    preemption = Preemption()
    heartbeat = Heartbeat(out, info.rank, cfg.run.watchdog_s)
    try:
        for index, stage in enumerate(cfg.stages):
            final = stage_dir(cfg, index) / "final"
            if ckpt.is_committed(final):
                logger.info("stage %d (%s) already committed at %s; skipping", index, stage.name, final)
            else:
                checkpoint = start_from[1] if start_from is not None and start_from[0] == index else None
                train_stage(cfg, index, previous, info, metrics, max_steps=max_steps, checkpoint=checkpoint,
                            preemption=preemption, heartbeat=heartbeat)
            if stage.eval:
                evaluate_stage(cfg, index, info)
            previous = final
    except Stopped as stop:
        logger.info("%s; run the same command to continue", stop)
        metrics.close()
        return None
    finally:
        heartbeat.stop()
        preemption.restore()
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
    # How images become crops travels with the processor: training, its saved copy and eval agree.
    processor.configure_images(cfg.data.image_aspect, cfg.data.anyres_grids)
    for earlier in cfg.stages[:index]:
        apply_transformations(model, processor, earlier, cfg.run.seed)
    if init_from is not None:
        ckpt.load_weights(model, init_from)
    if index < len(cfg.stages):
        stage = cfg.stages[index]
        layers = apply_transformations(model, processor, stage, cfg.run.seed + index)
        if layers:
            logger.info("stage %s: upcycled the FFNs of decoder layers %s into MoE blocks", stage.name, layers)
        if stage.peft is not None:  # earlier PEFT stages need nothing: their final/ holds merged weights
            from mllm.train.lora import apply_peft

            torch.manual_seed(cfg.run.seed + index)  # the adapters' init
            model = apply_peft(model, stage.peft)
    return model, processor


def prepare_for_training(model, cfg: RunConfig, info: DistInfo) -> None:
    """Training-only changes that keep the checkpoint layout: fused kernels, activation checkpointing,
    torch.compile (the saved model folder and the eval use the stock modules)."""
    kernels = cfg.model.kernels
    if kernels.module_ops:
        from mllm.fused import apply_fused_kernels

        report = apply_fused_kernels(model, kernels.module_ops, backend=kernels.backend)
        if info.is_main:
            logger.info("fused kernels (%s backend): %s", kernels.backend,
                        {op: len(v) for op, v in report.items() if op != "skipped"} | {"skipped": report["skipped"]})
    wrapped = apply_activation_checkpointing(model, cfg.run.activation_checkpointing, cfg.run.checkpoint_every)
    if wrapped and info.is_main:
        logger.info("activation checkpointing (%s): %d modules", cfg.run.activation_checkpointing, len(wrapped))
    if cfg.run.compile:
        compile_decoder_layers(model, cfg.run.compile_backend)


def apply_transformations(model, processor, stage: StageSpec, seed: int) -> list[int]:
    """A stage's declared model transformations (`upcycle` to MoE, `mod` / `moh` conversion, `compression`,
    `token_pruning`); returns the layers converted to MoE. The processor follows the image-token count."""
    layers = []
    if stage.upcycle is not None:
        from mllm.sparse import upcycle

        layers = upcycle(model, stage.upcycle, seed=seed)
    if stage.mod is not None or stage.moh is not None:
        from mllm.sparse.depth import convert

        done = convert(model, mod=stage.mod, moh=stage.moh)
        logger.info("stage %s: %s", stage.name, ", ".join(f"{k} on decoder layers {v}" for k, v in done.items()))
    if stage.compression is not None:
        from mllm.compression import convert as compress

        processor.num_image_tokens = compress(model, stage.compression)
        logger.info("stage %s: %s compression, %d image tokens per image", stage.name, stage.compression.method,
                    processor.num_image_tokens)
    if stage.token_pruning is not None:
        from mllm.builder import with_prompt_end
        from mllm.compression.pruning import convert as prune

        candidates = prune(model, with_prompt_end(stage.token_pruning, processor.tokenizer))
        logger.info("stage %s: %s token pruning at decoder layers %s", stage.name, stage.token_pruning.method,
                    candidates)
    return layers


def merge_adapters(cfg: RunConfig, index: int, state: dict, adapter_dir: Path, info: DistInfo) -> dict:
    """A PEFT stage's result: rank 0 saves the adapter (atomically) and returns the merged base weights.

    `state` is the gathered PeftModel state dict; the merge runs on a fresh CPU copy of the stage's model,
    so it does not depend on how ZeRO partitioned the trained one."""
    if not info.is_main:
        return {}
    import shutil

    from mllm.train.lora import merged_and_adapter

    fresh, _ = build_stage_model(cfg, index, None)
    fresh.load_state_dict(state, strict=True)
    # What the adapter applies to: the previous stage's result, or the model the recipe started from.
    base = stage_dir(cfg, index - 1) / "final" if index > 0 else cfg.model.init_from
    fresh.peft_config["default"].base_model_name_or_path = None if base is None else str(Path(base).resolve())
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = merged_and_adapter(fresh, tmp)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    logger.info("stage %s: LoRA adapter saved to %s; final/ holds the merged weights", cfg.stages[index].name,
                adapter_dir)
    return merged


def save_model_folder(cfg: RunConfig, weights: Path, folder: Path) -> None:
    """The trained model in transformers layout (config + safetensors + processor) for eval / export. The
    processor (configured by build_stage_model) carries data.image_aspect / data.anyres_grids into
    processor_config.json, so `mllm eval`, generate and export preprocess images as training did."""
    model, processor = build_stage_model(cfg, len(cfg.stages), weights)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def stage_result_model(cfg: RunConfig, index: int, final: Path):
    """The model stage `index` produced (its transformations applied, `final/` loaded), eval mode."""
    model, processor = build_model_and_processor(cfg.model)
    processor.configure_images(cfg.data.image_aspect, cfg.data.anyres_grids)  # stage eval / export as trained
    for earlier in cfg.stages[: index + 1]:
        apply_transformations(model, processor, earlier, cfg.run.seed)
    ckpt.load_weights(model, final)
    return model.eval(), processor


def evaluate_run(cfg: RunConfig, out: Path, model=None, processor=None, name: str = "eval.json") -> None:
    """Held-out exact match of the trained model (the recipe's `eval:` section) -> `<out>/<name>`."""
    from mllm.train.evaluate import evaluate, format_report, load_for_inference, write_eval_plots

    if model is None:
        model, processor = load_for_inference(out / "model")
    report = evaluate(model, processor, cfg.eval.source.path, max_samples=cfg.eval.max_samples,
                      batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
    write_eval_plots(report, out)
    (out / name).write_text(json.dumps(report, indent=2))
    logger.info("held-out evaluation of %s (%s):\n%s", out, cfg.eval.source.path, format_report(report))


def evaluate_stage(cfg: RunConfig, index: int, info: DistInfo) -> None:
    """`stage.eval`: rank 0 evaluates the stage's committed result once -> <stage folder>/eval.json."""
    folder = stage_dir(cfg, index)
    if info.is_main and cfg.eval.source is not None and not (folder / "eval.json").exists():
        from mllm.builder import set_generation_defaults

        model, processor = stage_result_model(cfg, index, folder / "final")
        set_generation_defaults(model, processor.tokenizer)
        evaluate_run(cfg, folder, model, processor)
    barrier()


def train_stage(cfg: RunConfig, index: int, init_from: Path | None, info: DistInfo, metrics: MetricsLogger,
                max_steps: int | None = None, checkpoint: Path | None = None, preemption: Preemption | None = None,
                heartbeat: Heartbeat | None = None) -> None:
    """Train one stage and commit `final/`; raises Stopped after checkpointing when stopped early
    (--max-steps, SIGTERM)."""
    stage = cfg.stages[index]
    folder = stage_dir(cfg, index)
    torch.manual_seed(cfg.run.seed + index)
    model, processor = build_stage_model(cfg, index, init_from)
    prepare_for_training(model, cfg, info)
    objective = build_objective(stage.objective, model, processor, cfg.data.max_length, stage,
                                fused_loss=cfg.model.kernels.fused_cross_entropy, packing=cfg.data.packing)
    # Training mode whatever the source: from_pretrained (model.init_from) returns eval mode, which would turn
    # off dropout, MoE balance losses, router jitter and the exit gates' supervision.
    objective.module.train()
    groups = apply_trainable(objective.module, stage)
    if info.is_main:
        logger.info("stage %d (%s): %s\n%s", index, stage.name, stage.objective, param_table(objective.module))
    engine = build_engine(objective.module, groups, stage, cfg, info, lr_lambda(stage))
    loader = make_loader(cfg, stage, objective, info)
    if info.is_main:
        logger.info("stage %s data mix per epoch: %s", stage.name,
                    {name: round(share, 4) for name, share in loader.target_mix().items()})

    step = 0
    latest = ckpt.committed_checkpoints(folder / "checkpoints")
    resume_from = checkpoint or (latest[-1] if latest else None)
    if resume_from is not None:
        state = ckpt.load_checkpoint(engine, resume_from, info)
        step = state["step"]
        loader.load_state_dict(state["data"])
        logger.info("resumed stage %s from %s (step %d)", stage.name, resume_from, step)

    def save(at: int) -> Path:
        return ckpt.save_checkpoint(engine, folder / "checkpoints", at, {"step": at, "data": loader.state_dict()},
                                    info, keep=cfg.run.keep_last_n)

    guard = NonFiniteGuard(p for p in objective.module.parameters() if p.requires_grad)
    last_step = stage.steps if max_steps is None else min(stage.steps, max_steps)
    progress = make_progress(info, stage, step, last_step)
    while step < last_step:
        started = time.perf_counter()
        result = train_step(engine, objective, loader, guard, cfg.run.on_nonfinite, step + 1)
        step += 1
        elapsed = time.perf_counter() - started
        if heartbeat is not None:
            heartbeat.beat(stage.name, step)
        record = {"stage": stage.name, "step": step, "loss": result.loss, "lr": engine.get_lr()[0],
                  "grad_norm": result.grad_norm, "skipped": int(result.skipped),
                  "tokens_per_s": all_reduce(result.tokens) / elapsed, "samples": loader.position,
                  "rejected": all_reduce(sum(loader.rejected.values())),
                  **throughput(result, elapsed, info, cfg.run.peak_tflops)}
        if progress is not None:
            progress.update(1)
            postfix = {"loss": f"{result.loss:.4f}", "lr": f"{record['lr']:.2e}", "tok_s": f"{record['tokens_per_s']:.0f}"}
            if record.get("mfu") is not None:
                postfix["mfu"] = f"{record['mfu']:.1%}"
            progress.set_postfix(postfix)
        if step % cfg.run.log_every == 0 or step == last_step:
            record.update(objective.metrics())  # collective on every rank (MoE load and losses)
            record["data_mix"] = loader.mix()  # realised share per source (target: loader.target_mix())
            metrics.log(record, global_step=step)
        if stage.save_every and step % stage.save_every == 0 and step < last_step:
            save(step)
        preempted = preemption is not None and all_reduce(1.0 if preemption.requested else 0.0, "max") > 0
        if preempted and step < stage.steps:
            if not (stage.save_every and step % stage.save_every == 0):
                save(step)
            raise Stopped(f"preempted (SIGTERM) in stage {stage.name} at step {step}; checkpoint saved")
    guard.remove()
    loader.close()  # stop the data workers
    if progress is not None:
        progress.close()
    if step >= stage.steps:
        state = gathered_state_dict(engine, objective)
        if stage.peft is not None:
            state = merge_adapters(cfg, index, state, folder / "adapter", info)
        ckpt.save_weights(state, folder / "final", info, {"stage": stage.name, "steps": step,
                                                          "rejected": dict(loader.rejected)})
    else:  # stopped early on request (max_steps): checkpoint so a re-run continues from here
        save(step)
        raise Stopped(f"stopped in stage {stage.name} after --max-steps {max_steps}")
    del engine
    barrier()


@dataclass
class StepResult:
    loss: float  # global mean per target token (nan when skipped)
    tokens: int  # this rank's tokens
    skipped: bool  # non-finite somewhere: the optimizer step was vetoed
    grad_norm: float | None  # global, before clipping
    flops: float | None  # this rank's training FLOPs (None: not accounted for this objective)
    data_s: float  # this rank's time waiting for the batch (load, decode, tokenize, collate)


def throughput(result: StepResult, elapsed: float, info: DistInfo, peak_tflops: float | None) -> dict:
    """Per-device TFLOP/s and MFU (model FLOPs from the architecture), peak memory, data-wait fraction."""
    from mllm.train.flops import current_device_name, mfu

    out = {"data_wait": result.data_s / elapsed}
    if result.flops is not None:
        flops_per_device = all_reduce(result.flops) / info.world_size / elapsed
        out["tflops_per_device"] = flops_per_device / 1e12
        out["mfu"] = mfu(flops_per_device, current_device_name(), peak_tflops)
    if torch.cuda.is_available():
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)
    return out


def train_step(engine, objective, loader: StageLoader, guard: NonFiniteGuard | None = None,
               on_nonfinite: str = "stop", step: int = 0) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches."""
    data_started = time.perf_counter()
    micro_batches = loader.next_step()
    data_s = time.perf_counter() - data_started
    flops = [objective.flops(b) for b in micro_batches] if hasattr(objective, "flops") else [None]
    flops = None if any(f is None for f in flops) else sum(flops)
    problem = loader.quality_problem()
    if all_reduce(1.0 if problem else 0.0, "max") > 0:
        raise DataQualityError(problem or "another rank rejected too many samples (see its log)")
    # Normalise by the target count of the whole global batch: the result does not depend on how the
    # batch is split over micro-batches and ranks. DeepSpeed divides by grad_accum and averages over
    # ranks, which the scale undoes.
    global_count = all_reduce(sum(objective.count(b) for b in micro_batches))
    if global_count == 0:
        raise DataQualityError("a global batch without a single target token; check the data and the labels")
    scale = engine.gradient_accumulation_steps() * engine.world_size / global_count
    total, tokens, bad_loss, keys, skipped, norm = 0.0, 0, False, [], False, None
    if guard is not None:
        guard.reset()
    optimizer = getattr(engine, "guarded_optimizer", None)
    for i, batch in enumerate(micro_batches):
        keys += batch.pop("keys", [])
        tokens += objective.tokens(batch)
        loss_sum, aux_loss = objective.loss(engine, batch)
        bad_loss |= not bool(torch.isfinite(loss_sum)) or (aux_loss is not None and not bool(torch.isfinite(aux_loss)))
        # Auxiliary losses (MoE balance / z) are per-micro-batch means: DeepSpeed's 1/grad_accum and the
        # rank average turn them into the mean over the global batch.
        engine.backward(loss_sum * scale if aux_loss is None else loss_sum * scale + aux_loss)
        if i == len(micro_batches) - 1:  # every gradient exists now; the optimizer step comes next
            local = "loss" if bad_loss else ("gradient" if guard is not None and guard.seen() else None)
            if all_reduce(1.0 if local else 0.0, "max") > 0:
                skipped = handle_nonfinite(local, step, keys, on_nonfinite, loader, optimizer)
            if engine.zero_optimization_stage() == 0:  # DeepSpeed clips but does not report the norm here
                norm = averaged_grad_norm(objective.module)
        engine.step()
        total += float(loss_sum.detach())
    if optimizer is not None:
        optimizer.skip_next = False
    if norm is None:
        norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    loss = float("nan") if skipped else all_reduce(total) / global_count
    return StepResult(loss, tokens, skipped, norm, flops, data_s)


def handle_nonfinite(local: str | None, step: int, keys: list, on_nonfinite: str, loader, optimizer) -> bool:
    """Every rank agreed that some rank saw a NaN/Inf: log where, then stop or veto the optimizer step."""
    if local is not None:
        logger.error("non-finite %s at step %d on this rank (samples %s, data position %d)", local, step,
                     keys, loader.position)
    if on_nonfinite == "stop" or optimizer is None:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step} (see the rank logs for the sample keys); the optimizer "
            "step was not taken. Lower the learning rate or check the data, then resume from the last "
            "checkpoint, or set run.on_nonfinite=skip"
        )
    optimizer.skip_next = True  # the step is skipped on every rank: parameters and optimizer state unchanged
    logger.warning("step %d skipped: non-finite loss or gradient (run.on_nonfinite=skip)", step)
    return True


def averaged_grad_norm(module) -> float:
    """L2 norm of the (already rank-averaged) gradients: without ZeRO every rank holds all of them."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def make_loader(cfg: RunConfig, stage: StageSpec, objective, info: DistInfo) -> StageLoader:
    """The stage's data: its mixture, batched as `data:` says (packing / length grouping over a window of
    `data.buffer_size` samples), built in `data.num_workers` DataLoader workers."""
    data = cfg.data
    sources = [open_source(source_spec(s)) for s in stage.data]
    stream = MixtureStream(sources, [s.weight for s in stage.data], seed=cfg.run.seed)
    per_step = stage.micro_batch_size * stage.grad_accum
    window_steps = max(1, -(-data.buffer_size // per_step))
    mode = "packed" if data.packing else "grouped" if data.group_by_length else "fixed"
    if mode != "fixed" and objective.name != "lm":  # packing and length grouping need input_ids
        logger.warning("stage %s: the %s objective has no token lengths; data.%s ignored", stage.name,
                       objective.name, "packing" if data.packing else "group_by_length")
        mode = "fixed"
    if mode == "grouped" and window_steps * stage.grad_accum == 1:
        logger.warning("stage %s: data.group_by_length has no effect with one micro-batch per window; set "
                       "data.buffer_size to several micro-batches of samples (e.g. %d)", stage.name, 8 * per_step)
    return StageLoader(stream, partial(objective.encode, image_aspect=data.image_aspect), objective.collate,
                       micro_batch_size=stage.micro_batch_size, grad_accum=stage.grad_accum,
                       world_size=info.world_size, rank=info.rank,
                       max_bad_fraction=data.max_bad_fraction,
                       min_samples_before_abort=data.min_samples_before_abort,
                       batching=Batching(mode, window_steps, data.max_length),
                       num_workers=data.num_workers, prefetch_factor=data.prefetch_factor,
                       pin_memory=torch.cuda.is_available())


def source_spec(spec) -> dict:
    out = {"type": spec.type, "path": spec.path}
    if spec.image_root is not None:
        out["image_root"] = spec.image_root
    if spec.question_types:
        out["question_types"] = list(spec.question_types)
    if spec.cache_dir is not None:
        out["cache_dir"] = spec.cache_dir
    return out


def make_progress(info: DistInfo, stage: StageSpec, start: int, total: int):
    if not info.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=stage.name, dynamic_ncols=True, mininterval=2.0)
