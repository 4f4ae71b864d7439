"""Readers for the two on-disk sample formats: webdataset tar shards and LLaVA-style JSON.

Both yield the same `Record`: a key, the *encoded* image bytes (decoded later, in the worker that
needs the pixels, by `decode_images`) and a meta dict with one schema:

    {"id": str, "kind": "caption" | "vqa" | ..., "conversations": [{"from", "value"}, ...],
     "question_types": [one per human turn], "scene": [...] or None}

A record holds zero, one or several images, in the order of the `<image>` placeholders of its
conversation: LLaVA entries with `"image": "a.png"` or `"image": ["a.png", "b.png"]`, shard samples
with `KEY.png` or `KEY.0.png`, `KEY.1.png`, ... A count that does not match the placeholders is
rejected (and counted) when the sample is encoded.

Sources are random-access (`len`, `[i]`) so a sampler can index them deterministically. Neither
holds image bytes: the webdataset reader indexes each shard's members when it opens (see
`mllm.data.shards`: local paths, globs, brace patterns, `pipe:` URLs) and reads an image's bytes when
its record is asked for; the LLaVA reader reads image files on access.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mllm.data.shards import expand_shards, index_shard, read_member  # noqa: F401  (expand_shards: API)
from mllm.processing import SampleError
from mllm.tokenizer import IMAGE_TOKEN

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")
# Everything PIL raises for bytes that are not a readable image (truncated files raise OSError,
# some broken headers SyntaxError, bad compressed streams zlib.error / struct.error).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


@dataclass
class Record:
    key: str
    image_bytes: bytes | None  # encoded file bytes of the (first) image; None for a text-only sample
    meta: dict
    source: str = ""  # name of the source it came from, for error messages
    more_image_bytes: tuple[bytes, ...] = ()  # images 2..n of a multi-image sample, in placeholder order

    @property
    def images(self) -> list[bytes]:
        """Every image's encoded bytes, in placeholder order."""
        return [] if self.image_bytes is None else [self.image_bytes, *self.more_image_bytes]


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


def decode_bytes(data: bytes, where: str) -> Image.Image:
    """Encoded image bytes -> RGB image; unreadable bytes raise CorruptImageError starting with `where`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # Image.open is lazy: force the full decode so truncation shows up here
            return image.convert("RGB")
    except _DECODE_ERRORS as exc:
        reason = re.sub(r" at 0x[0-9a-f]+", "", str(exc))  # PIL names the BytesIO by address: keep messages stable
        raise CorruptImageError(
            f"{where}: image bytes ({len(data)} bytes) are not a readable image "
            f"({type(exc).__name__}: {reason}); regenerate or drop this sample"
        ) from exc


def _where(record: Record) -> str:
    return f"record {record.key!r}" + (f" of source {record.source!r}" if record.source else "")


def decode_images(record: Record) -> list[Image.Image]:
    """Every image of a record, decoded to RGB in placeholder order ([] for a text-only record)."""
    images = record.images
    if len(images) == 1:
        return [decode_bytes(images[0], _where(record))]
    return [decode_bytes(data, f"{_where(record)}, image {i}") for i, data in enumerate(images)]


def decode_image(record: Record) -> Image.Image:
    """Decode a single-image record to RGB; unreadable bytes raise CorruptImageError naming the key."""
    if record.image_bytes is None:  # BadRecordError: the loader skips and counts it
        raise BadRecordError(f"{_where(record)} is text-only: it has no image to decode")
    if record.more_image_bytes:
        raise BadRecordError(f"{_where(record)} has {len(record.images)} images where one is expected")
    return decode_bytes(record.image_bytes, _where(record))


# --------------------------------------------------------------------------- webdataset

_NUMBERED_IMAGE = re.compile(r"^(\d+)\.([a-z]+)$")


def _image_fields(fields: dict, where: str) -> list[str]:
    """The image fields of a sample in placeholder order: `png` alone, or `0.png`, `1.png`, ..."""
    single = [f for f in fields if f in IMAGE_EXTENSIONS]
    numbered = sorted((int(m.group(1)), f) for f in fields
                      if (m := _NUMBERED_IMAGE.match(f)) and m.group(2) in IMAGE_EXTENSIONS)
    if len(single) > 1 or (single and numbered):
        raise BadRecordError(f"{where}: several images without an order ({sorted(single + [f for _, f in numbered])}); "
                             "name them KEY.0.png, KEY.1.png, ... in placeholder order")
    if [i for i, _ in numbered] != list(range(len(numbered))):
        raise BadRecordError(f"{where}: images must be numbered 0, 1, 2, ... without gaps, got "
                             f"{[f for _, f in numbered]}")
    return single or [f for _, f in numbered]


@dataclass(slots=True)
class _ShardEntry:
    key: str
    shard: str
    images: tuple[tuple[int, int], ...]  # (offset, size) of each image member, in placeholder order
    meta: dict


def _to_entry(sample, shard: str) -> _ShardEntry:
    key, where = sample.key, f"webdataset shard {shard!r}, sample {sample.key!r}"
    if sample.meta_bytes is None:
        raise BadRecordError(f"webdataset shard {shard!r}: sample {key!r} has no .json meta "
                             f"(files: {sorted(sample.fields)})")
    try:
        meta = json.loads(sample.meta_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRecordError(f"webdataset shard {shard!r}: sample {key!r} has invalid .json meta: {exc}") from exc
    if not isinstance(meta, dict):
        raise BadRecordError(f"webdataset shard {shard!r}: sample {key!r} .json is a {type(meta).__name__}, "
                             "not an object")
    meta = normalize_meta(meta, key, where=where)
    images = tuple(sample.fields[f] for f in _image_fields(sample.fields, where))
    return _ShardEntry(key, sample.shard, images, meta)


def _require_records(records: list, problems: list[Rejection], what: str) -> None:
    if not records:
        shown = "; ".join(p.message for p in problems[:3])
        raise ValueError(f"{what} has no usable record ({len(problems)} problem(s): {shown})")


class WebDatasetSource:
    """Records from webdataset tar shards (`KEY.png` + `KEY.json`), in shard order; images read on access."""

    def __init__(self, paths: str | os.PathLike | list, name: str | None = None,
                 cache_dir: str | os.PathLike | None = None):
        self.shards = expand_shards(paths, allow_missing=True)
        self.name = name or _default_name(paths)
        self.entries: list[_ShardEntry] = []
        self.problems: list[Rejection] = []
        for shard in self.shards:
            samples, problems = index_shard(shard, cache_dir)
            self.problems += [Rejection(*p) for p in problems]
            for sample in samples:
                try:
                    self.entries.append(_to_entry(sample, shard))
                except BadRecordError as exc:
                    self.problems.append(Rejection(type(exc).__name__, sample.key, str(exc)))
        _require_records(self.entries, self.problems, f"webdataset source {self.name!r}")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Record:
        entry = self.entries[index]
        try:
            images = [read_member(entry.shard, offset, size) for offset, size in entry.images]
        except OSError as exc:
            raise MissingImageError(f"record {entry.key!r} (source {self.name!r}): {exc}") from exc
        return Record(key=entry.key, image_bytes=images[0] if images else None, meta=entry.meta, source=self.name,
                      more_image_bytes=tuple(images[1:]))

    def meta(self, index: int) -> dict:
        return self.entries[index].meta

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


def read_llava_json(path: str | os.PathLike) -> list:
    """The entries of a LLaVA JSON file (a list), or a ValueError naming the file."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"LLaVA json {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise ValueError(f"LLaVA json {str(path)!r} must hold a list of entries, got {type(entries).__name__}")
    return entries


def llava_image_list(entry: dict) -> list[str]:
    """An entry's `image`: absent -> [], one path -> [path], a list -> the list (placeholder order)."""
    image = entry.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


def llava_entry_meta(entry, index: int, name: str, where: str) -> dict:
    """Validate one LLaVA entry and bring it to the record schema (its id defaults to `NAME-INDEX`)."""
    if not isinstance(entry, dict):
        raise BadRecordError(f"{where}: expected an object, got {type(entry).__name__}")
    image = entry.get("image")
    many = isinstance(image, list) and image and all(isinstance(p, str) and p for p in image)
    if image is not None and not (isinstance(image, str) and image) and not many:
        raise BadRecordError(f"{where}: 'image' must be a relative path or a non-empty list of them, got {image!r}")
    return normalize_meta(entry, f"{name}-{index}", where)


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
        return read_llava_json(self.json_path)

    def _meta(self, index: int, entry) -> dict:
        return llava_entry_meta(entry, index, self.name, f"LLaVA json {str(self.json_path)!r}, entry {index}")

    def __len__(self) -> int:
        return len(self.entries)

    def meta(self, index: int) -> dict:
        return self.metas[index]

    def image_paths(self, index: int) -> list[Path]:
        """The files of an entry's images, in placeholder order."""
        return [self.image_root / p for p in llava_image_list(self.entries[index])]

    def __getitem__(self, index: int) -> Record:
        meta = self.metas[index]
        images = []
        for path in self.image_paths(index):
            if not path.is_file():
                raise MissingImageError(
                    f"image {str(path)!r} of record {meta['id']!r} (source {self.name!r}) not found"
                )
            images.append(path.read_bytes())
        return Record(key=meta["id"], image_bytes=images[0] if images else None, meta=meta, source=self.name,
                      more_image_bytes=tuple(images[1:]))

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
        return dataclasses.replace(self.source[self.index[index]], meta=self.metas[index])

    def meta(self, index: int) -> dict:
        return self.metas[index]

    def __repr__(self) -> str:
        return f"QuestionTypeSource({self.source!r}, types={sorted(self.types)}, records={len(self)})"


# --------------------------------------------------------------------------- factory

SOURCE_TYPES = {"webdataset": WebDatasetSource, "llava_json": LlavaJsonSource}
_SPEC_KEYS = {"webdataset": {"type", "path", "name", "question_types", "cache_dir"},
              "llava_json": {"type", "path", "image_root", "name", "question_types"}}


def open_source(spec: dict):
    """Build a source from a config dict: {"type": "webdataset" | "llava_json", "path": ..., ...};
    `question_types: [...]` keeps only those questions of each sample; `cache_dir` is where `pipe:`
    shards are copied (see mllm.data.shards)."""
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
        return WebDatasetSource(spec["path"], name=spec.get("name"), cache_dir=spec.get("cache_dir"))
    return LlavaJsonSource(spec["path"], image_root=spec.get("image_root"), name=spec.get("name"))
