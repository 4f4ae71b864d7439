"""Attention layouts as one key interval per query: `[kv_start[t], kv_end[t])` (DESIGN.md §3).

| pattern                      | kv_start[t]              | kv_end[t]                                     |
|------------------------------|--------------------------|-----------------------------------------------|
| causal text (+ packing)      | start of t's document    | t + 1                                         |
| MMA image token              | start of t's document    | first assistant-turn start after t, >= end of  |
|                              |                          | t's image span, >= t + 1                      |
| padding                      | empty window             |                                               |
| sliding window w             | max(doc start, t - w + 1)| t + 1                                         |

MMA (AKI, "Seeing is Understanding"): image tokens also see the user text that follows them, up to
but not including the assistant turn, so answers never leak into image states; text stays causal.
Our form also makes each image span bidirectional and handles many images, turns and documents.
The vectors are built once per batch (8 bytes per token; nothing O(T^2)) and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("causal", "mma", "mma_aki")


@dataclass
class AttentionLayout:
    """Per-row key windows for a padded batch: kv_start / kv_end are [B, T] int32 row-local indices."""

    kv_start: torch.Tensor
    kv_end: torch.Tensor
    mode: str = "causal"
    # mma_aki keeps the image block causal, which is not one interval: a dense mask (reference only).
    dense_mask: torch.Tensor | None = None


def _segment_starts(flags: torch.Tensor) -> torch.Tensor:
    """For each position, the index of the last position <= t where `flags` is True (else 0). [B, T]"""
    B, T = flags.shape
    idx = torch.arange(T, device=flags.device).expand(B, T)
    marked = torch.where(flags, idx, torch.zeros_like(idx))
    return torch.cummax(marked, dim=1).values


def _next_index(flags: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """For each position t, the smallest index > t where `flags` is True, else `default`. [B, T]"""
    B, T = flags.shape
    idx = torch.arange(T, device=flags.device).expand(B, T)
    big = torch.full_like(idx, T + 1)
    marked = torch.where(flags, idx, big)
    # Reverse cumulative min gives the first flagged index at or after t; shift to "after t".
    at_or_after = torch.flip(torch.cummin(torch.flip(marked, [1]), dim=1).values, [1])
    after = torch.cat([at_or_after[:, 1:], big[:, :1]], dim=1)
    return torch.where(after <= T, after, default)


def compute_layout(
    attention_mask: torch.Tensor | None,
    modality_ids: torch.Tensor | None,
    assistant_starts: torch.Tensor | None,
    mode: str = "causal",
    document_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> AttentionLayout:
    """Windows for a batch.

    attention_mask [B, T] (1 real, 0 padding; left or right), modality_ids [B, T] (1 image),
    assistant_starts [B, T] bool (True on the first token of every assistant turn),
    document_ids [B, T] for packed rows (a new document where the id changes).
    """
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; valid: {', '.join(MODES)}")
    ref = next(t for t in (attention_mask, modality_ids, assistant_starts, document_ids) if t is not None)
    B, T = ref.shape
    device = ref.device
    real = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
    idx = torch.arange(T, device=device).expand(B, T)

    # A document starts at the first real token and wherever document_ids change.
    new_doc = real & ~torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=device), real[:, :-1]], dim=1)
    if document_ids is not None:
        changed = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device),
                             document_ids[:, 1:] != document_ids[:, :-1]], dim=1)
        new_doc |= changed & real
    doc_start = _segment_starts(new_doc)
    doc_id = torch.cumsum(new_doc.long(), dim=1)  # [B, T] increasing document counter

    kv_start = doc_start.clone()
    kv_end = idx + 1
    if sliding_window is not None:
        kv_start = torch.maximum(kv_start, idx - sliding_window + 1)

    dense = None
    if mode != "causal" and modality_ids is not None:
        image = modality_ids.bool() & real
        doc_end = _next_index(new_doc, torch.full_like(idx, T))  # start of the next document (or T)
        # End of each image span: the first non-image position after t (spans are runs of image tokens).
        span_end = _next_index(~image, torch.full_like(idx, T))
        question_end = _next_index(assistant_starts.bool() & real, doc_end) if assistant_starts is not None \
            else span_end
        question_end = torch.minimum(question_end, doc_end)  # never past the document
        if mode == "mma":
            image_end = torch.maximum(torch.maximum(span_end, question_end), idx + 1)
            kv_end = torch.where(image, image_end, kv_end)
        else:  # mma_aki: image tokens see earlier tokens (causal) plus the text after their span
            dense = _aki_dense_mask(kv_start, kv_end, image, span_end, question_end, doc_id)
    kv_start = torch.where(real, kv_start, idx)
    kv_end = torch.where(real, kv_end, idx)  # padding: empty window
    return AttentionLayout(kv_start.to(torch.int32), kv_end.to(torch.int32), mode, dense)


def _aki_dense_mask(kv_start, kv_end, image, span_end, question_end, doc_id) -> torch.Tensor:
    """AKI exactly: causal everywhere, plus image token -> [end of its image span, question end)."""
    B, T = kv_start.shape
    key = torch.arange(T, device=kv_start.device).view(1, 1, T)
    causal = (key >= kv_start.unsqueeze(-1)) & (key < kv_end.unsqueeze(-1))
    extra = image.unsqueeze(-1) & (key >= span_end.unsqueeze(-1)) & (key < question_end.unsqueeze(-1))
    return causal | extra  # [B, T, T]


def dense_mask(layout: AttentionLayout) -> torch.Tensor:
    """[B, T, T] bool (reference backends and tests only)."""
    if layout.dense_mask is not None:
        return layout.dense_mask
    T = layout.kv_start.shape[1]
    key = torch.arange(T, device=layout.kv_start.device).view(1, 1, T)
    return (key >= layout.kv_start.unsqueeze(-1).long()) & (key < layout.kv_end.unsqueeze(-1).long())
