"""Load an exported Llava checkpoint back as our model: the reverse of `mllm.export.llava`.

`load_llava_as_mllm(folder)` reads a folder written by `save_as_llava` / `export_model` (or any
transformers Llava checkpoint with a CLIP / SigLIP tower) and returns an `MLLMForConditionalGeneration`
and `MLLMProcessor` computing the same function, so LoRA fine-tuning can start from a published export.
No remote code runs: config.json is read as JSON, the weights with safetensors, the processor files
with transformers' own `LlavaProcessor`.

What is translated (the export's choices, undone):
- open_clip towers were exported as `CLIPVisionModel`; they come back as our "clip" tower.
- SigLIP has no CLS token: Llava's "full" strategy is our "default" (see
  `llava.llava_vision_feature_select_strategy`); Llava's "default" on SigLIP drops a real patch, which
  our model cannot express, so it is rejected.
- Remote-code exports carry `mma_mode` / `mma_assistant_token_id` (-> our `attention` section, SDPA
  backend) and `moe` / `mod` / `moh` / `compression` / `token_pruning` (-> our sections of the same names,
  unchanged).

On disk, transformers v5 writes Llava keys in the pre-4.52 layout (`save_pretrained` reverses the
"llava" entry of `transformers.conversion_mapping`): `language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.*`, `multi_modal_projector.*`. Checkpoints saved by 4.52-4.57 use the in-memory names
(`model.language_model.*`, `lm_head.*`), which are ours; both are accepted.

A folder of our own format (`model_type: mllm`, written by `save_pretrained`) is loaded with
`MLLMForConditionalGeneration.from_pretrained` instead, so callers need not tell the two apart.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import GenerationConfig, LlavaConfig, LlavaProcessor
from transformers.initialization import no_init_weights
from transformers.modeling_utils import local_torch_dtype

from mllm.configuration import MLLMConfig
from mllm.modeling import MLLMForConditionalGeneration
from mllm.processing import MLLMProcessor

logger = logging.getLogger(__name__)

# "mllm_llava" / "mllm_mma_llava": remote-code exports (Llava weights + our attention / MoE sections).
LLAVA_MODEL_TYPES = ("llava", "mllm_llava", "mllm_mma_llava")
# config.json keys our exporter adds on top of LlavaConfig; the rest is parsed by LlavaConfig itself.
EXTENSION_KEYS = ("mma_mode", "mma_assistant_token_id", "moe", "mod", "moh", "compression", "token_pruning")
# On-disk key prefix -> our module prefix, first match wins (transformers v5 saves the left column).
ON_DISK_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("language_model.", "model.language_model."),  # backbones whose base model is not called `model`
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
OUR_PREFIXES = ("model.", "lm_head.")  # in-memory names (4.52-4.57 checkpoints) are already ours
# Llava's "default" drops token 0; ours drops it only for towers that have a CLS token.
TOWERS = {"clip_vision_model": True, "siglip_vision_model": False}  # model_type -> has a CLS token
MAX_LISTED = 8  # keys named in an error message


# ----------------------------------------------------------------------------- folder and config


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the folder an export was written to")
    path = folder / "config.json"
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:MAX_LISTED]
        raise FileNotFoundError(
            f"{folder} is not an exported checkpoint: it has no config.json (found: {found or 'nothing'}). "
            "Pass the folder written by `mllm export` / save_as_llava"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def is_llava_export(folder: str | os.PathLike) -> bool:
    """True when `folder/config.json` names a Llava model type this module loads."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") in LLAVA_MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def _vision_strategy(llava: LlavaConfig, folder: Path) -> str:
    strategy = llava.vision_feature_select_strategy
    if TOWERS[llava.vision_config.model_type]:  # CLS tower: the strategies mean the same on both sides
        return strategy
    if strategy == "full":
        return "default"  # no CLS: our "default" keeps every token, as Llava's "full" does
    raise ValueError(
        f"{folder}: vision_feature_select_strategy 'default' with a SigLIP tower drops the first patch token "
        "(SigLIP has no CLS token); mllm cannot express that. Llava exports of mllm models use 'full'"
    )


def _attention_section(raw: dict, folder: Path) -> dict | None:
    from mllm.attention.layout import MODES

    mode = raw.get("mma_mode")
    if mode is None or mode == "causal":
        return None
    if mode not in MODES:
        raise ValueError(f"{folder}/config.json: mma_mode {mode!r} is unknown; valid: {', '.join(MODES)}")
    if not isinstance(raw.get("mma_assistant_token_id"), int):
        raise ValueError(f"{folder}/config.json: mma_mode {mode!r} needs an integer mma_assistant_token_id "
                         f"(the assistant-turn token), got {raw.get('mma_assistant_token_id')!r}")
    return {"mode": mode, "backend": "sdpa", "assistant_token_id": raw["mma_assistant_token_id"]}


def mllm_config_from_llava(raw: dict, folder: str | os.PathLike = "<config>") -> MLLMConfig:
    """Our config for a Llava config.json (as a dict); raises ValueError for what we cannot represent."""
    folder = Path(folder)
    llava_fields = {k: v for k, v in raw.items() if k not in EXTENSION_KEYS + ("model_type", "auto_map")}
    llava = LlavaConfig.from_dict(llava_fields)  # fills LlavaConfig's defaults for absent keys
    tower = llava.vision_config.model_type
    if tower not in TOWERS:
        raise ValueError(f"{folder}: vision tower {tower!r} is not supported; mllm loads {', '.join(TOWERS)}")
    if not isinstance(llava.vision_feature_layer, int):
        raise ValueError(f"{folder}: vision_feature_layer={llava.vision_feature_layer!r}; mllm selects one layer")
    strategy, attention = _vision_strategy(llava, folder), _attention_section(raw, folder)
    try:
        config = MLLMConfig(
            vision_config=llava.vision_config,
            text_config=llava.text_config,
            image_token_id=llava.image_token_index,
            vision_feature_layer=llava.vision_feature_layer,
            vision_feature_select_strategy=strategy,
            projector_hidden_act=llava.projector_hidden_act,
            projector_depth=2,  # LlavaMultiModalProjector: linear_1 -> act -> linear_2
            multimodal_projector_bias=llava.multimodal_projector_bias,
            tie_word_embeddings=llava.tie_word_embeddings,
            attention=attention,
            moe=raw.get("moe"),
            mod=raw.get("mod"),
            moh=raw.get("moh"),
            compression=raw.get("compression"),
            token_pruning=raw.get("token_pruning"),
        )
    except ValueError as e:  # e.g. a bad moe section, named by MoESpec
        raise ValueError(f"{folder}/config.json: {e}") from None
    seq_length = raw.get("image_seq_length")
    if seq_length is not None and seq_length != config.num_image_tokens:
        raise ValueError(
            f"{folder}/config.json: image_seq_length={seq_length} but the tower gives {config.num_image_tokens} "
            f"image tokens ({tower}, strategy {llava.vision_feature_select_strategy!r}); the config is inconsistent"
        )
    return config


def _resolve_dtype(dtype: torch.dtype | str | None, raw: dict) -> torch.dtype:
    """None / "auto": the dtype the checkpoint was saved in (config.json `dtype`), else float32."""
    if dtype is None or dtype == "auto":
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. torch.float32, 'bfloat16' or None")
        dtype = resolved
    return dtype


# ----------------------------------------------------------------------------- weights


def module_name(disk_key: str) -> str | None:
    """Our state-dict name for a key in a Llava safetensors file (None: not a Llava key)."""
    for disk_prefix, our_prefix in ON_DISK_PREFIXES:
        if disk_key.startswith(disk_prefix):
            return our_prefix + disk_key[len(disk_prefix):]
    return disk_key if disk_key.startswith(OUR_PREFIXES) else None


def checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files of `folder` and the index's key -> file map (empty when unsharded)."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{folder}: the index lists shard(s) that are missing: {absent[:MAX_LISTED]}")
        return files, weight_map
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"], {}
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors", ".pt", ".pth"))
    raise FileNotFoundError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (weight files found: {found or 'none'}); "
        "only safetensors exports are loaded (re-save with save_pretrained(safe_serialization=True))"
    )


def _plan(model: torch.nn.Module, files: list[Path]) -> dict[Path, list[tuple[str, str]]]:
    """Check every on-disk key against the model (names and shapes) before any tensor is read.

    Returns file -> [(disk key, our name)]; raises ValueError listing every problem at once.
    """
    targets = model.state_dict(keep_vars=True)
    plan: dict[Path, list[tuple[str, str]]] = {}
    source: dict[str, str] = {}  # our name -> disk key
    unexpected, mismatched, duplicated = [], [], []
    for path in files:
        plan[path] = []
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                name = module_name(key)
                if name not in targets:
                    unexpected.append(key)
                elif name in source:
                    duplicated.append(f"{key} and {source[name]} -> {name}")
                elif (shape := tuple(f.get_slice(key).get_shape())) != tuple(targets[name].shape):
                    mismatched.append(f"{key}: {shape} on disk, {tuple(targets[name].shape)} in the model")
                else:
                    source[name] = key
                    plan[path].append((key, name))
    missing = [name for name in targets if name not in source and not _is_tied_head(model, name)]
    problems = [f"{label} ({len(keys)}): {keys[:MAX_LISTED]}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched),
                 ("two keys for one tensor", duplicated)) if keys]
    if problems:
        raise ValueError("the checkpoint does not match the model its config.json describes: " + "; ".join(problems))
    return plan


def _listed_but_absent(files: list[Path], weight_map: dict[str, str]) -> list[str]:
    """Keys the index names that no shard holds (a shard rewritten without updating the index)."""
    on_disk: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            on_disk.update(f.keys())
    return sorted(set(weight_map) - on_disk)


def _is_tied_head(model: MLLMForConditionalGeneration, name: str) -> bool:
    # transformers does not save a tied lm_head (it is the input embedding), so it may be absent.
    return name == "lm_head.weight" and model.lm_head.weight is model.get_input_embeddings().weight


def load_llava_weights(model: MLLMForConditionalGeneration, folder: str | os.PathLike) -> None:
    """Copy the Llava safetensors of `folder` into `model`, strictly, one tensor in memory at a time.

    Missing, unexpected, duplicated or misshapen keys raise a ValueError naming them; a tied lm_head may
    be absent (and, when present, must equal the embedding it is tied to).
    """
    folder = Path(folder)
    files, weight_map = checkpoint_files(folder)
    try:
        plan = _plan(model, files)
    except ValueError as e:
        listed_only = _listed_but_absent(files, weight_map)
        hint = f"; the index lists keys absent from their shard: {listed_only[:MAX_LISTED]}" if listed_only else ""
        raise ValueError(f"{folder}: {e}{hint}") from None
    targets = model.state_dict(keep_vars=True)
    tied_head = None
    with torch.no_grad():
        for path, pairs in plan.items():
            with safe_open(path, framework="pt") as f:
                for key, name in pairs:
                    if name == "lm_head.weight" and _is_tied_head(model, name):
                        tied_head = f.get_tensor(key)  # compared once the embedding is loaded
                        continue
                    targets[name].copy_(f.get_tensor(key))
    if tied_head is not None and not torch.equal(tied_head.to(model.lm_head.weight.dtype), model.lm_head.weight):
        raise ValueError(f"{folder}: the config ties lm_head to the input embedding, but the checkpoint's "
                         "lm_head.weight differs from it; set tie_word_embeddings: false in config.json")


# ----------------------------------------------------------------------------- processor


def processor_from_llava(folder: str | os.PathLike, config: MLLMConfig) -> MLLMProcessor:
    """Our processor from the LlavaProcessor files of `folder` (tokenizer, image processor, template).

    Raises ValueError when the saved LlavaProcessor would expand `<image>` to a different number of
    tokens than the model takes (the two processors must give identical input_ids).
    """
    folder = Path(folder)
    llava_processor = LlavaProcessor.from_pretrained(folder)
    tokenizer = llava_processor.tokenizer
    # The export pads left for generation; our processor pads by itself (left for generation, right for
    # training batches), and our tokenizers keep transformers' default, as `load_tokenizer` gives them.
    tokenizer.padding_side = "right"
    tokenizer.init_kwargs["padding_side"] = "right"
    processor = MLLMProcessor(
        image_processor=llava_processor.image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        chat_template=llava_processor.chat_template,
        image_token=llava_processor.image_token,
    )
    if processor.image_token_id != config.image_token_id:
        raise ValueError(f"{folder}: the tokenizer's {processor.image_token!r} is id {processor.image_token_id} "
                         f"but config.json has image_token_index={config.image_token_id}")
    _check_expansion(llava_processor, processor, folder)
    return processor


def _check_expansion(llava_processor: LlavaProcessor, processor: MLLMProcessor, folder: Path) -> None:
    from PIL import Image

    # Non-square: an image processor that does not crop to the square input shows up as a count mismatch.
    probe = Image.new("RGB", (80, 64), (127, 64, 32))
    theirs = llava_processor(images=[probe], text=processor.image_token, return_tensors="pt")
    n = int((theirs["input_ids"] == processor.image_token_id).sum())
    if n != processor.num_image_tokens:
        raise ValueError(
            f"{folder}: the saved LlavaProcessor expands {processor.image_token} to {n} tokens but the model "
            f"takes {processor.num_image_tokens} (patch_size {llava_processor.patch_size}, "
            f"num_additional_image_tokens {llava_processor.num_additional_image_tokens}, pixel_values "
            f"{tuple(theirs['pixel_values'].shape)}); fix processor_config.json / preprocessor_config.json"
        )


# ----------------------------------------------------------------------------- entry point


def load_llava_as_mllm(folder: str | os.PathLike, dtype: torch.dtype | str | None = None):
    """`(MLLMForConditionalGeneration, MLLMProcessor)` from an exported folder, in eval mode.

    `dtype` None (or "auto") keeps the dtype the checkpoint was saved in. Raises FileNotFoundError for a
    folder without config.json or weights and ValueError for a config or checkpoint we cannot load
    exactly. A `model_type: mllm` folder (our own save_pretrained) is loaded with `from_pretrained`.
    """
    folder = Path(folder)
    raw = _read_config(folder)
    model_type = raw.get("model_type")
    dtype = _resolve_dtype(dtype, raw)
    if model_type == "mllm":
        logger.info("%s is an mllm save_pretrained folder, not a Llava export; loading it directly", folder)
        model = MLLMForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
        return model, MLLMProcessor.from_pretrained(folder)
    if model_type not in LLAVA_MODEL_TYPES:
        raise ValueError(
            f"{folder} is not a Llava export: config.json has model_type {model_type!r}; load_llava_as_mllm reads "
            f"{', '.join(LLAVA_MODEL_TYPES)} (and mllm). Other models load with their own from_pretrained"
        )
    config = mllm_config_from_llava(raw, folder)
    config.dtype = dtype
    # Built under the target default dtype, as from_pretrained does (rotary inv_freq stays float32); no
    # random init, since every parameter is overwritten by the strict load below.
    with local_torch_dtype(dtype, MLLMForConditionalGeneration.__name__), no_init_weights():
        model = MLLMForConditionalGeneration(config)
    model.tie_weights()  # no_init_weights also skips the tying that init_weights does
    load_llava_weights(model, folder)
    processor = processor_from_llava(folder, config)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    else:
        from mllm.builder import set_generation_defaults

        set_generation_defaults(model, processor.tokenizer)
    return model.eval(), processor


__all__ = [
    "LLAVA_MODEL_TYPES",
    "checkpoint_files",
    "is_llava_export",
    "load_llava_as_mllm",
    "load_llava_weights",
    "mllm_config_from_llava",
    "module_name",
    "processor_from_llava",
]
