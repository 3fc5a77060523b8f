#!/usr/bin/env bash
# One command, on a fresh machine: set up, prepare the bundled model, start vLLM on the CPU
# and the proxy, and send a request through it. Arguments go to `leangate up`
# (e.g. --once to stop after the demo, --port 8080, --redis-url redis://127.0.0.1:6379/0).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/leangate up "$@"
