"""Streaming webdataset sources: opening a shard indexes it without holding image bytes, records read their
bytes on access, and `pipe:` URLs are copied once into a cache and read like local shards."""

from __future__ import annotations

import json
import os
import tarfile
import tracemalloc

import pytest

from mllm.data import synth
from mllm.data.loader import MixtureStream, StageLoader
from mllm.data.shards import add_member, expand_shards
from mllm.data.sources import WebDatasetSource, open_source

TURNS = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "noise"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synth.generate(out, seed=5, n_train=30, n_heldout=2, shard_size=12)
    return out


def big_shard(path, n: int, image_bytes: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            add_member(tar, f"s{i}.png", os.urandom(image_bytes))
            add_member(tar, f"s{i}.json", json.dumps({"id": f"s{i}", "conversations": TURNS}).encode())


def test_opening_indexes_members_without_holding_image_bytes(tmp_path):
    shard = tmp_path / "big-000000.tar"
    big_shard(shard, n=16, image_bytes=1 << 20)  # 16 MiB of images
    tracemalloc.start()
    source = WebDatasetSource([shard])
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(source) == 16 and held < (1 << 20)  # the index of 16 samples, not 16 MiB of pixels
    record = source[3]
    # Read on access: rewrite that image in place after opening, and the record sees the new bytes.
    offset, size = source.entries[3].images[0]
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * size)
    assert record.image_bytes != bytes(size) and source[3].image_bytes == bytes(size)


def test_pipe_urls_give_the_same_records_as_local_paths_and_are_fetched_once(world, tmp_path):
    local = WebDatasetSource(str(world / "wds" / "train-vqa-*.tar"))
    counter = tmp_path / "runs.txt"
    pattern = f"pipe:echo x >> {counter}; cat {world}/wds/train-vqa-{{000000..000002}}.tar"
    assert len(expand_shards(pattern)) == 3  # brace-expanded into one command per shard
    piped = WebDatasetSource(pattern, cache_dir=tmp_path / "cache")
    assert [(r.key, r.images, r.meta) for r in piped] == [(r.key, r.images, r.meta) for r in local]
    again = open_source({"type": "webdataset", "path": pattern, "cache_dir": str(tmp_path / "cache")})
    assert len(again) == len(local) and counter.read_text().count("x") == 3  # the second open used the cache
    # Records of a piped source load in forked DataLoader workers like any other.
    loader = StageLoader(MixtureStream([piped], [1.0], seed=0), lambda r: {"key": r.key, "n": len(r.image_bytes)},
                         lambda samples: samples, micro_batch_size=5, grad_accum=1, num_workers=2)
    read = [s["key"] for _ in range(6) for batch in loader.next_step() for s in batch]
    assert sorted(read) == sorted(r.key for r in local)
    loader.close()


def test_a_failing_pipe_is_reported_and_the_other_shards_are_read(world, tmp_path):
    good = f"pipe:cat {world}/wds/train-vqa-000000.tar"
    bad = f"pipe:cat {tmp_path}/absent-000001.tar"
    source = WebDatasetSource([good, bad], cache_dir=tmp_path / "cache")
    assert len(source) == 12
    (problem,) = source.problems
    assert problem.reason == "MissingShard" and problem.key == bad and "absent-000001.tar" in problem.message
    assert not list((tmp_path / "cache").glob("*.tmp"))  # a failed copy leaves nothing that looks complete
