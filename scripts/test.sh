#!/usr/bin/env bash
# The test suite: creates/updates .venv, then runs pytest (extra arguments go to pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export TRITON_INTERPRET=1  # Triton kernels run in the interpreter on CPU
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=20 "$@"
