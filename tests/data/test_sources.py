"""Sample readers: webdataset shards and LLaVA JSON give the same records; bad input fails loudly."""

import dataclasses
import io
import json
import tarfile

import pytest

from mllm.data import synth
from mllm.data.sources import (
    BadRecordError,
    CorruptImageError,
    LlavaJsonSource,
    MissingImageError,
    QuestionTypeSource,
    Record,
    WebDatasetSource,
    decode_image,
    keep_question_types,
    open_source,
)
from mllm.processing import SampleError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synth.generate(out, seed=3, n_train=40, n_heldout=10, shard_size=16)
    return out


def write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("split,kind,n", [("train", "caption", 40), ("train", "vqa", 40), ("heldout", "vqa", 10)])
def test_both_readers_return_the_same_records(world, split, kind, n):
    wds_source = open_source({"type": "webdataset", "path": str(world / "wds" / f"{split}-{kind}-*.tar")})
    llava_source = open_source({"type": "llava_json", "path": str(world / "llava" / f"{split}_{kind}.json")})
    assert len(wds_source) == len(llava_source) == n
    for i in range(n):
        a, b = wds_source[i], llava_source[i]
        assert (a.key, a.image_bytes, a.meta) == (b.key, b.image_bytes, b.meta)
        assert a.key == a.meta["id"] == f"{split}-{kind}-{i:06d}"  # shard order is sample order
        assert set(a.meta) == {"id", "kind", "conversations", "question_types", "scene"}
        assert a.meta["kind"] == kind
        assert decode_image(a).size == (48, 48)


def test_shard_list_glob_and_brace_pattern_agree(world):
    shards = sorted(str(p) for p in (world / "wds").glob("train-vqa-*.tar"))
    assert len(shards) == 3  # 40 samples in shards of 16
    by_list = WebDatasetSource(shards)
    by_glob = WebDatasetSource(str(world / "wds" / "train-vqa-*.tar"))
    by_brace = WebDatasetSource(str(world / "wds" / "train-vqa-{000000..000002}.tar"))
    assert [r.key for r in by_list] == [r.key for r in by_glob] == [r.key for r in by_brace]
    assert by_glob.name == "train-vqa-*.tar"


def test_decode_image_returns_rgb(world):
    record = WebDatasetSource(str(world / "wds" / "heldout-caption-000000.tar"))[0]
    image = decode_image(record)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("bad", [b"", b"not a png at all", "truncate"])
def test_corrupt_image_names_key_and_source(world, bad):
    record = LlavaJsonSource(world / "llava" / "train_vqa.json")[5]
    image_bytes = record.image_bytes[: len(record.image_bytes) // 2] if bad == "truncate" else bad
    broken = dataclasses.replace(record, image_bytes=image_bytes)
    with pytest.raises(CorruptImageError, match="train-vqa-000005") as info:
        decode_image(broken)
    assert "train_vqa" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_corrupt_png_inside_a_shard(world, tmp_path):
    meta = LlavaJsonSource(world / "llava" / "train_vqa.json")[0].meta
    shard = tmp_path / "bad-000000.tar"
    write_tar(shard, {"k1.png": b"\x89PNG\r\n\x1a\ngarbage", "k1.json": json.dumps(meta).encode()})
    (record,) = WebDatasetSource([shard])  # reading is lazy: the bytes are only checked on decode
    with pytest.raises(CorruptImageError, match="'k1'"):
        decode_image(record)


def test_text_only_record_has_no_image():
    record = Record(key="t0", image_bytes=None, meta={})
    with pytest.raises(ValueError, match="t0.*text-only"):
        decode_image(record)


def test_sample_without_json_names_shard_and_key(tmp_path):  # the only sample: nothing usable
    shard = tmp_path / "nojson-000000.tar"
    write_tar(shard, {"lonely.png": b"x"})
    with pytest.raises(ValueError, match=r"nojson-000000\.tar.*'lonely'"):
        WebDatasetSource([shard])


def test_unreadable_shard_names_it(tmp_path):
    shard = tmp_path / "junk-000000.tar"
    shard.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match="junk-000000.tar"):
        WebDatasetSource([shard])


def test_missing_paths_raise_file_not_found_and_partly_missing_shards_are_skipped(world, tmp_path):
    pattern = str(tmp_path / "nothing-*.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        WebDatasetSource(pattern)
    with pytest.raises(FileNotFoundError, match="absent-000000.tar"):  # nothing listed exists
        WebDatasetSource([str(tmp_path / "absent-000000.tar")])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        LlavaJsonSource(tmp_path / "missing.json")
    # Some shards of a list / brace pattern missing: the rest is read, each missing shard reported.
    present = str(world / "wds" / "train-vqa-000000.tar")
    source = WebDatasetSource([present, str(tmp_path / "absent-000000.tar")])
    assert len(source) == len(WebDatasetSource([present]))
    assert [(p.reason, p.key) for p in source.problems] == [("MissingShard", str(tmp_path / "absent-000000.tar"))]
    braced = WebDatasetSource(str(world / "wds" / "train-vqa-{000000..000009}.tar"))
    assert len(braced.problems) == 7 and {p.reason for p in braced.problems} == {"MissingShard"}
    assert braced.problems[0].key.endswith("train-vqa-000003.tar")


def test_truncated_shard_keeps_the_records_before_the_cut(world, tmp_path):
    meta = json.dumps(LlavaJsonSource(world / "llava" / "train_vqa.json")[0].meta).encode()
    whole = tmp_path / "whole-000000.tar"
    write_tar(whole, {f"k{i}.{ext}": (meta if ext == "json" else b"png") for i in range(4) for ext in ("json", "png")})
    cut = tmp_path / "cut-000000.tar"
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    source = WebDatasetSource([cut])
    assert 1 <= len(source) < 4 and [r.key for r in source] == [f"k{i}" for i in range(len(source))]
    assert [p.reason for p in source.problems] == ["TruncatedShard"] and "cut-000000.tar" in source.problems[0].key


def test_llava_missing_image_file_names_path_and_key(tmp_path):
    path = tmp_path / "data.json"
    turns = [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "hello"}]
    path.write_text(json.dumps([{"id": "a", "image": "images/gone.png", "conversations": turns}]))
    source = LlavaJsonSource(path)
    with pytest.raises(MissingImageError, match=r"gone\.png.*'a'") as info:
        source[0]
    assert isinstance(info.value, SampleError)  # the loader skips and counts it


def test_llava_defaults_and_text_only_entries(tmp_path):
    path = tmp_path / "mixed.json"
    turns = [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "bye"},
    ]  # fmt: skip
    path.write_text(json.dumps([{"id": "t1", "conversations": turns}]))
    (record,) = LlavaJsonSource(path)
    assert record.image_bytes is None
    assert record.meta == {
        "id": "t1", "kind": "vqa", "conversations": turns, "question_types": ["unknown", "unknown"], "scene": None
    }  # fmt: skip


@pytest.mark.parametrize("entry", [
    {"id": "x"}, {"id": "x", "conversations": []}, {"id": "x", "conversations": [{"value": "hi"}]},
    {"id": "x", "conversations": "hello"}, {"id": "x", "conversations": [{"from": "human", "value": 5}]},
    {"id": "x", "image": ["a.png", 5], "conversations": [{"from": "human", "value": "a"}]},
    {"id": "x", "image": [], "conversations": [{"from": "human", "value": "a"}]}, ["not", "a", "dict"],
], ids=["no-conversations", "empty", "turn-without-from", "conversations-a-string", "value-a-number",
        "image-list-not-paths", "image-empty-list", "entry-a-list"])
def test_malformed_llava_entry_is_skipped_and_reported_with_its_key(tmp_path, entry):
    path = tmp_path / "broken.json"
    good = {"id": "ok", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    path.write_text(json.dumps([good, good, entry]))
    source = LlavaJsonSource(path)
    assert len(source) == 2
    (problem,) = source.problems
    assert problem.reason == "BadRecordError" and problem.key in ("x", "broken-2")
    assert "broken.json" in problem.message and "entry 2" in problem.message
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=r"no usable record.*entry 0"):
        LlavaJsonSource(path)


def test_open_source_rejects_unknown_type_and_keys(world):
    with pytest.raises(ValueError, match="webdataset, llava_json"):
        open_source({"type": "parquet", "path": "x"})
    with pytest.raises(ValueError, match="image_dir"):
        open_source({"type": "llava_json", "path": str(world / "llava" / "train_vqa.json"), "image_dir": "x"})
    source = open_source(
        {"type": "llava_json", "path": str(world / "llava" / "train_vqa.json"), "image_root": str(world / "llava")}
    )
    assert source[0].image_bytes == (world / "llava" / "images" / "train-000000.png").read_bytes()


def test_question_type_filter_keeps_those_pairs_and_the_image(world):
    """Holding a question type out of a stage: every kept sample still shows its image once, first."""
    full = open_source({"type": "llava_json", "path": str(world / "llava" / "train_vqa.json")})
    only = open_source({"type": "llava_json", "path": str(world / "llava" / "train_vqa.json"),
                        "question_types": ["position"]})
    with_position = [full.meta(i) for i in range(len(full)) if "position" in full.meta(i)["question_types"]]
    assert len(only) == len(with_position) > 0
    for i in range(len(only)):
        record = only[i]
        conversation = record.meta["conversations"]
        assert set(record.meta["question_types"]) == {"position"}
        assert len(conversation) == 2 * len(record.meta["question_types"])
        assert conversation[0]["value"].startswith("<image>\n")
        assert sum(turn["value"].count("<image>") for turn in conversation) == 1
        assert record.image_bytes is not None
    rest = open_source({"type": "webdataset", "path": str(world / "wds" / "train-vqa-*.tar"),
                        "question_types": ["color", "shape", "count"]})
    assert all("position" not in rest.meta(i)["question_types"] for i in range(len(rest)))


def test_question_type_filter_moves_the_placeholder_and_refuses_misaligned_types():
    meta = {"id": "k", "question_types": ["color", "position"], "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "left"}]}
    kept = keep_question_types(meta, {"position"})
    assert kept["conversations"] == [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "left"}]
    assert keep_question_types(meta, {"count"}) is None
    with pytest.raises(BadRecordError, match="do not line up"):
        keep_question_types({**meta, "question_types": ["color"]}, {"color"})
    with pytest.raises(ValueError, match="no question of type"):
        QuestionTypeSource(FakeSource([meta]), ["count"])


class FakeSource:
    name = "fake"

    def __init__(self, metas):
        self.metas = metas

    def __len__(self):
        return len(self.metas)

    def meta(self, i):
        return self.metas[i]
