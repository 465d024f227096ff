#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: ruff, then pytest (GUI tests under Xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh testing
.venv/bin/ruff check src tests scripts benchmarks
.venv/bin/python -m pytest "$@"
