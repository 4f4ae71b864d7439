"""`mllm data convert`: LLaVA JSON + an image folder -> webdataset tar shards with a manifest.

Output: `OUT/PREFIX-000000.tar`, ... and `OUT/manifest.json`. Shard k holds the usable entries among
input entries `[k * shard_size, (k + 1) * shard_size)`, in input order, so every shard is a function of
its own slice of the input and can be rewritten alone. A sample is `KEY.json` (the record meta, the
schema of mllm.data.sources) plus `KEY.<ext>` (the image file's bytes, unchanged) or `KEY.0.<ext>`,
`KEY.1.<ext>`, ... for a multi-image entry, in placeholder order. KEY is the entry's id with every
character outside `[A-Za-z0-9_-]` replaced by `_` (webdataset cuts keys at the first dot), suffixed with
the entry index if two entries would share it; the meta keeps the original id.

Deterministic: the same input gives byte-identical shards and manifest (members in entry order, tar
mtime 0, uid/gid 0, no user names; no timestamps in the manifest).

Resumable: a shard is written to `NAME.tmp` and renamed, and the manifest (written the same way) is
updated after every shard. A rerun skips every shard the manifest lists whose file has the recorded
size, and writes the rest. A folder holding a conversion of other input (other JSON bytes, image root,
shard size or prefix) is refused rather than mixed.

Rejected entries (malformed entry, missing, unreadable or unsupported image, `<image>` placeholders
that do not match the images) are listed in the manifest with their key, entry index, reason and
message, per shard, and counted in its totals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from pathlib import Path

from mllm.data.shards import add_member
from mllm.data.sources import (
    IMAGE_EXTENSIONS,
    BadRecordError,
    CorruptImageError,
    MissingImageError,
    decode_bytes,
    llava_entry_meta,
    llava_image_list,
    read_llava_json,
)
from mllm.processing import ImageCountMismatchError, SampleError
from mllm.tokenizer import IMAGE_TOKEN

logger = logging.getLogger(__name__)
FORMAT = "mllm.data.convert/1"


class ConversionError(ValueError):
    """The output folder or the arguments do not allow this conversion (nothing was written)."""


def sample_keys(entries: list, name: str) -> list[str]:
    """A unique, webdataset-safe key per entry (computed over the whole input: stable under reruns)."""
    keys, seen = [], set()
    for index, entry in enumerate(entries):
        raw = str(entry.get("id", f"{name}-{index}")) if isinstance(entry, dict) else f"{name}-{index}"
        key = re.sub(r"[^A-Za-z0-9_-]", "_", raw) or f"{name}-{index}"
        if key in seen:
            key = f"{key}_{index}"
        seen.add(key)
        keys.append(key)
    return keys


def _image_members(key: str, paths: list[Path], verify: bool) -> list[tuple[str, bytes]]:
    members = []
    for j, path in enumerate(paths):
        ext = path.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTENSIONS:
            raise BadRecordError(f"image {str(path)!r}: extension {path.suffix!r} is not one of {IMAGE_EXTENSIONS}")
        if not path.is_file():
            raise MissingImageError(f"image {str(path)!r} not found")
        data = path.read_bytes()
        if verify:
            decode_bytes(data, f"image {str(path)!r}")  # CorruptImageError for bytes PIL cannot read
        members.append((f"{key}.{ext}" if len(paths) == 1 else f"{key}.{j}.{ext}", data))
    return members


def _convert_entry(entry, index: int, key: str, name: str, image_root: Path, where: str,
                   verify: bool) -> list[tuple[str, bytes]]:
    """The tar members of one entry (images, then meta), or an exception saying why it is rejected."""
    meta = llava_entry_meta(entry, index, name, where)
    images = [image_root / p for p in llava_image_list(entry)]
    placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in meta["conversations"])
    if placeholders != len(images):
        raise ImageCountMismatchError(f"{where}: {placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} "
                                      "image(s); each image needs exactly one placeholder, in order")
    members = _image_members(key, images, verify)
    payload = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return members + [(f"{key}.json", payload)]


def _write_shard(path: Path, entries: list, start: int, keys: list[str], name: str, image_root: Path,
                 json_path: Path, verify: bool) -> dict:
    tmp = path.with_name(path.name + ".tmp")
    rejected, samples = [], 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for offset, entry in enumerate(entries):
            index = start + offset
            where = f"LLaVA json {str(json_path)!r}, entry {index}"
            try:
                members = _convert_entry(entry, index, keys[index], name, image_root, where, verify)
            except (SampleError, CorruptImageError) as exc:
                rejected.append({"key": keys[index], "entry": index, "reason": type(exc).__name__,
                                 "message": str(exc)})
                continue
            for member, data in members:
                add_member(tar, member, data)
            samples += 1
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, path)
    return {"name": path.name, "entries": [start, start + len(entries)], "samples": samples,
            "bytes": path.stat().st_size, "sha256": digest, "rejected": rejected}


def _write_manifest(path: Path, manifest: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def convert_llava(json_path: str | os.PathLike, out_dir: str | os.PathLike, image_root: str | os.PathLike | None = None,
                  *, shard_size: int = 1000, prefix: str | None = None, verify_images: bool = True) -> dict:
    """Convert (or finish converting) a LLaVA JSON file into shards under `out_dir`; returns the manifest."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"LLaVA json not found: {str(json_path)!r}")
    root = Path(image_root) if image_root is not None else json_path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root folder not found: {str(root)!r}")
    if shard_size < 1:
        raise ConversionError(f"shard_size must be >= 1, got {shard_size}")
    name = json_path.stem
    prefix = prefix or name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise ConversionError(f"prefix {prefix!r} may only hold letters, digits, '_', '-' and '.'")
    entries = read_llava_json(json_path)
    if not entries:
        raise ConversionError(f"LLaVA json {str(json_path)!r} holds no entries")
    source = {"json": str(json_path.resolve()), "json_sha256": hashlib.sha256(json_path.read_bytes()).hexdigest(),
              "image_root": str(root.resolve()), "entries": len(entries)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    done: dict[str, dict] = {}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        mine = (FORMAT, source, shard_size, prefix)
        theirs = (old.get("format"), old.get("source"), old.get("shard_size"), old.get("prefix"))
        if mine != theirs:
            raise ConversionError(f"{str(out)!r} already holds a conversion of other input ({theirs[1]}, shard_size "
                                  f"{theirs[2]}, prefix {theirs[3]!r}); nothing was changed. Use another output "
                                  "folder, or delete that one to convert again")
        done = {shard["name"]: shard for shard in old.get("shards", [])}

    keys = sample_keys(entries, name)
    shards = []
    manifest = {"format": FORMAT, "source": source, "shard_size": shard_size, "prefix": prefix}
    for k, start in enumerate(range(0, len(entries), shard_size)):
        path = out / f"{prefix}-{k:06d}.tar"
        previous = done.get(path.name)
        if previous is not None and path.is_file() and path.stat().st_size == previous["bytes"]:
            shards.append(previous)
            continue
        shard = _write_shard(path, entries[start:start + shard_size], start, keys, name, root, json_path,
                             verify_images)
        logger.info("wrote %s: %d samples, %d rejected", path.name, shard["samples"], len(shard["rejected"]))
        shards.append(shard)
        _write_manifest(manifest_path, {**manifest, "shards": shards + [done[n] for n in sorted(done)
                                                                       if n > path.name]})
    rejected = [r for shard in shards for r in shard["rejected"]]
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    manifest.update(samples=sum(s["samples"] for s in shards), rejected=len(rejected),
                    rejected_by_reason=dict(sorted(reasons.items())), shards=shards)
    _write_manifest(manifest_path, manifest)
    return manifest
