"""B1 PyTorch reference: random 16-frame clips decoded and resized with torchcodec, one JSON line.

Each run opens every .mp4 of --videos once and decodes --clips-per-video clips of --frames
consecutive frames from seeded random starts, resized to uint8 RGB [frames, 3, H, W]. The resize is
torchcodec's decoder-native Resize (FFmpeg scale, SWS_BILINEAR) unless
--resize-impl interpolate (decode at source size, then F.interpolate bilinear, antialias=False).
"""
import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchcodec.decoders import VideoDecoder
from torchcodec.transforms import Resize

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--videos", required=True, help="folder of .mp4 files")
p.add_argument("--clips-per-video", type=int, default=2)
p.add_argument("--frames", type=int, default=16)
p.add_argument("--size", default="128x171", help="output H x W")
p.add_argument("--threads", type=int, default=1, help="FFmpeg decode threads (and torch threads)")
p.add_argument("--runs", type=int, default=5)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--seek-mode", choices=["approximate", "exact"], default="approximate")
p.add_argument("--resize-impl", choices=["torchcodec", "interpolate"], default="torchcodec")
p.add_argument("--write-plan", help="also write the drawn clip starts as JSON here (for the vidtune side)")
p.add_argument("--smoke", action="store_true", help="1 run, 1 clip per video, 4 frames, 32x40")
args = p.parse_args()
if args.smoke:
    args.runs, args.clips_per_video, args.frames, args.size = 1, 1, 4, "32x40"
h, w = (int(v) for v in args.size.lower().split("x"))
torch.set_num_threads(args.threads)

videos = sorted(Path(args.videos).glob("*.mp4"))
if not videos:
    sys.exit(f"no .mp4 in {args.videos}")
transforms = [Resize((h, w))] if args.resize_impl == "torchcodec" else None


def open_video(path):
    return VideoDecoder(path, num_ffmpeg_threads=args.threads, seek_mode=args.seek_mode, transforms=transforms)


# Clip starts are drawn once (seeded), so every run decodes the same clips.
rng = random.Random(args.seed)
plan = []
for v in videos:
    n = open_video(v).metadata.num_frames
    plan.append((v, [rng.randint(0, max(n - args.frames, 0)) for _ in range(args.clips_per_video)], n))
clips = sum(len(s) for _, s, _ in plan)
if args.write_plan:
    with open(args.write_plan, "w") as f:
        json.dump([{"video": str(v), "starts": s, "frames": n} for v, s, n in plan], f)


def decode(dec, start, n):
    if start + args.frames <= n:
        x = dec.get_frames_in_range(start, start + args.frames).data
    else:  # a video shorter than one clip: repeat its last frame
        x = dec.get_frames_at([min(start + i, n - 1) for i in range(args.frames)]).data
    if args.resize_impl == "interpolate":
        x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    assert x.shape == (args.frames, 3, h, w) and x.dtype == torch.uint8, x.shape
    return x


def run():
    t = time.perf_counter()
    for v, starts, n in plan:
        dec = open_video(v)
        for s in starts:
            decode(dec, s, n)
    return (time.perf_counter() - t) * 1e3


run()  # warm-up
runs = [run() for _ in range(args.runs)]
med = statistics.median(runs)
resize = (
    "torchcodec.transforms.Resize (decoder-native FFmpeg scale, SWS_BILINEAR; antialiased per its docs)"
    if args.resize_impl == "torchcodec"
    else "torch.nn.functional.interpolate (bilinear, antialias=False, uint8->float->uint8)"
)
print(json.dumps({
    "bench": "B1", "videos": len(videos), "clips": clips, "frames": args.frames, "size": [h, w],
    "threads": args.threads, "seek_mode": args.seek_mode, "resize": resize,
    "median_ms_total": round(med, 3), "clips_per_s": round(clips / (med / 1e3), 3),
    "runs": [round(r, 3) for r in runs],
}))
