#!/usr/bin/env bash
# Create or update .venv with treeckpt installed in editable mode.
#
#   scripts/setup-venv.sh             # extras: test, lint, docs, s3, lightning, safetensors, notebooks
#   scripts/setup-venv.sh bench       # ...plus more extras (several: "bench other")
#
# Idempotent: when pyproject.toml and the extras have not changed since the last
# successful run, it installs nothing. PYTHON=python3.12 picks the interpreter.
set -euo pipefail

cd "$(dirname "$0")/.."

# Pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"

extras="test,lint,docs,s3,lightning,safetensors,notebooks"
for extra in "$@"; do
    extras="${extras},${extra// /,}"
done

pip_install() {
    # Quiet, but keep real errors; drop the notes about local index folders that do not exist.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if [[ ! -x .venv/bin/python ]]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "setup-venv: $PYTHON is older than 3.10; set PYTHON to a newer interpreter" >&2
        exit 1
    fi
    echo "setup-venv: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
    pip_install --upgrade pip
fi

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "setup-venv: installing torch==$TORCH_VERSION"
    pip_install "torch==$TORCH_VERSION"
fi

stamp=".venv/.treeckpt-setup"
want="$(cat pyproject.toml <(echo "$extras $TORCH_VERSION") | cksum)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && .venv/bin/python -c "import treeckpt" 2>/dev/null; then
    echo "setup-venv: .venv is up to date"
    exit 0
fi

echo "setup-venv: installing treeckpt[$extras] in editable mode"
pip_install -e ".[$extras]" "torch==$TORCH_VERSION"
echo "$want" > "$stamp"
