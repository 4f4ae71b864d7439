"""Config of a Llava checkpoint trained with modality-mutual attention (written by `mllm export`)."""

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig


@strict
class MMALlavaConfig(LlavaConfig):
    model_type = "mllm_mma_llava"

    # mma: image tokens also see the user text after them (up to the assistant turn) at prefill.
    mma_mode: str = "mma"
    # The token that opens an assistant turn: the end of the question image tokens may see.
    mma_assistant_token_id: int | None = None
