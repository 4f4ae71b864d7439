"""`MLLMConfig`: the transformers config of the composed vision-language model.

It nests a `vision_config` (a transformers CLIP/SigLIP vision config, or our `OpenCLIPVisionConfig`)
and a `text_config` (any transformers causal-LM config), plus the projector settings. Later sections
(moe, mod, moh, attention, compression) nest here too; all off means the dense LLaVA model.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class OpenCLIPVisionConfig(PreTrainedConfig):
    """An open_clip vision tower: a model name (built-in or registered from `model_cfg`) plus weights.

    `model_cfg` is an open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`); when given it is
    registered under `model_name`, which is how tiny custom towers are built offline.
    `pretrained` is a local file or (online) an open_clip pretrained tag; `None` = random init.
    """

    model_type = "open_clip_vision"
    base_config_key = "vision_config"

    model_name: str = "ViT-B-16"
    model_cfg: dict | None = None
    pretrained: str | None = None
    # Filled from the built tower so the rest of the stack never needs open_clip to read them.
    hidden_size: int | None = None
    image_size: int | None = None
    patch_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None


AutoConfig.register("open_clip_vision", OpenCLIPVisionConfig)


@strict
class MLLMConfig(PreTrainedConfig):
    """Vision tower + projector + causal LM, with LLaVA's feature-selection conventions.

    `vision_feature_layer=-2` and `vision_feature_select_strategy="default"` (drop the CLS token) are
    LLaVA-1.5's choices; `projector_depth=2` with GELU is its MLP projector.
    """

    model_type = "mllm"
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 4
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    projector_hidden_act: str = "gelu"
    projector_depth: int = 2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    # {"mode": causal|mma|mma_aki, "backend": auto|triton|flex|sdpa|reference, "assistant_token_id": int}.
    # None = the backbone's own attention (plain causal), exactly the dense LLaVA model.
    attention: dict | None = None
    # Modality-aware MoE in the decoder (mllm.sparse.MoESpec as a dict); None = dense FFNs.
    moe: dict | None = None
    # Mixture-of-Depths over image tokens (mllm.sparse.mod.MoDSpec as a dict); None = every token runs
    # every layer.
    mod: dict | None = None
    # Mixture-of-Head attention (mllm.sparse.moh.MoHSpec as a dict); None = every head, unit weights.
    moh: dict | None = None
    # Visual-token compression before the LLM (mllm.compression.CompressionSpec as a dict); None = every
    # patch token reaches the LLM. It changes num_image_tokens (the processor's expansion of <image>).
    compression: dict | None = None
    # Visual-token pruning inside the LLM (mllm.compression.pruning.TokenPruningSpec as a dict: fastv or exit);
    # None = every image token runs every layer.
    token_pruning: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.projector_depth < 1:
            raise ValueError(f"projector_depth must be >= 1, got {self.projector_depth}")
        if self.attention is not None and self.attention.get("mode", "causal") != "causal" \
                and self.attention.get("assistant_token_id") is None:
            raise ValueError("attention.mode mma needs attention.assistant_token_id (the assistant-turn header)")
        if self.moe is not None:
            from mllm.sparse.config import MoESpec

            MoESpec.from_config(self.moe)  # a bad section fails here, naming the key
        if self.compression is not None:
            from mllm.compression.config import CompressionSpec

            spec = CompressionSpec.from_config(self.compression)
            if spec.saliency == "cls" and getattr(self.vision_config, "model_type", None) == "siglip_vision_model":
                raise ValueError("compression.saliency 'cls' needs a vision tower with a CLS token; SigLIP has none: "
                                 "use saliency 'norm' or 'auto'")
        if self.token_pruning is not None:
            from mllm.compression.pruning import TokenPruningSpec

            TokenPruningSpec.from_config(self.token_pruning)  # a bad section fails here, naming the key
            if self.mod is not None:
                raise ValueError("token_pruning and mod both compact the sequence inside the LLM; use one of them")

    @property
    def uses_interval_attention(self) -> bool:
        return self.attention is not None and (self.attention.get("mode", "causal") != "causal"
                                               or self.attention.get("backend", "sdpa") != "sdpa")

    @property
    def has_routing(self) -> bool:
        """Some decoder modules route by modality (MoE, MoD, MoH): the model tells them each token's."""
        return self.moe is not None or self.mod is not None or self.moh is not None

    @property
    def hidden_size(self) -> int:
        # DeepSpeed / accelerate size their ZeRO buckets from `config.hidden_size`.
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def num_image_tokens(self) -> int:
        """LLM-side tokens per image: the patch grid (or the K tokens compression leaves of it), plus the
        CLS token unless it is dropped (compression never merges CLS)."""
        vc = self.vision_config
        image_size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
        patch_size = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
        n = (image_size // patch_size) ** 2
        if self.compression is not None:
            from mllm.compression.config import CompressionSpec

            n = CompressionSpec.from_config(self.compression).output_tokens(n)
        # SigLIP has no CLS token; CLIP and open_clip ViTs put it first.
        has_cls = vc.model_type != "siglip_vision_model"
        if has_cls and self.vision_feature_select_strategy == "full":
            n += 1
        return n


AutoConfig.register("mllm", MLLMConfig)

__all__ = ["MLLMConfig", "OpenCLIPVisionConfig"]
