#!/usr/bin/env bash
# Set up .venv, then run the treeckpt demo.
set -euo pipefail

cd "$(dirname "$0")/.."

bash scripts/setup-venv.sh
.venv/bin/python -m treeckpt.tools.demo "$@"
