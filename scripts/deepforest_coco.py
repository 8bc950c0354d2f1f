#!/usr/bin/env python3
"""Build a tiny real detection set in COCO layout from the aerial tree images that ship inside
the `deepforest` wheel on PyPI (Pascal-VOC XML, one class: Tree), for `emo train --task`.

    python3 scripts/deepforest_coco.py OUT_DIR [TILE]     # downloads deepforest==2.1.0 (no deps)

Writes OUT_DIR/images/{train,val}/*.png and OUT_DIR/annotations/instances_{train,val}.json.
The image listed in VAL goes to `val`, the others to `train`. Images larger than TILE are cut
into about TILE x TILE tiles (default 400, as DeepForest itself predicts on 400 px patches); a box
is kept in a tile when at least half of it lies inside, clipped to the tile. The trees are 16-68 px
(5th-95th percentile): 200 px tiles at a 320x320 input put them in the size range of SSDLite's
anchors (the smallest is 0.15 of the input side). Needs Pillow.
"""
import io
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile

from PIL import Image

WHEEL = "deepforest==2.1.0"
VAL = {"OSBS_029"}


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    tile = int(sys.argv[2]) if len(sys.argv) == 3 else 400
    if tile < 64:
        sys.exit(f"TILE must be at least 64 (got {tile})")
    if os.path.exists(os.path.join(out, "annotations")):
        sys.exit(f"{out} already holds a dataset")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
        whl = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        z = zipfile.ZipFile(whl)
        names = set(z.namelist())
        xmls = sorted(n for n in names if n.startswith("deepforest/data/") and n.endswith(".xml"))
        sets = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
        ann_id = 1
        for x in xmls:
            stem = os.path.basename(x)[:-4]
            png = f"deepforest/data/{stem}.png"
            if png not in names:
                continue
            root = ET.parse(io.BytesIO(z.read(x))).getroot()
            img = Image.open(io.BytesIO(z.read(png))).convert("RGB")
            w, h = img.size
            boxes = []
            for obj in root.iter("object"):
                bb = obj.find("bndbox")
                boxes.append(tuple(float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")))
            split = "val" if stem in VAL else "train"
            d = os.path.join(out, "images", split)
            os.makedirs(d, exist_ok=True)
            ty, tx = max(1, round(h / tile)), max(1, round(w / tile))
            for iy in range(ty):
                for ix in range(tx):
                    y0, y1 = iy * h // ty, (iy + 1) * h // ty
                    x0, x1 = ix * w // tx, (ix + 1) * w // tx
                    name = f"{stem}_{iy}_{ix}.png" if ty * tx > 1 else f"{stem}.png"
                    img.crop((x0, y0, x1, y1)).save(os.path.join(d, name))
                    img_id = len(sets["train"]["images"]) + len(sets["val"]["images"]) + 1
                    sets[split]["images"].append({"id": img_id, "file_name": name, "width": x1 - x0, "height": y1 - y0})
                    for (bx0, by0, bx1, by1) in boxes:
                        cx0, cy0, cx1, cy1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
                        if cx1 <= cx0 or cy1 <= cy0:
                            continue
                        if (cx1 - cx0) * (cy1 - cy0) < 0.5 * (bx1 - bx0) * (by1 - by0):
                            continue
                        bw, bh = cx1 - cx0, cy1 - cy0
                        sets[split]["annotations"].append({
                            "id": ann_id, "image_id": img_id, "category_id": 1, "iscrowd": 0,
                            "bbox": [cx0 - x0, cy0 - y0, bw, bh], "area": bw * bh,
                        })
                        ann_id += 1
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    for split, s in sets.items():
        s["categories"] = [{"id": 1, "name": "tree"}]
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(s, f)
        print(f"{split}: {len(s['images'])} images, {len(s['annotations'])} boxes")


if __name__ == "__main__":
    main()
