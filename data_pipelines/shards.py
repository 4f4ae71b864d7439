"""Webdataset tar shards, streamed: list them, index their members when a source opens, read on access.

A shard is a tar file in which consecutive members sharing a key form one sample (webdataset's rule:
the key is the member name up to the first dot of its basename, the field is the rest, lower-cased):
`KEY.json` holds the record meta, `KEY.png` (or .jpg, .webp, ...) the image, and `KEY.0.png`,
`KEY.1.png`, ... the images of a multi-image sample, in the order of its `<image>` placeholders.

Opening a shard reads the tar headers and the small `.json` members only. Every other member is kept as
an (offset, size) pair and read with one `pread` when a sample is used, so a source over terabytes of
images holds its index (a few hundred bytes per sample) and not the pixels; forked DataLoader workers
share the index and read the bytes they need themselves.

`pipe:` URLs (`pipe:cat /data/x.tar`, `pipe:curl -s https://host/x.tar`): a pipe cannot seek, and the
sampler needs random access (the global order is a shuffle of every sample of the epoch), so the stream
is copied once into a local cache file and indexed like a local shard. The cache folder is `cache_dir`
(the source spec's `cache_dir`, else `$MLLM_SHARD_CACHE`, else `<tmp>/mllm-shard-cache`); the file is
named by a hash of the URL, written under a temporary name and renamed, so ranks on one node share one
copy and a killed download never looks complete. A cached copy is reused while it exists: delete it
when the remote shard changes. Disk use is the size of the shards.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PIPE_PREFIX = "pipe:"
# webdataset's split of a member name into (key, field): the key keeps any folder part.
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class RawSample:
    """One sample of a shard as indexed: its fields' (offset, size), and the meta JSON bytes."""

    key: str
    shard: str  # the readable local path (a pipe's cache file)
    fields: dict[str, tuple[int, int]]
    meta_bytes: bytes | None


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE_PREFIX)


def expand_shards(paths: str | os.PathLike | list, allow_missing: bool = False) -> list[str]:
    """Shard paths from a list, a glob (`train-*.tar`), a brace pattern (`train-{000..009}.tar`) or
    `pipe:` URLs (brace-expanded too: `pipe:cat /d/train-{000..009}.tar`).

    A pattern that matches nothing raises FileNotFoundError naming it. Listed local shards that do not
    exist raise too, unless `allow_missing` (the source then skips and reports them) and at least one
    exists. Pipe commands are not checked here: a failing one is reported when the source opens.
    """
    if isinstance(paths, (str, os.PathLike)):
        pattern = os.fspath(paths)
        if "{" in pattern:
            from webdataset.shardlists import expand_urls  # braceexpand, as webdataset does it

            found = list(expand_urls(pattern))
        elif glob.has_magic(pattern) and not is_pipe(pattern):
            found = sorted(glob.glob(pattern))
        else:
            found = [pattern]
        if not found:
            raise FileNotFoundError(f"no webdataset shard matches {pattern!r}")
    else:
        pattern, found = None, [os.fspath(p) for p in paths]
        if not found:
            raise FileNotFoundError("WebDatasetSource got an empty list of shard paths")
    missing = [p for p in found if not is_pipe(p) and not os.path.isfile(p)]
    if missing and allow_missing and len(missing) < len(found):
        return found
    if missing:
        origin = f" (from pattern {pattern!r})" if pattern and missing != [pattern] else ""
        shown = ", ".join(repr(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(found)} webdataset shard(s) not found: {shown}{origin}")
    return found


def default_cache_dir() -> Path:
    return Path(os.environ.get("MLLM_SHARD_CACHE") or Path(tempfile.gettempdir()) / "mllm-shard-cache")


def spool_pipe(url: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Run a `pipe:` command once and keep its output as a local file; returns that file's path."""
    command = url[len(PIPE_PREFIX):].strip()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tail = re.sub(r"[^A-Za-z0-9_.-]", "_", command.split()[-1].rsplit("/", 1)[-1] if command else "shard")[-60:]
    path = folder / f"{hashlib.sha256(url.encode()).hexdigest()[:20]}-{tail}"
    if path.is_file():
        return str(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            proc = subprocess.run(command, shell=True, stdout=out, stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace").strip()[-300:]
            raise OSError(f"pipe command {command!r} exited with status {proc.returncode}: {stderr or '(no stderr)'}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


def index_shard(shard: str, cache_dir: str | os.PathLike | None = None
                ) -> tuple[list[RawSample], list[tuple[str, str, str]]]:
    """The samples of one shard in file order (no image bytes read), and (reason, key, message) for what
    had to be skipped: a missing shard, a failing pipe, an unreadable tar, the rest of a truncated one."""
    if is_pipe(shard):
        try:
            path = spool_pipe(shard, cache_dir)
        except OSError as exc:
            return [], [("MissingShard", shard, f"webdataset shard {shard!r} could not be read: {exc}")]
    else:
        path = shard
        if not os.path.isfile(path):
            return [], [("MissingShard", shard, f"webdataset shard {shard!r} not found")]
    size = os.path.getsize(path)
    samples: list[RawSample] = []
    current: RawSample | None = None
    cut = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:  # headers only: tarfile seeks over the member data
                if not info.isfile():
                    continue
                match = _KEY_FIELD.match(info.name)
                if info.offset_data + info.size > size:
                    cut = f"member {info.name!r} ends past the end of the file"
                    if current is not None and match is not None and match.group(1) == current.key:
                        samples.pop()  # the sample the cut member belongs to is incomplete
                    break
                if match is None:  # no extension: not part of any sample (webdataset skips it too)
                    continue
                key, field = match.group(1), match.group(2).lower()
                if current is None or key != current.key or field in current.fields:
                    current = RawSample(key, path, {}, None)
                    samples.append(current)
                current.fields[field] = (info.offset_data, info.size)
                if field == "json":
                    current.meta_bytes = tar.extractfile(info).read()
            tar.members = []  # the index above is all we keep
    except (tarfile.TarError, EOFError, OSError) as exc:
        return samples, [("TruncatedShard", shard, f"webdataset shard {shard!r} is not a readable tar file "
                          f"after {len(samples)} sample(s): {exc}")]
    if cut is None and not ends_with_tar_trailer(path):
        # Cut between members: the last sample may have lost the members that followed it.
        cut, samples = "no end-of-archive blocks", samples[:-1]
    if cut is not None:
        return samples, [("TruncatedShard", shard, f"webdataset shard {shard!r} is truncated ({cut}); kept the "
                          f"{len(samples)} complete sample(s) before the cut")]
    return samples, []


def ends_with_tar_trailer(path: str) -> bool:
    """A complete tar ends with two zero 512-byte blocks (writers pad further with zeros)."""
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def read_member(path: str, offset: int, size: int) -> bytes:
    """The bytes of one indexed member (a fresh descriptor per read: safe in forked workers)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"shard {path!r} changed after it was indexed: expected {size} bytes at offset {offset}, "
                      f"got {len(data)}")
    return data


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one member with fixed mtime / owner / mode, so the shard's bytes depend on its samples only."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
