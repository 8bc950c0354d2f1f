#!/usr/bin/env bash
# GPU check of the `vulkan` backend (a `--features vulkan` build): parity of the burn model with
# the official outputs on the GPU, training throughput against flex in one interleaved run, a
# Fashion-MNIST training run sized to a time budget, and a short DeepLabv3 run on the canvas set.
#
#   scripts/gpu_check.sh EMO_BINARY FASHION_MNIST_DIR OUT_DIR [TRAIN_SECONDS]
#
# PARTS (default "verify bench fmnist dense") picks the parts; the dense part also runs PSPNet,
# SSDLite and RetinaNet for a few hundred images each, and RetinaNet keep-ratio 1333x800 on 64.
#
# Writes the logs and each run's config / metrics / curves to OUT_DIR. Needs a Vulkan loader
# (libvulkan1) and the GPU vendor's Vulkan driver.
set -uo pipefail
EMO=$1
FM=$2
OUT=$3
BUDGET=${4:-240}
N_TRAIN=${N_TRAIN:-60000}   # training images in FASHION_MNIST_DIR
PARTS=${PARTS:-verify bench fmnist dense}
has() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT"
log() { echo "== $(date +%T) $*"; }

log "vulkan devices"
(command -v vulkaninfo >/dev/null && vulkaninfo --summary 2>/dev/null | grep -iE "deviceName|driverName|apiVersion") || true

if has verify; then
log "verify: the burn model on the GPU against the official PyTorch outputs"
timeout 120 "$EMO" --backend vulkan verify 2>&1 | grep -v XDG_RUNTIME_DIR | tee "$OUT/verify.log" | tail -12
[ "${PIPESTATUS[0]}" = 0 ] || { log "verify failed: stopping"; exit 1; }
fi
IPS=100
if has bench; then
log "bench-train: EMO-1M, batch 64, 32x32, vulkan against flex (one worker per core), interleaved"
timeout 150 "$EMO" bench-train --backends vulkan,flex --batch 64 --steps 10 --rounds 3 2>&1 | grep -v XDG_RUNTIME_DIR | tee "$OUT/bench-train.log" | tail -6
IPS=$(awk '/^emo-vulkan/ { for (i = 1; i <= NF; i++) if ($(i + 1) == "img/s") print $i }' "$OUT/bench-train.log")
IPS=${IPS:-100}
fi
# Epochs of N_TRAIN images that fit the budget at 80% of the measured step rate, 1..10.
if has fmnist; then
EPOCHS=$(python3 -c "print(max(1, min(10, int($BUDGET * 0.8 * $IPS / $N_TRAIN))))")

log "train: Fashion-MNIST on the GPU, $EPOCHS epochs ($IPS img/s measured)"
timeout $((BUDGET + 90)) "$EMO" --backend vulkan train --variant emo-1m --data "fashion-mnist:$FM" \
  --epochs "$EPOCHS" --out /tmp/gpu-fmnist 2>&1 | grep -v XDG_RUNTIME_DIR | grep -v "^\s*$" | tail -25
for f in config.json metrics.jsonl curves.png; do cp /tmp/gpu-fmnist/$f "$OUT/fmnist-$f" 2>/dev/null; done
fi
if has dense; then
log "train: DeepLabv3-EMO-1M on the GPU, one epoch of 2,400 192x192 canvases"
"$EMO" make-canvas --out /tmp/canvas-seg192 --size 192 --train 2400 --val 200 --items 1-2 --scale 3.75-6.75 \
  --seed 2 --fmnist "$FM" >/dev/null 2>&1
timeout 120 "$EMO" --backend vulkan train --task deeplabv3 --data /tmp/canvas-seg192 --input 192x192 --epochs 1 \
  --batch 16 --lr 1e-3 --light-augment --backbone-weights assets/emo1m-fashion-mnist.safetensors \
  --out /tmp/gpu-deeplab 2>&1 | grep -v XDG_RUNTIME_DIR | grep -v "^\s*$" | tail -8
cp /tmp/gpu-deeplab/metrics.jsonl "$OUT/deeplab-metrics.jsonl" 2>/dev/null
for task in pspnet ssdlite retinanet; do
  log "train: $task on the GPU, one epoch of 320 canvases"
  in=""; [ $task = pspnet ] && in="--input 192x192 --light-augment"
  timeout 90 "$EMO" --backend vulkan train --task $task --data /tmp/canvas-seg192 $in --epochs 1 --batch 16 \
    --train-limit 320 --backbone-weights assets/emo1m-fashion-mnist.safetensors --out /tmp/gpu-$task 2>&1 \
    | grep -v XDG_RUNTIME_DIR | grep -v "^\s*$" | tail -4
done
log "train: ssdlite fine-tuned from the run above (--init-weights: every weight loaded, the classifiers too)"
timeout 90 "$EMO" --backend vulkan train --task ssdlite --data /tmp/canvas-seg192 --epochs 1 --batch 16 \
  --train-limit 320 --init-weights /tmp/gpu-ssdlite/best.safetensors --out /tmp/gpu-ssdlite-ft 2>&1 \
  | grep -v XDG_RUNTIME_DIR | grep -v "^\s*$" | tail -4
log "train: retinanet keep-ratio 1333x800 (mmdet's COCO pipeline: padded batches, valid anchors), 64 canvases"
timeout 120 "$EMO" --backend vulkan train --task retinanet --data /tmp/canvas-seg192 --train-scale 1333x800 --epochs 1 \
  --batch 8 --train-limit 64 --eval-limit 16 --backbone-weights assets/emo1m-fashion-mnist.safetensors \
  --out /tmp/gpu-retinanet-keep 2>&1 | grep -v XDG_RUNTIME_DIR | grep -v "^\s*$" | tail -4
fi
log done
