"""The run config: a model spec, data settings, a DeepSpeed preset and an ordered list of stages.

Stages are data: each names its objective, data mixture, trainable parameter globs (with per-group
learning rates), schedule and length. The trainer applies every stage with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mllm.builder import ModelSpec
from mllm.schema import ConfigError, apply_overrides, from_dict, load_yaml
from mllm.sparse.config import UpcycleSpec
from mllm.train.lora import PeftSpec


@dataclass
class SourceSpec:
    type: Literal["webdataset", "llava_json"] = "webdataset"
    path: str = ""
    image_root: str | None = None
    weight: float = 1.0
    # Keep only these question types of each sample (e.g. hold one out of a stage); None keeps all.
    question_types: list[str] | None = None

    def validate(self):
        if not self.path:
            raise ConfigError("data source needs a path")
        if self.weight <= 0:
            raise ConfigError(f"source weight must be > 0, got {self.weight}")


@dataclass
class ParamGroupSpec:
    params: list[str] = field(default_factory=list)  # fnmatch globs over parameter names
    lr: float | None = None  # None: the stage's lr
    weight_decay: float | None = None


@dataclass
class ContrastiveSpec:
    """Stage-0 CLIP pretraining: open_clip's model factory and ClipLoss, captions as text."""

    context_length: int = 32


@dataclass
class StageSpec:
    name: str = "stage"
    objective: Literal["lm", "contrastive"] = "lm"
    data: list[SourceSpec] = field(default_factory=list)
    trainable: list[ParamGroupSpec] = field(default_factory=list)
    steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    save_every: int = 0  # 0: only at the end of the stage
    deepspeed: str | None = None  # overrides the run's preset for this stage
    contrastive: ContrastiveSpec = field(default_factory=ContrastiveSpec)
    # Transformation applied to the model when the stage starts (after loading the previous stage's
    # weights): `upcycle` turns the dense FFNs into MoE blocks whose experts copy them.
    upcycle: UpcycleSpec | None = None
    # Evaluate this stage's result on the recipe's eval source -> <stage folder>/eval.json (the run's
    # final model is always evaluated); e.g. accuracy before and after a LoRA stage.
    eval: bool = False
    # LoRA / DoRA adapters (PEFT) on the language model; the stage then trains the adapters and
    # `peft.modules_to_save` (plus any `trainable` globs, which may be left out).
    peft: PeftSpec | None = None

    def validate(self):
        if not self.data:
            raise ConfigError(f"stage {self.name!r} has no data sources")
        if not self.trainable and self.peft is None:
            raise ConfigError(f"stage {self.name!r} has no trainable parameter groups (and no peft section)")
        if self.peft is not None and self.objective != "lm":
            raise ConfigError(f"stage {self.name!r}: peft applies to the lm objective, not {self.objective!r}")
        for name, value in (("steps", self.steps), ("micro_batch_size", self.micro_batch_size),
                            ("grad_accum", self.grad_accum)):
            if value < 1:
                raise ConfigError(f"stage {self.name!r}: {name} must be >= 1, got {value}")


@dataclass
class EvalSpec:
    source: SourceSpec | None = None
    max_samples: int = 500
    batch_size: int = 32
    max_new_tokens: int = 8


@dataclass
class DataSpec:
    max_length: int = 512
    # Pack several samples per row up to max_length (first-fit decreasing, never splitting a sample);
    # documents are kept apart by the interval attention layout, so it needs model.attention with
    # mode mma or a backend other than sdpa.
    packing: bool = False
    max_bad_fraction: float = 0.05  # abort once more than this fraction of samples was rejected
    min_samples_before_abort: int = 100


@dataclass
class RunSpec:
    output_dir: str = "runs/default"
    seed: int = 0
    dtype: Literal["fp32", "bf16"] = "fp32"
    deepspeed: str = "configs/deepspeed/zero0.json"
    log_every: int = 10
    threads: int = 0  # torch intra-op threads per process; 0 = cores / local processes
    dist_timeout_s: int = 600  # a rank that hangs longer than this fails the run
    # A NaN/Inf loss or gradient on any rank: `stop` the run, or `skip` the optimizer step on every rank
    # (parameters and optimizer state unchanged; the event is logged with the step and sample keys).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    keep_last_n: int = 2  # committed checkpoints kept per stage (the newest is never deleted)
    watchdog_s: int = 0  # > 0: dump every thread's stack when one step takes longer than this
    # Memory savers: recompute activations in the backward (`full`: whole decoder layers, every
    # `checkpoint_every`-th one; `selective`: only the FFNs, whose activations are the largest).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    checkpoint_every: int = 1
    compile: bool = False  # torch.compile each decoder layer
    compile_backend: str = "inductor"
    peak_tflops: float | None = None  # the device's peak for MFU; None = look the GPU up (no MFU on CPU)


    def validate(self):
        if self.keep_last_n < 1:
            raise ConfigError(f"keep_last_n must be >= 1 (the newest checkpoint is always kept), got {self.keep_last_n}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.dist_timeout_s < 1:
            raise ConfigError(f"dist_timeout_s must be >= 1, got {self.dist_timeout_s}")


@dataclass
class RunConfig:
    run: RunSpec = field(default_factory=RunSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    stages: list[StageSpec] = field(default_factory=list)

    def validate(self):
        if not self.stages:
            raise ConfigError("the recipe has no stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        attention = self.model.attention
        if self.data.packing and attention.mode == "causal" and attention.backend == "sdpa":
            raise ConfigError("data.packing needs the interval attention layout (documents must not see each "
                              "other): set model.attention.backend to auto, triton, flex or reference, or use "
                              "mode mma; the backbone's own causal SDPA has no document boundaries")
        upcycled = [s.name for s in self.stages if s.upcycle is not None]
        if self.model.moe is not None and upcycled:
            raise ConfigError(f"model.moe already builds MoE layers; stage(s) {upcycled} cannot upcycle them")
        if len(upcycled) > 1:
            raise ConfigError(f"only one stage can upcycle the model, got {upcycled}")
        evaluated = [s.name for s in self.stages if s.eval]
        if evaluated and self.eval.source is None:
            raise ConfigError(f"stage(s) {evaluated} ask for eval but the recipe has no eval.source")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """defaults < YAML < `key=value` overrides."""
    data = apply_overrides(load_yaml(path), overrides or [])
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
