"""transformers' Llava plus modality-mutual attention (MMA) at prefill (written by `mllm export`).

The weights are a plain Llava checkpoint. The only difference is the language model's attention at
prefill: image tokens also attend to the question that follows them, up to the assistant turn, and
each image span is bidirectional. Decode steps are plain causal over the cache, as in training.
"""

import torch
from transformers import AttentionInterface, LlavaForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .configuration_mllm_llava import MMALlavaConfig
from .mma_layout import compute_layout, dense_mask

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
register_checkpoint_conversion_mapping(MMALlavaConfig.model_type, get_checkpoint_conversion_mapping("llava"),
                                       overwrite=True)


class MMALlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MMALlavaConfig

    def __init__(self, config: MMALlavaConfig):
        super().__init__(config)
        # Attention layers read the implementation name from the (shared) text config at call time.
        self.config.text_config._attn_implementation = IMPLEMENTATION

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if input_ids is not None and (cache is None or cache.get_seq_length() == 0):
            kwargs["attention_layout"] = compute_layout(
                attention_mask,
                (input_ids == self.config.image_token_id).long(),
                input_ids == self.config.mma_assistant_token_id,
                mode=self.config.mma_mode,
            )
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                               cache=cache, **kwargs)
