"""What the three example trainers share: the data (scikit-learn's handwritten
digits, shipped inside the package, so nothing is downloaded), SSL
augmentations, a timm backbone, the pre-training loop, and the second stage
(linear probe and fine-tune on labels) for the pre-trained backbone and for
the same backbone at its random initialisation."""

import argparse
import contextlib
import copy
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 32
NUM_CLASSES = 10


def parse_args(description, defaults):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="resnet18", help="timm model name (default: resnet18)")
    p.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights")
    p.add_argument("--loss-impl", choices=("fused", "reference"), default="fused",
                   help="ssl_ops kernels, or the pure-PyTorch reference (same math) to compare")
    p.add_argument("--epochs", type=int, default=defaults.get("epochs", 40), help="pre-training epochs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=defaults.get("lr", 2e-3))
    p.add_argument("--temperature", type=float, default=defaults.get("temperature", 0.2))
    p.add_argument("--max-steps", type=int, default=0, help="stop pre-training after this many steps (0: no limit)")
    p.add_argument("--probe-steps", type=int, default=300, help="full-batch steps of the linear probe")
    p.add_argument("--finetune-epochs", type=int, default=15)
    p.add_argument("--finetune-fraction", type=float, default=0.1,
                   help="fraction of the training labels the fine-tune sees")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--emulate-cuda", action="store_true",
                   help="on the CPU, run ssl_ops' CUDA code path through the host emulator (slow; checks a "
                        "whole training step of the CUDA route without a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-only", action="store_true",
                   help="stop after pre-training: no linear probe, no fine-tune (the JSON has no accuracies)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


def load_digits(device):
    """(train_x, train_y, test_x, test_y): 1437 / 360 images, 1 x 32 x 32, standardised."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    train, test = order[:1437], order[1437:]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def augment(x, strength=1.0):
    """A random view of each image: affine jitter (rotation, scale, shear,
    translation; no flips, digits are not symmetric), contrast and brightness,
    noise and a random erased patch, drawn independently per image."""
    n, dev = x.shape[0], x.device
    u = lambda lo, hi: torch.empty(n, device=dev).uniform_(lo, hi)  # noqa: E731
    angle = u(-0.35, 0.35) * strength
    scale = 1 + u(-0.25, 0.15) * strength
    shear = u(-0.2, 0.2) * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin + shear, u(-0.2, 0.2) * strength], 1),
        torch.stack([sin, cos, u(-0.2, 0.2) * strength], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin()
    out = F.grid_sample(x - background, grid, align_corners=False) + background
    out = out * (1 + u(-0.4, 0.4)[:, None, None, None] * strength) + u(-0.4, 0.4)[:, None, None, None] * strength
    out = out + 0.2 * strength * torch.randn_like(out)
    # Erase one random 10 x 10 patch in half of the images.
    size = 10
    r0 = torch.randint(0, IMAGE_SIZE - size, (n,), device=dev)
    c0 = torch.randint(0, IMAGE_SIZE - size, (n,), device=dev)
    rows = torch.arange(IMAGE_SIZE, device=dev)
    in_r = (rows[None] >= r0[:, None]) & (rows[None] < r0[:, None] + size)
    in_c = (rows[None] >= c0[:, None]) & (rows[None] < c0[:, None] + size)
    erase = (in_r[:, :, None] & in_c[:, None, :]) & (torch.rand(n, device=dev) < 0.5 * strength)[:, None, None]
    return out.masked_fill(erase[:, None], 0.0)


def backbone(name, pretrained):
    """A timm model giving pooled features (num_classes=0), 1 input channel."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=1)
    except Exception as e:  # no network, no cached weights, unknown name
        if not pretrained:
            raise
        raise SystemExit(
            f"could not load pretrained weights for timm model {name!r} ({type(e).__name__}: {e}). "
            "They are fetched from the Hugging Face Hub: put them in its cache, or run without --pretrained."
        ) from None


def kernels(args):
    """The context ssl_ops' calls run in: the emulated CUDA route with --emulate-cuda."""
    if not args.emulate_cuda:
        return contextlib.nullcontext()
    if args.device != "cpu":
        raise SystemExit("--emulate-cuda runs the CUDA code on the CPU: use it with --device cpu")
    from ssl_ops.emulation import use_emulated_kernels

    return use_emulated_kernels()


def pretrain(model, step_fn, after_step, x_train, args):
    """Self-supervised pre-training: ``step_fn(view0, view1) -> loss`` on two
    augmented views per image; ``after_step(step, total_steps)`` (momentum
    updates) after each optimizer step. AdamW with a cosine learning rate."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, x_train.shape[0] // args.batch_size)
    total = args.epochs * steps_per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    losses, step, start = [], 0, time.perf_counter()
    bar = tqdm(total=total, desc="pre-train", unit="step")
    while step < total:
        for idx in torch.randperm(x_train.shape[0], device=x_train.device).split(args.batch_size):
            if step >= total or idx.numel() < args.batch_size:  # drop the last partial batch
                break
            x = x_train[idx]
            with kernels(args):
                loss = step_fn(augment(x), augment(x))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                after_step(step, total)
            losses.append(loss.item())
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return {"steps": step, "seconds": time.perf_counter() - start, "first_loss": losses[0], "last_loss": losses[-1]}


@torch.no_grad()
def momentum_update(encoder, online, momentum, fused):
    """encoder (an ssl_ops.MomentumEncoder) <- EMA of online's parameters, buffers
    copied: one fused ema_update_ call, or the reference per-parameter loop."""
    if fused:
        encoder.update(online, momentum)
        return
    import ssl_ops

    ssl_ops.reference.ema_update_(list(encoder.module.parameters()), list(online.parameters()), momentum)
    for ema_buffer, buffer in zip(encoder.module.buffers(), online.buffers()):
        ema_buffer.copy_(buffer)


@torch.no_grad()
def features(net, x):
    net.eval()
    return torch.cat([net(chunk) for chunk in x.split(512)])


def linear_probe(net, data, steps):
    """Accuracy of a linear classifier on frozen, standardised features."""
    x_train, y_train, x_test, y_test = data
    f_train, f_test = features(net, x_train), features(net, x_test)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    head = nn.Linear(f_train.shape[1], NUM_CLASSES).to(f_train.device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(f_train), y_train).backward()
        opt.step()
    return (head(f_test).argmax(1) == y_test).float().mean().item()


def fine_tune(net, data, epochs, fraction, seed):
    """Accuracy after training backbone and linear head on a fraction of the labels."""
    x_train, y_train, x_test, y_test = data
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(x_train.shape[0], generator=g)[: max(NUM_CLASSES, int(fraction * x_train.shape[0]))]
    x, y = x_train[keep.to(x_train.device)], y_train[keep.to(y_train.device)]
    model = nn.Sequential(copy.deepcopy(net), nn.Linear(net.num_features, NUM_CLASSES)).to(x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(x.shape[0], device=x.device).split(64):
            if idx.numel() < 2:  # batch norm needs two samples
                continue
            opt.zero_grad()
            F.cross_entropy(model(augment(x[idx], strength=0.5)), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def evaluate_and_report(name, pretrained_net, random_net, data, train_stats, args):
    """Stage 2 for the pre-trained and the randomly initialised backbone; prints a table."""
    results = {"method": name, "model": args.model, "loss_impl": args.loss_impl, "device": args.device,
               "pretrain": train_stats, "accuracy": {}}
    print(f"\n{name} ({args.model}, {args.loss_impl} loss): {train_stats['steps']} steps in "
          f"{train_stats['seconds']:.0f} s, loss {train_stats['first_loss']:.3f} -> {train_stats['last_loss']:.3f}")
    if args.pretrain_only:
        _write_json(results, args)
        return results
    for label, net in (("ssl", pretrained_net), ("random_init", random_net)):
        torch.manual_seed(args.seed)
        results["accuracy"][label] = {
            "linear_probe": linear_probe(net, data, args.probe_steps),
            "fine_tune": fine_tune(net, data, args.finetune_epochs, args.finetune_fraction, args.seed),
        }
    acc = results["accuracy"]
    print(f"| backbone | linear probe | fine-tune ({args.finetune_fraction:.0%} labels) |")
    print("|---|---|---|")
    baseline = "timm weights, no SSL" if args.pretrained else "random init"
    for label, title in (("ssl", f"{name} pre-trained"), ("random_init", baseline)):
        print(f"| {title} | {acc[label]['linear_probe']:.1%} | {acc[label]['fine_tune']:.1%} |")
    _write_json(results, args)
    return results


def _write_json(results, args):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def setup(args):
    torch.manual_seed(args.seed)
    data = load_digits(args.device)
    net = backbone(args.model, args.pretrained).to(args.device)
    initial = copy.deepcopy(net)  # the baseline: this backbone before pre-training
    return data, net, initial
