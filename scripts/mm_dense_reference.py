#!/usr/bin/env python3
"""Reference outputs of mmdet 2.x / mmseg 0.x's *own* neck and head code on an EMO-1M backbone,
for the Rust parity test `crates/emo-dense/tests/mm_parity.rs`.

The official EMO detection / segmentation checkpoints are mmdet 2.28 / mmseg 0.30 models: an EMO
backbone (`down-stream-tasks/*/backbones/emo.py`: the classification blocks without norm and
head) under SSDNeck + SSDHead, FPN + RetinaHead, ASPPHead / PSPHead + FCNHead, configured as in
../shared/docs/emo-spec.md §12. Here those heads are built from the real mmdet / mmseg classes,
the backbone from `torch_train_bench.EMO` (written from the spec and checked against the official
classification outputs), and every state_dict entry is filled with a deterministic value
(`values()` below; the Rust test computes the same ones), so the fixture holds only:

  mm_heads.json         every task's state_dict keys and shapes, in mmdet / mmseg's order
  mm_heads.safetensors  the input and each task's outputs in eval mode
  mmcv_checkpoint.pth   a small ConvModule saved by mmcv.runner.save_checkpoint (meta,
                        state_dict, optimizer), to test reading mmcv's checkpoint layout

Set-up (offline-capable, PyPI only; mmcv without its compiled ops, which no head here needs):
  python -m venv venv-mm && venv-mm/bin/pip install torch==2.13 "setuptools<70" wheel
  MMCV_WITH_OPS=0 venv-mm/bin/pip install --no-build-isolation mmcv==1.7.2 mmsegmentation==0.30.0 mmdet==2.28.2
  venv-mm/bin/pip install --no-deps torchvision==0.28.0 safetensors
Run: venv-mm/bin/python scripts/mm_dense_reference.py --out crates/emo-dense/tests/fixtures \
         [--check ../shared/fixtures/emo]
ONNX exports for `emo bench --task T --compare-onnx F` (also needs `onnx onnxruntime`):
     venv-mm/bin/python scripts/mm_dense_reference.py --onnx bench-onnx [--tasks ssdlite,deeplabv3]
"""
import argparse
import importlib.abc
import importlib.machinery
import json
import math
import os
import sys
import types
import warnings

warnings.filterwarnings("ignore")


class _StubOps(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Every `mmcv.ops*` module as a stub (mmcv built with MMCV_WITH_OPS=0 has no `_ext`);
    mmdet / mmseg import them at module level, the heads used here never call them."""

    def find_spec(self, name, path=None, target=None):
        if name == "mmcv.ops" or name.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = types.ModuleType(spec.name)

        def attr(n):
            if n.startswith("__"):
                raise AttributeError(n)
            return type(n, (), {})

        m.__getattr__ = attr
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StubOps())
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import mmcv  # noqa: E402
import mmcv.cnn.bricks.transformer as _tr  # noqa: E402

if not hasattr(_tr, "MultiScaleDeformableAttention"):
    _tr.MultiScaleDeformableAttention = type("MultiScaleDeformableAttention", (), {})
from mmcv.cnn import ConvModule  # noqa: E402
from mmcv.runner import save_checkpoint  # noqa: E402
from mmdet.models.dense_heads import RetinaHead, SSDHead  # noqa: E402
from mmdet.models.necks import FPN, SSDNeck  # noqa: E402
from mmseg.models.decode_heads import ASPPHead, FCNHead, PSPHead  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_train_bench import EMO, check  # noqa: E402

M32 = 0xFFFFFFFF
DIMS = [32, 48, 80, 168]  # EMO-1M stage dims
DET_CLASSES, SEG_CLASSES = 10, 11
INPUT = (160, 128)  # H, W: not square, so a swapped axis shows


def fnv1a(s):
    h = 0x811C9DC5
    for b in s.encode():
        h = ((h ^ b) * 0x01000193) & M32
    return h


def uniform(key, n):
    """n values in [-0.5, 0.5): lowbias32(fnv1a(key) ^ (i * 0x9E3779B1)) / 2^32 - 0.5."""
    x = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B1)) & np.uint64(M32)
    x ^= np.uint64(fnv1a(key))
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(M32)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & np.uint64(M32)
    x ^= x >> np.uint64(16)
    return x.astype(np.float64) / 4294967296.0 - 0.5


def values(key, shape):
    """The deterministic value of state_dict entry `key` (f64 arithmetic, rounded to f32 once)."""
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniform(key, n)
    if key.endswith("running_var"):
        v = 1.0 + u
    elif key.endswith("running_mean"):
        v = 0.2 * u
    elif len(shape) == 1 and key.endswith("weight"):
        v = 1.0 + 0.2 * u
    elif len(shape) <= 1:
        v = 0.2 * u
    else:
        v = u * math.sqrt(12.0 / (n // shape[0]))
    return torch.from_numpy(v.astype(np.float32)).reshape(shape)


class Backbone(EMO):
    """The mmdet / mmseg EMO backbone: stage outputs at `out_indices`, no final norm or head."""

    def __init__(self, out_indices):
        super().__init__("emo-1m", num_classes=1)
        del self.norm, self.head
        self.out_indices = out_indices

    def forward(self, x):
        outs = []
        for i in range(5):
            for m in getattr(self, f"stage{i}"):
                x = m(x)
            outs.append(x)
        return [outs[i] for i in self.out_indices]


class Detector(nn.Module):
    def __init__(self, out_indices, neck, bbox_head):
        super().__init__()
        self.backbone, self.neck, self.bbox_head = Backbone(out_indices), neck, bbox_head

    def forward(self, x):
        cls, reg = self.bbox_head(self.neck(self.backbone(x)))
        flat = lambda ts, c: torch.cat([t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, c) for t in ts], 1)
        return {"cls": flat(cls, self.bbox_head.cls_out_channels), "reg": flat(reg, 4)}


class Segmentor(nn.Module):
    def __init__(self, decode_head, seg_classes=SEG_CLASSES):
        super().__init__()
        self.backbone = Backbone((1, 2, 3, 4))
        self.decode_head = decode_head
        self.auxiliary_head = FCNHead(in_channels=DIMS[2], in_index=2, channels=256, num_convs=1, concat_input=False,
                                      dropout_ratio=0.1, num_classes=seg_classes, norm_cfg=dict(type="BN"),
                                      align_corners=False)

    def forward(self, x):
        f = self.backbone(x)
        return {"logits": self.decode_head(f), "aux": self.auxiliary_head(f)}


def models(det_classes=DET_CLASSES, seg_classes=SEG_CLASSES):
    bn_ssd = dict(type="BN", eps=0.001, momentum=0.03)
    chans = (DIMS[2], DIMS[3], 512, 256, 256, 128)
    ssd = Detector(
        (3, 4),
        SSDNeck(in_channels=chans[:2], out_channels=chans, level_strides=(2, 2, 2, 2), level_paddings=(1, 1, 1, 1),
                l2_norm_scale=None, use_depthwise=True, norm_cfg=bn_ssd, act_cfg=dict(type="ReLU6")),
        SSDHead(in_channels=chans, num_classes=det_classes, use_depthwise=True, norm_cfg=bn_ssd,
                act_cfg=dict(type="ReLU6"),
                anchor_generator=dict(type="SSDAnchorGenerator", scale_major=False, strides=[16, 32, 64, 107, 160, 320],
                                      ratios=[[2, 3]] * 6, min_sizes=[48, 100, 150, 202, 253, 304],
                                      max_sizes=[100, 150, 202, 253, 304, 320]),
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2])),
    )
    retina = Detector(
        (1, 2, 3, 4),
        FPN(in_channels=DIMS, out_channels=256, start_level=1, add_extra_convs="on_input", num_outs=5),
        RetinaHead(num_classes=det_classes, in_channels=256, stacked_convs=4, feat_channels=256,
                   anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                                         ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128])),
    )
    seg = dict(in_channels=DIMS[3], in_index=3, channels=256, dropout_ratio=0.1, num_classes=seg_classes,
               norm_cfg=dict(type="BN"), align_corners=False)
    deeplab = Segmentor(ASPPHead(dilations=(1, 12, 24, 36), **seg), seg_classes)
    psp = Segmentor(PSPHead(pool_scales=(1, 2, 3, 6), **seg), seg_classes)
    return {"ssdlite": ssd, "retinanet": retina, "deeplabv3": deeplab, "pspnet": psp}


def fill(model):
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                v.copy_(values(k, tuple(v.shape)))


# The paper's input (H, W, as `Task::paper_input`) and classes of each task.
PAPER = {"ssdlite": ((320, 320), 80), "retinanet": ((1280, 800), 80), "deeplabv3": ((512, 512), 150),
         "pspnet": ((512, 512), 150)}


class Inference(nn.Module):
    """A model's inference outputs as a tuple: (cls, reg) of a detector, the decode head's logits
    of a segmentor (the auxiliary head is a training device)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        if isinstance(self.model, Segmentor):
            return self.model.decode_head(self.model.backbone(x))
        out = self.model(x)
        return out["cls"], out["reg"]


def export_onnx(out, tasks):
    """Each model at the paper's input and classes, weights from `values`, as OUT/TASK.onnx
    (opset 17, batch 1): the ONNX Runtime side of `emo bench --task TASK --compare-onnx`.
    ONNX Runtime's outputs are checked against PyTorch's first."""
    import onnxruntime as ort
    os.makedirs(out, exist_ok=True)
    built = models(det_classes=80, seg_classes=150)
    for task in tasks:
        (h, w), _ = PAPER[task]
        net = Inference(built[task])
        fill(net.model)
        net.eval()
        x = values("input", (1, 3, h, w)) * 4.0
        path = os.path.join(out, f"{task}.onnx")
        with torch.no_grad():
            try:
                torch.onnx.export(net, (x,), path, input_names=["input"], opset_version=17, dynamo=False)
            except torch.onnx.errors.SymbolicValueError:
                # PSPNet's adaptive pooling to 3x3 / 6x6 of a 16x16 map: only the dynamo
                # exporter (onnxscript) writes it.
                torch.onnx.export(net, (x,), path, input_names=["input"], opset_version=18, dynamo=True,
                                  external_data=False)
            want = net(x)
        want = [want] if torch.is_tensor(want) else list(want)
        got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
        d = max(float(np.abs(g - t.numpy()).max()) for g, t in zip(got, want))
        print(f"{path}: {h}x{w}, outputs {[tuple(g.shape) for g in got]}, max |ORT - PyTorch| {d:.2e}",
              file=sys.stderr)
        assert d <= 1e-3, f"{task}: ONNX Runtime differs from PyTorch by {d}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="write the parity fixtures here")
    ap.add_argument("--check", help="official fixtures folder: first check the PyTorch EMO against them")
    ap.add_argument("--onnx", help="export the models at the paper's input and classes to this folder")
    ap.add_argument("--tasks", default="ssdlite,retinanet,deeplabv3,pspnet", help="with --onnx: which models")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.check:
        check(EMO("emo-1m"), a.check, "emo-1m")
    if a.onnx:
        export_onnx(a.onnx, a.tasks.split(","))
    if not a.out:
        return
    os.makedirs(a.out, exist_ok=True)
    x = values("input", (1, 3) + INPUT) * 4.0
    tensors, keys = {"input": x}, {}
    for task, m in models().items():
        fill(m)
        m.eval()
        keys[task] = [[k, list(v.shape)] for k, v in m.state_dict().items()]
        with torch.no_grad():
            for name, t in m(x).items():
                tensors[f"{task}.{name}"] = t.contiguous()
                print(f"{task}.{name}: {tuple(t.shape)}, max |v| {t.abs().max().item():.3f}", file=sys.stderr)
    save_file(tensors, os.path.join(a.out, "mm_heads.safetensors"))
    with open(os.path.join(a.out, "mm_heads.json"), "w") as f:
        json.dump({"input": list(INPUT), "det_classes": DET_CLASSES, "seg_classes": SEG_CLASSES, "keys": keys}, f)

    # A checkpoint in mmcv's layout: {"meta": {...}, "state_dict": ..., "optimizer": ...}.
    cm = ConvModule(3, 4, 3, padding=1, norm_cfg=dict(type="BN"))
    fill(cm)
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    cm(torch.ones(2, 3, 4, 4)).sum().backward()
    opt.step()  # optimizer state with tensors; the weights moved, so store them again
    fill(cm)
    save_checkpoint(cm, os.path.join(a.out, "mmcv_checkpoint.pth"), optimizer=opt,
                    meta=dict(epoch=12, iter=100, CLASSES=("a", "b"), mmcv_version=mmcv.__version__))


if __name__ == "__main__":
    main()
