#!/usr/bin/env python3
"""Upper bound on mIoU from the logit resolution alone.

    seg_stride_bound.py LABEL_DIR NUM_CLASSES CELLS [CELLS ...]

For every ground-truth label map (PNG, 255 = ignore): one-hot, average-pool each class to
CELLS x CELLS, upsample bilinearly back (align_corners=False, as the segmentation heads do) and
take the argmax. The mIoU of these maps (mmseg's definition) is what perfect logits of that size
could reach. With output stride 32, a 128x128 input has 4x4 logits and a 192x192 input 6x6.
Needs numpy and Pillow.
"""
import glob, sys
import numpy as np
from PIL import Image


def pool(x, cells):
    # x: (C, H, W) -> (C, cells, cells), adaptive average pooling as PyTorch's.
    c, h, w = x.shape
    out = np.zeros((c, cells, cells))
    for i in range(cells):
        y0, y1 = (i * h) // cells, -(-((i + 1) * h) // cells)
        for j in range(cells):
            x0, x1 = (j * w) // cells, -(-((j + 1) * w) // cells)
            out[:, i, j] = x[:, y0:y1, x0:x1].mean(axis=(1, 2))
    return out


def upsample(x, h, w):
    # Bilinear, align_corners=False.
    c, ih, iw = x.shape
    def coords(n, m):
        s = (np.arange(n) + 0.5) * m / n - 0.5
        s = np.clip(s, 0, m - 1)
        i0 = np.floor(s).astype(int)
        i1 = np.minimum(i0 + 1, m - 1)
        return i0, i1, s - i0
    y0, y1, dy = coords(h, ih)
    x0, x1, dx = coords(w, iw)
    top = x[:, y0][:, :, x0] * (1 - dx) + x[:, y0][:, :, x1] * dx
    bot = x[:, y1][:, :, x0] * (1 - dx) + x[:, y1][:, :, x1] * dx
    return top * (1 - dy)[:, None] + bot * dy[:, None]


def main():
    label_dir, n = sys.argv[1], int(sys.argv[2])
    files = sorted(glob.glob(f"{label_dir}/*.png"))
    gts = [np.array(Image.open(f)) for f in files]
    for cells in map(int, sys.argv[3:]):
        inter, union = np.zeros(n), np.zeros(n)
        for g in gts:
            valid = g != 255
            onehot = np.stack([(g == c) & valid for c in range(n)]).astype(np.float64)
            pred = upsample(pool(onehot, cells), *g.shape).argmax(0)
            for c in range(n):
                p, t = (pred == c) & valid, (g == c) & valid
                inter[c] += (p & t).sum()
                union[c] += (p | t).sum()
        iou = inter[union > 0] / union[union > 0]
        print(f"{cells}x{cells} logits: mIoU bound {100 * iou.mean():.1f} over {len(gts)} maps")


if __name__ == "__main__":
    main()
