"""Packing: rows hold whole samples up to max_length; a packed batch gives every sample the same loss and
the model the same gradients as the padded batch (fp32), with causal and MMA layouts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mllm.data.packing import collate_packed, pack_bins, padding_fraction
from mllm.processing import pad_rows
from tests.attention.test_layout_and_mma import build, spec  # noqa: F401  (fixture)


def test_packing_never_splits_and_respects_max_length():
    lengths = [7, 3, 5, 2, 9, 4, 1]
    bins = pack_bins(lengths, max_length=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every sample, once
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 31 tokens need at least 4 rows of 10; the packer finds 4
    with pytest.raises(ValueError, match="longer than max_length"):
        pack_bins([11], max_length=10)


def conversations():
    turns = [("What color is the circle?", "red"), ("How many shapes are there?", "two"),
             ("What shape is at the top left?", "a blue square near the corner")]
    return [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
             {"role": "assistant", "content": [{"type": "text", "text": a}]}] for q, a in turns]


def per_token_loss(logits, labels):
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    return F.pad(loss, (1, 0))  # [B, T]: the loss of predicting token t, at position t


@pytest.mark.parametrize("mode", ["causal", "mma"])
def test_packed_equals_padded_per_sample_losses_and_gradients(spec, tiny, synth_world, mode):
    model, processor = build(spec, mode, "reference")
    images = tiny.images(synth_world, 3)
    samples = []
    for i, (messages, image) in enumerate(zip(conversations(), images)):
        sample = processor.encode_conversation(messages, 1)
        sample["pixel_values"] = processor.preprocess_images([image])
        sample["key"] = f"s{i}"
        samples.append(sample)
    lengths = [len(s["input_ids"]) for s in samples]

    padded = pad_rows([s["input_ids"] for s in samples], 0, "right", label_rows=[s["labels"] for s in samples])
    padded["modality_ids"] = pad_rows([s["modality_ids"] for s in samples], 0, "right")["input_ids"]
    padded["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    packed = collate_packed(samples, max_length=lengths[0] + lengths[1] + 1, pad_id=0)
    keys = packed.pop("keys")
    assert packed["input_ids"].shape[0] == 2 and padding_fraction(packed) < padding_fraction(padded)

    def run(batch, packed_rows):
        m = copy.deepcopy(model).train()
        labels = batch["labels"]
        logits = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
        tokens = per_token_loss(logits, labels)
        if packed_rows:  # per sample: sum over its document's positions
            losses = {}
            for r in range(tokens.shape[0]):
                for d in batch["document_ids"][r].unique().tolist():
                    if d >= 0:
                        losses[len(losses)] = tokens[r][batch["document_ids"][r] == d].sum()
            ordered = [losses[keys.index(f"s{i}")] for i in range(3)]
        else:
            ordered = list(tokens.sum(1))
        torch.stack(ordered).sum().backward()
        return torch.stack(ordered).detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    loss_padded, grads_padded = run(padded, False)
    loss_packed, grads_packed = run(packed, True)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-4, rtol=1e-5)
    assert set(grads_packed) == set(grads_padded)
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], atol=1e-5, rtol=1e-4, msg=name)
    # It can fail: without document boundaries the second sample of a row sees the first one.
    leaky = {k: v for k, v in packed.items() if k != "document_ids"}
    leaky_losses = per_token_loss(model(**{k: v for k, v in leaky.items() if k != "labels"}).logits,
                                  leaky["labels"]).sum()
    assert (leaky_losses - loss_padded.sum()).abs() > 1e-3


def test_packed_batch_needs_interval_attention(spec, tiny, synth_world):
    model, processor = build(spec, "causal", "sdpa")  # the backbone's own attention: no document windows
    sample = processor.encode_conversation(conversations()[0], 1)
    sample["pixel_values"] = processor.preprocess_images(tiny.images(synth_world, 1))
    batch = collate_packed([sample, dict(sample)], max_length=10_000, pad_id=0)
    batch.pop("keys")
    with pytest.raises(ValueError, match="interval attention"):
        model(**{k: v for k, v in batch.items() if k != "labels"})
