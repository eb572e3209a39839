#!/usr/bin/env bash
# Install punchgate into ./.venv and run the local demonstration (two peers, one tunnel).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/python -m punchgate.demo "$@"
