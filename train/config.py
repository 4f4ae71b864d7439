"""The run config: a model spec, data settings, a DeepSpeed preset and an ordered list of stages.

Stages are data: each names its objective, data mixture, trainable parameter globs (with per-group
learning rates), schedule and length. The trainer applies every stage with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mllm.builder import ModelSpec
from mllm.compression.config import CompressionSpec
from mllm.compression.pruning import TokenPruningSpec
from mllm.processing import DEFAULT_ANYRES_GRIDS, check_image_settings
from mllm.schema import ConfigError, apply_overrides, from_dict, load_yaml
from mllm.sparse.config import UpcycleSpec
from mllm.sparse.mod import MoDSpec
from mllm.sparse.moh import MoHSpec
from mllm.train.lora import PeftSpec


@dataclass
class SourceSpec:
    type: Literal["webdataset", "llava_json"] = "webdataset"
    path: str = ""
    image_root: str | None = None
    weight: float = 1.0
    # Keep only these question types of each sample (e.g. hold one out of a stage); None keeps all.
    question_types: list[str] | None = None
    # webdataset `pipe:` shards are copied here once (None: $MLLM_SHARD_CACHE or <tmp>/mllm-shard-cache).
    cache_dir: str | None = None

    def validate(self):
        if not self.path:
            raise ConfigError("data source needs a path")
        if self.weight <= 0:
            raise ConfigError(f"source weight must be > 0, got {self.weight}")
        if self.cache_dir is not None and self.type != "webdataset":
            raise ConfigError(f"cache_dir is for webdataset pipe: shards; this source is {self.type}")


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
    # Convert the trained dense model to Mixture-of-Depths over image tokens / Mixture-of-Head attention
    # (routers start at zero: the converted model starts at the dense one).
    mod: MoDSpec | None = None
    moh: MoHSpec | None = None
    # Compress the trained uncompressed model's image tokens before the LLM from this stage on (pixel_shuffle's
    # wider projector starts as average pooling), or prune them inside the LLM (fastv / exit; exit gates start
    # closed). Both start from the trained weights, so the stage fine-tunes the model to its fewer tokens.
    compression: CompressionSpec | None = None
    token_pruning: TokenPruningSpec | None = None
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
    # Pack several samples per row up to max_length (longest first, then the best-filling subset; never
    # splitting a sample); documents are kept apart by the interval attention layout, so it needs
    # model.attention with mode mma or a backend other than sdpa.
    packing: bool = False
    # Padded batches sorted by length inside each window (like HF's group_by_length), so less padding.
    group_by_length: bool = False
    # How many of a rank's samples are read ahead and packed / length-grouped together, rounded up to
    # whole optimizer steps (0: one step). Bigger packs tighter: on the demo VQA mix, rows of 128 tokens,
    # 32 samples leave 8.1% padding and 256 3.3% (scripts/bench_data.py). The window is a pure function
    # of the data position, so resume stays exact; it costs memory for that many encoded samples. Across
    # a window's steps the samples are redistributed, so 1 vs N processes agree per window, not per step.
    buffer_size: int = 0
    # Images: `resize` (the image processor's resize + centre crop), `pad` (LLaVA-1.5: pad to a square
    # with the processor's mean colour first, so nothing is cropped) or `anyres` (LLaVA-NeXT: that padded
    # thumbnail plus tiles of the tower's input size, cut row-major from the image fitted onto the best
    # of `anyres_grids`; one <image> then takes (1 + tiles) x num_image_tokens tokens, so budget
    # max_length for it). Saved in the processor of the run's model folder (processor_config.json), so
    # eval / generate / export preprocess as training did. The Llava export cannot express anyres.
    image_aspect: Literal["resize", "pad", "anyres"] = "resize"
    # anyres: candidate grids as [columns, rows] of tiles (LLaVA-NeXT's (width, height) order). An image
    # takes the grid wasting the least canvas once fitted (aspect ratio), then the one upscaling least.
    anyres_grids: list[list[int]] = field(default_factory=lambda: [list(g) for g in DEFAULT_ANYRES_GRIDS])
    # DataLoader worker processes that read, decode, preprocess, tokenize and collate (0: in the training
    # process); each keeps `prefetch_factor` windows ready. Batches are identical for any worker count.
    num_workers: int = 0
    prefetch_factor: int = 2
    max_bad_fraction: float = 0.05  # abort once more than this fraction of samples was rejected
    min_samples_before_abort: int = 100

    def validate(self):
        for name in ("num_workers", "buffer_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {self.max_length}")
        try:
            check_image_settings(self.image_aspect, self.anyres_grids)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.packing and self.group_by_length:
            raise ConfigError("packing and group_by_length are alternatives (packing already fills rows "
                              "by length); set one of them")


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
        for section in ("mod", "moh", "compression", "token_pruning"):
            converting = [s.name for s in self.stages if getattr(s, section) is not None]
            if getattr(self.model, section) is not None and converting:
                raise ConfigError(f"model.{section} already builds these layers; stage(s) {converting} cannot convert")
            if len(converting) > 1:
                raise ConfigError(f"only one stage can set {section}, got {converting}")
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
