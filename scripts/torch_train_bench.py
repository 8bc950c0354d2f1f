#!/usr/bin/env python3
"""EMO in PyTorch, written from docs (../shared/docs/emo-spec.md), for one purpose: timing
PyTorch *training* of the same architecture on the same machine as `emo bench --train`.

It is checked against the official outputs before it is timed (`--check`), so the comparison
is with the real architecture: official key names, the strided window partition, attn_pre,
both residuals, eps 1e-6, exact GELU.

Protocol (line-based, driven by `emo bench --train --compare-torch`):
  stdin  "steps N"  -> runs N training steps (forward + backward + AdamW step), then prints
                       "ok SECONDS_PER_STEP,SECONDS_PER_STEP,..."
  stdin  "quit"
Start-up prints "ready" after a warm-up step.
Usage: torch_train_bench.py --variant emo-1m --batch 64 --size 32 --threads 2 [--check FIXTURE_DIR]
"""
import argparse
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = {
    "emo-1m": dict(depths=[2, 2, 8, 3], dims=[32, 48, 80, 168], exp=[2, 2.5, 3, 3.5], heads=[16, 16, 20, 21], dp=0.04036),
    "emo-2m": dict(depths=[3, 3, 9, 3], dims=[32, 48, 120, 200], exp=[2, 2.5, 3, 3.5], heads=[16, 16, 20, 20], dp=0.05),
    "emo-5m": dict(depths=[3, 3, 9, 3], dims=[48, 72, 160, 288], exp=[2, 3, 4, 4], heads=[24, 24, 32, 32], dp=0.05),
    "emo-6m": dict(depths=[3, 3, 9, 3], dims=[48, 72, 160, 320], exp=[2, 3, 4, 5], heads=[16, 24, 20, 32], dp=0.05),
}
EPS = 1e-6


def pad_of(k, s):
    return math.ceil((k - s) / 2)


class LN2d(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=EPS)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Conv(nn.Module):
    """`<name>.conv` 1x1 conv (+ act)."""

    def __init__(self, cin, cout, bias, act=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=bias)
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        return self.act(x) if self.act is not None else x


class Local(nn.Module):
    def __init__(self, c, k, s):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, s, pad_of(k, s), groups=c, bias=False)
        self.norm = nn.BatchNorm2d(c, eps=EPS)

    def forward(self, x):
        return F.silu(self.norm(self.conv(x)))


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, c, 1)
        self.conv_expand = nn.Conv2d(c, c, 1)

    def forward(self, x):
        s = F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.conv_expand(s))


class IRMB(nn.Module):
    def __init__(self, cin, cout, norm, act, exp, k, stride, dim_head, attn, v_proj=True, se=False, drop_path=0.0, ws=7):
        super().__init__()
        mid = int(cin * exp)
        self.skip = cin == cout and stride == 1 and norm is not None
        self.norm = {"bn": lambda: nn.BatchNorm2d(cin, eps=EPS), "ln": lambda: LN2d(cin), None: nn.Identity}[norm]()
        self.attn = attn
        if attn:
            self.heads, self.dh, self.ws = cin // dim_head, dim_head, ws
            self.qk = Conv(cin, 2 * cin, True)
        self.v = Conv(cin, mid, True, act) if v_proj else nn.Identity()
        self.conv_local = Local(mid, k, stride)
        self.se = SE(mid) if se else nn.Identity()
        self.proj = Conv(mid, cout, False)
        self.drop_path = drop_path

    def window_attention(self, x):
        b, c, h, w = x.shape
        ws = self.ws
        pr, pb = (ws - w % ws) % ws, (ws - h % ws) % ws
        x = F.pad(x, (0, pr, 0, pb))
        hp, wp = h + pb, w + pr
        n1, n2 = hp // ws, wp // ws
        # strided (grid) partition: h = h1 * n1 + i1
        x = x.view(b, c, ws, n1, ws, n2).permute(0, 3, 5, 1, 2, 4).reshape(b * n1 * n2, c, ws, ws)
        bw = x.shape[0]
        qk = self.qk(x).reshape(bw, 2, self.heads, self.dh, ws * ws).permute(1, 0, 2, 4, 3)
        q, k = qk[0], qk[1]
        attn = (q @ k.transpose(-2, -1) * self.dh ** -0.5).softmax(-1)
        xv = x.reshape(bw, self.heads, self.dh, ws * ws).transpose(-2, -1)
        o = (attn @ xv).transpose(-2, -1).reshape(bw, c, ws, ws)
        o = self.v(o)
        cm = o.shape[1]
        o = o.view(b, n1, n2, cm, ws, ws).permute(0, 3, 4, 1, 5, 2).reshape(b, cm, hp, wp)
        return o[:, :, :h, :w].contiguous()

    def forward(self, x):
        shortcut = x
        x = self.norm(x)
        x = self.window_attention(x) if self.attn else self.v(x)
        y = self.se(self.conv_local(x))
        x = x + y if self.skip else y
        x = self.proj(x)
        if self.skip:
            if self.training and self.drop_path > 0:
                keep = 1 - self.drop_path
                mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep) / keep
                x = x * mask
            return shortcut + x
        return x


class PatchEmb(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1), nn.BatchNorm2d(24, eps=EPS), nn.Identity())])

    def forward(self, x):
        return self.convs[0](x)


class EMO(nn.Module):
    def __init__(self, variant, num_classes=1000, drop_path=None, window_size=7):
        super().__init__()
        cfg = VARIANTS[variant]
        dp = cfg["dp"] if drop_path is None else drop_path
        rates = torch.linspace(0, dp, sum(cfg["depths"])).tolist()
        self.stage0 = nn.ModuleList([PatchEmb(), IRMB(24, 24, None, nn.SiLU(), 1, 3, 1, 0, False, v_proj=False, se=True)])
        prev, r = 24, 0
        norms, acts, kss = ["bn", "bn", "ln", "ln"], [nn.SiLU(), nn.SiLU(), nn.GELU(), nn.GELU()], [3, 3, 5, 5]
        for i in range(4):
            blocks = []
            for j in range(cfg["depths"][i]):
                down = j == 0
                blocks.append(IRMB(prev if down else cfg["dims"][i], cfg["dims"][i], norms[i], acts[i],
                                   cfg["exp"][i] * (2 if down else 1), kss[i], 2 if down else 1,
                                   cfg["heads"][i], (not down) and i >= 2, drop_path=rates[r], ws=window_size))
                r += 1
            setattr(self, f"stage{i + 1}", nn.ModuleList(blocks))
            prev = cfg["dims"][i]
        self.norm = LN2d(prev)
        self.head = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2, b=2)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for m in self.stage0:
            x = m(x)
        for i in range(1, 5):
            for m in getattr(self, f"stage{i}"):
                x = m(x)
        return self.head(self.norm(x).mean((2, 3)))


def check(model, fixture_dir, variant):
    from safetensors.torch import load_file
    tag = variant.replace("-", "_")
    sd = load_file(f"{fixture_dir}/{tag}.safetensors")
    model.load_state_dict(sd, strict=True)
    io = load_file(f"{fixture_dir}/{tag}_224x224.io.safetensors")
    model.eval()
    with torch.no_grad():
        diff = (model(io["input"]) - io["logits"]).abs().max().item()
    if diff > 1e-4:
        sys.exit(f"PyTorch EMO does not match the official logits: max diff {diff}")
    print(f"parity: max |logits - official| = {diff:.2e}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="emo-1m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", help="folder with the official fixtures (emo_1m.safetensors, ...)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.check:
        check(EMO(a.variant, 1000), a.check, a.variant)
    model = EMO(a.variant, a.classes).train()
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    decay = [p for p in model.parameters() if p.ndim > 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.999))
    x = torch.randn(a.batch, 3, a.size, a.size)
    y = torch.randint(0, a.classes, (a.batch,))

    def step():
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        return time.perf_counter() - t

    step()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "steps":
            times = [step() for _ in range(int(cmd[1]))]
            print("ok " + ",".join(f"{t:.6f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
