#!/usr/bin/env bash
# Set up .venv, then run the treeckpt demo.
set -euo pipefail

cd "$(dirname "$0")/.."

bash scripts/setup-venv.sh lightning   # the demo needs only the Lightning extra
.venv/bin/python scripts/demo.py "$@"
