"""Which position should a merged token look a relative position bias up at? Measured on a trained BEiT.

    python benchmarks/relative_bias_rules.py            # trains a small BEiT on the MNIST digits, then measures

A relative position bias (BEiT, Data2VecVision, relpos ViTs, T5) is a table indexed by the integer offset between
two tokens. A merged token stands for several original tokens, and the carried position (the size-weighted mean
of its members') is fractional. The rules compared, all under the same ToMe merges (class token protected,
proportional attention, the keys' head mean as the metric):

- rounded mean (tc-export's rule): the bias between the rounded mean positions, half up;
- destination: the position of the token the others merged into (ToMe's B-side token), which never moves;
- interpolated: BEiT's table read bilinearly at the fractional offset between the two mean positions;
- member mean: the mean over all member pairs of the original bias (a merged token then sees the average of what
  its members saw; needs each token's membership, which a static-shape export does not carry);
- dropped: no bias at the layers that see merged tokens (what an export that loses the table computes).

The model is timm's BEiT without absolute position embeddings (its relative bias is the only position signal),
4 layers, width 96, 4 heads, 4 x 4 patches of the 28 x 28 digits (7 x 7 grid + class token, 50 tokens), trained on
the 4,000 training digits (``tc_export.data.mnist``; random shifts of up to 2 pixels) and scored on the 1,000
held-out ones: top-1 agreement with the uncompressed model, accuracy, and the mean relative error of the logits.
Pruning (Top-K) needs no rule: a kept token keeps its exact position.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tc_export.data.mnist import heldout_split, train_split
from tc_export.passes.relative_bias import HALF_UP

Rule = Callable[["State", Tensor, Tensor, Tensor], Tensor]  # (state, bias, positions, table) -> bias


def build(seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("beit_base_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10,
                             embed_dim=96, depth=4, num_heads=4, mlp_ratio=2.0, init_values=0.1,
                             use_abs_pos_emb=False, use_rel_pos_bias=True)


def train(model: torch.nn.Module, epochs: int, seed: int, lr: float) -> None:
    """AdamW with a one-cycle schedule; ``epochs`` 0 leaves the random weights (the benchmark test's tiny mode)."""
    model.eval()
    if epochs == 0:
        return
    images, labels = train_split()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(images.shape[0] / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for first in range(0, images.shape[0], 64):
            index = order[first:first + 64]
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            batch = torch.roll(images[index], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(batch), labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: last loss {loss.item():.3f}", flush=True)
    model.eval()


class State:
    """One sample's tokens: membership (n, N) over the original tokens, and each token's destination index."""

    def __init__(self, tokens: int) -> None:
        self.members = torch.eye(tokens)
        self.destination = torch.arange(tokens)

    @property
    def size(self) -> Tensor:
        return self.members.sum(1, keepdim=True)

    def merge(self, x: Tensor, metric: Tensor, r: int) -> Tensor:
        """ToMe bipartite soft matching with the class token (row 0) protected: A = even rows, B = odd rows."""
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = torch.arange(0, x.shape[0], 2), torch.arange(1, x.shape[0], 2)
        scores = metric[a] @ metric[b].T
        scores[0] = float("-inf")
        best, partner = scores.max(dim=-1)
        order = best.argsort(descending=True)
        merged, kept = order[:r], order[r:].sort().values
        size = self.size
        dst_x, dst_m = (x * size)[b].clone(), self.members[b].clone()
        for i in merged.tolist():
            j = int(partner[i])
            dst_x[j] += x[a[i]] * size[a[i]]
            dst_m[j] += self.members[a[i]]
        self.members = torch.cat([self.members[a[kept]], dst_m])
        self.destination = torch.cat([self.destination[a[kept]], self.destination[b]])
        return torch.cat([x[a[kept]], dst_x / dst_m.sum(1, keepdim=True)])


def mean_positions(state: State, positions: Tensor) -> Tensor:
    return state.members @ positions / state.size


def rounded_mean(state: State, bias: Tensor, positions: Tensor, table: Tensor) -> Tensor:
    mean = torch.floor(mean_positions(state, positions) + HALF_UP)
    width = int(positions[:, 1].max()) + 1
    index = torch.where(mean[:, 0] < 0, 0, 1 + mean[:, 0] * width + mean[:, 1]).long()
    return bias[:, index][:, :, index]


def destination(state: State, bias: Tensor, positions: Tensor, table: Tensor) -> Tensor:
    return bias[:, state.destination][:, :, state.destination]


def member_mean(state: State, bias: Tensor, positions: Tensor, table: Tensor) -> Tensor:
    weights = state.members / state.size
    return weights @ bias @ weights.T


def dropped(state: State, bias: Tensor, positions: Tensor, table: Tensor) -> Tensor:
    return torch.zeros_like(bias[:, :state.members.shape[0], :state.members.shape[0]])


def interpolated(state: State, bias: Tensor, positions: Tensor, table: Tensor) -> Tensor:
    """BEiT's offset table (2Wh-1, 2Ww-1, heads) read bilinearly at the fractional offset between the mean
    positions; the class token's three entries as they are."""
    window = (int(positions[:, 0].max()) + 1, int(positions[:, 1].max()) + 1)
    offsets = table[:-3].T.reshape(-1, 2 * window[0] - 1, 2 * window[1] - 1)
    mean = mean_positions(state, positions)
    d = mean[:, None, :] - mean[None, :, :]  # (n, n, 2): row and column offsets
    grid = torch.stack([d[..., 1] / (window[1] - 1), d[..., 0] / (window[0] - 1)], dim=-1)
    out = F.grid_sample(offsets[None], grid[None], mode="bilinear", align_corners=True)[0]  # (H, n, n)
    cls = mean[:, 0] < 0
    query_cls, key_cls = cls[:, None].expand_as(out[0]), cls[None, :].expand_as(out[0])
    out = torch.where(query_cls, table[-3][:, None, None], out)
    out = torch.where(key_cls, table[-2][:, None, None], out)
    return torch.where(query_cls & key_cls, table[-1][:, None, None], out)


RULES: dict[str, Rule] = {
    "rounded mean (tc-export)": rounded_mean,
    "destination token": destination,
    "interpolated offset": interpolated,
    "member mean": member_mean,
    "dropped (no bias)": dropped,
}


@torch.no_grad()
def forward(model: torch.nn.Module, image: Tensor, r: int, rule: Rule | None) -> Tensor:
    """One sample through the BEiT blocks, merging ``r`` tokens after each attention (``rule`` None: no merging)."""
    x = model.patch_embed(image[None])
    x = torch.cat([model.cls_token, x], dim=1)[0]
    grid = model.patch_embed.grid_size
    positions = torch.cat([torch.full((1, 2), -1.0), torch.stack(torch.meshgrid(
        torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij"), -1).reshape(-1, 2).float()])
    state = State(x.shape[0])
    for block in model.blocks:
        attn = block.attn
        full = attn._get_rel_pos_bias()[0]
        compressed = rule is not None and state.members.shape[0] < full.shape[-1]
        bias = rule(state, full, positions, attn.relative_position_bias_table) if compressed else full
        y = block.norm1(x)
        qkv = F.linear(y, attn.qkv.weight, torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]))
        q, k, v = (t.view(x.shape[0], attn.num_heads, -1).transpose(0, 1) for t in qkv.chunk(3, dim=-1))
        logits = (q @ k.transpose(-1, -2)) * attn.scale + bias + state.size[:, 0].log()
        out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(x.shape[0], -1)
        x = x + block.gamma_1 * attn.proj(out)
        if rule is not None:
            x = state.merge(x, k.mean(0), r)
        x = x + block.gamma_2 * block.mlp(block.norm2(x))
    weights = state.size[1:]
    pooled = (x[1:] * weights).sum(0) / weights.sum()
    return model.head(model.fc_norm(pooled))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build(args.seed)
    start = time.perf_counter()
    train(model, args.epochs, args.seed, args.lr)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    images, labels = heldout_split()
    images, labels = images[:args.samples], labels[:args.samples]
    reference = torch.stack([forward(model, image, 0, None) for image in images])
    accuracy = float((reference.argmax(-1) == labels).float().mean())
    print(f"\nuncompressed: accuracy {accuracy:.4f} on {len(labels)} held-out digits\n")
    print("| ToMe r | rule | top-1 agreement | accuracy | mean relative logit error |")
    print("|---|---|---|---|---|")
    for r in args.r:
        for name, rule in RULES.items():
            outputs = torch.stack([forward(model, image, r, rule) for image in images])
            agreement = float((outputs.argmax(-1) == reference.argmax(-1)).float().mean())
            correct = float((outputs.argmax(-1) == labels).float().mean())
            error = float(((outputs - reference).norm(dim=-1) / reference.norm(dim=-1)).mean())
            print(f"| {r} | {name} | {agreement:.4f} | {correct:.4f} | {error:.4f} |", flush=True)


if __name__ == "__main__":
    main()
