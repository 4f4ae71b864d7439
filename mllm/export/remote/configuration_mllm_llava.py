"""Config of an mllm export: a Llava checkpoint plus the mllm extensions it was trained with.

Written by `mllm export`; loaded with `trust_remote_code=True`. All extension fields unset is exactly
transformers' Llava.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig


@strict
class MLLMLlavaConfig(LlavaConfig):
    model_type = "mllm_llava"

    # Modality-mutual attention at prefill: "mma" lets image tokens also see the user text after them
    # (up to the assistant turn); None or "causal" is Llava's causal attention.
    mma_mode: str | None = None
    # The token that opens an assistant turn: the end of the question image tokens may see.
    mma_assistant_token_id: int | None = None
    # Modality-aware MoE / MoT / attention experts in the decoder (mllm's MoESpec as a dict); None = dense.
    moe: dict | None = None
    # Mixture-of-Depths over image tokens / Mixture-of-Head attention (mllm's MoDSpec / MoHSpec as dicts).
    mod: dict | None = None
    moh: dict | None = None
    # Visual-token compression before the LLM / image-token pruning inside it (mllm's CompressionSpec /
    # TokenPruningSpec as dicts).
    compression: dict | None = None
    token_pruning: dict | None = None
