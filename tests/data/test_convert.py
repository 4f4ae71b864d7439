"""`mllm data convert`: shards that read back as the LLaVA JSON's records, byte-identical across runs, a rerun
that rewrites only missing shards, and a manifest with counts per shard and the rejected entries."""

from __future__ import annotations

import json

import pytest

from mllm.data import synth
from mllm.data.convert import ConversionError, convert_llava
from mllm.data.sources import LlavaJsonSource, WebDatasetSource
from mllm.train.cli import main


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A shapes-world LLaVA JSON (23 entries) plus four bad ones and a two-image entry."""
    root = tmp_path_factory.mktemp("convert")
    synth.generate(root, seed=4, n_train=23, n_heldout=1)
    entries = json.loads((root / "llava" / "train_vqa.json").read_text())
    turns = entries[0]["conversations"]
    two = [{"from": "human", "value": "<image>\nvs\n<image>\nSame?"}, {"from": "gpt", "value": "no"}]
    entries[3:3] = [
        {"id": "gone", "image": "images/missing.png", "conversations": turns},
        {"id": "no-turns", "image": entries[0]["image"]},
        {"id": "pair.v1", "image": [entries[1]["image"], entries[2]["image"]], "conversations": two},
        {"id": "one-placeholder", "image": [entries[1]["image"], entries[2]["image"]], "conversations": turns},
    ]
    (root / "llava" / "bad").mkdir()
    (root / "llava" / "bad" / "broken.png").write_bytes(b"not a png")
    entries.append({"id": "broken", "image": "bad/broken.png", "conversations": turns})
    path = root / "llava" / "mixed.json"
    path.write_text(json.dumps(entries))
    return path


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_read_back_as_the_json_records_with_a_manifest(llava, tmp_path):
    manifest = convert_llava(llava, tmp_path / "out", shard_size=8)
    source, shards = LlavaJsonSource(llava), WebDatasetSource(str(tmp_path / "out" / "mixed-*.tar"))
    good = [source[i] for i in range(len(source)) if source.meta(i)["id"] not in ("gone", "one-placeholder", "broken")]
    assert len(shards) == len(good) == manifest["samples"] == 24
    for a, b in zip(good, shards):
        key = a.key.replace(".", "_")  # tar keys cannot hold dots; the meta keeps the id
        assert (b.key, b.images, b.meta) == (key, a.images, a.meta)
    assert [r.key for r in shards if len(r.images) == 2] == ["pair_v1"]
    # 28 entries in shards of 8: counts per shard, rejections with their key, entry and reason.
    assert [(s["name"], s["entries"], s["samples"]) for s in manifest["shards"]] == [
        ("mixed-000000.tar", [0, 8], 5), ("mixed-000001.tar", [8, 16], 8), ("mixed-000002.tar", [16, 24], 8),
        ("mixed-000003.tar", [24, 28], 3)]
    rejected = {(r["key"], r["entry"], r["reason"]) for s in manifest["shards"] for r in s["rejected"]}
    assert rejected == {("gone", 3, "MissingImageError"), ("no-turns", 4, "BadRecordError"),
                        ("one-placeholder", 6, "ImageCountMismatchError"), ("broken", 27, "CorruptImageError")}
    assert manifest["rejected"] == 4 and json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_output_is_byte_identical_and_a_rerun_rewrites_only_missing_shards(llava, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    convert_llava(llava, first, shard_size=8)
    convert_llava(llava, second, shard_size=8)
    assert files(first) == files(second)
    before = {p.name: p.stat() for p in second.glob("*.tar")}
    (second / "mixed-000002.tar").unlink()
    (second / "mixed-000001.tar").write_bytes(b"half a shard")  # e.g. copied over and cut short
    convert_llava(llava, second, shard_size=8)
    after = {p.name: p.stat() for p in second.glob("*.tar")}
    identity = lambda st: (st.st_ino, st.st_mtime_ns)  # noqa: E731
    rewritten = {n for n in before if identity(before[n]) != identity(after[n])}
    assert rewritten == {"mixed-000001.tar", "mixed-000002.tar"}
    assert files(first) == files(second) and not list(second.glob("*.tmp"))


def test_a_folder_holding_another_conversion_is_refused(llava, tmp_path):
    convert_llava(llava, tmp_path / "out", shard_size=8)
    kept = files(tmp_path / "out")
    with pytest.raises(ConversionError, match="other input"):
        convert_llava(llava, tmp_path / "out", shard_size=5)
    assert files(tmp_path / "out") == kept


def test_cli_converts_and_reports_user_errors(llava, tmp_path, capfd):
    out = tmp_path / "cli"
    assert main(["data", "convert", "--json", str(llava), "--out", str(out), "--shard-size", "10",
                 "--prefix", "train"]) == 0
    summary = json.loads(capfd.readouterr().out)
    assert summary["samples"] == 24 and summary["shards"] == 3
    assert summary["rejected_by_reason"]["MissingImageError"] == 1
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert main(["data", "convert", "--json", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "LLaVA json not found" in capfd.readouterr().err
