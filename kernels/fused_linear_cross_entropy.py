"""Fused lm_head + cross-entropy: the loss of `hidden @ weight.T` without the [N, V] logits.

With a 32k-128k vocabulary the logits dominate a training step's activation memory: N = 16k tokens
x V = 128k is 8 GB in fp32, and unfused cross-entropy keeps several tensors that size alive
(logits, log-softmax, their gradients). Here tokens go through in chunks (the Liger-Kernel
approach): each chunk's logits [C, V] are computed, turned into the chunk's loss and, in the same
pass, into dloss/dlogits = softmax - onehot(label), which is immediately multiplied into
dloss/dhidden [C, D] and accumulated into dloss/dweight [V, D]. The forward therefore returns the
loss with both gradients already computed; the backward only scales them by grad_output. Peak
memory is O(C * V + V * D + N * D) instead of O(N * V).

Numerics match the full-logits reference `F.cross_entropy((hidden @ weight.T).float(), ...)`:
each chunk's matmul runs in the input dtype (fp32 accumulation inside the GEMM, as in the
reference), the softmax and loss in fp32, dweight is accumulated over chunks in fp32, and the
gradients come back in the input dtype.

Plain PyTorch (it runs anywhere; the GEMMs dominate and are already cuBLAS / oneDNN), so its twin
is the unchunked formula rather than a Triton kernel:
  * `fused_linear_cross_entropy_reference`: full logits then F.cross_entropy (the ground truth).
  * `FusedLinearCrossEntropyFunction`: the chunked loop, gradients computed in the forward.
  * `fused_linear_cross_entropy`: validation, chunk size, and the loss sum with the target count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# Reference twin
# ------------------------------------------------------------------------------------------------
def fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index: int = -100):
    """(loss_sum, target_count) from the full [N, V] logits: the definition the fused op must equal."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()  # [N, V]
    labels = labels.reshape(-1).long()
    loss_sum = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss_sum, (labels != ignore_index).sum()


# ------------------------------------------------------------------------------------------------
# The chunked loop
# ------------------------------------------------------------------------------------------------
def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Liger-Kernel's rule: a chunk's logits [C, V] about as large as all hidden states [N, D]
    (C = N / ceil(V / D), rounded up to a power of two), so the logits never dominate memory.
    N = 4096, D = 1024, V = 32000 -> C = 128 (16 MB of fp32 logits instead of 512 MB)."""
    n_chunks = max(1, -(-vocab_size // max(hidden_size, 1)))
    chunk = max(1, -(-n_tokens // n_chunks))
    return 1 << (chunk - 1).bit_length()


def _chunked_loss_and_grads(hidden, weight, labels, ignore_index: int, chunk_size: int,
                            need_hidden_grad: bool, need_weight_grad: bool):
    """hidden [N, D], weight [V, D], labels [N] -> loss_sum (fp32 scalar), dloss_sum/dhidden [N, D]
    (or None), dloss_sum/dweight [V, D] (or None), gradients in the inputs' dtypes."""
    N, D = hidden.shape
    low_precision = hidden.dtype != torch.float32
    loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype) if need_hidden_grad else None
    # fp32 accumulator: summing N / C chunk contributions in bf16 would lose ~log2(N / C) bits
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight_grad else None
    for start in range(0, N, chunk_size):
        h = hidden[start:start + chunk_size]  # [C, D]
        label = labels[start:start + chunk_size]  # [C]
        logits = (h @ weight.T).float()  # [C, V]: the reference's (hidden @ weight.T).float(), chunk by chunk
        valid = label != ignore_index  # [C]
        target = torch.where(valid, label, 0)[:, None]  # ignored rows point at class 0, then get zero weight
        lse = torch.logsumexp(logits, dim=-1)  # [C]
        loss_sum += torch.where(valid, lse - logits.gather(1, target)[:, 0], 0.0).sum()
        if grad_hidden is None and grad_weight is None:
            continue
        # dloss/dlogits = softmax - onehot(target) on valid rows, 0 on ignored ones; in place, so a
        # chunk never holds more than one [C, V] fp32 buffer (two for 16-bit inputs: the cast below)
        dlogits = logits.sub_(lse[:, None]).exp_()
        dlogits.scatter_add_(1, target, -valid[:, None].float())
        dlogits.mul_(valid[:, None])
        dlogits = dlogits.to(hidden.dtype)  # the reference's backward casts dlogits to the input dtype too
        if grad_hidden is not None:
            torch.mm(dlogits, weight, out=grad_hidden[start:start + chunk_size])  # [C, D]
        if grad_weight is not None:
            if low_precision:  # a 16-bit GEMM (tensor cores, fp32 inside), its [V, D] result summed in fp32
                grad_weight += dlogits.T @ h
            else:
                grad_weight.addmm_(dlogits.T, h)  # [V, D], no temporary
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_sum, grad_hidden, grad_weight


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked loop: the forward computes the gradients of loss_sum, the
    backward scales them by grad_output in place (so a second backward through it is refused)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size):
        loss_sum, grad_hidden, grad_weight = _chunked_loss_and_grads(
            hidden, weight, labels, ignore_index, chunk_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        # ctx attributes, not save_for_backward: these are our own buffers, neither inputs nor outputs
        ctx.grads = (grad_hidden, grad_weight)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy supports one backward per forward: its gradients are "
                               "computed in the forward and handed over (scaled in place) by the first backward")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # hand the buffers over: autograd can then take them as .grad without a copy
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.mul_(grad_output)
        return grad_hidden, grad_weight, None, None, None


# ------------------------------------------------------------------------------------------------
# Validation and public entry point
# ------------------------------------------------------------------------------------------------
def check_inputs(hidden, weight, labels, ignore_index: int, chunk_size) -> None:
    """Raise ValueError naming the offending argument when the inputs do not form a valid call."""
    if not isinstance(hidden, torch.Tensor) or hidden.ndim < 1 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point [N, D] tensor, got {getattr(hidden, 'shape', hidden)}")
    D = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must be the lm_head weight [V, D] with D = {D} (hidden's last dim), "
                         f"got {tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight and hidden must share dtype and device, got weight {weight.dtype} {weight.device} "
                         f"and hidden {hidden.dtype} {hidden.device}")
    if (not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:-1]
            or labels.dtype not in (torch.int32, torch.int64) or labels.device != hidden.device):
        raise ValueError(f"labels must be an int64/int32 tensor of shape {tuple(hidden.shape[:-1])} (hidden's "
                         f"leading dims) on {hidden.device}, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    V = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))  # one host sync per call
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"label {int(labels[index])} at {index} is outside the vocabulary [0, {V}) and is not "
                         f"ignore_index={ignore_index}")


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, chunk_size: int | None = None):
    """(loss_sum, target_count): the summed cross-entropy of logits = hidden @ weight.T against
    labels, and the number of labels that are not ignore_index (divide for the mean).

    hidden [N, D] (or [..., D]), weight [V, D] (lm_head, no bias), labels [N] (or [...]) int64.
    loss_sum is fp32 and equals F.cross_entropy((hidden @ weight.T).float(), labels,
    ignore_index=ignore_index, reduction="sum") in value and gradients, without the [N, V] logits;
    `chunk_size` tokens go through at a time (None: `default_chunk_size`).
    """
    check_inputs(hidden, weight, labels, ignore_index, chunk_size)
    hidden2 = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    labels2 = labels.reshape(-1).long()  # [N]; gather and scatter index with int64
    chunk = chunk_size or default_chunk_size(*hidden2.shape, weight.shape[0])
    target_count = (labels2 != ignore_index).sum()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss_sum = FusedLinearCrossEntropyFunction.apply(hidden2, weight, labels2, ignore_index, chunk)
    else:  # evaluation: the loss only, no gradient buffers
        loss_sum = _chunked_loss_and_grads(hidden2, weight, labels2, ignore_index, chunk, False, False)[0]
    return loss_sum, target_count


__all__ = [
    "FusedLinearCrossEntropyFunction",
    "check_inputs",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
]
