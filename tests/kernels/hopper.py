"""Compile Triton kernels for sm_90 without a GPU, in a subprocess (the kernel tests share this).

The interpreter accepts code the GPU compiler rejects (and ignores shared memory), so every kernel is
also compiled to a cubin with the compiler bundled in the triton wheel. `script` does the compiling
and prints "compiled".
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def assert_compiles_for_hopper(script: str, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache, so the compiler really runs
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("this triton install has no CUDA compiler (ptxas)")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
