"""Atomic checkpoints: model, optimizer, scheduler, RNG and data position.

A checkpoint is written under `<name>.tmp`, then a commit marker is written and the folder renamed;
a folder without the marker (a crash mid-write) is ignored on resume, so nothing already written is
ever replaced by a half-written copy. Stage results (`final/`) use the same protocol.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mllm.train.distributed import DistInfo, barrier

COMMIT = "COMMITTED"


def is_committed(path: Path) -> bool:
    return (Path(path) / COMMIT).exists()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _commit(tmp: Path, final: Path, info: DistInfo, meta: dict) -> None:
    barrier()
    if info.is_main:
        (tmp / COMMIT).write_text(json.dumps(meta))
        if final.exists():  # a stale uncommitted folder of the same name
            shutil.rmtree(final)
        tmp.rename(final)
    barrier()


def save_checkpoint(engine, root: Path, step: int, client_state: dict, info: DistInfo, keep: int = 2) -> Path:
    root = Path(root)
    final, tmp = root / f"step-{step:08d}", root / f"step-{step:08d}.tmp"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag="state", client_state=client_state, save_latest=False)
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
    _commit(tmp, final, info, {"step": step})
    if info.is_main:
        prune_checkpoints(root, keep)
    barrier()
    return final


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` (>= 1) committed checkpoints; uncommitted folders are left for
    the next save to replace. The newest complete checkpoint is never deleted. Returns what was removed."""
    if keep < 1:
        raise ValueError(f"keep_last_n must be >= 1, got {keep}")
    removed = committed_checkpoints(root)[:-keep]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def committed_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and is_committed(p))


def load_checkpoint(engine, path: Path, info: DistInfo) -> dict:
    _, client_state = engine.load_checkpoint(str(path), tag="state", load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"checkpoint {path} could not be loaded")
    rng_file = Path(path) / f"rng-rank{info.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def save_weights(state_dict: dict, folder: Path, info: DistInfo, meta: dict | None = None) -> None:
    """Rank 0 writes `model.safetensors` into `folder` atomically (the state dict is already gathered)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, tmp / "model.safetensors")
    _commit(tmp, folder, info, meta or {})


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    folder = Path(folder)
    if not is_committed(folder):
        raise FileNotFoundError(f"{folder} is not a committed weights folder (no {COMMIT} marker)")
    state = load_file(folder / "model.safetensors")
    # Tied weights (lm_head <-> embeddings) may be saved once; strict otherwise.
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) or {}]
    if missing or unexpected:
        raise RuntimeError(f"weights in {folder} do not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
