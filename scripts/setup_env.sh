#!/usr/bin/env bash
# Create/update .venv and install the project with its dev extras (idempotent, fast when unchanged).
# Sourced by demo.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
# Reinstall only when the dependency list changed.
STAMP=.venv/.mllm-install-stamp
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing mllm[dev] into .venv (first time: ~2 minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v -i "warning" || true
  .venv/bin/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v -i "warning: location" || true
  .venv/bin/python -c "import mllm, mllm.train, mllm.data, deepspeed, open_clip, webdataset" \
    || { echo "[setup] install failed: see the pip output above" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
# No GPU here: DeepSpeed must use its CPU accelerator; nothing may reach the hub at run time.
if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
