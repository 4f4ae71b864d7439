"""mllm.kernels: Triton kernels, each beside its exact PyTorch twin, and the backend dispatcher.

Importing this package never requires Triton: without it every op runs its reference twin.
Under TRITON_INTERPRET=1 (set before this import) the Triton kernels run on CPU in the interpreter.
"""


if __name__ == "kernels":
    # This folder installs as `mllm.kernels`. Python reaches it as a top-level `kernels` only when the checkout
    # root is on sys.path (`python -m ...` / `python -c` / pytest from the repo root), where it would shadow
    # Hugging Face's `kernels` package, which transformers >= 5.25 depends on and imports
    # (transformers.integrations.hub_kernels). Step aside: load the installed package under that name.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ImportError("`import kernels` found mllm's kernels/ folder (import it as mllm.kernels) and no installed "
                          "`kernels` package elsewhere on sys.path")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
else:
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
