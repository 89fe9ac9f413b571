"""vidtune's freeze policies on a torchvision video ResNet, for the PyTorch reference scripts."""

STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]


def freeze(model, policy):
    """Apply `full`, `head_only` or `last_stages:N` as vidtune does: the frozen stages get no
    gradients and run BatchNorm in eval mode (call after model.train()). Returns the parameters
    that still train."""
    if policy == "full":
        frozen = []
    elif policy == "head_only":
        frozen = STAGES
    elif policy.startswith("last_stages:"):
        frozen = STAGES[: len(STAGES) - int(policy.split(":")[1])]
    else:
        raise SystemExit(f"unknown freeze policy {policy} (full, head_only, last_stages:N)")
    for name in frozen:
        getattr(model, name).eval().requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]
