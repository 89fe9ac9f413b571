"""B6 PyTorch reference: a whole fine-tuning job (train, validate each epoch, test the best epoch), one JSON line.

What a competent PyTorch user writes for the job vidtune runs, with vidtune's recipe copied
exactly where it can be (src/train/run.rs, hyper.rs, optim.rs, data.rs, evaluate.rs):

- Data: --split is the dataset's video list as `GET /v1/datasets/{id}/videos` answers it (split,
  label, source fps and frames, the training cache's frames, size and rate); each source file
  under --videos is decoded with torchcodec every time a clip is drawn (VideoDecoder in a
  Dataset, DataLoader with workers = os.cpu_count()), resized by the decoder to the size of
  vidtune's cache (bilinear with antialiasing; vidtune's cache uses FFmpeg's area filter) and
  taken at the cache's rate (cache frame i is the first source frame at or after i / cache_fps,
  as ingest keeps them; for the benchmark's 30 fps sources, every second frame). Classes are the training split's labels, sorted.
- Training clips: --frames consecutive frames (every --stride-th) from a uniformly random
  start, a random --crop square (crop_scale [1, 1], no flip: vidtune's defaults), Kinetics
  mean/std. Validation: 1 clip per video, centred in time and space. Test: --eval-clips clips per
  video evenly spaced in time, centre crop, softmax averaged per video; batches of 8.
- Model: torchvision r3d_18 with --weights loaded, then `fc` replaced by Linear(512, classes)
  initialised as vidtune's head (weight Kaiming-uniform with the ReLU gain, bias uniform
  ±1/sqrt(512)); --freeze as vidtune's policies (_freeze.py: frozen stages get no gradients and
  keep BatchNorm in eval mode).
- Optimiser: AdamW (betas 0.9/0.999, eps 1e-8, decoupled weight decay on every trainable
  parameter), backbone at lr × --backbone-lr-mult and the head at lr; the learning rate is set
  before every step from the epoch position t = epoch + batch / batches: linear warm-up
  min(t + 1e-9, W) / W for t < W, then cosine 0.5 (1 + cos(pi (t - W) / (epochs - W))).
  Cross-entropy with --label-smoothing.
- Selection: the epoch with the best validation --selection-metric (the first one on ties) is
  kept in memory; at the end it is reloaded, validated with --eval-clips clips and tested.

Where it cannot be the same: the random draws (shuffle, clip starts, crops, head init) come from
torch's generator, not vidtune's; the resize is the decoder's bilinear one rather than the cache's
area filter (a mean absolute difference of about 2.6 of 255 per channel on the synthetic echo
loops); the best epoch's weights are kept in memory, where vidtune writes a checkpoint (weights
and optimiser state) every epoch and exports the model at the end; the loader is torch's
(workers = cores) rather than vidtune's (loader_threads, default 2); where torchcodec cannot
reach a source's last frame or two (some synthetic H.264 files), a clip that would end there
ends on the last frame it can reach.

The wall time runs from this file's first line (before the imports) to the test result.
"""
import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchcodec.decoders import VideoDecoder  # noqa: E402
from torchcodec.transforms import Resize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _freeze import freeze  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--videos", required=True, help="the folder the dataset was uploaded from")
p.add_argument("--split", required=True, help="JSON of GET /v1/datasets/{id}/videos")
p.add_argument("--weights", required=True, help="torchvision r3d_18 state_dict (.pth)")
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--frames", type=int, default=8)
p.add_argument("--stride", type=int, default=1)
p.add_argument("--crop", type=int, default=64)
p.add_argument("--lr", type=float, default=0.001)
p.add_argument("--weight-decay", type=float, default=0.01)
p.add_argument("--backbone-lr-mult", type=float, default=0.1)
p.add_argument("--warmup-epochs", type=int, default=None, help="default: 1, or 0 for one epoch")
p.add_argument("--label-smoothing", type=float, default=0.0)
p.add_argument("--eval-clips", type=int, default=5)
p.add_argument("--selection-metric", default="balanced_accuracy",
               choices=["accuracy", "balanced_accuracy", "loss"])
p.add_argument("--freeze", default="last_stages:1", help="full, head_only or last_stages:N")
p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: os.cpu_count())")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
if args.workers is None:
    args.workers = os.cpu_count()
if args.warmup_epochs is None:
    args.warmup_epochs = 1 if args.epochs > 1 else 0
torch.manual_seed(args.seed)
bf16 = args.precision == "bf16"

MEAN = torch.tensor([0.43216, 0.394666, 0.37645]).view(3, 1, 1, 1)
STD = torch.tensor([0.22803, 0.22145, 0.216989]).view(3, 1, 1, 1)


def rnd(x):
    """Rust's f64::round (half away from zero) for x >= 0."""
    return int(math.floor(x + 0.5))


listing = json.loads(Path(args.split).read_text())["items"]
videos = [v for v in listing if v["status"] == "accepted" and v["split"] and v["label"]]
classes = sorted({v["label"] for v in videos if v["split"] == "train"})
by_split = {s: [v for v in videos if v["split"] == s and v["label"] in classes] for s in ("train", "val", "test")}
if not by_split["train"] or not by_split["val"]:
    sys.exit("the split has no training or no validation videos")


def source_indices(dec, cache_fps, cache_idx):
    """Source frame numbers of cache frames: ingest keeps the first frame at or after each
    multiple of 1 / cache_fps (timestamps k / the stream's rate, from 0)."""
    rate, n = dec.metadata.average_fps, dec.metadata.num_frames
    return [min(max(math.ceil((i / cache_fps - 1e-6) * rate), 0), n - 1) for i in cache_idx]


def clip_indices(total, start):
    return [min(start + j * args.stride, total - 1) for j in range(args.frames)]


REACHABLE = {}


def last_reachable(path, n):
    """The last frame index torchcodec's get_frames_at reaches in `path` (memoised)."""
    if path not in REACHABLE:
        k = n - 1
        while k > 0:
            try:
                VideoDecoder(path, num_ffmpeg_threads=1, seek_mode="approximate").get_frames_at([k])
                break
            except RuntimeError:
                k -= 1
        REACHABLE[path] = k
    return REACHABLE[path]


class Clips(Dataset):
    """Training clips (random position and crop) or, with `clips`, evaluation clips (evenly
    spaced, centre crop): one item per (video, clip)."""

    def __init__(self, items, clips=None):
        self.videos = items
        self.clips = clips
        self.items = [(i, c) for i in range(len(items)) for c in range(clips or 1)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        i, c = self.items[k]
        v = self.videos[i]
        h, w, total = v["cache_height"], v["cache_width"], v["cache_frames"]
        span = (args.frames - 1) * args.stride + 1
        room = total - span
        ch, cw = min(args.crop, h), min(args.crop, w)
        if self.clips is None:
            start = int(torch.randint(0, room + 1, ())) if room >= 0 else 0
            y, x = float(torch.rand(())) * (h - ch), float(torch.rand(())) * (w - cw)
        else:
            if room < 0:
                start = 0
            elif self.clips <= 1:
                start = room // 2
            else:
                start = rnd(c * room / (self.clips - 1))
            y, x = (h - ch) / 2.0, (w - cw) / 2.0
        y0, x0 = min(rnd(y / h * h), h - ch), min(rnd(x / w * w), w - cw)
        path = Path(args.videos) / v["path"]
        dec = VideoDecoder(path, num_ffmpeg_threads=1, seek_mode="approximate", transforms=[Resize((h, w))])
        wanted = source_indices(dec, v["cache_fps"], clip_indices(total, start))
        try:
            frames = dec.get_frames_at(wanted).data
        except RuntimeError:
            # torchcodec 0.17 cannot seek to the last one or two frames of some of the
            # synthetic H.264 sources ("no more frames left to decode"; 10 of the large set's
            # 240, although FFmpeg decodes all their frames): such a clip ends on the last
            # frame it can reach instead.
            top = last_reachable(path, dec.metadata.num_frames)
            dec = VideoDecoder(path, num_ffmpeg_threads=1, seek_mode="approximate", transforms=[Resize((h, w))])
            frames = dec.get_frames_at([min(i, top) for i in wanted]).data
        frames = frames[:, :, y0 : y0 + ch, x0 : x0 + cw].float()  # [T, C, h, w]
        if (ch, cw) != (args.crop, args.crop):
            frames = F.interpolate(frames, size=(args.crop, args.crop), mode="bilinear", align_corners=False)
        frames = frames.permute(1, 0, 2, 3).div_(255)  # [C, T, H, W]
        return (frames - MEAN) / STD, classes.index(v["label"])


def loader(items, clips=None, shuffle=False, batch=8, persistent=False):
    return DataLoader(Clips(items, clips), batch_size=batch, shuffle=shuffle, num_workers=args.workers,
                      persistent_workers=persistent and args.workers > 0, drop_last=False)


model = torchvision.models.video.r3d_18(weights=None)
model.load_state_dict(torch.load(args.weights, map_location="cpu"))
model.fc = nn.Linear(512, len(classes))
nn.init.kaiming_uniform_(model.fc.weight, nonlinearity="relu")  # as tch's default Linear init


def train_mode():
    model.train()
    return freeze(model, args.freeze)


trainable = {id(t) for t in train_mode()}
backbone = [t for n, t in model.named_parameters() if id(t) in trainable and not n.startswith("fc.")]
head = [t for n, t in model.named_parameters() if id(t) in trainable and n.startswith("fc.")]
groups = [{"params": backbone, "mult": args.backbone_lr_mult}, {"params": head, "mult": 1.0}]
opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=args.weight_decay)


def lr_factor(t):
    warm = args.warmup_epochs
    if warm > 0 and t < warm:
        return min(t + 1e-9, warm) / warm
    span = max(args.epochs - warm, 1)
    return 0.5 * (1 + math.cos(math.pi * min(max((t - warm) / span, 0.0), 1.0)))


@torch.no_grad()
def evaluate(dl, items, clips):
    model.eval()
    probs = torch.zeros(len(items), len(classes), dtype=torch.float64)
    loss_sum, n = 0.0, 0
    for b, (x, y) in enumerate(dl):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
        first = b * dl.batch_size
        for k, row in enumerate(logits.softmax(-1).double()):
            probs[dl.dataset.items[first + k][0]] += row / clips
    truth = torch.tensor([classes.index(v["label"]) for v in items])
    pred = probs.argmax(-1)
    recalls = [float((pred[truth == c] == c).double().mean()) for c in range(len(classes)) if (truth == c).any()]
    return {"accuracy": float((pred == truth).double().mean()), "balanced_accuracy": sum(recalls) / len(recalls),
            "loss": loss_sum / max(n, 1), "videos": len(items)}


def better(new, old):
    if old is None:
        return True
    return new < old if args.selection_metric == "loss" else new > old


train_dl = loader(by_split["train"], shuffle=True, batch=args.batch, persistent=True)
val_dl = loader(by_split["val"], clips=1, persistent=True)
steps = math.ceil(len(by_split["train"]) / args.batch)
epochs, best, best_epoch, best_state = [], None, None, None
setup_s = time.perf_counter() - T0
for epoch in range(args.epochs):
    t_epoch = time.perf_counter()
    train_mode()
    wait, loss_sum, seen = 0.0, 0.0, 0
    t = time.perf_counter()
    for b, (x, y) in enumerate(train_dl):
        wait += time.perf_counter() - t
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=args.label_smoothing)
        loss.backward()
        lr = args.lr * lr_factor(epoch + b / steps)
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += float(loss.detach()) * len(y)
        seen += len(y)
        t = time.perf_counter()
    train_s = time.perf_counter() - t_epoch
    val = evaluate(val_dl, by_split["val"], 1)
    value = val[args.selection_metric]
    if better(value, best):
        best, best_epoch = value, epoch + 1
        best_state = copy.deepcopy(model.state_dict())
    epochs.append({"epoch": epoch + 1, "train_loss": round(loss_sum / max(seen, 1), 4), "lr": lr,
                   "train_s": round(train_s, 3), "clips_per_s": round(seen / train_s, 3),
                   "data_wait_share": round(wait / train_s, 3), "epoch_s": round(time.perf_counter() - t_epoch, 3),
                   "val_accuracy": round(val["accuracy"], 4), "val_balanced_accuracy": round(val["balanced_accuracy"], 4)})
t_final = time.perf_counter()
if best_epoch != args.epochs:
    model.load_state_dict(best_state)
val = evaluate(loader(by_split["val"], clips=args.eval_clips), by_split["val"], args.eval_clips)
test = evaluate(loader(by_split["test"], clips=args.eval_clips), by_split["test"], args.eval_clips) if by_split["test"] else None
wall = time.perf_counter() - T0
print(json.dumps({
    "bench": "B6", "arch": "r3d_18", "freeze": args.freeze, "precision": args.precision, "workers": args.workers,
    "threads": torch.get_num_threads(), "classes": classes,
    "videos": {s: len(v) for s, v in by_split.items()}, "wall_s": round(wall, 3), "setup_s": round(setup_s, 3),
    "final_eval_s": round(time.perf_counter() - t_final, 3), "best_epoch": best_epoch, "epochs": epochs, "val": val, "test": test,
}))
