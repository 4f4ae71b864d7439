"""Run a Python script where only torch + transformers + pillow are installed (the user's machine).

Exported checkpoints must load without our package, so tests need an interpreter that has
torch, transformers and pillow with their runtime dependencies, and nothing else: not `mllm`, not
open_clip, deepspeed, triton, peft, accelerate, webdataset or torchvision. If any of those were
importable, transformers would quietly use it (torchvision's fast image processors, accelerate's
loading path) or a remote-code file could import it, and the test would pass on our machine only.

How the environment is built, and why:
- Installing torch from PyPI into a fresh venv takes minutes and gigabytes (and CI has no internet),
  so the environment reuses what /work/main/.venv already has installed.
- The distributions are the dependency closure of torch, transformers and pillow computed from the
  installed metadata (`Requires-Dist`, markers evaluated for this interpreter; a requirement's own
  extras are followed, e.g. torch's `cuda-toolkit[cublas,...]`; optional extras of the roots are not).
  EXCLUDED even when a dependency lists them: triton (torch lists it, but imports it lazily and
  runs without it) and everything in `FORBIDDEN`.
- `python -m venv --without-pip` gives a bare interpreter (no system site-packages); one `.pth`
  file in its site-packages points at a folder of symlinks to exactly the top-level entries of the
  closure (packages, `.py`/`.so` modules, `*.libs` folders and the `*.dist-info` folders, so
  `importlib.metadata.version(...)` checks inside transformers still work). Symlinks, not copies:
  torch alone is gigabytes, symlinking it is instant, and the environment always matches the
  versions the rest of the suite tests.
- The environment is cached in a folder with a stamp of the interpreter and the closure's versions;
  a matching stamp is reused, anything else is rebuilt (atomically: built beside, then renamed).

Use: `run_clean(script_source, *args)` runs `python -I script.py *args` offline (HF_HUB_OFFLINE,
TRANSFORMERS_OFFLINE, an empty HF_HOME), without PYTHONPATH, in a temporary folder outside the repo,
and raises with the output on a non-zero exit or a timeout.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ("torch", "transformers", "pillow")
# Distribution names (canonical) that must not be importable where the export is loaded.
FORBIDDEN = ("mllm", "open-clip-torch", "deepspeed", "triton", "peft", "accelerate", "webdataset", "torchvision")
# The import names of the same packages; the build refuses to link any of them.
FORBIDDEN_MODULES = ("mllm", "open_clip", "deepspeed", "triton", "peft", "accelerate", "webdataset", "torchvision")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
STAMP = "clean-env.json"
LAYOUT = 1  # bump when the way the environment is built changes: cached environments are then rebuilt
# Environment variables passed through to the clean interpreter; everything else is dropped.
PASS_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "OMP_NUM_THREADS")


class CleanRunError(RuntimeError):
    """A script run in the clean environment failed or timed out; the message has its output."""


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def installed() -> dict[str, metadata.Distribution]:
    """Canonical name -> distribution, for the site-packages of the running interpreter only."""
    return {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site_packages())])}


def closure(dists: dict[str, metadata.Distribution]) -> list[str]:
    """Canonical names of ROOTS plus everything they need at runtime, minus FORBIDDEN."""
    wanted: dict[str, set[str]] = {}  # name -> extras requested of it ("" = none)
    todo = [(canonicalize_name(root), "") for root in ROOTS]
    while todo:
        name, extra = todo.pop()
        if name in FORBIDDEN or extra in wanted.get(name, ()):
            continue
        if name not in dists:
            raise RuntimeError(f"{name} is required by the clean environment but not installed in {site_packages()}")
        wanted.setdefault(name, set()).add(extra)
        for line in dists[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(canonicalize_name(req.name), e) for e in ("", *req.extras)]
    return sorted(wanted)


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """The names a distribution installs directly in site-packages, from its RECORD."""
    if dist.files is None:
        raise RuntimeError(f"{dist.metadata['Name']} has no RECORD file; cannot tell which files are its own")
    entries = set()
    for file in dist.files:
        parts = file.parts
        if parts[0] in ("..", "__pycache__") or parts[0].endswith(".pth"):
            continue  # scripts outside site-packages, shared bytecode, path hooks (e.g. setuptools')
        if len(parts) > 1 or parts[0].endswith((".py", ".so")):
            entries.add(parts[0])
    return entries


def link_tree(links: Path, names: list[str], dists: dict[str, metadata.Distribution]) -> None:
    """Symlink each top-level entry of `names` into `links`.

    An entry shared with a distribution outside the closure (a namespace folder such as `nvidia/`)
    becomes a real folder holding links to only the closure's own sub-entries.
    """
    source = site_packages()
    owned = {name: top_level_entries(dists[name]) for name in names}
    mine = set().union(*owned.values())
    theirs = set().union(*(top_level_entries(d) for n, d in dists.items() if n not in owned)) & mine
    for entry in sorted(mine):
        if entry.split(".")[0] in FORBIDDEN_MODULES:
            raise RuntimeError(f"the clean environment would contain {entry}; check FORBIDDEN in {__file__}")
        if entry not in theirs:
            (links / entry).symlink_to(source / entry)
            continue
        (links / entry).mkdir()
        children = {f.parts[1] for name in names for f in dists[name].files
                    if len(f.parts) > 1 and f.parts[0] == entry}
        for child in sorted(children):
            (links / entry / child).symlink_to(source / entry / child)


def stamp_for(names: list[str], dists: dict[str, metadata.Distribution]) -> dict:
    return {"layout": LAYOUT, "python": sys.version, "base": sys._base_executable,
            "site_packages": str(site_packages()), "distributions": {name: dists[name].version for name in names}}


def read_stamp(env: Path) -> dict | None:
    try:
        return json.loads((env / STAMP).read_text())
    except (OSError, ValueError):
        return None


def build(env: Path, names: list[str], dists: dict[str, metadata.Distribution]) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, capture_output=True)
    links = env / "packages"
    links.mkdir()
    link_tree(links, names, dists)
    (pth,) = env.glob("lib/python*/site-packages")
    # Relative, so the folder can be renamed into place after it is built (site.py joins it to sitedir).
    (pth / "clean-env.pth").write_text(os.path.relpath(links, pth) + "\n")
    (env / STAMP).write_text(json.dumps(stamp_for(names, dists), indent=2))


@functools.cache
def clean_python(cache_dir: str | os.PathLike = Path(tempfile.gettempdir()) / f"mllm-clean-env-{os.getuid()}") -> Path:
    """The interpreter of the clean environment in `cache_dir/env`, built on first use."""
    dists = installed()
    names = closure(dists)
    env = Path(cache_dir) / "env"
    python = env / "bin" / "python"
    if read_stamp(env) == stamp_for(names, dists) and python.exists():
        return python
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="env.", dir=cache_dir))
    try:
        build(tmp, names, dists)
        if env.exists() and read_stamp(env) != stamp_for(names, dists):
            shutil.rmtree(env)  # stale: another interpreter or other package versions
        try:
            tmp.rename(env)
        except OSError:  # another process built the same environment first
            if read_stamp(env) != stamp_for(names, dists):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return python


def clean_env_vars(hf_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {key: os.environ[key] for key in PASS_ENV if key in os.environ}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra or {})
    return env


def run_clean(
    script: str,
    *args: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    timeout: float = TIMEOUT_S,
    env: dict[str, str] | None = None,
    python: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run the Python source `script` with `args` in the clean environment; raise CleanRunError on failure.

    `cwd` defaults to a fresh temporary folder and may not be inside the repository (its `mllm/`
    would not be imported under `-I`, but relative paths would silently resolve against it).
    `env` adds variables to the minimal environment; `python` overrides the interpreter.
    """
    if cwd is not None and Path(cwd).resolve().is_relative_to(REPO):
        raise ValueError(f"cwd={cwd} is inside the repository {REPO}; use a temporary folder")
    python = python or clean_python()
    with tempfile.TemporaryDirectory(prefix="clean-run.") as tmp:
        tmp = Path(tmp)
        (tmp / "script.py").write_text(script)
        (tmp / "cwd").mkdir()
        cmd = [str(python), "-I", str(tmp / "script.py"), *map(str, args)]
        try:
            proc = subprocess.run(cmd, cwd=cwd or tmp / "cwd", env=clean_env_vars(tmp / "hf_home", env),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out, err = (s.decode(errors="replace") if isinstance(s, bytes) else s or "" for s in (e.stdout, e.stderr))
            raise CleanRunError(f"clean-environment script timed out after {timeout}s\n"
                                f"--- stdout ---\n{out}\n--- stderr ---\n{err}") from None
    if proc.returncode != 0:
        raise CleanRunError(f"clean-environment script exited with {proc.returncode}\n"
                            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc
