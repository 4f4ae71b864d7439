"""Length grouping and window packing: every sample exactly once, deterministic, less padding, the same
target tokens (the loss normaliser), and identical batches built in 0 or 2 worker processes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mllm.data.batching import group_by_length, pack_micro_batches
from mllm.data.loader import Batching, MixtureStream, StageLoader
from mllm.data.packing import collate_packed
from mllm.data.sources import LlavaJsonSource, WebDatasetSource
from mllm.train.objectives import LMObjective


def test_group_by_length_uses_every_sample_once_in_groups_of_equal_size():
    rng = random.Random(0)
    lengths = [rng.randint(5, 90) for _ in range(50)]
    groups = group_by_length(lengths, 6, np.random.default_rng(0))
    assert sorted(i for g in groups for i in g) == list(range(50))
    assert sorted(len(g) for g in groups) == [8, 8, 8, 8, 9, 9]
    assert groups == group_by_length(lengths, 6, np.random.default_rng(0))  # deterministic
    spread = [max(lengths[i] for i in g) - min(lengths[i] for i in g) for g in groups]
    assert max(spread) < (max(lengths) - min(lengths)) / 2  # each group holds similar lengths
    assert group_by_length([3, 1], 4, np.random.default_rng(0)).count([]) == 2  # fewer samples than groups


@pytest.mark.parametrize("seed", range(4))
def test_window_packing_uses_every_sample_once_fits_rows_and_balances_tokens(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(4, 60) for _ in range(rng.randint(20, 80))]
    micro = pack_micro_batches(lengths, 64, n_micro=4)
    rows = [row for m in micro for row in m]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    tokens = [sum(lengths[i] for row in m for i in row) for m in micro]
    assert max(tokens) - min(tokens) <= 64  # at most one row apart
    assert micro == pack_micro_batches(lengths, 64, n_micro=4)
    # Fewer rows than micro-batches: full rows give up samples so no micro-batch is left empty.
    few = pack_micro_batches([10, 10, 10, 10, 10], 64, n_micro=3)
    assert all(few) and sorted(i for m in few for row in m for i in row) == [0, 1, 2, 3, 4]


def test_collate_packed_honours_given_rows_and_refuses_overlong_ones():
    samples = [{"input_ids": [7] * n, "labels": [7] * n, "modality_ids": [0] * n, "key": f"s{n}"} for n in (3, 4, 5)]
    batch = collate_packed(samples, max_length=9, pad_id=0, rows=[[2], [0, 1]])
    assert batch["keys"] == ["s5", "s3", "s4"] and batch["attention_mask"].sum(1).tolist() == [5, 7]
    with pytest.raises(ValueError, match="longer than max_length"):
        collate_packed(samples, max_length=9, pad_id=0, rows=[[0, 1, 2]])


# --------------------------------------------------------------------------- through the real objective

MAX_LENGTH = 256


@pytest.fixture
def objective(tiny, tokenizer):
    return LMObjective(None, tiny.processor(tokenizer, tiny.config()), MAX_LENGTH, packing=False)


def vqa_mix(world) -> MixtureStream:
    """The demo's instruct mixture: VQA (LLaVA JSON) : captions (shards) = 3 : 1."""
    sources = [LlavaJsonSource(world / "llava" / "train_vqa.json"),
               WebDatasetSource(str(world / "wds" / "train-caption-*.tar"))]
    return MixtureStream(sources, [3.0, 1.0], seed=0)


def stage_loader(objective, stream, mode, window_steps, **kw):
    objective.packing = mode == "packed"
    return StageLoader(stream, objective.encode, objective.collate, batching=Batching(mode, window_steps, MAX_LENGTH),
                       **{"micro_batch_size": 32, "grad_accum": 1, **kw})


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("mode", ["fixed", "grouped", "packed"])
def test_zero_and_two_workers_give_identical_batches(objective, synth_world, mode):
    stream = vqa_mix(synth_world)
    runs = []
    for workers in (0, 2):
        loader = stage_loader(objective, stream, mode, 2, micro_batch_size=6, grad_accum=2, num_workers=workers)
        runs.append([b for _ in range(4) for b in loader.next_step()])
        loader.close()
    assert_same_batches(*runs)
    assert "pixel_values" in runs[0][0] and len(runs[0]) == 8


def test_packing_a_window_cuts_padding_below_five_percent_and_keeps_every_target(objective, synth_world):
    stream = vqa_mix(synth_world)
    results = {}
    for mode, window_steps in (("fixed", 4), ("grouped", 4), ("packed", 4), ("packed", 1)):
        loader = stage_loader(objective, stream, mode, window_steps)
        batches = [b for _ in range(4) for b in loader.next_step()]  # one window: 128 samples
        mask = [b["attention_mask"] for b in batches]
        results[mode, window_steps] = {
            "padding": 1 - sum(int(m.sum()) for m in mask) / sum(m.numel() for m in mask),
            "keys": sorted(k for b in batches for k in b["keys"]),
            "targets": sum(LMObjective.count(b) for b in batches),
        }
    fixed, grouped, packed = results["fixed", 4], results["grouped", 4], results["packed", 4]
    assert fixed["keys"] == grouped["keys"] == packed["keys"] == sorted(stream[p].key for p in range(128))
    # The global target-token count the loss is normalised by does not change with the batching.
    assert fixed["targets"] == grouped["targets"] == packed["targets"]
    assert packed["padding"] < 0.05 < grouped["padding"] < fixed["padding"]
    assert packed["padding"] < results["packed", 1]["padding"]  # a bigger window packs tighter


def test_data_config_refuses_conflicting_or_negative_settings():
    from mllm.schema import ConfigError, from_dict
    from mllm.train.config import DataSpec

    spec = from_dict(DataSpec, {"packing": True, "buffer_size": 256, "num_workers": 4, "prefetch_factor": 4})
    assert (spec.buffer_size, spec.num_workers, spec.group_by_length) == (256, 4, False)
    with pytest.raises(ConfigError, match="packing and group_by_length are alternatives"):
        from_dict(DataSpec, {"packing": True, "group_by_length": True})
    with pytest.raises(ConfigError, match="num_workers must be >= 0, got -1"):
        from_dict(DataSpec, {"num_workers": -1})
