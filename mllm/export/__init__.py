"""mllm.export: trained run folder -> a checkpoint that loads with plain transformers.

`export_model(model_dir, out_dir)` writes a transformers Llava checkpoint (sharded safetensors, the
Llava processor, a model card), atomically: everything goes to `<out_dir>.tmp`, which is renamed to
`out_dir` only when complete, and a non-empty `out_dir` is never touched. `verify_export` reloads the
result with `AutoModelForImageTextToText` / `AutoProcessor` and compares logits with our model.

Nothing heavy is imported here: `mllm.vision` imports `mllm.export.open_clip_to_hf`, which runs this
file first, so importing the model library at module level would be circular.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

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


def default_description(config) -> str:
    vision = config.vision_config
    tower = getattr(vision, "model_name", None) or vision.model_type
    return (
        f"A LLaVA-style vision-language model trained with mllm and exported as a plain transformers "
        f"`LlavaForConditionalGeneration`: {tower} vision tower (layer {config.vision_feature_layer}, "
        f"{config.num_image_tokens} tokens per image), {config.projector_depth}-layer "
        f"{config.projector_hidden_act} MLP projector, {config.text_config.model_type} language model."
        + (" Trained with modality-mutual attention (image tokens also see the question after them):"
           " load with `trust_remote_code=True` (the flat remote-code files beside the weights import only"
           " torch and transformers)." if config.uses_interval_attention else "")
    )


def save_as_llava(
    model,
    processor,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: str | int = "2GB",
    metrics: dict | None = None,
    base_model: str | list[str] | None = None,
    description: str | None = None,
    share_weights: bool = False,
) -> Path:
    """Convert an in-memory model + processor and write the Llava checkpoint folder atomically."""
    from mllm.export.llava import to_llava, to_llava_processor
    from mllm.export.model_card import write_model_card

    out_dir = Path(out_dir)
    _check_target(out_dir)
    # Convert before touching the disk: an unexportable model fails without leaving anything behind.
    mma = model.config.attention if model.config.uses_interval_attention else None
    llava = to_llava(model, share_weights=share_weights, with_mma_remote_code=mma is not None)
    llava_processor = to_llava_processor(processor, model.config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        logger.warning("removing %s left by an interrupted export", tmp)
        shutil.rmtree(tmp)
    try:
        llava.save_pretrained(tmp, max_shard_size=max_shard_size)
        llava_processor.save_pretrained(tmp)
        if mma is not None:
            write_mma_remote_code(tmp, mma)
        write_model_card(
            tmp,
            base_model=base_model,
            description=description or default_description(model.config),
            metrics=metrics,
            model_id=out_dir.name,
        )
        _check_target(out_dir)  # something may have appeared there while we were writing
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported Llava checkpoint to %s", out_dir)
    return out_dir


REMOTE_FILES = ("configuration_mllm_llava.py", "modeling_mllm_llava.py")


def has_remote_code(folder: str | os.PathLike) -> bool:
    """True for exports that need `trust_remote_code=True` (MMA models)."""
    return (Path(folder) / "modeling_mllm_llava.py").is_file()


def write_mma_remote_code(folder: Path, attention: dict) -> None:
    """Make a saved Llava folder load as Llava + modality-mutual attention (`trust_remote_code=True`).

    The weights stay a plain Llava checkpoint; config.json points the Auto classes at the remote code
    (flat sibling files importing only torch + transformers) and records the MMA settings.
    """
    import json

    from mllm.attention import layout

    remote = Path(__file__).parent / "remote"
    for name in REMOTE_FILES:
        shutil.copy(remote / name, folder / name)
    shutil.copy(layout.__file__, folder / "mma_layout.py")  # torch-only: one source for the layout
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.update(
        model_type="mllm_mma_llava",
        architectures=["MMALlavaForConditionalGeneration"],
        auto_map={"AutoConfig": "configuration_mllm_llava.MMALlavaConfig",
                  "AutoModelForImageTextToText": "modeling_mllm_llava.MMALlavaForConditionalGeneration"},
        mma_mode=attention.get("mode", "mma"),
        mma_assistant_token_id=attention["assistant_token_id"],
    )
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_shard_size: str | int = "2GB",
    metrics: dict | None = None,
    *,
    base_model: str | list[str] | None = None,
    description: str | None = None,
) -> Path:
    """Export the model saved in `model_dir` as a transformers Llava checkpoint in `out_dir`.

    Raises FileExistsError for a non-empty `out_dir` (before loading anything) and ValueError for
    models Llava cannot represent (see `mllm.export.llava.check_llava_exportable`).
    """
    _check_target(Path(out_dir))
    model, processor = load_mllm(model_dir)
    return save_as_llava(
        model, processor, out_dir, max_shard_size=max_shard_size, metrics=metrics,
        base_model=base_model, description=description, share_weights=True,
    )


def verification_inputs(image_size: int):
    """One synthetic image (fixed seed) and a one-turn chat messages list that shows it."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VERIFY_PROMPT}]}]
    return Image.fromarray(pixels), messages


def verify_export(out_dir: str | os.PathLike, model_dir: str | os.PathLike, atol: float = VERIFY_ATOL) -> float:
    """Reload `out_dir` with plain transformers and compare with `model_dir`; returns max |logit diff|.

    Both models run in fp32 on one synthetic image and a chat prompt; the two processors must give
    identical input_ids. Raises ExportVerificationError when anything differs beyond `atol`.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = load_mllm(model_dir, dtype=torch.float32)
    remote = has_remote_code(out_dir)
    exported = AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32,
                                                           trust_remote_code=remote).eval()
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
        raise ExportVerificationError(f"{out_dir}: logits differ from {model_dir} by {diff:.3g} (> {atol:g})")
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
    "load_mllm",
    "save_as_llava",
    "to_llava",
    "to_llava_processor",
    "verify_export",
    "write_model_card",
]
