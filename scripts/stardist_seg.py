#!/usr/bin/env python3
"""Build a tiny real segmentation set in mask-folder layout from the fluorescence nuclei image
that ships inside the `stardist` wheel on PyPI, for `emo train --task deeplabv3|pspnet`.

    python3 scripts/stardist_seg.py OUT_DIR [TILE]      # downloads stardist==0.9.2 (no deps)

`stardist/data/images/img2d.tif` is a 512x512 16-bit (values 0-235) image of cell nuclei from the
2018 Kaggle Data Science Bowl (BBBC038), and `mask2d.tif` labels its 125 nuclei one id each.
Classes: background (0) and nucleus (1), no ignored pixels. The left three quarters of the image
(columns 0-383) make the training split, cut into TILE x TILE tiles (default 64) every TILE / 2
pixels; the right quarter (columns 384-511) makes the validation split, cut into tiles that do not
overlap. Train at an input larger than TILE (e.g. `--input 192x192`: the images are resized to the
model input when loaded, the validation label maps are scored at TILE x TILE). Writes
OUT_DIR/images/{train,val}/*.png (grey as RGB), OUT_DIR/labels/{train,val}/*.png and
OUT_DIR/classes.txt, and prints, as a reference, the mIoU that a global Otsu threshold (fitted on
the training columns) scores on the validation tiles. Needs numpy and Pillow.
"""
import io
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from PIL import Image

WHEEL = "stardist==0.9.2"
SPLIT_COL = 384


def tiles(h, w, tile, step):
    for y in range(0, h - tile + 1, step):
        for x in range(0, w - tile + 1, step):
            yield y, x


def otsu(values):
    """The grey level t that maximises the between-class variance of `values < t` / `>= t`."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    best, best_t = -1.0, 1
    for t in range(1, 256):
        w0, w1 = hist[:t].sum(), hist[t:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0, m1 = (hist[:t] * levels[:t]).sum() / w0, (hist[t:] * levels[t:]).sum() / w1
        if w0 * w1 * (m0 - m1) ** 2 > best:
            best, best_t = w0 * w1 * (m0 - m1) ** 2, t
    return best_t


def miou(pred, label):
    """mmseg's mIoU of two binary maps (both classes present)."""
    return float(np.mean([((pred == c) & (label == c)).sum() / ((pred == c) | (label == c)).sum() for c in (0, 1)]))


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    tile = int(sys.argv[2]) if len(sys.argv) == 3 else 64
    if os.path.exists(os.path.join(out, "labels")):
        sys.exit(f"{out} already holds a dataset")
    if not 16 <= tile <= 128 or 128 % tile:
        sys.exit(f"TILE must divide 128 and be at least 16 (got {tile})")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
        whl = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        z = zipfile.ZipFile(whl)
        img = np.array(Image.open(io.BytesIO(z.read("stardist/data/images/img2d.tif"))))
        ids = np.array(Image.open(io.BytesIO(z.read("stardist/data/images/mask2d.tif"))))
    if img.shape != (512, 512) or ids.shape != (512, 512) or img.max() > 255:
        sys.exit(f"unexpected stardist data: image {img.shape} max {img.max()}, mask {ids.shape}")
    grey = img.astype(np.uint8)
    label = (ids > 0).astype(np.uint8)
    counts = {}
    for split, x0, x1, step in [("train", 0, SPLIT_COL, tile // 2), ("val", SPLIT_COL, 512, tile)]:
        os.makedirs(os.path.join(out, "images", split))
        os.makedirs(os.path.join(out, "labels", split))
        region_img, region_lab = grey[:, x0:x1], label[:, x0:x1]
        n = 0
        for y, x in tiles(512, x1 - x0, tile, step):
            name = f"{y:03d}_{x0 + x:03d}.png"
            patch = region_img[y : y + tile, x : x + tile]
            Image.fromarray(np.stack([patch] * 3, axis=-1)).save(os.path.join(out, "images", split, name))
            Image.fromarray(region_lab[y : y + tile, x : x + tile]).save(os.path.join(out, "labels", split, name))
            n += 1
        # nuclei with any pixel in the split's columns
        nuclei = len(np.unique(ids[:, x0:x1])) - 1
        counts[split] = (n, nuclei, float(region_lab.mean()))
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("background\nnucleus\n")
    for split, (n, nuclei, fg) in counts.items():
        print(f"{split}: {n} tiles of {tile}x{tile}, {nuclei} nuclei, {100 * fg:.1f}% nucleus pixels")
    # The validation tiles cover columns 384-511 whole (128 is a multiple of TILE).
    t = otsu(grey[:, :SPLIT_COL])
    m = miou((grey[:, SPLIT_COL:] >= t).astype(np.uint8), label[:, SPLIT_COL:])
    print(f"reference: a global Otsu threshold ({t}, fitted on the training columns) scores mIoU {100 * m:.2f} on val")


if __name__ == "__main__":
    main()
