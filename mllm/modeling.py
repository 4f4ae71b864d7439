"""`MLLMForConditionalGeneration`: vision tower -> projector -> any transformers causal LM.

Module names follow transformers' Llava (`model.vision_tower`, `model.multi_modal_projector`,
`model.language_model`, `lm_head`) so LoRA patterns, checkpoints and the Llava export line up.
Image features are written into the expanded `<image>` positions with `masked_scatter`; pixel
values are consumed at prefill only (generation drops them afterwards, the cache holds the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput

from mllm.compression import build_compressor, projector_input_size
from mllm.configuration import MLLMConfig
from mllm.projector import MultiModalProjector
from mllm.vision import build_vision_tower, has_cls_token, select_image_features

IGNORE_INDEX = -100


@dataclass
class MLLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    image_features: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE balance + z losses (weighted), training only
    loss_sum: torch.Tensor | None = None  # summed target-token loss (fused path: the logits are never built)
    exit_loss: torch.Tensor | None = None  # visual-token exit gates' weighted BCE (in aux_loss), when they train


class MLLMPreTrainedModel(PreTrainedModel):
    config: MLLMConfig
    config_class = MLLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]
    # ZeRO-3 gathers a leaf module's parameters on entry instead of hooking its children: ranks that route
    # tokens to different experts would otherwise wait for different parameters and hang.
    zero3_leaf_modules = ("MoEBlock",)


class MLLMModel(MLLMPreTrainedModel):
    """Vision tower + projector + the backbone's base model (no LM head)."""

    def __init__(self, config: MLLMConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config.vision_config)
        # Parameter-free; None without a compression section. pixel_shuffle widens the projector's input.
        self.token_compressor = build_compressor(config.compression)
        self.multi_modal_projector = MultiModalProjector(
            vision_hidden_size=projector_input_size(config.vision_config.hidden_size, config.compression),
            text_hidden_size=config.text_config.hidden_size,
            depth=config.projector_depth,
            act=config.projector_hidden_act,
            bias=config.multimodal_projector_bias,
        )
        if config.uses_interval_attention:
            from mllm.attention.interface import IMPLEMENTATION

            self.language_model = AutoModel.from_config(config.text_config, attn_implementation=IMPLEMENTATION)
        else:
            self.language_model = AutoModel.from_config(config.text_config)
        if config.moe is not None:
            from mllm.sparse.upcycle import build_moe_layers

            build_moe_layers(self.language_model, config.moe, getattr(config.text_config, "initializer_range", 0.02))
        if config.mod is not None or config.moh is not None:
            from mllm.sparse.depth import build_dynamic_layers

            build_dynamic_layers(self.language_model, config)
        self.token_pruning = None  # TokenPruningSpec once image tokens are pruned inside the LLM
        if config.token_pruning is not None:
            self.apply_token_pruning(config.token_pruning)
        self.post_init()

    def apply_token_pruning(self, section: dict) -> list[int]:
        """Prune image tokens inside the LLM (mllm.compression.pruning); returns the candidate layers."""
        from mllm.compression.pruning import TokenPruningSpec, apply_pruning
        from mllm.sparse.moe import decoder_layers

        spec = TokenPruningSpec.from_config(section)
        layers = apply_pruning(decoder_layers(self.language_model), spec,
                               self.language_model.config._attn_implementation)
        self.token_pruning = spec
        return layers

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N_img, 3, H, W] -> [N_img, tokens_per_image, D_text] (config.num_image_tokens per image)."""
        tower_dtype = next(self.vision_tower.parameters()).dtype
        outputs = self.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True)
        has_cls = has_cls_token(self.config.vision_config)
        features = select_image_features(
            outputs.hidden_states,
            self.config.vision_feature_layer,
            self.config.vision_feature_select_strategy,
            has_cls,
        )
        if self.token_compressor is None:
            return self.multi_modal_projector(features)
        layer = outputs.hidden_states[self.config.vision_feature_layer]  # [N_img, (1 +) P, D_vision]
        return self.token_compressor.compress_and_project(
            features, self.multi_modal_projector, cls_state=layer[:, 0] if has_cls else None,
            keeps_cls=has_cls and self.config.vision_feature_select_strategy == "full",
        )

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        image_mask = input_ids == self.config.image_token_id  # [B, T]
        n_tokens = int(image_mask.sum())
        n_features = image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"image tokens and image features do not match: the input has {n_tokens} image tokens but "
                f"{image_features.shape[0]} image(s) give {n_features} features "
                f"({image_features.shape[1]} per image). Expand each <image> with the processor, "
                "and pass one image per placeholder."
            )
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        modality_ids: torch.LongTensor | None = None,
        document_ids: torch.LongTensor | None = None,
        prune_force_exit: int | None = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, T, D]
        image_features = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids to locate the image tokens")
            image_features = self.encode_images(pixel_values)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
        elif input_ids is not None and (cache is None or cache.get_seq_length() == 0):
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("input_ids contain image tokens but no pixel_values were given")
        prefill = cache is None or cache.get_seq_length() == 0
        if self.config.has_routing:
            self.set_routing_context(input_ids, modality_ids, attention_mask, inputs_embeds)
        if document_ids is not None and not self.config.uses_interval_attention:
            raise ValueError("packed batches (document_ids) need the interval attention layout: set "
                             "model.attention.backend to auto | triton | flex | reference (or mode mma); the "
                             "backbone's own causal SDPA would let packed samples attend to each other")
        if self.config.uses_interval_attention and prefill:
            kwargs.update(self.attention_layout_kwargs(input_ids, attention_mask, modality_ids, document_ids))
        self.pruning_state = None
        if self.token_pruning is not None and prefill:
            if input_ids is None:
                raise ValueError("token pruning needs input_ids to find the image tokens and the prompt")
            from mllm.compression.pruning import pruning_state

            self.pruning_state = kwargs["token_pruning"] = pruning_state(
                input_ids, attention_mask, self.config.image_token_id, self.token_pruning,
                kwargs.get("attention_layout"), force_exit=prune_force_exit)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return outputs, image_features

    def exit_gate_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.language_model.named_parameters() if ".exit_gate." in name]

    def routed_modules(self) -> list[nn.Module]:
        return [m for m in self.language_model.modules() if hasattr(m, "routing_context")]

    def set_routing_context(self, input_ids, modality_ids, attention_mask, inputs_embeds) -> None:
        """Tell the MoE / MoT modules each token's modality. Image positions are exactly the image
        tokens, so input_ids decide (this also covers cached decoding, where only new text tokens come)."""
        from mllm.sparse.routing import RoutingContext, set_routing_context

        batch, seq = inputs_embeds.shape[:2]
        if input_ids is not None:
            modality = (input_ids == self.config.image_token_id).long()
        elif modality_ids is not None and modality_ids.shape == (batch, seq):
            modality = modality_ids.long()
        else:
            modality = torch.zeros(batch, seq, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -seq:].bool()
        else:
            valid = torch.ones(batch, seq, dtype=torch.bool, device=inputs_embeds.device)
        self._routed = self.routed_modules()  # one walk per forward; routing_aux_loss reads the same list
        set_routing_context(self._routed, RoutingContext(modality, valid))

    def routing_aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' weighted auxiliary losses from the last training forward (then cleared)."""
        total = None
        for module in getattr(self, "_routed", ()):
            loss = getattr(module, "aux_loss", None)
            if isinstance(loss, torch.Tensor):
                total = loss if total is None else total + loss
                module.aux_loss = None
        return total

    def attention_layout_kwargs(self, input_ids, attention_mask, modality_ids, document_ids=None) -> dict:
        """The per-batch key windows every layer's attention reads (computed once, at prefill)."""
        from mllm.attention.layout import compute_layout

        if input_ids is None:
            raise ValueError("interval attention needs input_ids to find image spans and assistant turns")
        attention = self.config.attention
        if modality_ids is None:
            modality_ids = (input_ids == self.config.image_token_id).long()
        assistant = attention.get("assistant_token_id")
        layout = compute_layout(attention_mask, modality_ids,
                                input_ids == assistant if assistant is not None else None,
                                mode=attention.get("mode", "causal"), document_ids=document_ids)
        return {"attention_layout": layout, "attention_backend": attention.get("backend", "auto")}


class LMHead(nn.Linear):
    """`lm_head`: a plain Linear, plus a fused loss mode.

    `lm_head(hidden, labels=...)` returns (summed cross-entropy, target count) through the chunked
    fused linear + cross-entropy kernel, never building the [tokens, vocab] logits. It is a method of
    this module (not code reading `lm_head.weight` from outside) so ZeRO-3 gathers the weight for it."""

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is None:
            return super().forward(hidden)
        from mllm.kernels import fused_linear_cross_entropy

        shift_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # position t predicts token t+1
        shift_labels = labels[:, 1:].reshape(-1).to(hidden.device)
        return fused_linear_cross_entropy(shift_hidden, self.weight, shift_labels, ignore_index=IGNORE_INDEX)


class MLLMForConditionalGeneration(MLLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: MLLMConfig):
        super().__init__(config)
        self.model = MLLMModel(config)
        self.lm_head = LMHead(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        document_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        fused_loss: bool = False,
        prune_force_exit: int | None = None,
        **kwargs,
    ) -> MLLMOutput:
        """`modality_ids` (0 text, 1 image) feed the attention layouts; plain causal attention ignores them.
        `fused_loss=True` with labels computes the loss with the fused lm_head + cross-entropy and returns
        no logits (training memory: the [tokens, vocab] logits are never materialised)."""
        cache = cache if cache is not None else past_key_values
        outputs, image_features = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            modality_ids=modality_ids,
            document_ids=document_ids,
            prune_force_exit=prune_force_exit,
            **kwargs,
        )
        pruning = self.model.pruning_state
        hidden = outputs.last_hidden_state  # [B, T, D]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        aux_loss = self.model.routing_aux_loss() if self.config.has_routing and self.training else None
        loss = logits = total = None
        if fused_loss and labels is not None:
            if not isinstance(self.lm_head, LMHead):  # e.g. replaced by resize_token_embeddings
                raise ValueError(f"fused_loss needs mllm's LMHead as lm_head, got {type(self.lm_head).__name__}")
            total, count = self.lm_head(hidden, labels=labels)
        else:
            logits = self.lm_head(hidden)  # [B, T, V]
            if labels is not None:
                total, count = causal_lm_loss_sum(logits, labels)
        exit_loss = None
        if self.training and labels is not None and pruning is not None and pruning.gate_logits \
                and any(p.requires_grad for p in self.model.exit_gate_parameters()):
            from mllm.compression.pruning import exit_supervision

            rerun = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, modality_ids=modality_ids, document_ids=document_ids,
                         use_cache=False)
            exit_loss = exit_supervision(self, rerun, labels, pruning.gate_logits, logits, self.model.token_pruning)
            aux_loss = exit_loss if aux_loss is None else aux_loss + exit_loss
        if total is not None:
            loss = total / count.clamp(min=1)
            if aux_loss is not None:
                loss = loss + aux_loss
        return MLLMOutput(
            loss=loss,
            logits=logits,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            image_features=image_features,
            aux_loss=aux_loss,
            loss_sum=total,
            exit_loss=exit_loss,
        )


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of target tokens (labels != -100).

    The trainer divides by the target count of the whole global batch, so gradient accumulation and
    world size do not change the loss.
    """
    shift_logits = logits[:, :-1].float()  # fp32 softmax: bf16 logits lose ~2 digits in the loss
    shift_labels = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (shift_labels != IGNORE_INDEX).sum()


__all__ = ["LMHead", "MLLMForConditionalGeneration", "MLLMModel", "MLLMPreTrainedModel", "causal_lm_loss_sum"]
