"""What keeps a long run honest: the non-finite guard, preemption (SIGTERM), heartbeats, a hang
watchdog, and the check that a run folder's checkpoints belong to the config that resumes them.

- `NonFiniteGuard` flags a NaN/Inf in any gradient as it is produced (tensor hooks, no sync); the
  trainer agrees across ranks before the optimizer step and then skips it (`GuardedAdamW`) or stops.
- `Preemption` turns SIGTERM into a flag; the trainer finishes the step, checkpoints and exits 0.
- `Heartbeat` rewrites `<run>/heartbeat/rank<r>.json` every step (stage, step, time), and with a
  `watchdog_s` dumps every thread's stack to stderr when one step takes longer than that, so a hang
  shows where it is before the collective timeout turns it into a failure.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from mllm.schema import ConfigError, to_dict

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss or gradient with `run.on_nonfinite: stop`; no optimizer step was taken."""


class NonFiniteGuard:
    """Records whether any gradient of `params` was non-finite since the last `reset`."""

    def __init__(self, params):
        self.flag: torch.Tensor | None = None
        self.handles = [p.register_hook(self._check) for p in params if p.requires_grad]

    def _check(self, grad: torch.Tensor) -> None:
        bad = ~torch.isfinite(grad).all()
        self.flag = bad if self.flag is None else (self.flag | bad.to(self.flag.device))

    def seen(self) -> bool:
        return bool(self.flag) if self.flag is not None else False

    def reset(self) -> None:
        self.flag = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class GuardedAdamW(torch.optim.AdamW):
    """AdamW whose next `step` can be vetoed: parameters and optimizer state stay exactly as they were.

    DeepSpeed calls the inner optimizer's `step` (once per parameter group under ZeRO-1/2), so the veto
    is set by the trainer, after every rank agreed, before it calls `engine.step()`."""

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            return None
        return super().step(closure)


class Preemption:
    """SIGTERM (cluster preemption, `scancel`, torchrun forwarding) sets a flag instead of killing."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a test harness): nothing to install
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            print(f"[mllm] SIGTERM on pid {os.getpid()}: finishing the step, then checkpointing", file=sys.stderr,
                  flush=True)
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int, watchdog_s: int = 0):
        self.path = Path(run_dir) / "heartbeat" / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.watchdog_s = watchdog_s

    def beat(self, stage: str, step: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stage": stage, "step": step, "time": time.time(), "pid": os.getpid()}))
        tmp.replace(self.path)  # readers never see a half-written file
        if self.watchdog_s > 0:
            faulthandler.dump_traceback_later(self.watchdog_s, repeat=True, exit=False)

    def stop(self) -> None:
        if self.watchdog_s > 0:
            faulthandler.cancel_dump_traceback_later()


# Changing these between a checkpoint and the run that resumes it does not change what was trained.
RESUMABLE_CHANGES = {"steps", "save_every"}


def config_diff(saved: dict, current: dict, committed_stages: int) -> list[str]:
    """Fields that make `saved` checkpoints unusable for `current`: the model, the seed and dtype, the data
    settings (except worker counts), and every field except steps / save_every of the stages that already
    have checkpoints."""
    lines = []

    def compare(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                compare(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        elif a != b:
            lines.append(f"{where}: {a!r} (checkpoint) != {b!r} (now)")

    # Fused kernels are a runtime choice: the checkpoint layout is the stock one either way.
    compare({k: v for k, v in (saved.get("model") or {}).items() if k != "kernels"},
            {k: v for k, v in (current.get("model") or {}).items() if k != "kernels"}, "model")
    for key in ("seed", "dtype"):
        compare(saved.get("run", {}).get(key), current.get("run", {}).get(key), f"run.{key}")
    # Data settings decide which samples each step sees and how they are encoded; worker counts do not.
    runtime_only = ("num_workers", "prefetch_factor")
    compare({k: v for k, v in (saved.get("data") or {}).items() if k not in runtime_only},
            {k: v for k, v in (current.get("data") or {}).items() if k not in runtime_only}, "data")
    saved_stages, current_stages = saved.get("stages", []), current.get("stages", [])
    for i in range(min(committed_stages, len(saved_stages))):
        if i >= len(current_stages):
            lines.append(f"stages[{i}]: present in the checkpointed run, missing now")
            continue
        a = {k: v for k, v in saved_stages[i].items() if k not in RESUMABLE_CHANGES}
        b = {k: v for k, v in current_stages[i].items() if k not in RESUMABLE_CHANGES}
        compare(a, b, f"stages[{i}]")
    return lines


def check_resumable(saved_path: Path, cfg, stages_with_state: int) -> None:
    """Refuse to continue a run folder written by an incompatible config, naming the differing fields."""
    import yaml

    if not saved_path.exists() or stages_with_state == 0:
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    diff = config_diff(saved, to_dict(cfg), stages_with_state)
    if diff:
        raise ConfigError(
            f"{saved_path.parent} holds checkpoints of a different config; refusing to resume from them:\n  "
            + "\n  ".join(diff[:20]) + ("\n  ..." if len(diff) > 20 else "")
            + f"\nUse a new run.output_dir, or restore the old values."
        )
