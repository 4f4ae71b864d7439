"""`mllm train RECIPE --dry-run`: resolve and check a recipe without its data or weights.

It validates the config, the DeepSpeed presets and every stage's trainable globs against a tiny
stand-in model of the same kinds (tower type, projector, backbone family), runs one forward and
backward pass on it, and reports which data paths exist. Recipes for 7B models on real datasets can
be checked on a laptop this way before a cluster job is queued.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from mllm.builder import ModelSpec, TextSpec, VisionSpec, build_model_and_processor
from mllm.schema import ConfigError
from mllm.tokenizer import train_tokenizer
from mllm.train.config import RunConfig
from mllm.train.engine import load_deepspeed_config
from mllm.train.parameters import apply_trainable
from mllm.train.trainer import apply_transformations
from mllm.train.paths import missing_data_paths

# 4 layers: deep enough for the default layer choices (token pruning from layer 2, MoD from layer 1).
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8}
STAND_IN_CORPUS = "a red circle at top left. what color is the square? blue. how many shapes are there? two.\n"


def stand_in_spec(spec: ModelSpec, tokenizer_dir: str) -> ModelSpec:
    """Same kinds of parts as `spec`, tiny and offline."""
    tiny = copy.deepcopy(spec)
    if spec.vision.type == "open_clip":
        tiny.vision = VisionSpec(type="open_clip", name="mllm-dry-run-vit", model_cfg={
            "embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                                            "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 256, "width": 32, "heads": 2, "layers": 1}},
            feature_layer=spec.vision.feature_layer, select_strategy=spec.vision.select_strategy)
    else:
        tiny.vision = VisionSpec(type=spec.vision.type, config=dict(TINY_CLIP), feature_layer=spec.vision.feature_layer,
                                 select_strategy=spec.vision.select_strategy)
    model_type = (spec.text.config or {}).get("model_type") or _model_type_of(spec.text.name)
    tiny.text = TextSpec(config={"model_type": model_type, **TINY_TEXT})
    tiny.tokenizer = tokenizer_dir
    return tiny


def _model_type_of(name: str | None) -> str:
    """Backbone family of a hub id / path, read from its config when available, else Llama."""
    if name and os.path.exists(os.path.join(name, "config.json")):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name).model_type
    return "llama"


def check_deepspeed_config(path: str, stage, dtype: str) -> str:
    """DeepSpeed's own validation of the preset (unknown keys under zero_optimization, bad values and the
    batch arithmetic raise), as the engine would see it in one process."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = load_deepspeed_config(path, stage, dtype, world_size=1)
    try:
        parsed = DeepSpeedConfig(config)
    except Exception as exc:  # pydantic ValidationError / AssertionError: name the file and the problem
        raise ConfigError(f"DeepSpeed config {path} (stage {stage.name!r}) is invalid: {exc}") from None
    return f"ZeRO-{parsed.zero_optimization_stage}"


def dry_run(cfg: RunConfig, world_size: int | None = None) -> str:
    from mllm.train.distributed import use_cpu_accelerator_if_needed

    use_cpu_accelerator_if_needed()
    world = world_size or 1
    if world < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world}")
    lines = [f"recipe resolved: {len(cfg.stages)} stage(s), output_dir={cfg.run.output_dir}, world size {world}"]
    for index, stage in enumerate(cfg.stages):
        preset = stage.deepspeed or cfg.run.deepspeed
        zero = check_deepspeed_config(preset, stage, cfg.run.dtype)
        global_batch = stage.micro_batch_size * stage.grad_accum * world
        lines.append(f"stage {index} {stage.name!r}: {preset} ({zero}) valid; global batch {stage.micro_batch_size} "
                     f"x {stage.grad_accum} accum x {world} processes = {global_batch}, "
                     f"{stage.steps} steps = {stage.steps * global_batch:,} samples")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(STAND_IN_CORPUS * 4)
        train_tokenizer([str(corpus)], Path(tmp) / "tokenizer", vocab_size=300)
        model, processor = build_model_and_processor(stand_in_spec(cfg.model, str(Path(tmp) / "tokenizer")))
        for index, stage in enumerate(cfg.stages):
            layers = apply_transformations(model, processor, stage, cfg.run.seed)
            if layers:
                lines.append(f"stage {index} {stage.name!r}: upcycles decoder layers {layers} of the stand-in to MoE")
            if stage.objective == "lm":
                groups = apply_trainable(model, stage)
                trainable = sum(p.numel() for g in groups for p in g["params"])
                lines.append(f"stage {index} {stage.name!r}: objective={stage.objective} steps={stage.steps} "
                             f"micro_batch={stage.micro_batch_size} grad_accum={stage.grad_accum} "
                             f"lr={stage.lr:g}; stand-in trainable params: {trainable:,}")
            else:
                lines.append(f"stage {index} {stage.name!r}: objective={stage.objective} steps={stage.steps}")
        lines.append(f"stand-in forward/backward loss: {stand_in_step(model, processor):.4f}")
    missing = missing_data_paths(cfg)
    lines += [f"data path missing here: {m}" for m in missing] or ["all data paths exist"]
    return "\n".join(lines)


def stand_in_step(model, processor) -> float:
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the square?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "blue."}]}]
    sample = processor.encode_conversation(messages, num_images=1)
    for p in model.parameters():
        p.requires_grad_(True)
    out = model(input_ids=torch.tensor([sample["input_ids"]]), labels=torch.tensor([sample["labels"]]),
                pixel_values=processor.preprocess_images([Image.new("RGB", (64, 64), "blue")]))
    out.loss.backward()
    if not torch.isfinite(out.loss):
        raise ConfigError("the stand-in model produced a non-finite loss")
    return float(out.loss.detach())
