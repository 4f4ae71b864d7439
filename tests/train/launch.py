"""Run `mllm` (1 process, or N under torchrun) as a subprocess with a hard timeout.

On timeout every worker process gets SIGUSR1 in turn, which `mllm` answers by printing all its threads' stacks
(faulthandler), and the test fails with those stacks instead of hanging CI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def command(args, nproc: int = 1, script: str | None = None) -> list[str]:
    target = [script] if script else ["-m", "mllm.train.cli"]
    if nproc == 1:
        return [sys.executable, *target, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *target, *args]


def stacks_of(stderr: str, context: int = 3000) -> str:
    """Every rank's faulthandler dump in full (they come last, after SIGUSR1), with some log lines before
    them. A plain tail could cut off the first rank's stacks when the ranks have many threads."""
    found = [i for i in (stderr.find("Thread 0x"), stderr.find("Current thread 0x")) if i >= 0]
    start = min(found) if found else max(0, len(stderr) - context)
    return stderr[max(0, start - context):]


def run(cmd: list[str], env: dict | None = None, timeout: float = TIMEOUT_S, hung: Path | None = None,
        settle: float = 5.0) -> subprocess.CompletedProcess:
    """`hung`: a file a worker writes when it enters an injected hang; `settle` seconds after it appears the run
    counts as hung (the other ranks have reached their collective by then), without waiting for `timeout`."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline, reason = time.monotonic() + timeout, f"in {timeout} s"
    hung_since = None
    while True:
        try:  # retrying communicate after its timeout loses no output
            stdout, stderr = proc.communicate(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if hung is not None and hung_since is None and hung.exists():
                hung_since = now
            if hung_since is not None and now - hung_since >= settle:
                reason = f"(a worker wrote {hung.name}: it hangs)"
                break
            if now >= deadline:
                break
    workers = descendants(proc.pid) or [proc.pid]
    # The workers print their stacks (the launcher itself has no handler), one at a time: dumps written
    # at once to the shared stderr interleave mid-line and garble every rank's stack.
    for pid in workers:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            continue
        time.sleep(2)
    time.sleep(1)
    for pid in [*workers, proc.pid]:  # workers may run in their own process groups
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    stdout, stderr = proc.communicate(timeout=30)
    raise AssertionError(f"{' '.join(cmd)} did not finish {reason}; the ranks' stacks:\n{stacks_of(stderr)}")
