#!/usr/bin/env bash
# The seeds' ablations on Shakespeare with small budgets; fills docs/experiments.md. About 30 minutes on
# an idle 2-core reference machine with the default 1 minute per run. Arguments go to bench/experiments.py
# (e.g. --minutes 2, --only positions, --fill-only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" bench/experiments.py "$@"
