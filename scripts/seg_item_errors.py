#!/usr/bin/env python3
"""Split a segmenter's mIoU loss into wrong item classes and wrong shapes.

    emo segment --weights W --label-maps --out PRED DATA/images/val/*.png
    seg_item_errors.py PRED DATA/labels/val NUM_CLASSES [CLASSES_TXT]

Reads each ground-truth label map (PNG, 255 = ignore, 0 = background) and the predicted map
PRED/NAME-labels.png, and prints three mIoUs (mmseg's definition, over the whole set):

* as predicted;
* "oracle class": every predicted foreground pixel on a ground-truth item takes that item's
  class, so only the shapes' errors remain (foreground vs background, where the boundaries fall);
* "oracle shape": the ground-truth shapes, each item given the class most of its predicted
  foreground pixels have, so only the items' class errors remain. An item is a connected region
  of one class of at least 400 pixels (smaller ones are fragments of an outline and keep their
  own class); one with no predicted foreground keeps its own class here and counts as "missed".

Then, per class, how many items there are, how often the majority class is right, and what the
wrong ones were taken for. Needs numpy, Pillow and scipy.
"""
import glob, os, sys
import numpy as np
from PIL import Image
from scipy import ndimage

MIN_ITEM = 400  # pixels; a 192x192 canvas's items are ~1,000-20,000


def miou(conf):
    tp = np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (conf.sum(0) + conf.sum(1) - tp)
    return 100 * np.nanmean(iou), 100 * iou


def main():
    pred_dir, gt_dir, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    names = [str(c) for c in range(k)]
    if len(sys.argv) > 4:
        names = open(sys.argv[4]).read().split("\n")[:k]
    conf, conf_oc, conf_os = (np.zeros((k, k)) for _ in range(3))
    items = np.zeros((k, k))  # ground-truth item class x majority predicted class (0: missed)

    def add(c, gt, pr, v):
        c += np.bincount(gt[v] * k + pr[v], minlength=k * k).reshape(k, k)

    gts = sorted(glob.glob(os.path.join(gt_dir, "*.png")))
    if not gts:
        sys.exit(f"no label maps in {gt_dir}")
    for gp in gts:
        stem = os.path.basename(gp)[:-4]
        gt = np.array(Image.open(gp)).astype(np.int64)
        pp = os.path.join(pred_dir, stem + "-labels.png")
        if not os.path.exists(pp):
            sys.exit(f"{pp} missing: run `emo segment --label-maps --out {pred_dir}` on the images")
        pr = np.array(Image.open(pp)).astype(np.int64)
        if pr.shape != gt.shape:
            sys.exit(f"{pp}: {pr.shape} against the label map's {gt.shape}")
        v = gt != 255
        add(conf, gt, pr, v)
        add(conf_oc, gt, np.where((pr > 0) & (gt > 0), gt, pr), v)
        shape = np.zeros_like(gt)
        for c in range(1, k):
            lab, n = ndimage.label(gt == c)
            for i in range(1, n + 1):
                m = lab == i
                if m.sum() < MIN_ITEM:
                    shape[m] = c
                    continue
                fg = pr[m][pr[m] > 0]
                maj = int(np.bincount(fg, minlength=k).argmax()) if fg.size else 0
                items[c, maj] += 1
                shape[m] = maj if maj > 0 else c
        add(conf_os, gt, shape, v)

    m, per = miou(conf)
    m_oc, per_oc = miou(conf_oc)
    m_os, per_os = miou(conf_os)
    print(f"{len(gts)} label maps")
    print(f"mIoU as predicted                     {m:6.2f}")
    print(f"oracle class (shape errors only)      {m_oc:6.2f}")
    print(f"oracle shape (item class errors only) {m_os:6.2f}")
    n = items.sum()
    print(f"items: {int(n)}, majority class right: {100 * np.trace(items) / max(n, 1):.2f}%, "
          f"missed (no foreground predicted): {int(items[:, 0].sum())}")
    print(f"{'class':<12} {'items':>5} {'right':>6} {'IoU':>6} {'o-class':>8} {'o-shape':>8}  taken for")
    for c in range(1, k):
        row = items[c]
        wrong = ", ".join(f"{'missed' if j == 0 else names[j]} {int(row[j])}"
                          for j in np.argsort(-row) if j != c and row[j] > 0)
        print(f"{names[c]:<12} {int(row.sum()):>5} {100 * row[c] / max(row.sum(), 1):>5.1f}% "
              f"{per[c]:>6.1f} {per_oc[c]:>8.1f} {per_os[c]:>8.1f}  {wrong}")


if __name__ == "__main__":
    main()
