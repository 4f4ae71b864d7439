"""Sequence packing: several samples in one row up to `max_length`, never splitting a sample.

`pack_bins` places samples first-fit by decreasing length (deterministic: ties keep input order).
`collate_packed` builds the rows: position ids restart at 0 for every sample, `document_ids` mark the
samples so the attention layout (mllm.attention.layout, `kv_start` at the document start) keeps them
from attending to each other, and each sample's first label is ignored, so the last token of one
sample never learns to predict the first token of the next: exactly what the padded batch computes.
Image tensors are reordered to the row-major order of their `<image>` tokens in the packed rows.
"""

from __future__ import annotations

import torch

from mllm.processing import IGNORE_INDEX


def pack_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of the samples in each row (first-fit decreasing)."""
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"samples {too_long} are longer than max_length {max_length}; they must be rejected before packing")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        for b, free in enumerate(space):
            if lengths[i] <= free:
                bins[b].append(i)
                space[b] -= lengths[i]
                break
        else:
            bins.append([i])
            space.append(max_length - lengths[i])
    return [sorted(b) for b in bins]  # inside a row, keep the samples' original order


def collate_packed(samples: list[dict], max_length: int, pad_id: int) -> dict:
    """Samples with input_ids / labels / modality_ids (lists) and optional pixel_values -> packed rows."""
    bins = pack_bins([len(s["input_ids"]) for s in samples], max_length)
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in bins)
    shape = (len(bins), width)
    batch = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
             "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros(shape, dtype=torch.long),
             "position_ids": torch.zeros(shape, dtype=torch.long),
             "document_ids": torch.full(shape, -1, dtype=torch.long),
             "modality_ids": torch.zeros(shape, dtype=torch.long)}
    pixels, keys = [], []
    for r, row in enumerate(bins):
        at = 0
        for doc, i in enumerate(row):
            sample = samples[i]
            n = len(sample["input_ids"])
            span = slice(at, at + n)
            batch["input_ids"][r, span] = torch.tensor(sample["input_ids"])
            labels = torch.tensor(sample["labels"])
            labels[0] = IGNORE_INDEX  # the previous document's last token must not predict this one
            batch["labels"][r, span] = labels
            batch["attention_mask"][r, span] = 1
            batch["position_ids"][r, span] = torch.arange(n)
            batch["document_ids"][r, span] = doc
            batch["modality_ids"][r, span] = torch.tensor(sample["modality_ids"])
            if "pixel_values" in sample:
                pixels.append(sample["pixel_values"])
            keys.append(sample.get("key"))
            at += n
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    batch["keys"] = keys
    return batch


def padding_fraction(batch: dict) -> float:
    """Share of the batch's token slots that are padding."""
    mask = batch["attention_mask"]
    return 1.0 - float(mask.sum()) / mask.numel()
