"""B4 PyTorch reference: one prediction on one video, end to end in one process, one JSON line.

A prediction: torchcodec decodes --clips evenly spaced clips of --frames frames, sampled at about
--fps (stride round(src_fps / fps)), resized so the short side is --short-side and centre-cropped
to --crop inside the decoder (torchcodec Resize + CenterCrop); normalised with the Kinetics
mean/std; the video ResNet (eval, no_grad, Linear(512, 3) head) runs on the batch of clips;
softmax, mean over clips. The model is built once, untimed; each run times the whole prediction.
p99 is nearest-rank.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torchvision
from torch import nn
from torchcodec.decoders import VideoDecoder, get_container_metadata
from torchcodec.transforms import CenterCrop, Resize

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--video", required=True)
p.add_argument("--runs", type=int, default=20)
p.add_argument("--arch", choices=["r2plus1d_18", "r3d_18"], default="r3d_18")
p.add_argument("--clips", type=int, default=5)
p.add_argument("--frames", type=int, default=16)
p.add_argument("--fps", type=float, default=15.0, help="target sampling rate")
p.add_argument("--short-side", type=int, default=128)
p.add_argument("--crop", type=int, default=112)
p.add_argument("--threads", type=int, default=1, help="FFmpeg decode threads")
p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
p.add_argument("--device", default="cpu", help="cpu or cuda (decoding stays on the CPU)")
p.add_argument("--smoke", action="store_true", help="1 run, 2 clips of 4 frames, short side 40, crop 32")
args = p.parse_args()
if args.smoke:
    args.runs, args.clips, args.frames, args.short_side, args.crop = 1, 2, 4, 40, 32
if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
dev = torch.device(args.device)
torch.manual_seed(0)

model = getattr(torchvision.models.video, args.arch)(weights=None)
model.fc = nn.Linear(512, 3)
model.to(dev).eval()
mean = torch.tensor([0.43216, 0.394666, 0.37645], device=dev).view(1, 3, 1, 1, 1)
std = torch.tensor([0.22803, 0.22145, 0.216989], device=dev).view(1, 3, 1, 1, 1)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def clip_indices(n, src_fps):
    stride = max(1, round(src_fps / args.fps))
    span = (args.frames - 1) * stride + 1
    last = max(n - span, 0)
    if args.clips == 1:
        starts = [last // 2]
    else:
        starts = [round(k * last / (args.clips - 1)) for k in range(args.clips)]
    return [min(s + i * stride, n - 1) for s in starts for i in range(args.frames)]


def predict():
    t0 = time.perf_counter()
    # The header gives the size the decoder-native Resize needs (it is fixed when the decoder opens).
    s = get_container_metadata(args.video)
    s = s.streams[s.best_video_stream_index]
    h, w = s.height, s.width
    if not (h and w):  # no size in the header: ask a plain decoder
        m = VideoDecoder(args.video, seek_mode="approximate").metadata
        h, w = m.height, m.width
    size = (args.short_side, int(args.short_side * w / h)) if h <= w else (int(args.short_side * h / w), args.short_side)
    dec = VideoDecoder(
        args.video, num_ffmpeg_threads=args.threads, seek_mode="approximate",
        transforms=[Resize(size), CenterCrop((args.crop, args.crop))],
    )
    m = dec.metadata
    x = dec.get_frames_at(clip_indices(m.num_frames, m.average_fps or args.fps)).data  # [clips*T, 3, crop, crop] uint8
    t1 = time.perf_counter()
    x = x.to(dev).view(args.clips, args.frames, 3, args.crop, args.crop).permute(0, 2, 1, 3, 4)
    x = (x.float().div_(255) - mean) / std
    sync()
    t2 = time.perf_counter()
    with torch.no_grad():
        probs = model(x).softmax(1).mean(0).tolist()
    t3 = time.perf_counter()
    return probs, [(t3 - t0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3]


probs, _ = predict()  # warm-up
times = [predict()[1] for _ in range(args.runs)]
total, decode, prep, fwd = ([t[i] for t in times] for i in range(4))
print(json.dumps({
    "bench": "B4", "arch": args.arch, "device": args.device, "clips": args.clips, "frames": args.frames,
    "threads": args.threads, "torch_threads": torch.get_num_threads(),
    "p50_ms": round(statistics.median(total), 3),
    "p99_ms": round(sorted(total)[math.ceil(0.99 * len(total)) - 1], 3),
    "decode_p50_ms": round(statistics.median(decode), 3),
    "preprocess_p50_ms": round(statistics.median(prep), 3),
    "forward_p50_ms": round(statistics.median(fwd), 3),
    "runs": [round(t, 3) for t in total], "probs": [round(v, 4) for v in probs],
}))
