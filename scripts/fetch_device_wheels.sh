#!/usr/bin/env bash
# Here (with a package index): download the wheels the H100/H200 machine lacks into .whl/ (ignored by git;
# a device run carries it when `.whl` is named in its carry list). That machine already has torch 2.11
# (CUDA 13), triton 3.6, transformers 5.17, huggingface-hub 1.33, tokenizers, safetensors, numpy, Pillow,
# regex, requests, filelock, matplotlib (see ../shared/FINDINGS.md); of diffkiln's needs only diffusers is
# missing. Every wheel is pinned (an unpinned huggingface-hub 2.x would break the transformers there).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1)  # Requires-Dist: importlib_metadata (imported only on Python < 3.8), filelock,
                            # huggingface-hub>=1.32, numpy, regex, requests, safetensors>=0.8, Pillow: all there
grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
  || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
# keep exactly the pinned wheels: a second version of one package stops the install there
for f in .whl/*.whl; do
  keep=0
  for w in "${WHEELS[@]}"; do
    name=${w%%==*}; ver=${w##*==}
    case "$(basename "$f")" in "${name//-/_}-${ver}-"*|"${name}-${ver}-"*) keep=1 ;; esac
  done
  [ "$keep" = 1 ] || { echo "removing unpinned $(basename "$f")"; rm -f "$f"; }
done
du -sh .whl
echo "device run: carry [\".whl\"], command: scripts/device_run.sh"
