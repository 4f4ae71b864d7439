"""DataLoader workers and ranks: disjoint reads that cover the epoch, identical batches for any worker
count, exact resume (sample keys) inside a batching window, and no rank desynchronisation with uneven
shards (checked with simulated ranks and with two real gloo processes running a collective per
micro-batch, which hangs if the ranks disagree on the number of micro-batches)."""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter

import pytest
import torch

from mllm.data.loader import Batching, MixtureStream, StageLoader
from mllm.data.shards import add_member
from mllm.data.sources import CorruptImageError, Record, WebDatasetSource
from tests.data.test_loader import ListSource


def encode(record: Record) -> dict:
    """A token sample whose length depends on the key; remembers the worker process that built it."""
    if record.key.endswith("-bad"):
        raise CorruptImageError(f"{record.key}: unreadable")
    info = torch.utils.data.get_worker_info()
    n = 3 + sum(map(ord, record.key)) % 17
    return {"input_ids": [1] * n, "labels": [1] * n, "modality_ids": [0] * n, "key": record.key,
            "worker": None if info is None else info.id, "pid": os.getpid()}


def collate(samples: list[dict], rows: list[list[int]] | None = None) -> dict:
    keys = [s["key"] for s in samples]
    return {"keys": keys, "rows": None if rows is None else [[keys[i] for i in row] for row in rows],
            "workers": sorted({s["worker"] for s in samples}, key=str), "pids": {s["pid"] for s in samples},
            "tokens": sum(len(s["input_ids"]) for s in samples)}


def loader(stream, batching=Batching(), **kw) -> StageLoader:
    args = dict(micro_batch_size=3, grad_accum=2, world_size=1, rank=0, batching=batching)
    args.update(kw)
    return StageLoader(stream, encode, collate, **args)


def keys_of(steps) -> list[str]:
    return [k for step in steps for batch in step for k in batch["keys"]]


def same_content(a: list, b: list) -> bool:
    """Batches equal apart from which worker process built them."""
    strip = lambda steps: [[{k: v for k, v in batch.items() if k not in ("workers", "pids")} for batch in step]
                           for step in steps]  # noqa: E731
    return strip(a) == strip(b)


def test_two_ranks_times_two_workers_read_disjoint_samples_whose_union_is_the_epoch():
    stream = MixtureStream([ListSource("a", 30), ListSource("b", 18)], [1.0, 1.0], seed=0)
    steps = stream.epoch_len // (3 * 2 * 2)  # 48 samples, 12 per step -> 4 steps = one epoch
    per_rank = []
    for rank in range(2):
        ranked = loader(stream, world_size=2, rank=rank, num_workers=2)
        per_rank.append([ranked.next_step() for _ in range(steps)])
        ranked.close()
    keys = [keys_of(steps_) for steps_ in per_rank]
    assert not set(keys[0]) & set(keys[1])
    assert Counter(keys[0] + keys[1]) == Counter(stream[i].key for i in range(stream.epoch_len))  # each once
    for steps_ in per_rank:
        # Both worker processes did work (windows alternate between them), none of it in this process.
        assert {w for step in steps_ for batch in step for w in batch["workers"]} == {0, 1}
        assert os.getpid() not in {p for step in steps_ for batch in step for p in batch["pids"]}
        # One window (here one step) is built by one worker, so a worker's samples are disjoint from the other's.
        assert [step[0]["workers"] for step in steps_] == [[0], [1], [0], [1]]
    # The same reads as in-process loading.
    for rank in range(2):
        plain = loader(stream, world_size=2, rank=rank)
        assert same_content([plain.next_step() for _ in range(steps)], per_rank[rank])


@pytest.mark.parametrize("mode", ["fixed", "grouped", "packed"])
def test_resume_inside_a_window_with_workers_continues_with_exactly_the_next_samples(mode):
    stream = MixtureStream([ListSource("a", 23, bad=(4, 9, 17)), ListSource("b", 14, bad=(2,))], [1.0, 1.0], seed=5)
    batching = Batching(mode, window_steps=3, max_length=40)  # windows of 3 steps x 2 micro-batches
    full = loader(stream, batching, num_workers=2)
    reference = [full.next_step() for _ in range(7)]
    first = loader(stream, batching, num_workers=2)
    for _ in range(4):  # stop after step 4: inside the second window
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    first.close()
    resumed = loader(stream, batching, num_workers=2)
    resumed.load_state_dict(state)
    rest = [resumed.next_step() for _ in range(3)]
    assert keys_of(rest) == keys_of(reference[4:])
    assert same_content(rest, reference[4:])
    # Rejections and the sample count are those of the uninterrupted run (none counted twice), and those
    # counted in-process: the workers send every rejection back with its window.
    assert resumed.rejected == full.rejected and sum(full.rejected.values()) > 0
    assert resumed.seen == full.seen and resumed.rejected_keys == full.rejected_keys
    in_process = loader(stream, batching)
    assert same_content([in_process.next_step() for _ in range(7)], reference)
    assert in_process.rejected == full.rejected and in_process.rejected_keys == full.rejected_keys
    full.close()
    resumed.close()


def test_resume_refuses_a_different_window_inside_a_window():
    stream = MixtureStream([ListSource("a", 40)], [1.0], seed=0)
    first = loader(stream, Batching("grouped", window_steps=3))
    for _ in range(4):
        first.next_step()
    other = loader(stream, Batching("grouped", window_steps=2))
    with pytest.raises(ValueError, match="inside a 3-step grouped window"):
        other.load_state_dict(first.state_dict())
    at_boundary = loader(stream, Batching("grouped", window_steps=3))
    for _ in range(6):  # step 6: a boundary of 3-step and 2-step windows
        at_boundary.next_step()
    other.load_state_dict(at_boundary.state_dict())
    assert other.position == at_boundary.position


# --------------------------------------------------------------------------- uneven shards


def write_uneven_shards(folder, sizes: list[int]) -> list[str]:
    """Shards of `sizes` samples (meta only: the encode above needs no pixels)."""
    paths, n = [], 0
    for k, size in enumerate(sizes):
        path = folder / f"uneven-{k:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]
                meta = {"id": f"s{n}", "conversations": turns}
                add_member(tar, f"s{n}.json", json.dumps(meta).encode())
                n += 1
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("mode", ["fixed", "grouped", "packed"])
def test_uneven_shards_give_every_rank_the_same_steps_and_micro_batches(tmp_path, mode):
    source = WebDatasetSource(write_uneven_shards(tmp_path, [5, 3, 1]))  # 9 samples: odd, shards uneven
    stream = MixtureStream([source], [1.0], seed=2)
    batching = Batching(mode, window_steps=2, max_length=64)
    steps = 6  # 3 whole windows, 48 positions: the epochs (9 samples) end inside steps, never at a boundary
    reads = []
    for rank in range(2):
        ranked = StageLoader(stream, encode, collate, micro_batch_size=2, grad_accum=2, world_size=2, rank=rank,
                             batching=batching, num_workers=2)
        taken = [ranked.next_step() for _ in range(steps)]
        ranked.close()
        assert [len(step) for step in taken] == [2] * steps  # grad_accum micro-batches in every step
        assert all(batch["keys"] for step in taken for batch in step)  # none empty: no rank starves
        reads.append(keys_of(taken))
    # Together the ranks read positions 0..47 of the stream, each exactly once.
    assert Counter(reads[0] + reads[1]) == Counter(stream[p].key for p in range(steps * 8))


def _rank_process(rank: int, shards: list[str], init_file: str, steps: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=__import__("datetime").timedelta(seconds=30))
    stream = MixtureStream([WebDatasetSource(shards)], [1.0], seed=0)
    ranked = StageLoader(stream, encode, collate, micro_batch_size=2, grad_accum=3, world_size=2, rank=rank,
                         batching=Batching("packed", window_steps=2, max_length=48), num_workers=1)
    micro_batches = 0
    for _ in range(steps):
        for batch in ranked.next_step():
            # What ZeRO-3 does inside every forward/backward: a collective both ranks must reach.
            torch.distributed.all_reduce(torch.tensor([batch["tokens"]]))
            micro_batches += 1
    ranked.close()
    counts = [None, None]
    torch.distributed.all_gather_object(counts, micro_batches)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(counts, f)
    torch.distributed.destroy_process_group()


def test_two_real_ranks_with_uneven_shards_run_the_same_collectives(tmp_path):
    shards = write_uneven_shards(tmp_path, [7, 2, 4])  # 13 samples
    out = str(tmp_path / "counts")
    torch.multiprocessing.start_processes(_rank_process, args=(shards, str(tmp_path / "init"), 4, out), nprocs=2,
                                          start_method="fork")
    for rank in range(2):
        assert json.loads(open(f"{out}.{rank}").read()) == [12, 12]  # 4 steps x 3 micro-batches on both ranks
