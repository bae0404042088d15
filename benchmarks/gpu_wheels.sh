#!/usr/bin/env bash
# Download, into .whl/, the wheels benchmarks/gpu_suite.sh installs on a GPU
# machine that has torch with CUDA but no network access.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12; PIP="python3 -m pip"
#
# Exactly what treeckpt imports (its dependencies in pyproject.toml, torch
# aside), what the gpu-marked tests import (pytest, its timeout plugin,
# hypothesis from tests/conftest.py, Lightning for the FSDPStrategy test) and
# what the benchmarks import (psutil). Binary wheels for CPython on
# manylinux x86_64; installed there with --no-deps, each only when its module
# does not import already. .whl/modules.txt maps each wheel to its module.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
read -r -a PIP <<< "${PIP:-python3 -m pip}"

# module  requirement
WHEELS=(
  "optree optree==0.20.0"
  "zstandard zstandard==0.25.0"
  "xxhash xxhash==4.1.0"
  "fsspec fsspec==2025.12.0"
  "numpy numpy==2.4.6"
  "rich rich==15.0.0"
  "markdown_it markdown-it-py==4.3.0"
  "mdurl mdurl==0.1.2"
  "pygments pygments==2.21.0"
  "typing_extensions typing-extensions==4.16.0"
  "psutil psutil==7.2.2"
  "pytest pytest==9.2.0"
  "pluggy pluggy==1.7.0"
  "iniconfig iniconfig==2.3.1"
  "packaging packaging==26.4"
  "pytest_timeout pytest-timeout==2.4.0"
  "hypothesis hypothesis==6.170.27"
  "attrs attrs==26.1.0"
  "sortedcontainers sortedcontainers==2.4.0"
  "lightning lightning==2.6.6"
  "lightning_utilities lightning-utilities==0.15.3"
  "torchmetrics torchmetrics==1.9.0"
  "tqdm tqdm==4.70.1"
  "yaml pyyaml==6.0.4"
)

specs=()
for line in "${WHEELS[@]}"; do
  specs+=("${line#* }")
done
mkdir -p .whl
"${PIP[@]}" download --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
printf '%s\n' "${WHEELS[@]}" > .whl/modules.txt
echo "$(ls .whl/*.whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)) for CPython $PYVER"
