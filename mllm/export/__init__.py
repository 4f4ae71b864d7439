"""mllm.export: a trained model -> a folder that loads with torch + transformers alone.

`export_model(source, out_dir)` accepts a run folder, a saved model folder, a training checkpoint (any
ZeRO stage) or a LoRA adapter, and writes Llava weights (sharded safetensors), the Llava processor, a
model card and, by default, mllm's flat remote code (`format="mllm"`, loaded with
`trust_remote_code=True`; it also carries MMA attention and MoE layers). `format="llava"` writes a
plain transformers Llava checkpoint for dense causal models. Writing is atomic: everything goes to
`<out_dir>.tmp`, renamed to `out_dir` only when complete, and a non-empty `out_dir` is never touched.
`verify_export` reloads the result with `AutoModelForImageTextToText` / `AutoProcessor` and compares
logits with our model.

Nothing heavy is imported here: `mllm.vision` imports `mllm.export.open_clip_to_hf`, which runs this
file first, so importing the model library at module level would be circular.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from mllm.export.remote_code import has_remote_code  # torch-free, safe to import eagerly

logger = logging.getLogger(__name__)

# Largest logit difference `verify_export` accepts. fp32 on both sides; the models run the same ops
# in the same order except open_clip's fused-qkv attention vs CLIP's q/k/v projections (~1e-6).
VERIFY_ATOL = 1e-4
VERIFY_PROMPT = "What is in the image?"


class ExportVerificationError(RuntimeError):
    """The exported checkpoint does not reproduce the model it was exported from."""


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"export target {out_dir} already exists and is not an empty folder; nothing was written. "
            "Choose another out_dir or remove it yourself"
        )


def load_mllm(model_dir: str | os.PathLike, dtype=None):
    """Our model (eval mode) and processor from a folder written by `save_pretrained`."""
    from mllm.modeling import MLLMForConditionalGeneration
    from mllm.processing import MLLMProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a saved mllm model (no config.json); pass the folder written by "
            "model.save_pretrained + processor.save_pretrained (e.g. runs/<name>/model)"
        )
    model = MLLMForConditionalGeneration.from_pretrained(model_dir, dtype=dtype or "auto").eval()
    processor = MLLMProcessor.from_pretrained(model_dir)
    return model, processor


FORMATS = ("mllm", "llava")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def default_description(config, format: str = "mllm") -> str:
    vision = config.vision_config
    tower = getattr(vision, "model_name", None) or vision.model_type
    extensions = []
    if config.uses_interval_attention and config.attention.get("mode", "causal") != "causal":
        extensions.append("modality-mutual attention (image tokens also see the question after them)")
    if config.moe is not None:
        groups = config.moe.get("experts") if config.moe.get("modality_aware", True) else config.moe.get("num_experts")
        extensions.append(f"modality-aware MoE FFNs (experts {groups}, top-{config.moe.get('top_k')})")
    text = (
        f"A LLaVA-style vision-language model trained with mllm: {tower} vision tower (layer "
        f"{config.vision_feature_layer}, {config.num_image_tokens} tokens per image), {config.projector_depth}-layer "
        f"{config.projector_hidden_act} MLP projector, {config.text_config.model_type} language model"
        + (f", with {' and '.join(extensions)}" if extensions else "") + "."
    )
    if format == "llava":
        return text + " Stored as a plain transformers `LlavaForConditionalGeneration` (no remote code)."
    return text + (" Load with `trust_remote_code=True`: the flat remote-code files beside the weights import only "
                   "torch and transformers (mllm, open_clip and triton are not needed).")


def _torch_dtype(dtype: str | None):
    import torch

    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


def save_export(
    model,
    processor,
    out_dir: str | os.PathLike,
    *,
    format: str = "mllm",
    dtype: str | None = None,
    max_shard_size: str | int = "2GB",
    metrics: dict | None = None,
    base_model: str | list[str] | None = None,
    base_model_relation: str | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
    recipe: str | None = None,
    description: str | None = None,
    share_weights: bool = False,
) -> Path:
    """Convert an in-memory model + processor and write the export folder atomically.

    `format="mllm"` (default): Llava weights plus mllm's flat remote code (`config.json` `auto_map`), which
    also carries MMA attention and MoE layers. `format="llava"`: a plain transformers Llava checkpoint,
    for dense causal models only. `dtype` (fp32 | bf16 | fp16) casts the saved weights.
    """
    from mllm.export.llava import to_llava, to_llava_processor
    from mllm.export.model_card import write_model_card
    from mllm.export.remote_code import write_remote_code

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    torch_dtype = _torch_dtype(dtype)
    out_dir = Path(out_dir)
    _check_target(out_dir)
    # Convert before touching the disk: an unexportable model fails without leaving anything behind.
    remote = format == "mllm"
    llava = to_llava(model, share_weights=share_weights, remote_code=remote)
    if torch_dtype is not None:
        llava = llava.to(torch_dtype)
    llava_processor = to_llava_processor(processor, model.config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        logger.warning("removing %s left by an interrupted export", tmp)
        shutil.rmtree(tmp)
    try:
        llava.save_pretrained(tmp, max_shard_size=max_shard_size)
        llava_processor.save_pretrained(tmp)
        if remote:
            attention = model.config.attention if model.config.uses_interval_attention else {}
            write_remote_code(tmp, mma_mode=attention.get("mode"),
                              mma_assistant_token_id=attention.get("assistant_token_id"), moe=model.config.moe,
                              mod=model.config.mod, moh=model.config.moh, compression=model.config.compression,
                              token_pruning=model.config.token_pruning)
        write_model_card(
            tmp,
            base_model=base_model,
            base_model_relation=base_model_relation,
            datasets=datasets,
            license=license,
            description=description or default_description(model.config, format),
            metrics=metrics,
            recipe=recipe,
            model_id=out_dir.name,
            remote_code=remote,
        )
        _check_target(out_dir)  # something may have appeared there while we were writing
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s checkpoint to %s", format, out_dir)
    return out_dir


def save_as_llava(model, processor, out_dir: str | os.PathLike, **kwargs) -> Path:
    """`save_export(..., format="llava")`: a plain transformers Llava checkpoint."""
    return save_export(model, processor, out_dir, format="llava", **kwargs)


def export_model(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_shard_size: str | int = "2GB",
    metrics: dict | None = None,
    *,
    format: str = "mllm",
    dtype: str | None = None,
    base: str | os.PathLike | None = None,
    merge_lora: bool = False,
    base_model: str | list[str] | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
    description: str | None = None,
) -> Path:
    """Export `source` (a run folder, a saved model folder, a training checkpoint of any ZeRO stage, a stage's
    `final/`, or a LoRA adapter with `merge_lora`) into `out_dir`.

    Raises FileExistsError for a non-empty `out_dir` (before loading anything) and ValueError for models the
    chosen format cannot represent (see `mllm.export.llava.check_llava_exportable`).
    """
    from mllm.export.inputs import load_export_source

    _check_target(Path(out_dir))
    loaded = load_export_source(source, base=base, merge_lora=merge_lora)  # an ExportSource passes through
    return save_export(
        loaded.model, loaded.processor, out_dir, format=format, dtype=dtype, max_shard_size=max_shard_size,
        metrics=metrics if metrics is not None else loaded.metrics, base_model=base_model or loaded.base_model,
        base_model_relation=loaded.base_model_relation, datasets=datasets or loaded.datasets, license=license,
        recipe=loaded.recipe, description=description, share_weights=True,
    )


def verification_inputs(image_size: int):
    """One synthetic image (fixed seed) and a one-turn chat messages list that shows it."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VERIFY_PROMPT}]}]
    return Image.fromarray(pixels), messages


def verify_export(out_dir: str | os.PathLike, reference, atol: float = VERIFY_ATOL) -> float:
    """Reload `out_dir` with plain transformers and compare with `reference` (a saved model folder, or an
    in-memory `(model, processor)` pair); returns the max |logit diff|.

    Both run in fp32 on one synthetic image and a chat prompt; the two processors must give identical
    input_ids. A reduced-precision export is compared with the reference's weights rounded to that dtype
    (the only change the cast makes). Raises ExportVerificationError beyond `atol`.
    """
    import copy

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if isinstance(reference, (str, os.PathLike)):
        model, processor = load_mllm(reference, dtype=torch.float32)
    else:
        model, processor = reference
    remote = has_remote_code(out_dir)
    exported = AutoModelForImageTextToText.from_pretrained(out_dir, trust_remote_code=remote).eval()
    saved_dtype = next(exported.parameters()).dtype
    if saved_dtype != torch.float32:  # round the weights (not buffers such as rotary inv_freq) like the cast did
        model = copy.deepcopy(model)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(saved_dtype).float())
    exported = exported.float()
    model = model.float().eval()
    exported_processor = AutoProcessor.from_pretrained(out_dir, trust_remote_code=remote)

    vision = model.config.vision_config
    image, messages = verification_inputs(vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0])
    ours = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True))
    prompt = exported_processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = exported_processor(images=[image], text=prompt, return_tensors="pt")
    if not torch.equal(ours["input_ids"], theirs["input_ids"]):
        raise ExportVerificationError(
            f"{out_dir}: the exported processor tokenizes the prompt differently "
            f"({theirs['input_ids'].tolist()} vs ours {ours['input_ids'].tolist()})"
        )
    with torch.no_grad():
        want = model(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"],
                     attention_mask=ours["attention_mask"]).logits
        got = exported(**theirs).logits
    diff = float((got - want).abs().max())
    if not diff < atol:
        raise ExportVerificationError(f"{out_dir}: logits differ from the reference by {diff:.3g} (> {atol:g})")
    return diff


def __getattr__(name: str):
    # Lazy re-exports (see the module docstring for why they cannot be eager).
    if name in ("to_llava", "to_llava_processor", "check_llava_exportable"):
        from mllm.export import llava

        return getattr(llava, name)
    if name == "write_model_card":
        from mllm.export.model_card import write_model_card

        return write_model_card
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ExportVerificationError",
    "check_llava_exportable",
    "export_model",
    "has_remote_code",
    "load_mllm",
    "save_as_llava",
    "save_export",
    "to_llava",
    "to_llava_processor",
    "verify_export",
    "write_model_card",
]
