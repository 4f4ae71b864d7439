"""transformers' Llava plus the mllm extensions an exported model was trained with (written by `mllm export`).

The weights are a Llava checkpoint; the language model's decoder layers may additionally hold
modality-aware MoE blocks (and MoT / attention-expert projections), Mixture-of-Depths routers over image
tokens and Mixture-of-Head attention, rebuilt here from `config.moe` / `.mod` / `.moh` by the same code
that trained them (the `sparse_*.py` siblings are mllm's own files with their imports made
relative). Modality comes from the input ids: image positions are exactly the image tokens, which also
holds for cached decoding, where only new text tokens arrive.

With `mma_mode` the language model's attention at prefill lets image tokens also attend to the question
that follows them, up to the assistant turn, and each image span is bidirectional; decode steps are plain
causal over the cache, as in training.

With `compression` each image's patch tokens are merged to a fixed count around the projector (pool,
pixel_shuffle, ToMe, VMTC; the processor expands `<image>` to that count); with `token_pruning` image
tokens leave the sequence inside the language model (fastv, visual-token exit), by the same code as in
training (`compression*.py`).
"""

import torch
from transformers import AttentionInterface, LlavaForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .compression import build_compressor, projector_input_size
from .compression_pruning import TokenPruningSpec, apply_pruning, pruning_state
from .configuration_mllm_llava import MLLMLlavaConfig
from .mma_layout import compute_layout, dense_mask
from .sparse_depth import build_dynamic_layers
from .sparse_moe import decoder_layers
from .sparse_routing import RoutingContext, set_routing_context
from .sparse_upcycle import build_moe_layers

IMPLEMENTATION = "mllm_mma_sdpa"


def mma_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          attention_layout=None, **kwargs):
    """query [B, Hq, T, D]; with a layout (prefill) SDPA on its mask, otherwise the causal SDPA path."""
    if attention_layout is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    mask = dense_mask(attention_layout).unsqueeze(1)  # [B, 1, T, T]
    empty = ~mask.any(-1, keepdim=True)  # padding rows: no visible key, output zeros
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask | empty, scale=scaling)
    return out.masked_fill(empty, 0.0).transpose(1, 2).contiguous(), None


# Register the attention function *and* its mask function: without the mask entry transformers would
# drop the causal mask for this implementation name.
AttentionInterface.register(IMPLEMENTATION, mma_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


# The weights are saved in Llava's layout (transformers renames some keys on save); load them the same way.
register_checkpoint_conversion_mapping(MLLMLlavaConfig.model_type, get_checkpoint_conversion_mapping("llava"),
                                       overwrite=True)


class CompressingModel:
    """Mixin swapped into the inner LlavaModel of a compressing export: the tower's selected features go
    through the compressor around the projector, as in mllm's `MLLMModel.encode_images`."""

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden = outputs.hidden_states[layer]  # [N, (1 +) P, D_vision]
        has_cls = self.config.vision_config.model_type != "siglip_vision_model"
        features = hidden[:, 1:] if strategy == "default" else hidden
        projected = self.token_compressor.compress_and_project(
            features, self.multi_modal_projector, cls_state=hidden[:, 0] if has_cls else None,
            keeps_cls=has_cls and strategy == "full")
        return BaseModelOutputWithPooling(last_hidden_state=outputs.last_hidden_state,
                                          hidden_states=outputs.hidden_states, pooler_output=list(projected))


def widen_projector(model, section: dict) -> None:
    """pixel_shuffle: the projector's first layer takes the widened input, as in mllm's MLLMModel."""
    width = projector_input_size(model.config.vision_config.hidden_size, section)
    old = model.multi_modal_projector.linear_1
    if width != old.in_features:
        model.multi_modal_projector.linear_1 = torch.nn.Linear(width, old.out_features, bias=old.bias is not None,
                                                               device=old.weight.device, dtype=old.weight.dtype)


class MLLMLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MLLMLlavaConfig
    # ZeRO-3 must gather an MoE block's parameters as one unit (ranks route tokens to different experts).
    zero3_leaf_modules = ("MoEBlock",)

    def __init__(self, config: MLLMLlavaConfig):
        super().__init__(config)
        if self.uses_mma:
            # Attention layers read the implementation name from the (shared) text config at call time.
            self.config.text_config._attn_implementation = IMPLEMENTATION
        if config.moe is not None:
            std = getattr(config.text_config, "initializer_range", 0.02)
            build_moe_layers(self.model.language_model, config.moe, std)
        if config.mod is not None or config.moh is not None:  # Mixture-of-Depths / Mixture-of-Head
            build_dynamic_layers(self.model.language_model, config)
        if config.compression is not None:
            widen_projector(self.model, config.compression)
            self.model.token_compressor = build_compressor(config.compression)  # parameter-free
            self.model.__class__ = type("MLLMLlavaModel", (CompressingModel, type(self.model)), {})
        self.pruning = None
        if config.token_pruning is not None:
            self.pruning = TokenPruningSpec.from_config(config.token_pruning)
            apply_pruning(decoder_layers(self.model.language_model), self.pruning,
                          self.config.text_config._attn_implementation)
        self._routed = [m for m in self.model.language_model.modules() if hasattr(m, "routing_context")]

    @property
    def uses_mma(self) -> bool:
        return self.config.mma_mode not in (None, "causal")

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        prefill = cache is None or cache.get_seq_length() == 0
        if input_ids is not None and self.uses_mma and prefill:
            kwargs["attention_layout"] = compute_layout(
                attention_mask,
                (input_ids == self.config.image_token_id).long(),
                input_ids == self.config.mma_assistant_token_id,
                mode=self.config.mma_mode,
            )
        if self.pruning is not None and prefill:
            if input_ids is None:
                raise ValueError("this export prunes image tokens inside the language model and needs input_ids, "
                                 "not inputs_embeds")
            kwargs["token_pruning"] = pruning_state(input_ids, attention_mask, self.config.image_token_id,
                                                    self.pruning, None)
        if self._routed:
            if input_ids is None:
                raise ValueError("this export routes by modality (MoE / MoD / MoH) and needs input_ids, not "
                                 "inputs_embeds")
            seq = input_ids.shape[1]
            modality = (input_ids == self.config.image_token_id).long()  # [B, T]
            valid = attention_mask[:, -seq:].bool() if attention_mask is not None else torch.ones_like(modality).bool()
            set_routing_context(self._routed, RoutingContext(modality, valid))
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                               cache=cache, **kwargs)
