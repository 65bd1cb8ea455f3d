#!/usr/bin/env bash
# Set everything up, then serve (default: the embedded SmolLM2-135M-Instruct on CPU, port 8000).
# Extra arguments go to `kubellm serve`, e.g. `scripts/serve.sh /path/to/model --port 9000`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/kubellm serve "$@"
