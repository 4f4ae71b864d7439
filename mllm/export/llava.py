"""Convert a dense `MLLMForConditionalGeneration` into a plain transformers `LlavaForConditionalGeneration`.

Our module names already are Llava's (`model.vision_tower`, `model.multi_modal_projector`,
`model.language_model`, `lm_head`), so the conversion is a config translation plus a strict state-dict
copy. The only tensor rewrite is the vision tower of open_clip models, which becomes a
`CLIPVisionModel` (`open_clip_to_hf`). Everything Llava cannot compute exactly (projector depth other
than 2, MoE / MoD / MoH / attention-layout / compression sections, unmerged LoRA) is rejected with a
ValueError rather than exported as a model that silently computes something else.

Two conventions differ between the models and are translated here:
- SigLIP towers have no CLS token. Our "default" strategy drops CLS only when there is one, while
  Llava's always drops the first token, so SigLIP exports use Llava's "full" strategy.
- `LlavaProcessor` expands `<image>` to `(H // patch)(W // patch) + num_additional_image_tokens`,
  minus one for "default"; CLS towers set `num_additional_image_tokens=1`. `to_llava_processor`
  checks the expansion against our `num_image_tokens` on a real image before returning.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedConfig

from mllm.configuration import MLLMConfig, OpenCLIPVisionConfig
from mllm.modeling import MLLMForConditionalGeneration
from mllm.vision import has_cls_token

# Optional MLLMConfig sections that change the computation; Llava has none of them.
EXTENSION_SECTIONS = ("moe", "mod", "moh", "attention", "compression", "token_pruning")
# Llava's LlavaMultiModalProjector is exactly linear_1 -> act -> linear_2.
LLAVA_PROJECTOR_DEPTH = 2
# The chat template (mllm/tokenizer.py) ends every turn with this token; generation stops on it.


# ----------------------------------------------------------------------------- checks


def _section_is_active(section) -> bool:
    """A section is off when absent, empty, or explicitly `enabled: false`; anything else is on."""
    if section is None or section is False:
        return False
    if isinstance(section, Mapping):
        return bool(section) and section.get("enabled", True) is not False
    return getattr(section, "enabled", True) is not False


# Sections the export's remote code (mllm/export/remote) computes exactly.
REMOTE_SECTIONS = ("attention", "moe", "mod", "moh", "compression", "token_pruning")


def check_llava_exportable(config: MLLMConfig, remote_code: bool = False) -> None:
    """Raise a ValueError naming every part of `config` that the export cannot represent.

    `remote_code`: the export carries mllm's remote code, which computes the `REMOTE_SECTIONS` too;
    otherwise it is a plain Llava checkpoint.
    """
    problems = []
    if config.projector_depth != LLAVA_PROJECTOR_DEPTH:
        problems.append(
            f"projector_depth={config.projector_depth} (Llava's projector is exactly linear_1 -> act -> "
            f"linear_2, i.e. depth {LLAVA_PROJECTOR_DEPTH}); train with projector.depth: 2 to export as Llava"
        )
    for name in EXTENSION_SECTIONS:
        if name in REMOTE_SECTIONS and remote_code:
            continue
        section = getattr(config, name, None)
        if _section_is_active(section):
            problems.append(
                f"the {name!r} section is set ({section!r}); " + (
                    f"a plain Llava checkpoint has no {name} layers: export with --format mllm (remote code)"
                    if name in REMOTE_SECTIONS else f"the export cannot carry {name} layers yet")
            )
    if remote_code and _section_is_active(config.token_pruning) and config.uses_interval_attention:
        problems.append("token_pruning together with the attention section: the export's MMA attention cannot "
                        "take a pruned layer's mask yet")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer={config.vision_feature_layer!r} is not a single layer index")
    if problems:
        raise ValueError("cannot export this model as a transformers Llava checkpoint: " + "; ".join(problems))


def _check_no_lora(model: nn.Module) -> None:
    lora = [name for name, _ in model.named_parameters() if "lora_" in name or ".base_layer." in name]
    if lora:
        raise ValueError(
            f"the model still holds LoRA adapters (e.g. {lora[0]!r}); merge them first "
            "(peft: `model = model.merge_and_unload()`), then export"
        )


# ----------------------------------------------------------------------------- config


def llava_vision_feature_select_strategy(config: MLLMConfig) -> str:
    """Llava's strategy computing our selection: Llava's "default" always drops token 0."""
    return config.vision_feature_select_strategy if has_cls_token(config.vision_config) else "full"


def _hf_vision_tower(model: MLLMForConditionalGeneration) -> nn.Module:
    """The transformers vision model Llava will hold (open_clip towers are converted)."""
    tower = model.model.vision_tower
    if isinstance(model.config.vision_config, OpenCLIPVisionConfig):
        from mllm.export.open_clip_to_hf import open_clip_visual_to_hf

        return open_clip_visual_to_hf(tower.visual)
    return tower


def llava_config(config: MLLMConfig, vision_config: PreTrainedConfig, remote_code: bool = False) -> LlavaConfig:
    """The LlavaConfig of our model, given the (transformers-native) vision config of its tower."""
    check_llava_exportable(config, remote_code)
    return LlavaConfig(
        vision_config=copy.deepcopy(vision_config).to_dict(),
        text_config=copy.deepcopy(config.text_config).to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.num_image_tokens,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_select_strategy=llava_vision_feature_select_strategy(config),
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=config.tie_word_embeddings,
    )


# ----------------------------------------------------------------------------- weights


def _parts(model: MLLMForConditionalGeneration, vision_tower: nn.Module) -> dict[str, nn.Module]:
    """Llava module prefix -> the module of ours (or the converted tower) holding its tensors."""
    return {
        "model.vision_tower.": vision_tower,
        "model.multi_modal_projector.": model.model.multi_modal_projector,
        "model.language_model.": model.model.language_model,
        "lm_head.": model.lm_head,
    }


def to_llava(model: MLLMForConditionalGeneration, share_weights: bool = False,
             remote_code: bool = False) -> LlavaForConditionalGeneration:
    """A `LlavaForConditionalGeneration` (eval mode) computing exactly what `model` computes.

    Weights are copied (`share_weights=True` makes the Llava model use `model`'s tensors instead, which
    halves peak memory when `model` is discarded right after, as `export_model` does). The Llava model
    is built on the meta device and receives the tensors with a strict load, so a missing, extra or
    misshapen tensor is an error, never a silently random-initialised layer.

    `remote_code`: the result will be saved with mllm's remote code, so the language model keeps its MoE
    blocks (the remote model rebuilds them from `config.moe`).
    """
    check_llava_exportable(model.config, remote_code)
    _check_no_lora(model)
    vision_tower = _hf_vision_tower(model)
    config = llava_config(model.config, vision_tower.config, remote_code)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
        if model.config.moe is not None:
            from mllm.sparse.upcycle import build_moe_layers

            std = getattr(model.config.text_config, "initializer_range", 0.02)
            build_moe_layers(llava.model.language_model, model.config.moe, std)
        if model.config.mod is not None or model.config.moh is not None:
            from mllm.sparse.depth import build_dynamic_layers

            build_dynamic_layers(llava.model.language_model, model.config)
        if model.config.compression is not None:  # pixel_shuffle's widened projector
            llava.model.multi_modal_projector.linear_1 = nn.Linear(
                *model.model.multi_modal_projector.linear_1.weight.shape[::-1],
                bias=model.config.multimodal_projector_bias)
        if model.config.token_pruning is not None:  # the exit gates' parameters
            from mllm.compression.pruning import TokenPruningSpec, apply_pruning
            from mllm.sparse.moe import decoder_layers

            apply_pruning(decoder_layers(llava.model.language_model),
                          TokenPruningSpec.from_config(model.config.token_pruning), "sdpa")

    parts = _parts(model, vision_tower)
    state = {prefix + key: value for prefix, part in parts.items() for key, value in part.state_dict().items()}
    if not share_weights:
        state = {key: value.detach().clone() for key, value in state.items()}
    llava.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq, CLIP position_ids) are not in any state dict: take them
    # from the module that owns the same buffer on our side.
    for prefix, part in parts.items():
        for key, buffer in part.named_buffers():
            owner_name, _, buffer_name = (prefix + key).rpartition(".")
            owner = llava.get_submodule(owner_name)
            if owner._buffers.get(buffer_name) is not None and owner._buffers[buffer_name].is_meta:
                owner._buffers[buffer_name] = buffer.clone()
    leftover = [name for name, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"Llava export left tensors uninitialised: {leftover[:5]}; this is a bug in mllm.export")
    if config.tie_word_embeddings:
        llava.tie_weights()
    llava.generation_config = copy.deepcopy(model.generation_config)
    return llava.eval()


# ----------------------------------------------------------------------------- processor


def _probe_image(size: int = 64):
    from PIL import Image

    # Non-square on purpose: an image processor that does not crop to the tower's square input
    # shows up as a token-count mismatch here instead of at inference time.
    return Image.new("RGB", (size + 16, size), (127, 64, 32))


def llava_image_processor(processor):
    """The image processor of the export, preprocessing exactly as the model was trained.

    `resize`: ours as is. `pad` (LLaVA-1.5's pad-to-square with the mean colour): transformers'
    `LlavaImageProcessor(do_pad=True)` with the same resize / crop / normalisation computes the same pixels.
    `anyres` (a thumbnail plus tiles per image) has no Llava equivalent and is refused."""
    aspect = getattr(processor, "image_aspect", "resize")
    if aspect == "resize":
        return processor.image_processor
    if aspect == "anyres":
        raise ValueError(
            f"the model was trained with data.image_aspect=anyres (a thumbnail plus tiles per image, grids "
            f"{getattr(processor, 'anyres_grids', None)}); LlavaProcessor expands <image> to one crop and cannot "
            "tile, so the export would see different inputs. Use the mllm model folder (mllm eval / generate), or "
            "train with image_aspect pad or resize")
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    source = processor.image_processor
    if not isinstance(source, CLIPImageProcessor):
        raise ValueError(f"image_aspect pad is exported through LlavaImageProcessor(do_pad=True), which needs a "
                         f"CLIP-style image processor; this model has {type(source).__name__}")
    return LlavaImageProcessor(do_pad=True, size=source.size, crop_size=source.crop_size,
                               do_center_crop=source.do_center_crop, resample=source.resample,
                               image_mean=source.image_mean, image_std=source.image_std,
                               do_convert_rgb=True, do_rescale=source.do_rescale, rescale_factor=source.rescale_factor,
                               do_normalize=source.do_normalize)


def to_llava_processor(processor, model_config: MLLMConfig) -> LlavaProcessor:
    """A `LlavaProcessor` producing exactly the input_ids and pixel_values of our `MLLMProcessor`.

    The tokenizer is copied (left padding, as our processor pads for batched generation); the image
    processor is shared as is (open_clip preprocessing is already a `CLIPImageProcessor`).
    """
    vision_config = model_config.vision_config
    patch_size = vision_config.patch_size if isinstance(vision_config.patch_size, int) else vision_config.patch_size[0]
    image_processor = llava_image_processor(processor)
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes
    strategy = llava_vision_feature_select_strategy(model_config)
    extra = 1 if has_cls_token(vision_config) else 0
    if model_config.compression is not None:
        # LlavaProcessor expands <image> to (H // patch)(W // patch) + extra, minus 1 for "default": with the
        # whole image as one patch, `extra` sets any count, e.g. the compressed K.
        patch_size = vision_config.image_size
        extra = model_config.num_image_tokens - 1 + (strategy == "default")
    llava_processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=extra,
    )
    probe = llava_processor(images=[_probe_image()], text=processor.image_token, return_tensors="pt")
    n_tokens = int((probe["input_ids"] == model_config.image_token_id).sum())
    if n_tokens != processor.num_image_tokens or n_tokens != model_config.num_image_tokens:
        raise ValueError(
            f"LlavaProcessor would expand {processor.image_token} to {n_tokens} tokens but the model takes "
            f"{model_config.num_image_tokens} (processor: {processor.num_image_tokens}); pixel_values of shape "
            f"{tuple(probe['pixel_values'].shape)} with patch_size {patch_size}. Make the image processor "
            f"resize and crop to the tower's image_size ({vision_config.image_size})"
        )
    return llava_processor


__all__ = [
    "EXTENSION_SECTIONS",
    "check_llava_exportable",
    "llava_config",
    "llava_vision_feature_select_strategy",
    "to_llava",
    "to_llava_processor",
]
