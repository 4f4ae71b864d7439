"""mllm.kernels: Triton kernels, each beside its exact PyTorch twin, and the backend dispatcher.

Importing this package never requires Triton: without it every op runs its reference twin.
Under TRITON_INTERPRET=1 (set before this import) the Triton kernels run on CPU in the interpreter.
"""

from .dispatch import BACKENDS, select_backend
from .fused_linear_cross_entropy import (
    FusedLinearCrossEntropyFunction,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from .interval_attention import (
    HAS_TRITON,
    IntervalAttentionFunction,
    interval_attention,
    interval_attention_flex,
    interval_attention_reference,
    interval_attention_triton,
    make_flex_block_mask,
)
from .rms_norm import RMSNormFunction, rms_norm, rms_norm_reference, rms_norm_triton
from .rope import RoPEFunction, apply_rope, apply_rope_reference, apply_rope_triton
from .swiglu import SwiGLUFunction, swiglu, swiglu_reference, swiglu_triton

__all__ = [
    "BACKENDS",
    "FusedLinearCrossEntropyFunction",
    "HAS_TRITON",
    "IntervalAttentionFunction",
    "RMSNormFunction",
    "RoPEFunction",
    "SwiGLUFunction",
    "apply_rope",
    "apply_rope_reference",
    "apply_rope_triton",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "interval_attention",
    "interval_attention_flex",
    "interval_attention_reference",
    "interval_attention_triton",
    "make_flex_block_mask",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_triton",
    "select_backend",
    "swiglu",
    "swiglu_reference",
    "swiglu_triton",
]
