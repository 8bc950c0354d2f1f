#!/usr/bin/env bash
# Reproduce the speed table of the README: the fast engine against ONNX Runtime (official ONNX
# exports in ../shared/bench, where one exists for the shape) and the burn model, interleaved
# in the same run, for the four variants at batch 1 and 16, 224x224.
#   scripts/bench.sh [THREADS]      (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}
python3 -c "import onnxruntime, numpy" 2>/dev/null || python3 -m pip install --quiet onnxruntime numpy
cargo build --release -p emo-cli
ONNX_DIR=${ONNX_DIR:-../shared/bench}
for v in emo-1m emo-2m emo-5m emo-6m; do
  for b in 1 16; do
    tag=$(echo "$v" | tr 'a-z-' 'A-Z_' | sed 's/^EMO_/EMO_/')
    onnx="$ONNX_DIR/${tag}_b${b}_224.onnx"
    args=(--variant "$v" --batch "$b" --threads "$THREADS" --compare-burn)
    if [ "$b" = 16 ]; then args+=(--runs 4 --rounds 3); else args+=(--runs 10 --rounds 5); fi
    [ -f "$onnx" ] && args+=(--compare-onnx "$onnx")
    ./target/release/emo bench "${args[@]}"
    echo
  done
done
