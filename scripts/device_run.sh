#!/usr/bin/env bash
# The one command for a GPU machine (H100/H200: ../shared/FINDINGS.md has its packages and limits):
#
#   here:   scripts/fetch_device_wheels.sh            # pinned wheels the machine lacks -> .whl/ (diffusers only)
#   there:  scripts/device_run.sh                     # a device run with carry [".whl"], $OUT set
#   here:   DIFFKILN_DRY_RUN=1 OUT=/tmp/o scripts/device_run.sh   # the same phases on CPU, tiny presets, < 1 min
#   DIFFKILN_CASES=a,b (optional): a subset of the suite's cases, e.g. the video families that a full run leaves
#   for lack of time: DIFFKILN_CASES=open-sora-v2-eager,open-sora-v2-compile,videocrafter2-eager,videocrafter2-compile
#
# Installs only the carried wheels (no index, no deps) into /tmp/site, runs the device suite
# (diffkiln.benchmarks.device) under a deadline (default 540 s: one command may run 10 min), and leaves under
# $OUT: results.json, results.md, latency.png, kernels.png, device_run.log (<= 8 files, each < 16 MiB, no
# subfolders: what a device run returns). The suite writes results.json after every case; a summary table is
# printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT"
LOG="$OUT/device_run.log"
DEADLINE=${DIFFKILN_DEADLINE_S:-540}
PY=${PYTHON:-python3}
exec > >(tee -a "$LOG") 2>&1
echo "[device_run] $(date -u +%FT%TZ) deadline ${DEADLINE}s dry_run=${DIFFKILN_DRY_RUN:-0}"

if [ "${DIFFKILN_DRY_RUN:-0}" = 1 ]; then
  ARGS=(--dry-run)
else
  shopt -s nullglob
  wheels=(.whl/*.whl)
  if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
      || { echo "[device_run] wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  ARGS=()
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # diffkiln from this tree (not installed there)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch, diffusers, transformers; print('[device_run] torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" || { echo "[device_run] imports failed"; exit 1; }

# the suite stops itself at the deadline (results kept); `timeout` is the last guard against a hang
[ -n "${DIFFKILN_CASES:-}" ] && ARGS+=(--cases "$DIFFKILN_CASES")
timeout -k 10 $((DEADLINE + 30)) "$PY" -m diffkiln.benchmarks.device --out "$OUT" --deadline-s "$DEADLINE" "${ARGS[@]}"
rc=$?
# return limits: plain files directly under $OUT, each < 16 MiB (the log is cut to its last 8 MiB)
if [ -f "$LOG" ] && [ "$(stat -c %s "$LOG")" -gt $((15 * 2**20)) ]; then
  tail -c $((8 * 2**20)) "$LOG" > "$LOG.tmp" && mv "$LOG.tmp" "$LOG"
fi
echo "[device_run] suite exit code $rc; files: $(ls "$OUT" | tr '\n' ' ')"
if [ -f "$OUT/results.json" ]; then
  "$PY" -c "import json, sys; from diffkiln.benchmarks.device import summary; print(summary(json.load(open(sys.argv[1]))))" \
    "$OUT/results.json"
fi
exit $rc
