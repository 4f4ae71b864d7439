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


def expand_shards(paths: str | os.PathLike | list) -> list[str]:
    """Shard paths from a list, a glob (`train-*.tar`) or a brace pattern (`train-{000..009}.tar`).

    Every path must exist: a pattern that matches nothing raises FileNotFoundError naming it.
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


def _read_shard(shard: str, source_name: str) -> list[Record]:
    """All records of one shard, in file order, via webdataset's tar reader (no decoding)."""
    import webdataset as wds  # training-side dependency; the model library never imports it

    # No node/worker splitting: every rank materialises the full list; samplers shard indices.
    dataset = wds.WebDataset([shard], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    records = []
    try:
        for sample in dataset:
            records.append(_to_record(sample, shard, source_name))
    except (tarfile.TarError, EOFError) as exc:
        raise ValueError(f"webdataset shard {shard!r} is not a readable tar file: {exc}") from exc
    return records


def _to_record(sample: dict, shard: str, source_name: str) -> Record:
    key = sample["__key__"]
    if "json" not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"webdataset shard {shard!r}: sample {key!r} has no .json meta (files: {present})")
    try:
        meta = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"webdataset shard {shard!r}: sample {key!r} has invalid .json meta: {exc}") from exc
    meta = normalize_meta(meta, key, where=f"webdataset shard {shard!r}, sample {key!r}")
    return Record(key=key, image_bytes=_image_field(sample), meta=meta, source=source_name)


class WebDatasetSource:
    """Records from webdataset tar shards (`KEY.png` + `KEY.json`), in shard order."""

    def __init__(self, paths: str | os.PathLike | list, name: str | None = None):
        self.shards = expand_shards(paths)
        self.name = name or _default_name(paths)
        self.records = [record for shard in self.shards for record in _read_shard(shard, self.name)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

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
        raise ValueError(f"{where}: no 'conversations' list (keys present: {sorted(entry)})")
    for turn in conversations:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{where}: every conversation turn needs 'from' and 'value', got {turn!r}")
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
        self.entries = self._load()
        # Validate every entry up front: a bad entry fails at start-up, not hours into training.
        self.metas = [self._meta(i, entry) for i, entry in enumerate(self.entries)]

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
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        image = entry.get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: 'image' must be one relative path (multi-image entries are not supported)")
        return normalize_meta(entry, f"{self.name}-{index}", where)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Record:
        meta = self.metas[index]
        image = self.entries[index].get("image")
        image_bytes = None
        if image is not None:
            path = self.image_root / image
            if not path.is_file():
                raise FileNotFoundError(
                    f"image {str(path)!r} of record {meta['id']!r} (source {self.name!r}) not found"
                )
            image_bytes = path.read_bytes()
        return Record(key=meta["id"], image_bytes=image_bytes, meta=meta, source=self.name)

    def __repr__(self) -> str:
        return f"LlavaJsonSource(name={self.name!r}, json={str(self.json_path)!r}, records={len(self)})"


# --------------------------------------------------------------------------- factory

SOURCE_TYPES = {"webdataset": WebDatasetSource, "llava_json": LlavaJsonSource}
_SPEC_KEYS = {"webdataset": {"type", "path", "name"}, "llava_json": {"type", "path", "image_root", "name"}}


def open_source(spec: dict) -> WebDatasetSource | LlavaJsonSource:
    """Build a source from a config dict: {"type": "webdataset" | "llava_json", "path": ..., ...}."""
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
