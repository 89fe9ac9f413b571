"""PyTorch reference for scripts/bench/forward: torchvision models, same inputs, eval, fp32."""
import sys
import time

import torch
import torchvision
from torch import nn

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
only = set(sys.argv[2:])
torch.manual_seed(0)


class Tsn(nn.Module):
    def __init__(self, arch):
        super().__init__()
        self.base = getattr(torchvision.models, arch)(weights=None)
        if arch == "vgg16":
            self.base.classifier = self.base.classifier[:-1]
            dim = 4096
        else:
            dim = self.base.fc.in_features
            self.base.fc = nn.Identity()
        self.fc = nn.Linear(dim, 400)

    def forward(self, x):
        n, c, t, h, w = x.shape
        f = self.base(x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w))
        return self.fc(f.view(n, t, -1).mean(1))


for arch in ["r3d_18", "mc3_18", "r2plus1d_18", "resnet18", "resnet50", "vgg16"]:
    if only and arch not in only:
        continue
    if arch in ("r3d_18", "mc3_18", "r2plus1d_18"):
        model, x = getattr(torchvision.models.video, arch)(weights=None), torch.randn(1, 3, 16, 112, 112)
    else:
        model, x = Tsn(arch), torch.randn(1, 3, 8, 224, 224)
    model.eval()
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    print(f"{arch} {times[len(times) // 2]:.1f}", flush=True)
