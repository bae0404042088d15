#!/usr/bin/env bash
# Create or update .venv with treeckpt installed in editable mode.
#
#   scripts/setup-venv.sh             # every extra the checks need: test, lint, docs, s3,
#                                     # lightning, safetensors, notebooks
#   scripts/setup-venv.sh lightning   # only these extras (several: "lightning bench")
#
# Idempotent: when pyproject.toml and the extras have not changed since the last
# successful run, it installs nothing. PYTHON=python3.12 picks the interpreter.
set -euo pipefail

cd "$(dirname "$0")/.."

# Pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"

extras="test,lint,docs,s3,lightning,safetensors,notebooks"
if [[ $# -gt 0 ]]; then
    extras="$*"
    extras="${extras// /,}"
fi

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

# The stamp records what pyproject.toml and torch looked like, and which extras
# are installed: a request for extras already there installs nothing.
stamp=".venv/.treeckpt-setup"
project="$(cat pyproject.toml <(echo "$TORCH_VERSION") | cksum)"
if [[ -f "$stamp" ]] && [[ "$(head -n 1 "$stamp")" == "$project" ]] \
    && .venv/bin/python -c "import treeckpt" 2>/dev/null; then
    have=",$(sed -n 2p "$stamp"),"
    missing=""
    for extra in ${extras//,/ }; do
        [[ "$have" == *",$extra,"* ]] || missing="$missing $extra"
    done
    if [[ -z "$missing" ]]; then
        echo "setup-venv: .venv is up to date"
        exit 0
    fi
    extras="$(sed -n 2p "$stamp")$(printf ',%s' $missing)"
fi

echo "setup-venv: installing treeckpt[$extras] in editable mode"
pip_install -e ".[$extras]" "torch==$TORCH_VERSION"
if [[ ",$extras," == *",test,"* ]]; then
    # Real code the tests run, without its dependencies (docs/dependencies.md):
    # timm depends on torchvision, whose PyPI wheels do not import next to the CPU
    # build of torch (the tests import only timm's optimizer modules); torchtitan
    # depends on datasets, whose fsspec pin fights s3fs's and sends pip's resolver
    # into a long backtrack (its tested components need only the test extra).
    pip_install --no-deps "timm>=1.0.20,<2" "torchtitan>=0.3,<0.4" "torch==$TORCH_VERSION"
fi
printf '%s\n%s\n' "$project" "$extras" > "$stamp"
