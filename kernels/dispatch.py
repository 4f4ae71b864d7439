"""Backend selection for the kernels in this package: Triton where it can run, the reference elsewhere.

Triton runs on CUDA tensors of a supported dtype and head dim. Under `TRITON_INTERPRET=1` the
Triton interpreter also runs the kernels on CPU tensors (slowly, numpy underneath): that is how CI
tests them on machines without a GPU, so an explicit `requested="triton"` is then allowed on CPU,
while `"auto"` still picks the much faster reference there. `select_backend` serves attention
(head-dim rule, flex backend); `select_op_backend` serves the row-wise and element-wise ops
(rms_norm, apply_rope, swiglu), whose kernels mask any width.

Nothing here imports Triton at module import time, so `import mllm.kernels` works without it.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference", "flex")
OP_BACKENDS = ("auto", "triton", "reference")  # row-wise / element-wise ops: no flex variant
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # powers of two: tl.arange needs one, tl.dot needs >= 16


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when `import triton` works, else why it does not (cached: the answer cannot change)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # missing, or a broken install (e.g. no matching libLLVM)
        return f"Triton is not importable ({exc}); install it with `pip install 'mllm[kernels]'`"
    return None


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET is set the way triton reads it (1/true/yes/on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def _device_dtype_reason(x: torch.Tensor) -> str | None:
    """None when Triton is importable and can run on `x`'s device and dtype, else why not."""
    error = triton_import_error()
    if error is not None:
        return error
    if not x.is_cuda and not triton_interpreting():
        return (f"the inputs are on {x.device.type}; the Triton kernels need CUDA tensors "
                "(set TRITON_INTERPRET=1 before importing mllm.kernels to run them on CPU in the interpreter)")
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype} is not supported by the Triton kernels (supported: {TRITON_DTYPES})"
    return None


def triton_unavailable_reason(q: torch.Tensor) -> str | None:
    """None when the Triton kernels can run on `q` ([T, H, D]), else a sentence saying why not."""
    reason = _device_dtype_reason(q)
    if reason is not None:
        return reason
    head_dim = q.shape[-1]
    if head_dim not in TRITON_HEAD_DIMS:
        return f"head dim {head_dim} is not supported by the Triton kernels (supported: {TRITON_HEAD_DIMS})"
    return None


def select_backend(q: torch.Tensor, requested: str = "auto") -> str:
    """The backend to run: "triton", "reference" or "flex".

    "auto" -> "triton" for CUDA tensors the kernels support, else "reference".
    "triton" where Triton cannot run raises RuntimeError naming the reason (never a silent fallback:
    someone asking for the kernel explicitly is measuring or testing it).
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; valid backends: {BACKENDS}")
    if requested == "reference":
        return "reference"
    if requested == "flex":
        _require_flex()
        return "flex"
    reason = triton_unavailable_reason(q)
    if requested == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return "triton"
    return "triton" if reason is None and q.is_cuda else "reference"


def _require_flex() -> None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5): {exc}") from exc


def select_op_backend(x: torch.Tensor, requested: str = "auto", *, op: str, unsupported: str | None = None) -> str:
    """The backend for a row-wise or element-wise op (rms_norm, apply_rope, swiglu): "triton" or "reference".

    Same rules as `select_backend` without its head-dim rule (these kernels mask any width); `op`
    names the op in errors and `unsupported` is the op's own reason its kernel cannot take these
    inputs (a second dtype, a width too large for one block, ...), None when it can.
    """
    if requested not in OP_BACKENDS:
        raise ValueError(f"unknown {op} backend {requested!r}; valid backends: {OP_BACKENDS}")
    if requested == "reference":
        return "reference"
    reason = _device_dtype_reason(x) or unsupported
    if requested == "triton":
        if reason is not None:
            raise RuntimeError(f"{op}(backend='triton') cannot run: {reason}")
        return "triton"
    return "triton" if reason is None and x.is_cuda else "reference"


def check_launchable(kernel, x: torch.Tensor) -> None:
    """Raise when `kernel` (a @triton.jit function) was compiled for the GPU but `x` is on the CPU:
    TRITON_INTERPRET was set after the kernel's module was imported, too late for triton to see it."""
    from triton.runtime.interpreter import InterpretedFunction

    if not x.is_cuda and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError("the Triton kernels were compiled for the GPU but got CPU tensors: set "
                           "TRITON_INTERPRET=1 before mllm.kernels is first imported to run them on CPU")
