#!/usr/bin/env bash
# One run on a machine with one CUDA GPU: the carried wheels, the versions,
# the gpu-marked tests and the GPU benchmarks, every result in one markdown file.
#
#   bash benchmarks/gpu_suite.sh [--dry-run] [OUT_DIR]
#
# OUT_DIR: the argument, else $OUT, else bench-tmp/gpu-suite. It receives
# gpu-suite.md (the report: versions, one line per step, the benchmark
# tables, the end of the log of every failed step) and logs/<step>.log.
#
# Fail soft: every step runs under `timeout`; a failed or timed-out step is
# reported and the next one runs. The whole run stays within
# GPU_SUITE_BUDGET_S seconds (default 470): a step gets at most what is left,
# and none starts with less than 20 s left. Without CUDA (or with --dry-run)
# the GPU steps print "skipped: no CUDA" and the rest runs.
#
# Environment: PYTHON (default python3), GPU_SUITE_GIB (benchmark state size,
# default 4), GPU_SUITE_ROUNDS (default 2), GPU_SUITE_BUDGET_S.
# Wheels: benchmarks/gpu_wheels.sh fills .whl/ on a machine with network
# access; here each wheel whose module does not import already is unpacked
# into a private directory put first on PYTHONPATH (with src/).
# Exit status: the number of failed steps (0: every step passed or was skipped).
set -u
cd "$(dirname "$0")/.." || exit 99

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
OUTDIR="${1:-${OUT:-bench-tmp/gpu-suite}}"
mkdir -p "$OUTDIR/logs"
OUTDIR="$(cd "$OUTDIR" && pwd)"
REPORT="$OUTDIR/gpu-suite.md"
PY="${PYTHON:-python3}"
GIB="${GPU_SUITE_GIB:-4}"
ROUNDS="${GPU_SUITE_ROUNDS:-2}"
BUDGET="${GPU_SUITE_BUDGET_S:-470}"
START=$SECONDS
FAILED=0
SUMMARY=()

say() { printf '%s\n' "$*" | tee -a "$REPORT"; }

: > "$REPORT"
say "# treeckpt GPU suite"
say ""
say "Started $(date -u '+%Y-%m-%d %H:%M:%S UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); host $(uname -srm); $(nproc 2>/dev/null || echo '?') CPU cores."
say "Command: \`bash benchmarks/gpu_suite.sh${*:+ $*}\`$([ $DRY = 1 ] && echo ' (dry run)'); state ${GIB} GiB, ${ROUNDS} rounds, budget ${BUDGET} s."
say ""

# ---------------------------------------------------------------- wheels
SITE="${TMPDIR:-/tmp}/treeckpt-gpu-site"
if [ -f .whl/modules.txt ]; then
  missing=()
  # One interpreter lists the requirements whose module does not import.
  absent=$("$PY" - .whl/modules.txt 2> /dev/null << 'EOF'
import importlib, sys
for line in open(sys.argv[1]):
    if line.split():
        mod, req = line.split()
        try:
            importlib.import_module(mod)
        except Exception:
            print(req)
EOF
  ) || absent=$(cut -d' ' -f2 .whl/modules.txt)
  for req in $absent; do
    name="${req%%==*}"
    version="${req#*==}"
    shopt -s nocaseglob
    wheel=(.whl/"${name//-/_}"-"$version"-*.whl)
    shopt -u nocaseglob
    if [ -e "${wheel[0]}" ]; then
      missing+=("${wheel[0]}")
    else
      say "wheel for $req not found in .whl/"
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "Wheels: every carried module imports already; nothing installed."
  elif [ $DRY = 1 ]; then
    say "Wheels (dry run, not installed): ${missing[*]#.whl/}"
  else
    mkdir -p "$SITE"
    if ! timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${missing[@]}" \
        > "$OUTDIR/logs/wheels.log" 2>&1; then
      # No pip (or it failed): a wheel is a zip archive to unpack as it is.
      for w in "${missing[@]}"; do
        "$PY" -m zipfile -e "$w" "$SITE" >> "$OUTDIR/logs/wheels.log" 2>&1
      done
    fi
    say "Wheels installed into a private directory: ${missing[*]#.whl/}"
  fi
  export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  say "Wheels: no .whl/modules.txt (run benchmarks/gpu_wheels.sh where there is network access)."
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---------------------------------------------------------------- versions
HAS_CUDA=0
if [ $DRY = 0 ]; then
  HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)
fi
say ""
say "## Versions"
say ""
say '```'
if command -v nvidia-smi > /dev/null 2>&1; then
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$REPORT"
fi
timeout 60 "$PY" - << 'EOF' 2>&1 | tee -a "$REPORT"
import importlib, platform, sys
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB",
              "NCCL", ".".join(map(str, torch.cuda.nccl.version())))
except Exception as exc:
    print("torch: import failed:", exc)
for name in ("treeckpt", "optree", "zstandard", "xxhash", "fsspec", "numpy", "pytest", "lightning"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", type(exc).__name__, exc)
EOF
say '```'
say ""
say "## Results"
say ""

# ---------------------------------------------------------------- steps
step() { # step NAME TIMEOUT_S NEEDS_CUDA COMMAND...
  local name=$1 limit=$2 cuda=$3
  shift 3
  local log="$OUTDIR/logs/$name.log"
  if [ "$cuda" = 1 ] && [ "$HAS_CUDA" != 1 ]; then
    echo "$name: skipped: no CUDA"
    SUMMARY+=("| $name | skipped: no CUDA | | \`$*\` |")
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ $left -lt 20 ]; then
    echo "$name: skipped: out of time"
    SUMMARY+=("| $name | skipped: out of time (${left} s left) | | \`$*\` |")
    return 0
  fi
  [ "$limit" -gt $left ] && limit=$left
  echo "== $name (timeout ${limit} s): $*"
  local t0=$SECONDS rc status
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    status="passed"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="FAILED: timed out after ${limit} s"
  else
    status="FAILED: exit $rc"
  fi
  local last
  last=$(grep -E '(passed|failed|skipped|error)' "$log" | tail -n 1 | tr -d '=|' | sed 's/^ *//')
  [ -n "$last" ] && status="$status ($last)"
  echo "$name: $status"
  SUMMARY+=("| $name | $status | $((SECONDS - t0)) s | \`$*\` |")
  if [ $rc -ne 0 ]; then
    FAILED=$((FAILED + 1))
    {
      echo "### $name: $status"
      echo ""
      echo '```'
      tail -n 40 "$log"
      echo '```'
      echo ""
    } >> "$OUTDIR/failures.md"
  fi
  return 0
}

: > "$OUTDIR/failures.md"
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs -m gpu)
BENCH=("$PY" benchmarks/bench_gpu.py)
BARGS=(--gib "$GIB" --rounds "$ROUNDS" --out "$REPORT")

step tests-gpu 150 1 "${PYTEST[@]}" tests/gpu
step bench-async 120 1 "${BENCH[@]}" async "${BARGS[@]}"
step bench-save 150 1 "${BENCH[@]}" save "${BARGS[@]}"
step bench-load 100 1 "${BENCH[@]}" load "${BARGS[@]}"
step tests-lightning-fsdp 150 1 "${PYTEST[@]}" tests/lightning/test_resume.py

{
  echo "## Summary"
  echo ""
  echo "| step | result | took | command |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${SUMMARY[@]}"
  echo ""
  echo "$FAILED step(s) failed; $((SECONDS - START)) s in all."
  echo ""
  cat "$OUTDIR/failures.md"
} | tee -a "$REPORT"
rm -f "$OUTDIR/failures.md"
echo "report: $REPORT"
exit $((FAILED > 99 ? 99 : FAILED))
