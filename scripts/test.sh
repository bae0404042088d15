#!/usr/bin/env bash
# Set up .venv, then run every check and the default test set (this is what CI runs).
# Slow tests are left out; run them with: .venv/bin/pytest -m slow
set -euo pipefail

cd "$(dirname "$0")/.."

bash scripts/setup-venv.sh

bin=.venv/bin
failed=()

step() {
    # step NAME CMD...: run CMD, print how long it took, remember a failure and go on.
    local name="$1" start rc=0
    shift
    echo
    echo "==> $name"
    start=$SECONDS
    "$@" || rc=$?
    echo "<== $name: $([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - start))s"
    if [[ $rc != 0 ]]; then
        failed+=("$name")
    fi
}

step "ruff format" "$bin/ruff" format --check
step "ruff check" "$bin/ruff" check
step "lint-imports" "$bin/lint-imports" --no-cache
step "mypy" "$bin/mypy"
step "codespell" "$bin/codespell" src docs tests scripts README.md CHANGELOG.md CONTRIBUTING.md
if [[ -f mkdocs.yml ]]; then
    step "mkdocs build" env NO_MKDOCS_2_WARNING=1 "$bin/mkdocs" build --strict
fi
# The notebooks run top to bottom in a fresh kernel (their committed outputs are not compared).
step "notebooks" "$bin/pytest" --nbmake notebooks/ -p no:cacheprovider -q
# Last, so that its summary line closes the output. Exit 5 (no test collected) fails too.
step "pytest" "$bin/pytest"

echo
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "test.sh: FAILED: ${failed[*]}"
    exit 1
fi
echo "test.sh: all checks passed"
