"""B2 PyTorch reference: one SGD training step of a torchvision video ResNet, one JSON line.

Kinetics-400 backbone with fc replaced by Linear(512, 3); SGD lr 0.01, momentum 0.9,
weight decay 1e-4; cross-entropy; model.train(). A step is zero_grad, forward (under autocast
bf16 with --precision bf16), loss, backward, optimizer.step, on one fixed random batch.
--freeze last_stages:N freezes the stages before the last N as vidtune does (no gradients,
BatchNorm in eval mode); phases_ms splits the median step into forward, backward and optimizer.
`malloc` names the allocator that serves this process's malloc (glibc, jemalloc, tcmalloc), as
the dynamic linker resolved it: the driver sets LD_PRELOAD and checks that it took effect.
"""
import argparse
import ctypes
import json
import os
import statistics
import time

import torch
import torchvision
from torch import nn

from _freeze import freeze

class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]


def allocator():
    """(name, library path) of the malloc this process calls: the global symbol lookup finds a
    preloaded allocator before the C library, so dladdr on its address names the library."""
    libc = ctypes.CDLL(None)
    info = _DlInfo()
    addr = ctypes.cast(libc.malloc, ctypes.c_void_p)
    if not libc.dladdr(addr, ctypes.byref(info)) or not info.fname:
        return "unknown", ""
    path = os.path.realpath(info.fname.decode())
    base = os.path.basename(path)
    for name, mark in (("jemalloc", "libjemalloc"), ("tcmalloc", "libtcmalloc"), ("glibc", "libc.so")):
        if base.startswith(mark):
            return name, path
    return base, path


p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--arch", choices=["r2plus1d_18", "r3d_18"], default="r2plus1d_18")
p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--frames", type=int, default=16)
p.add_argument("--crop", type=int, default=112)
p.add_argument("--runs", type=int, default=5)
p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--freeze", default="full", help="full, head_only or last_stages:N")
p.add_argument("--smoke", action="store_true", help="1 run, batch 1, 4 frames, crop 32")
args = p.parse_args()
if args.smoke:
    args.runs, args.batch, args.frames, args.crop = 1, 1, 4, 32
if args.threads:
    torch.set_num_threads(args.threads)
dev = torch.device(args.device)
if dev.type == "cuda":
    torch.backends.cudnn.benchmark = True  # as vidtune's worker does on CUDA
torch.manual_seed(0)

model = getattr(torchvision.models.video, args.arch)(weights=None)
model.fc = nn.Linear(512, 3)
model.to(dev).train()
trainable = freeze(model, args.freeze)
opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9, weight_decay=1e-4)
x = torch.randn(args.batch, 3, args.frames, args.crop, args.crop, device=dev)
y = torch.randint(0, 3, (args.batch,), device=dev)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def step():
    sync()
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        loss = nn.functional.cross_entropy(model(x), y)
    sync()
    f = time.perf_counter()
    loss.backward()
    sync()
    b = time.perf_counter()
    opt.step()
    sync()
    e = time.perf_counter()
    return [(e - t) * 1e3, (f - t) * 1e3, (b - f) * 1e3, (e - b) * 1e3]


step()  # warm-up
phases = [step() for _ in range(args.runs)]
steps = [p[0] for p in phases]
mid = sorted(phases)[len(phases) // 2]
malloc, malloc_lib = allocator()
print(json.dumps({
    "bench": "B2", "arch": args.arch, "precision": args.precision, "batch": args.batch,
    "frames": args.frames, "crop": args.crop, "device": args.device, "freeze": args.freeze,
    "threads": torch.get_num_threads(), "malloc": malloc, "malloc_lib": malloc_lib, "median_ms": round(statistics.median(steps), 3),
    "phases_ms": {"forward": round(mid[1], 3), "backward": round(mid[2], 3), "optimizer": round(mid[3], 3)}, "steps": [round(s, 3) for s in steps],
}))
