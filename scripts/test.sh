#!/usr/bin/env bash
# Set up and run every check: ruff, mypy --strict, then pytest, whose integration tests use
# the real vLLM server (started here when none is running) and the real Redis.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/cache -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/ensure-redis.sh

echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy --strict"
scripts/typecheck.sh

if [ -z "${LEANGATE_TEST_BACKEND_URL:-}" ]; then
  echo "==> preparing the bundled vLLM backend (first time: installs vLLM and converts the model)"
  .venv/bin/python -m leangate.backend.localvllm prepare
  url=$(.venv/bin/python -m leangate.backend.localvllm url)
  serving() { .venv/bin/python -c "import sys; from leangate.backend.localvllm import is_serving; sys.exit(not is_serving('$url'))"; }
  if ! serving; then
    echo "==> starting vLLM on the CPU at $url (about 2 minutes)"
    .venv/bin/python -m leangate.backend.localvllm serve &
    vllm_pid=$!
    trap 'kill "$vllm_pid" 2>/dev/null; wait "$vllm_pid" 2>/dev/null || true' EXIT
    until serving; do
      kill -0 "$vllm_pid" 2>/dev/null || { echo "error: vLLM exited before it was ready" >&2; exit 1; }
      sleep 3
    done
  fi
  export LEANGATE_TEST_BACKEND_URL=$url
fi

echo "==> pytest (backend: $LEANGATE_TEST_BACKEND_URL)"
.venv/bin/pytest "$@"
