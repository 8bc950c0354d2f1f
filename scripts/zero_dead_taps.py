#!/usr/bin/env python3
"""Zero the depthwise-conv taps of an EMO classifier that its training input never reached.

    zero_dead_taps.py IN.safetensors OUT.safetensors TRAIN_SIZE

A classifier trained at TRAIN_SIZE x TRAIN_SIZE sees maps of TRAIN_SIZE / 2^(s+1) at stage s
(stage 0 is the stem at stride 2). With zero padding, a tap of a `conv_local` depthwise conv
whose offset falls outside such a map for every output position never touches data: it gets
no gradient and keeps its initial value, shrunk by weight decay. At 32x32 that is 16 of the 25
taps in stage 3 (blocks 1-7), 21 in the strided `stage4.0` and 24 in `stage4.1` / `stage4.2`.
This writes a copy with those taps set to 0 (every other tensor byte for byte), and prints
which ones and their mean magnitude against the live taps'. The first block of stages 1-4
has the strided depthwise conv (it reads the previous stage's map). Needs numpy.

Used for the DeepLabv3 probes of docs/runs/deeplabv3-canvas-emo1m ("dead depthwise taps"):
zeroing them did not change how the backbone transfers.
"""
import json, struct, sys
import numpy as np


def live_taps(n_in, k, stride):
    """Per kernel offset: does any output position read a pixel of the n_in-wide map with it?"""
    pad = -(-(k - stride) // 2)  # ceil((k - stride) / 2), EMO's padding rule
    n_out = (n_in + 2 * pad - k) // stride + 1
    return np.array([any(0 <= o * stride - pad + t < n_in for o in range(n_out)) for t in range(k)])


def main():
    src, dst, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    raw = open(src, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header, base = json.loads(raw[8 : 8 + n]), 8 + n
    data = bytearray(raw[base:])
    for key, v in header.items():
        if key == "__metadata__" or not key.endswith("conv_local.conv.weight"):
            continue
        if v["dtype"] != "F32":
            sys.exit(f"{key}: dtype {v['dtype']}, expected F32")
        stage, block = int(key.split(".")[0][len("stage"):]), int(key.split(".")[1])
        stride = 2 if stage >= 1 and block == 0 else 1
        n_in = max(1, size // 2 ** (stage + 1)) * stride
        s, e = v["data_offsets"]
        w = np.frombuffer(bytes(data[s:e]), dtype=np.float32).reshape(v["shape"]).copy()
        live = live_taps(n_in, w.shape[2], stride)
        dead = ~(live[:, None] & live[None, :])
        if dead.any():
            print(f"{key}: input {n_in}x{n_in}, stride {stride}: {dead.sum()} of {dead.size} taps dead, "
                  f"mean |w| {np.abs(w[:, :, dead]).mean():.3f} against {np.abs(w[:, :, ~dead]).mean():.3f} live")
            w[:, :, dead] = 0
            data[s:e] = w.tobytes()
    open(dst, "wb").write(raw[:base] + bytes(data))


if __name__ == "__main__":
    main()
