#!/usr/bin/env bash
# One lint entry: ruff (incl. A005 stdlib shadowing and G logging rules), mypy, import-linter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy protocol/src engine/src server/src operator/src
.venv/bin/lint-imports
