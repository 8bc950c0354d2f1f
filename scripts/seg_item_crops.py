#!/usr/bin/env python3
"""Crop every annotated item of a canvas set into an ImageNet-style folder, to train and test a
classifier on the items exactly as the canvases render them (tint, background, scale).

    seg_item_crops.py DATA OUT [SIZE]
    emo train --data imagefolder:OUT --size SIZE --rand-augment false ...

DATA is an `emo make-canvas` folder (its `annotations/instances_{train,val}.json` and
`images/{train,val}`); OUT gets `OUT/{train,val}/NN-class/ID.png`: for each annotation, the
square of side max(w, h) + 4 centred on its box (areas outside the canvas black), resized to
SIZE x SIZE (default 32) with bilinear filtering. A canvas with two items gives two crops, each
possibly showing part of the other item. The class folders sort in the canvas set's category
order. Needs Pillow.
"""
import json
import os
import sys

from PIL import Image


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    root, out = sys.argv[1], sys.argv[2]
    size = int(sys.argv[3]) if len(sys.argv) == 4 else 32
    for split in ("train", "val"):
        with open(f"{root}/annotations/instances_{split}.json") as f:
            coco = json.load(f)
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        names = {c["id"]: f"{c['id']:02d}-{c['name']}" for c in coco["categories"]}
        for name in names.values():
            os.makedirs(f"{out}/{split}/{name}", exist_ok=True)
        opened = (None, None)
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            side = max(w, h) + 4
            cx, cy = x + w / 2, y + h / 2
            file = files[a["image_id"]]
            if opened[0] != file:
                opened = (file, Image.open(f"{root}/images/{split}/{file}").convert("RGB"))
            box = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
            crop = opened[1].crop(box).resize((size, size), Image.BILINEAR)
            crop.save(f"{out}/{split}/{names[a['category_id']]}/{a['id']:06d}.png")
        print(f"{split}: {len(coco['annotations'])} items")


if __name__ == "__main__":
    main()
