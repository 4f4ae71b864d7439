"""mllm.kernels: Triton kernels, each beside its exact PyTorch twin, and the backend dispatcher.

Importing this package never requires Triton: without it every op runs its reference twin.
Under TRITON_INTERPRET=1 (set before this import) the Triton kernels run on CPU in the interpreter.
"""

from .dispatch import BACKENDS, select_backend
from .interval_attention import (
    HAS_TRITON,
    IntervalAttentionFunction,
    interval_attention,
    interval_attention_flex,
    interval_attention_reference,
    interval_attention_triton,
    make_flex_block_mask,
)

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "IntervalAttentionFunction",
    "interval_attention",
    "interval_attention_flex",
    "interval_attention_reference",
    "interval_attention_triton",
    "make_flex_block_mask",
    "select_backend",
]
