#!/usr/bin/env bash
# Set everything up, then run the linters and the whole test suite (what CI runs).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow" -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/lint.sh
exec .venv/bin/python -m pytest "$@"
