"""B3 PyTorch reference: one training epoch fed by a torchcodec Dataset and DataLoader, one JSON line.

--videos holds <label>/<name>.mp4. Each item is a random --frames clip of one video, decoded with
torchcodec (1 FFmpeg thread) and resized there to --resize, random-cropped to --crop, normalised
with the Kinetics mean/std, as (C, T, H, W) float and the label's index. The epoch visits every
video once (shuffled); training is as in train_step_torch.py
(head: Linear(512, number of labels)); --freeze matches vidtune's freeze policies. One invocation is one run.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchcodec.decoders import VideoDecoder
from torchcodec.transforms import Resize

from _freeze import freeze

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--videos", required=True, help="folder of <label>/<name>.mp4")
p.add_argument("--arch", choices=["r2plus1d_18", "r3d_18"], default="r3d_18")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--frames", type=int, default=16)
p.add_argument("--crop", type=int, default=112)
p.add_argument("--resize", default="128x171", help="H x W before the crop")
p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: os.cpu_count())")
p.add_argument("--freeze", default="full",
               help="full, head_only or last_stages:N (frozen stages: no gradients, BatchNorm in eval mode)")
p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the training loop")
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--smoke", action="store_true", help="2 videos, batch 1, 4 frames, resize 40x52, crop 32, 1 worker")
args = p.parse_args()
if args.smoke:
    args.batch, args.frames, args.resize, args.crop = 1, 4, "40x52", 32
    args.workers = 1 if args.workers is None else args.workers
if args.workers is None:
    args.workers = os.cpu_count()
rh, rw = (int(v) for v in args.resize.lower().split("x"))
if args.threads:
    torch.set_num_threads(args.threads)
dev = torch.device(args.device)
torch.manual_seed(args.seed)

MEAN = torch.tensor([0.43216, 0.394666, 0.37645]).view(3, 1, 1, 1)
STD = torch.tensor([0.22803, 0.22145, 0.216989]).view(3, 1, 1, 1)


class Clips(Dataset):
    def __init__(self, root):
        labels = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
        self.items = [(v, i) for i, l in enumerate(labels) for v in sorted((Path(root) / l).glob("*.mp4"))]
        self.classes = len(labels)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        dec = VideoDecoder(path, num_ffmpeg_threads=1, seek_mode="approximate", transforms=[Resize((rh, rw))])
        n = dec.metadata.num_frames
        start = int(torch.randint(0, max(n - args.frames, 0) + 1, ()))
        if start + args.frames <= n:
            x = dec.get_frames_in_range(start, start + args.frames).data
        else:  # shorter than one clip: repeat the last frame
            x = dec.get_frames_at([min(start + k, n - 1) for k in range(args.frames)]).data
        top = int(torch.randint(0, rh - args.crop + 1, ()))
        left = int(torch.randint(0, rw - args.crop + 1, ()))
        x = x[:, :, top : top + args.crop, left : left + args.crop]  # [T, C, H, W] uint8
        x = x.permute(1, 0, 2, 3).float().div_(255)
        return (x - MEAN) / STD, label


data = Clips(args.videos)
if args.smoke:
    data.items = data.items[:: max(len(data.items) // 2, 1)][:2]
if not len(data):
    sys.exit(f"no <label>/*.mp4 under {args.videos}")
model = getattr(torchvision.models.video, args.arch)(weights=None)
model.fc = nn.Linear(512, data.classes)  # 3 for the benchmark's data sets
model.to(dev).train()
trainable = freeze(model, args.freeze)
opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9, weight_decay=1e-4)
loader = DataLoader(
    data, batch_size=args.batch, shuffle=True, num_workers=args.workers,
    persistent_workers=False, drop_last=False, pin_memory=dev.type == "cuda",
)

wait = 0.0
t0 = time.perf_counter()
it = iter(loader)  # starts the workers: counted in the epoch
while True:
    t = time.perf_counter()
    try:
        x, y = next(it)
    except StopIteration:
        wait += time.perf_counter() - t
        break
    wait += time.perf_counter() - t
    assert x.shape[1:] == (3, args.frames, args.crop, args.crop) and x.dtype == torch.float32, x.shape
    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
if dev.type == "cuda":
    torch.cuda.synchronize()
epoch = time.perf_counter() - t0
print(json.dumps({
    "bench": "B3", "arch": args.arch, "precision": args.precision, "batch": args.batch,
    "workers": args.workers, "freeze": args.freeze, "device": args.device, "threads": torch.get_num_threads(),
    "videos": len(data), "classes": data.classes, "epoch_s": round(epoch, 4),
    "clips_per_s": round(len(data) / epoch, 3), "data_wait_s": round(wait, 4),
}))
