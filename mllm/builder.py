"""Typed model specs (the `model:` section of a recipe) and the one function that builds from them.

A spec names each part: the vision tower (open_clip name + architecture/weights, or a transformers
CLIP / SigLIP id, path or config), the projector, the backbone (any causal LM by hub id, local path
or config dict) and the tokenizer. `build_model_and_processor` turns it into an
`MLLMForConditionalGeneration` and its `MLLMProcessor`, loading whatever pretrained weights it names.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CLIPImageProcessor, PreTrainedConfig

from mllm.compression.config import CompressionSpec
from mllm.compression.pruning import TokenPruningSpec
from mllm.configuration import MLLMConfig, OpenCLIPVisionConfig
from mllm.modeling import MLLMForConditionalGeneration
from mllm.processing import MLLMProcessor
from mllm.schema import ConfigError
from mllm.sparse.config import MoESpec
from mllm.sparse.mod import MoDSpec
from mllm.sparse.moh import MoHSpec
from mllm.tokenizer import IMAGE_TOKEN, ensure_special_tokens, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class VisionSpec:
    type: Literal["open_clip", "clip", "siglip"] = "open_clip"
    # open_clip: model name (built-in, or registered from model_cfg). clip/siglip: hub id or local path.
    name: str | None = None
    model_cfg: dict[str, Any] | None = None  # open_clip architecture (embed_dim, vision_cfg, text_cfg)
    pretrained: str | None = None  # open_clip: weights file or pretrained tag
    config: dict[str, Any] | None = None  # clip/siglip from scratch: vision config kwargs
    feature_layer: int = -2  # LLaVA-1.5: penultimate layer
    select_strategy: Literal["default", "full"] = "default"  # default drops CLS

    def validate(self):
        # from_dict prefixes these messages with the section's path ("model.vision: ...").
        if self.type == "open_clip" and not self.name:
            raise ConfigError("name is required for open_clip towers (an open_clip model name)")
        if self.type != "open_clip" and not self.name and self.config is None:
            raise ConfigError(f"a {self.type} tower needs `name` (hub id / path) or `config`")
        if self.type != "open_clip" and (self.model_cfg or self.pretrained):
            raise ConfigError("model_cfg / pretrained apply to open_clip towers only")


@dataclass
class ProjectorSpec:
    depth: int = 2
    act: str = "gelu"
    bias: bool = True

    def validate(self):
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")


@dataclass
class TextSpec:
    name: str | None = None  # causal LM hub id or local path
    config: dict[str, Any] | None = None  # build from scratch: {model_type: llama, hidden_size: ...}

    def validate(self):
        if (self.name is None) == (self.config is None):
            raise ConfigError("give exactly one of `name` (hub id / path) or `config` (dict with model_type)")
        if self.config is not None and "model_type" not in self.config:
            raise ConfigError("config needs a model_type (e.g. llama, qwen2)")


@dataclass
class AttentionSpec:
    """`mode`: causal | mma (image tokens also see the question after them) | mma_aki (AKI's exact mask,
    reference backend). `backend`: auto (Triton on CUDA, else the PyTorch reference) | triton | flex |
    reference | sdpa (causal: the backbone's own attention; MMA: SDPA with a materialised mask)."""

    mode: Literal["causal", "mma", "mma_aki"] = "causal"
    backend: Literal["auto", "triton", "flex", "sdpa", "reference"] = "sdpa"


@dataclass
class KernelsSpec:
    """Fused kernels for training (mllm.kernels); checkpoints keep the stock layout either way."""

    rms_norm: bool = False
    swiglu: bool = False
    rope: bool = False
    fused_cross_entropy: bool = False  # chunked lm_head + loss: never materialises [tokens, vocab] logits
    backend: Literal["auto", "triton", "reference"] = "auto"

    @property
    def module_ops(self) -> tuple[str, ...]:
        return tuple(op for op in ("rms_norm", "swiglu", "rope") if getattr(self, op))


@dataclass
class ModelSpec:
    vision: VisionSpec = field(default_factory=VisionSpec)
    projector: ProjectorSpec = field(default_factory=ProjectorSpec)
    text: TextSpec = field(default_factory=lambda: TextSpec(config={"model_type": "llama"}))
    tokenizer: str | None = None  # hub id / path; defaults to text.name
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    moe: MoESpec | None = None  # an MoE model from scratch; a stage's `upcycle:` converts a trained one
    mod: MoDSpec | None = None  # Mixture-of-Depths over image tokens from scratch (a stage's `mod:` converts)
    moh: MoHSpec | None = None  # Mixture-of-Head attention from scratch (a stage's `moh:` converts)
    kernels: KernelsSpec = field(default_factory=KernelsSpec)
    # Fewer image tokens per image before the LLM: {method: pool|pixel_shuffle|tome|vmtc, ratio: 0.25}
    # (mllm.compression); the processor expands <image> to the compressed count. None = every patch token.
    compression: CompressionSpec | None = None
    # Prune image tokens inside the LLM: {method: fastv, layer: 2, keep: 0.5} or {method: exit} (learned
    # visual-token exit; train its gates in a stage). None = every image token runs every layer.
    token_pruning: TokenPruningSpec | None = None
    # Start from a trained model instead of building one: a run folder, its `model/` folder, a stage's
    # `final/` or `checkpoints/step-N` (any ZeRO stage), or an `mllm export` folder. The saved config is used as is, so the sections above must stay unset
    # (`kernels` still applies: it only changes how training computes).
    init_from: str | None = None

    def validate(self):
        if self.init_from is None:
            return
        defaults = ModelSpec()
        given = [name for name in ("vision", "projector", "text", "tokenizer", "attention", "moe", "mod", "moh",
                                   "compression", "token_pruning")
                 if getattr(self, name) != getattr(defaults, name)]
        if given:
            raise ConfigError(f"init_from loads the saved model with its own config; remove model.{given[0]} "
                              f"(set: {', '.join(given)})")


def vision_config_from_spec(spec: VisionSpec) -> PreTrainedConfig:
    if spec.type == "open_clip":
        return OpenCLIPVisionConfig(model_name=spec.name, model_cfg=spec.model_cfg, pretrained=spec.pretrained)
    model_type = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[spec.type]
    if spec.name is not None:
        config = AutoConfig.from_pretrained(spec.name)
        # A full CLIP/SigLIP checkpoint nests the vision part.
        config = getattr(config, "vision_config", config)
        if config.model_type != model_type:
            raise ConfigError(f"vision.name {spec.name!r} is a {config.model_type}, not a {spec.type} vision model")
        return config
    kwargs = dict(spec.config)
    given = kwargs.pop("model_type", model_type)  # a saved config's to_dict() carries it
    if given != model_type:
        raise ConfigError(
            f"vision.config.model_type {given!r} does not match vision.type {spec.type!r} ({model_type})"
        )
    return AutoConfig.for_model(model_type, **kwargs)


def text_config_from_spec(spec: TextSpec, vocab_size: int) -> PreTrainedConfig:
    if spec.name is not None:
        return AutoConfig.from_pretrained(spec.name)
    kwargs = dict(spec.config)
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("vocab_size", vocab_size)
    if kwargs["vocab_size"] < vocab_size:
        raise ConfigError(f"text.config.vocab_size {kwargs['vocab_size']} < tokenizer size {vocab_size}")
    return AutoConfig.for_model(model_type, **kwargs)


def image_processor_for(spec: VisionSpec, vision_config: PreTrainedConfig):
    """The HF image processor matching the tower (open_clip preprocessing saved as a CLIPImageProcessor)."""
    if spec.type != "open_clip" and spec.name is not None:
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(spec.name)
        except OSError:
            logger.warning("no image processor saved with %s; using defaults for %s", spec.name, spec.type)
    size = vision_config.image_size
    if spec.type == "siglip":
        from transformers import SiglipImageProcessor

        return SiglipImageProcessor(size={"height": size, "width": size})
    mean = getattr(vision_config, "image_mean", None) or CLIPImageProcessor().image_mean
    std = getattr(vision_config, "image_std", None) or CLIPImageProcessor().image_std
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=mean, image_std=std
    )


def attention_config(spec: AttentionSpec, tokenizer) -> dict | None:
    if spec.mode == "causal" and spec.backend == "sdpa":
        return None  # the backbone's own attention, untouched
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    if spec.mode != "causal" and (assistant is None or assistant == tokenizer.unk_token_id):
        raise ConfigError("attention.mode mma needs an assistant-turn token <|assistant|> in the tokenizer")
    return {"mode": spec.mode, "backend": spec.backend, "assistant_token_id": assistant}


def with_prompt_end(spec: TokenPruningSpec, tokenizer) -> TokenPruningSpec:
    """The token pruning settings with the prompt's end marker (the `<|assistant|>` header) resolved."""
    if spec.assistant_token_id is not None:
        return spec
    return dataclasses.replace(spec, assistant_token_id=tokenizer.convert_tokens_to_ids("<|assistant|>"))


def load_trained(path: str, dtype: torch.dtype = torch.float32):
    """Model + processor from a run folder, a saved model folder, a stage's final/ or checkpoint folder (in
    its run), or an `mllm export` folder."""
    import json
    from pathlib import Path

    folder = Path(path)
    if (folder / "model" / "config.json").is_file():  # a run folder
        folder = folder / "model"
    config_file = folder / "config.json"
    if not config_file.is_file() and ((folder / "state").is_dir() or (folder / "COMMITTED").is_file()):
        from mllm.export.inputs import load_export_source  # a stage's final/ or a training checkpoint

        loaded = load_export_source(folder, merge_lora=True)  # a LoRA stage's checkpoint: merged, then trained on
        return loaded.model.to(dtype), loaded.processor
    if not config_file.is_file():
        raise ConfigError(f"model.init_from {path}: no config.json there (nor in {path}/model); give a run folder, "
                          "its model/ folder, a stage's final/ or checkpoints/step-N folder, or an mllm export")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type == MLLMConfig.model_type:
        model = MLLMForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        return model, MLLMProcessor.from_pretrained(folder)
    from mllm.export.from_llava import is_llava_export, load_llava_as_mllm

    if is_llava_export(folder):
        return load_llava_as_mllm(folder, dtype=dtype)
    raise ConfigError(f"model.init_from {path}: config.json has model_type {model_type!r}; expected an mllm model "
                      "(model_type mllm) or an mllm / Llava export")


def build_model_and_processor(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """Build model + processor, loading any pretrained tower / backbone weights the spec names
    (or the whole trained model, for `init_from`)."""
    if spec.init_from is not None:
        return load_trained(spec.init_from, dtype)
    tokenizer_name = spec.tokenizer or spec.text.name
    if tokenizer_name is None:
        raise ConfigError("model.tokenizer is required when the backbone is built from a config")
    tokenizer = load_tokenizer(tokenizer_name)
    ensure_special_tokens(tokenizer)
    vision_config = vision_config_from_spec(spec.vision)
    text_config = text_config_from_spec(spec.text, len(tokenizer))
    config = MLLMConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=spec.vision.feature_layer,
        vision_feature_select_strategy=spec.vision.select_strategy,
        projector_hidden_act=spec.projector.act,
        projector_depth=spec.projector.depth,
        multimodal_projector_bias=spec.projector.bias,
        attention=attention_config(spec.attention, tokenizer),
        moe=spec.moe.to_config() if spec.moe is not None else None,
        mod=spec.mod.to_config() if spec.mod is not None else None,
        moh=spec.moh.to_config() if spec.moh is not None else None,
        compression=spec.compression.to_config() if spec.compression is not None else None,
        token_pruning=with_prompt_end(spec.token_pruning, tokenizer).to_config() if spec.token_pruning else None,
    )
    model = MLLMForConditionalGeneration(config)
    if isinstance(vision_config, OpenCLIPVisionConfig):
        # The weights now live in the model; a saved checkpoint must not point back at the source file.
        vision_config.pretrained = None
    elif spec.vision.name is not None:
        load_hf_vision_tower(model, spec.vision)
    if spec.text.name is not None:
        load_pretrained_backbone(model, spec.text.name, len(tokenizer))
    processor = MLLMProcessor(
        image_processor=image_processor_for(spec.vision, vision_config),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
    )
    set_generation_defaults(model, tokenizer)
    return model.to(dtype), processor


def set_generation_defaults(model: MLLMForConditionalGeneration, tokenizer) -> None:
    """Stop at the end of an assistant turn, pad with the pad token, never emit `<image>` (an
    emitted placeholder would ask for an image that does not exist on the next uncached step)."""
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    stop = [i for i in (end_id, tokenizer.eos_token_id) if i is not None and i != tokenizer.unk_token_id]
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [model.config.image_token_id]


def load_hf_vision_tower(model: MLLMForConditionalGeneration, spec: VisionSpec) -> None:
    """Load CLIP / SigLIP tower weights (from a vision-only or a full two-tower checkpoint, as LLaVA does)."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}[spec.type]
    pretrained = cls.from_pretrained(spec.name, dtype=torch.float32)
    model.model.vision_tower.load_state_dict(pretrained.state_dict())


def load_pretrained_backbone(model: MLLMForConditionalGeneration, name: str, vocab_size: int) -> None:
    """Copy a pretrained causal LM into `model.language_model` + `lm_head` (after adding our tokens)."""
    lm = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    if lm.get_input_embeddings().weight.shape[0] < vocab_size:
        lm.resize_token_embeddings(vocab_size)
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    if model.get_input_embeddings().weight.shape[0] != lm.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(lm.get_input_embeddings().weight.shape[0])
    model.model.language_model.load_state_dict(base.state_dict())
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
