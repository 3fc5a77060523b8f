#!/usr/bin/env bash
# mypy --strict over the package and the tests.
#
# The repository maps folders to subpackages of `leangate` (see pyproject.toml). The editable
# install resolves that mapping with an import hook, which mypy cannot follow, so this script
# builds a tree of symlinks shaped like the installed package and points mypy at it.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.cache/typecheck
rm -rf "$tree" && mkdir -p "$tree/leangate"
for f in leangate/*; do ln -s "$PWD/$f" "$tree/leangate/$(basename "$f")"; done
for d in middleware backend cache retrieval planners bench; do ln -s "$PWD/$d" "$tree/leangate/$d"; done
export MYPYPATH="$PWD/$tree"
.venv/bin/mypy -p leangate "$@"
.venv/bin/mypy tests "$@"
