#!/usr/bin/env python3
"""pycocotools' bbox numbers for a ground-truth file and a detections file.

    coco_reference.py GT.json DETS.json          -> prints the 12 summarize() stats as JSON
    coco_reference.py --classwise GT.json DETS.json -> per category id: [AP, AP50] (-1: no gt),
                                                    as mmdet's classwise table reads them
    coco_reference.py --make-case SEED DIR       -> writes DIR/gt.json and DIR/dets.json, a random
                                                    case with crowds, empty images, ties, all sizes

Used by crates/emo-dense/tests/metrics.rs to check our COCO mAP against pycocotools.
"""
import contextlib, io, json, random, sys


def make_case(seed, out):
    r = random.Random(seed)
    images = [{"id": i, "file_name": f"{i}.png", "width": 640, "height": 480} for i in range(1, 13)]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 7)]  # 7 has no boxes
    anns, dets = [], []
    for im in images[:-1]:  # the last image has no boxes
        for _ in range(r.randint(0, 6)):
            side = r.choice([r.uniform(4, 30), r.uniform(33, 95), r.uniform(100, 300)])
            w, h = side * r.uniform(0.6, 1.4), side * r.uniform(0.6, 1.4)
            x, y = r.uniform(0, 640 - w), r.uniform(0, 480 - h)
            crowd = int(r.random() < 0.08)
            cat = r.choice((1, 2, 3))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": cat,
                         "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                         "area": round(w * h * r.uniform(0.5, 1.0), 2), "iscrowd": crowd})
            for _ in range(r.choice((0, 1, 1, 2))):
                j = lambda v, s: v + r.gauss(0, s)
                dets.append({"image_id": im["id"], "category_id": cat if r.random() < 0.85 else r.choice((1, 2, 3)),
                             "bbox": [round(j(x, w * 0.08), 2), round(j(y, h * 0.08), 2),
                                      round(max(1, j(w, w * 0.1)), 2), round(max(1, j(h, h * 0.1)), 2)],
                             "score": round(r.choice([r.random(), 0.5]), 3)})
        for _ in range(r.randint(0, 4)):  # false positives
            w, h = r.uniform(5, 200), r.uniform(5, 200)
            dets.append({"image_id": im["id"], "category_id": r.choice((1, 2, 3, 7)),
                         "bbox": [round(r.uniform(0, 400), 2), round(r.uniform(0, 300), 2), round(w, 2), round(h, 2)],
                         "score": round(r.random(), 3)})
    with open(f"{out}/gt.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    with open(f"{out}/dets.json", "w") as f:
        json.dump(dets, f)


def evaluated(gt, dt):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO(gt)
        d = g.loadRes(dt)
        e = COCOeval(g, d, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


def stats(gt, dt):
    return [float(s) for s in evaluated(gt, dt).stats]


def classwise(gt, dt):
    e = evaluated(gt, dt)
    out = {}
    for k, c in enumerate(e.params.catIds):
        p = e.eval["precision"][:, :, k, 0, -1]  # [iou thr, recall], area all, maxDets 100
        v = p[p > -1]
        p50 = p[0][p[0] > -1]
        out[str(c)] = [float(v.mean()) if v.size else -1.0, float(p50.mean()) if p50.size else -1.0]
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--make-case":
        make_case(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "--classwise":
        print(json.dumps(classwise(sys.argv[2], sys.argv[3])))
    else:
        print(json.dumps(stats(sys.argv[1], sys.argv[2])))
