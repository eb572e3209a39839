#!/usr/bin/env bash
# Static checks of punchgate/: ruff (lint) and mypy (types). scripts/test.sh runs this first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m ruff check punchgate
# libp2p depends on trio-typing, whose "trio-stubs" describe trio as it was years ago and
# hide the annotations trio now ships itself; point mypy at trio's own package instead.
types=$(mktemp -d)
trap 'rm -rf "$types"' EXIT
ln -s "$("$PY" -c 'import os, trio; print(os.path.dirname(trio.__file__))')" "$types/trio"
MYPYPATH="$types" "$PY" -m mypy
