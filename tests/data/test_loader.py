"""StageLoader / MixtureStream: deterministic order, exact resume, rank slices, rejection counting."""

from __future__ import annotations

from collections import Counter

import pytest

from mllm.data.loader import DataQualityError, MixtureStream, StageLoader
from mllm.data.sources import CorruptImageError, Record
from mllm.processing import SampleTooLongError


class ListSource:
    """`n` text-only records `name-i`; indices in `bad` get keys ending in `-bad`, which `encode` rejects."""

    def __init__(self, name: str, n: int, bad: tuple[int, ...] = ()):
        self.name = name
        self.records = [Record(f"{name}-{i}" + ("-bad" if i in bad else ""), None, {"i": i}) for i in range(n)]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def encode(record: Record) -> dict:
    if record.key.endswith("-bad"):
        raise CorruptImageError(f"{record.key}: unreadable")
    return {"key": record.key}


def collate(samples):
    return [s["key"] for s in samples]


def make_loader(stream, **kw):
    args = dict(micro_batch_size=2, grad_accum=2, world_size=1, rank=0)
    args.update(kw)
    return StageLoader(stream, encode, collate, **args)


def test_epoch_is_a_permutation_and_seed_dependent():
    stream = MixtureStream([ListSource("a", 10)], [1.0], seed=0)
    epoch0 = [stream[i].key for i in range(10)]
    assert sorted(epoch0) == sorted(f"a-{i}" for i in range(10))
    assert [stream[i].key for i in range(10, 20)] != epoch0  # reshuffled each epoch
    other = MixtureStream([ListSource("a", 10)], [1.0], seed=1)
    assert [other[i].key for i in range(10)] != epoch0
    assert [MixtureStream([ListSource("a", 10)], [1.0], seed=0)[i].key for i in range(10)] == epoch0


def test_mixture_weights_set_the_share_of_each_source():
    stream = MixtureStream([ListSource("a", 100), ListSource("b", 100)], [3.0, 1.0], seed=0)
    counts = Counter(stream[i].key.split("-")[0] for i in range(stream.epoch_len))
    assert counts == {"a": 150, "b": 50}


def test_the_realised_mix_is_reported_and_exact_per_epoch():
    stream = MixtureStream([ListSource("a", 100), ListSource("b", 100)], [3.0, 1.0], seed=0)
    loader = make_loader(stream, micro_batch_size=4, grad_accum=1, world_size=2)
    assert loader.target_mix() == {"0:a": 0.75, "1:b": 0.25}
    steps = stream.epoch_len // loader.global_batch_size  # 25 steps of 8 = one epoch of 200
    seen = Counter()
    for step in range(steps):
        seen.update(key.split("-")[0] for key in loader.next_step()[0])  # rank 0's half
        if step == 4:
            early = loader.mix()
            assert set(early) == {"0:a", "1:b"} and abs(sum(early.values()) - 1) < 1e-12
    assert loader.mix() == {"0:a": 0.75, "1:b": 0.25}  # the whole global batch, both ranks: exact per epoch
    other = make_loader(stream, micro_batch_size=4, grad_accum=1, world_size=2, rank=1)
    other.load_state_dict(loader.state_dict())  # a resumed loader recounts from position 0
    assert other.mix() == loader.mix()
    assert sum(seen.values()) == 100  # rank 0 read its half of the epoch


def test_resume_from_state_continues_the_same_sequence():
    stream = MixtureStream([ListSource("a", 7), ListSource("b", 5)], [1.0, 1.0], seed=3)
    full = make_loader(stream)
    reference = [full.next_step() for _ in range(6)]
    first = make_loader(stream)
    for _ in range(2):
        first.next_step()
    resumed = make_loader(stream)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.next_step() for _ in range(4)] == reference[2:]


def test_ranks_split_the_global_batch_without_overlap():
    stream = MixtureStream([ListSource("a", 64)], [1.0], seed=0)
    single = make_loader(stream, micro_batch_size=2, grad_accum=2, world_size=1)
    ranks = [make_loader(stream, micro_batch_size=2, grad_accum=1, world_size=2, rank=r) for r in range(2)]
    for _ in range(3):
        want = sorted(k for batch in single.next_step() for k in batch)
        got = sorted(k for loader in ranks for batch in loader.next_step() for k in batch)
        assert got == want


def test_bad_samples_are_skipped_counted_and_abort_past_the_limit():
    source = ListSource("a", 20)
    for i in (3, 11):
        source.records[i] = Record("a-bad", b"", {})
    stream = MixtureStream([source], [1.0], seed=0)
    loader = make_loader(stream, micro_batch_size=4, grad_accum=1, max_bad_fraction=0.5, min_samples_before_abort=1)
    keys = [k for _ in range(5) for batch in loader.next_step() for k in batch]
    assert len(keys) == 18 and "a-bad" not in keys
    assert loader.rejected == {"CorruptImageError": 2}
    assert loader.quality_problem() is None
    strict = make_loader(stream, micro_batch_size=4, grad_accum=1, max_bad_fraction=0.01, min_samples_before_abort=1)
    for _ in range(5):
        strict.next_step()
    assert "CorruptImageError: 2" in strict.quality_problem()


def test_all_rejected_micro_batch_becomes_a_zero_target_sample():
    # Every rank must still run a forward/backward for each micro-batch (ZeRO-3 gathers inside them),
    # so an all-rejected micro-batch is replaced by a copy of a good sample without targets.
    def encode_lm(record):
        if record.meta["i"] != 0:
            raise SampleTooLongError(f"{record.key}: too long")
        return {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}

    seed = next(s for s in range(100) if MixtureStream([ListSource("a", 4)], [1.0], seed=s)[0].meta["i"] == 0)
    stream = MixtureStream([ListSource("a", 4)], [1.0], seed=seed)
    loader = StageLoader(stream, encode_lm, lambda s: s, micro_batch_size=1, grad_accum=4)
    batches = loader.next_step()
    assert batches[0] == [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]
    assert batches[1:] == [[{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}]] * 3
    assert loader.rejected == {"SampleTooLongError": 3}


def test_first_micro_batch_without_any_usable_sample_is_an_error():
    def reject(record):
        raise SampleTooLongError(f"{record.key}: too long")

    loader = StageLoader(MixtureStream([ListSource("a", 4)], [1.0], seed=0), reject, lambda s: s,
                         micro_batch_size=2, grad_accum=1)
    with pytest.raises(DataQualityError, match="no usable sample"):
        loader.next_step()


def test_empty_source_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        MixtureStream([ListSource("a", 0)], [1.0], seed=0)


def test_source_problems_are_counted_once_with_keys_and_named_in_the_abort_message():
    from mllm.data.sources import Rejection

    source = ListSource("a", 20)
    source.problems = [Rejection("MissingShard", "shards/a-000007.tar", "not found"),
                       Rejection("BadRecordError", "a-x", "empty conversations"),
                       Rejection("BadRecordError", "a-y", "value is a number")]
    stream = MixtureStream([source], [1.0], seed=0)
    rank0 = make_loader(stream, world_size=2, rank=0, max_bad_fraction=0.05, min_samples_before_abort=1)
    rank1 = make_loader(stream, world_size=2, rank=1, max_bad_fraction=0.05, min_samples_before_abort=1)
    assert rank0.rejected == {"MissingShard": 1, "BadRecordError": 2} and rank1.rejected == {}  # not per rank
    message = rank0.quality_problem()
    # Worst offender first, with example keys.
    assert message.index("BadRecordError: 2 (e.g. a-x, a-y)") < message.index("MissingShard: 1 (e.g. shards/a-000007")
    state = rank0.state_dict()
    resumed = make_loader(stream, world_size=2, rank=0)
    resumed.load_state_dict(state)
    assert resumed.rejected == rank0.rejected and resumed.rejected_keys == rank0.rejected_keys


def test_a_record_that_fails_to_load_is_skipped_with_its_position():
    from mllm.data.sources import MissingImageError

    class Flaky(ListSource):
        def __getitem__(self, i):
            if i == 2:
                raise MissingImageError("image 'x.png' of record 'a-2' not found")
            return self.records[i]

    loader = make_loader(MixtureStream([Flaky("a", 8)], [1.0], seed=0), micro_batch_size=8, grad_accum=1)
    keys = [k for batch in loader.next_step() for k in batch]
    assert len(keys) == 7 and loader.rejected == {"MissingImageError": 1}
