"""Readers for the two on-disk sample formats: webdataset tar shards and LLaVA-style JSON.

Both yield the same `Record`: a key, the *encoded* image bytes (decoded later, in the worker that
needs the pixels, by `decode_image`) and a meta dict with one schema:

    {"id": str, "kind": "caption" | "vqa" | ..., "conversations": [{"from", "value"}, ...],
     "question_types": [one per human turn], "scene": [...] or None}

Sources are random-access (`len`, `[i]`) so a sampler can index them deterministically. The
webdataset reader materialises every record in memory, in shard order; fine for the synthetic and
test data sets, streaming for large corpora comes later.
"""

from __future__ import annotations

import glob
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mllm.processing import SampleError
from mllm.tokenizer import IMAGE_TOKEN

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# Everything PIL raises for bytes that are not a readable image (truncated files raise OSError,
# some broken headers SyntaxError, bad compressed streams zlib.error / struct.error).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


@dataclass
class Record:
    key: str
    image_bytes: bytes | None  # encoded file bytes; None for a text-only sample
    meta: dict
    source: str = ""  # name of the source it came from, for error messages


class BadRecordError(SampleError):
    """A record the reader cannot use (no/invalid meta, wrong JSON types, missing image file)."""


class MissingImageError(BadRecordError):
    pass


@dataclass(frozen=True)
class Rejection:
    """A record or shard a source skipped when it was opened; the loader counts it with its key."""

    reason: str
    key: str
    message: str


class CorruptImageError(ValueError):
    """The bytes of a record's image cannot be decoded."""


def decode_image(record: Record) -> Image.Image:
    """Decode a record's image to RGB; unreadable bytes raise CorruptImageError naming the key."""
    where = f"record {record.key!r}" + (f" of source {record.source!r}" if record.source else "")
    if record.image_bytes is None:
        raise ValueError(f"{where} is text-only: it has no image to decode")
    try:
        with Image.open(io.BytesIO(record.image_bytes)) as image:
            image.load()  # Image.open is lazy: force the full decode so truncation shows up here
            return image.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(
            f"{where}: image bytes ({len(record.image_bytes)} bytes) are not a readable image "
            f"({type(exc).__name__}: {exc}); regenerate or drop this sample"
        ) from exc


# --------------------------------------------------------------------------- webdataset


def expand_shards(paths: str | os.PathLike | list, allow_missing: bool = False) -> list[str]:
    """Shard paths from a list, a glob (`train-*.tar`) or a brace pattern (`train-{000..009}.tar`).

    A pattern that matches nothing raises FileNotFoundError naming it. Listed shards that do not exist
    raise too, unless `allow_missing` (the source then skips and reports them) and at least one exists.
    """
    if isinstance(paths, (str, os.PathLike)):
        pattern = os.fspath(paths)
        if glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
        elif "{" in pattern:
            from webdataset.shardlists import expand_urls  # braceexpand, as webdataset does it

            found = list(expand_urls(pattern))
        else:
            found = [pattern]
        if not found:
            raise FileNotFoundError(f"no webdataset shard matches {pattern!r}")
    else:
        pattern, found = None, [os.fspath(p) for p in paths]
        if not found:
            raise FileNotFoundError("WebDatasetSource got an empty list of shard paths")
    missing = [p for p in found if not os.path.isfile(p)]
    if missing and allow_missing and len(missing) < len(found):
        return found
    if missing:
        origin = f" (from pattern {pattern!r})" if pattern and missing != [pattern] else ""
        shown = ", ".join(repr(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(found)} webdataset shard(s) not found: {shown}{origin}")
    return found


def _image_field(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def _read_shard(shard: str, source_name: str) -> tuple[list[Record], list[Rejection]]:
    """The records of one shard in file order (no decoding), and what had to be skipped: samples with
    missing or invalid meta, and the rest of a truncated / unreadable tar."""
    import webdataset as wds  # training-side dependency; the model library never imports it

    if not os.path.isfile(shard):
        return [], [Rejection("MissingShard", shard, f"webdataset shard {shard!r} not found")]
    # No node/worker splitting: every rank materialises the full list; samplers shard indices.
    dataset = wds.WebDataset([shard], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    records, problems = [], []
    try:
        for sample in dataset:
            try:
                records.append(_to_record(sample, shard, source_name))
            except BadRecordError as exc:
                problems.append(Rejection(type(exc).__name__, sample.get("__key__", "?"), str(exc)))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        problems.append(Rejection("TruncatedShard", shard, f"webdataset shard {shard!r} is not a readable tar file "
                                  f"after {len(records)} record(s): {exc}"))
        return records, problems
    if not _ends_with_tar_trailer(shard):
        # webdataset's stream reader stops quietly at a cut member; the missing end-of-archive blocks
        # are how a partial copy (e.g. an interrupted upload) shows.
        problems.append(Rejection("TruncatedShard", shard, f"webdataset shard {shard!r} is truncated (no end-of-"
                                  f"archive blocks); kept the {len(records)} complete record(s) before the cut"))
    return records, problems


def _ends_with_tar_trailer(path: str) -> bool:
    """A complete tar ends with two zero 512-byte blocks (writers pad further with zeros)."""
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def _to_record(sample: dict, shard: str, source_name: str) -> Record:
    key = sample["__key__"]
    if "json" not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise BadRecordError(f"webdataset shard {shard!r}: sample {key!r} has no .json meta (files: {present})")
    try:
        meta = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRecordError(f"webdataset shard {shard!r}: sample {key!r} has invalid .json meta: {exc}") from exc
    if not isinstance(meta, dict):
        raise BadRecordError(f"webdataset shard {shard!r}: sample {key!r} .json is a {type(meta).__name__}, "
                             "not an object")
    meta = normalize_meta(meta, key, where=f"webdataset shard {shard!r}, sample {key!r}")
    return Record(key=key, image_bytes=_image_field(sample), meta=meta, source=source_name)


def _require_records(records: list, problems: list[Rejection], what: str) -> None:
    if not records:
        shown = "; ".join(p.message for p in problems[:3])
        raise ValueError(f"{what} has no usable record ({len(problems)} problem(s): {shown})")


class WebDatasetSource:
    """Records from webdataset tar shards (`KEY.png` + `KEY.json`), in shard order."""

    def __init__(self, paths: str | os.PathLike | list, name: str | None = None):
        self.shards = expand_shards(paths, allow_missing=True)
        self.name = name or _default_name(paths)
        self.records, self.problems = [], []
        for shard in self.shards:
            records, problems = _read_shard(shard, self.name)
            self.records += records
            self.problems += problems
        _require_records(self.records, self.problems, f"webdataset source {self.name!r}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def meta(self, index: int) -> dict:
        return self.records[index].meta

    def __repr__(self) -> str:
        return f"WebDatasetSource(name={self.name!r}, shards={len(self.shards)}, records={len(self)})"


def _default_name(paths) -> str:
    first = os.fspath(paths) if isinstance(paths, (str, os.PathLike)) else os.fspath(paths[0])
    return Path(first).name


# --------------------------------------------------------------------------- LLaVA JSON


def normalize_meta(entry: dict, key: str, where: str) -> dict:
    """Bring a LLaVA entry or a shard's meta to the record schema; missing fields get defaults."""
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadRecordError(f"{where}: no 'conversations' list, or an empty one (keys present: {sorted(entry)})")
    for turn in conversations:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecordError(f"{where}: every conversation turn needs 'from' and 'value', got {turn!r}")
        if not isinstance(turn["from"], str) or not isinstance(turn["value"], str):
            raise BadRecordError(f"{where}: 'from' and 'value' must be strings, got {turn!r}")
    n_human = sum(turn["from"] == "human" for turn in conversations)
    return {
        "id": str(entry.get("id", key)),
        "kind": entry.get("kind", "vqa"),
        "conversations": conversations,
        "question_types": entry.get("question_types", ["unknown"] * n_human),
        "scene": entry.get("scene"),
    }


class LlavaJsonSource:
    """Records from a LLaVA-style JSON list; images are read from `image_root` on access."""

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 name: str | None = None):
        self.json_path = Path(json_path)
        if not self.json_path.is_file():
            raise FileNotFoundError(f"LLaVA json not found: {str(self.json_path)!r}")
        self.image_root = Path(image_root) if image_root is not None else self.json_path.parent
        self.name = name or self.json_path.stem
        entries = self._load()
        # Validate every entry up front: a bad entry is skipped and reported at start-up (the loader
        # counts it with its key), not discovered hours into training.
        self.entries, self.metas, self.problems = [], [], []
        for i, entry in enumerate(entries):
            try:
                meta = self._meta(i, entry)
            except BadRecordError as exc:
                key = entry.get("id", f"{self.name}-{i}") if isinstance(entry, dict) else f"{self.name}-{i}"
                self.problems.append(Rejection(type(exc).__name__, str(key), str(exc)))
                continue
            self.entries.append(entry)
            self.metas.append(meta)
        _require_records(self.entries, self.problems, f"LLaVA json {str(self.json_path)!r}")

    def _load(self) -> list:
        try:
            entries = json.loads(self.json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"LLaVA json {str(self.json_path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(entries, list):
            raise ValueError(
                f"LLaVA json {str(self.json_path)!r} must hold a list of entries, got {type(entries).__name__}"
            )
        return entries

    def _meta(self, index: int, entry) -> dict:
        where = f"LLaVA json {str(self.json_path)!r}, entry {index}"
        if not isinstance(entry, dict):
            raise BadRecordError(f"{where}: expected an object, got {type(entry).__name__}")
        image = entry.get("image")
        if image is not None and not isinstance(image, str):
            raise BadRecordError(f"{where}: 'image' must be one relative path (multi-image entries are not supported)")
        return normalize_meta(entry, f"{self.name}-{index}", where)

    def __len__(self) -> int:
        return len(self.entries)

    def meta(self, index: int) -> dict:
        return self.metas[index]

    def __getitem__(self, index: int) -> Record:
        meta = self.metas[index]
        image = self.entries[index].get("image")
        image_bytes = None
        if image is not None:
            path = self.image_root / image
            if not path.is_file():
                raise MissingImageError(
                    f"image {str(path)!r} of record {meta['id']!r} (source {self.name!r}) not found"
                )
            image_bytes = path.read_bytes()
        return Record(key=meta["id"], image_bytes=image_bytes, meta=meta, source=self.name)

    def __repr__(self) -> str:
        return f"LlavaJsonSource(name={self.name!r}, json={str(self.json_path)!r}, records={len(self)})"


# --------------------------------------------------------------------------- question-type filter


def keep_question_types(meta: dict, types: set[str]) -> dict | None:
    """The record's conversation with only the question/answer pairs of `types` (None when none is left).

    The `<image>` placeholders of dropped questions move to the first kept one, so the image stays in the
    sample (LLaVA data puts it in the first human turn)."""
    conversations, kinds = meta["conversations"], meta.get("question_types") or []
    pairs = [conversations[i:i + 2] for i in range(0, len(conversations), 2)]
    if len(pairs) != len(kinds) or any(len(p) != 2 or p[0]["from"] != "human" for p in pairs):
        raise BadRecordError(f"record {meta['id']!r}: question_types {kinds} do not line up with its "
                             f"{len(conversations)} conversation turns (human/gpt pairs); cannot filter by type")
    kept = [pair for pair, kind in zip(pairs, kinds) if kind in types]
    if not kept:
        return None
    images = sum(pair[0]["value"].count(IMAGE_TOKEN) for pair in pairs)
    turns = []
    for j, (human, answer) in enumerate(kept):
        value = human["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
        if j == 0:
            value = (IMAGE_TOKEN + "\n") * images + value
        turns += [{**human, "value": value}, dict(answer)]
    return {**meta, "conversations": turns, "question_types": [k for k in kinds if k in types]}


class QuestionTypeSource:
    """A view of a source with only the question types asked for (e.g. to hold one out of a stage)."""

    def __init__(self, source, types: list[str]):
        self.source, self.types, self.name = source, set(types), source.name
        self.problems = list(getattr(source, "problems", []))
        self.index, self.metas = [], []
        for i in range(len(source)):
            meta = keep_question_types(source.meta(i), self.types)
            if meta is not None:
                self.index.append(i)
                self.metas.append(meta)
        if not self.index:
            raise ValueError(f"source {self.name!r} has no question of type(s) {sorted(self.types)}")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Record:
        record = self.source[self.index[index]]
        return Record(key=record.key, image_bytes=record.image_bytes, meta=self.metas[index], source=record.source)

    def meta(self, index: int) -> dict:
        return self.metas[index]

    def __repr__(self) -> str:
        return f"QuestionTypeSource({self.source!r}, types={sorted(self.types)}, records={len(self)})"


# --------------------------------------------------------------------------- factory

SOURCE_TYPES = {"webdataset": WebDatasetSource, "llava_json": LlavaJsonSource}
_SPEC_KEYS = {"webdataset": {"type", "path", "name", "question_types"},
              "llava_json": {"type", "path", "image_root", "name", "question_types"}}


def open_source(spec: dict):
    """Build a source from a config dict: {"type": "webdataset" | "llava_json", "path": ..., ...};
    `question_types: [...]` keeps only those questions of each sample."""
    if spec.get("question_types"):
        return QuestionTypeSource(open_source({k: v for k, v in spec.items() if k != "question_types"}),
                                  spec["question_types"])
    kind = spec.get("type")
    if kind not in SOURCE_TYPES:
        raise ValueError(f"unknown source type {kind!r}; valid types: {', '.join(SOURCE_TYPES)}")
    unknown = set(spec) - _SPEC_KEYS[kind]
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {kind} source spec; allowed: {sorted(_SPEC_KEYS[kind])}")
    if "path" not in spec:
        raise ValueError(f"{kind} source spec needs a 'path'")
    if kind == "webdataset":
        return WebDatasetSource(spec["path"], name=spec.get("name"))
    return LlavaJsonSource(spec["path"], image_root=spec.get("image_root"), name=spec.get("name"))
