"""Independent, straightforward projectors written from the published descriptions, one sample at a time.

Nothing here imports tc_export: these are the yardsticks the library's static modules are held to. Weights are
read from a plain state dict (the tested module's), so the same parameters run through both implementations.
The C-Abstractor reference is built from timm's own ``RegStage`` the way Honeybee builds it.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------- pooling


def window_pool(grid: Tensor, stride: int, reduce: str) -> Tensor:
    """One sample (H, W, C) or (T, C): non-overlapping windows of side ``stride``, floor rule, by loops."""
    if grid.dim() == 2:
        return _pool_1d(grid, stride, reduce)
    h, w, _ = grid.shape
    rows = []
    for i in range(h // stride):
        row = []
        for j in range(w // stride):
            window = grid[i * stride : (i + 1) * stride, j * stride : (j + 1) * stride].reshape(-1, grid.shape[-1])
            row.append(window.mean(0) if reduce == "avg" else window.max(0).values)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _pool_1d(seq: Tensor, stride: int, reduce: str) -> Tensor:
    out = []
    for t in range(seq.shape[0] // stride):
        window = seq[t * stride : (t + 1) * stride]
        out.append(window.mean(0) if reduce == "avg" else window.max(0).values)
    return torch.stack(out)


def linear_weights(size_in: int, size_out: int) -> Tensor:
    """(size_out, size_in) half-pixel linear interpolation weights (PyTorch align_corners=False, no antialias)."""
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    scale = size_in / size_out
    for o in range(size_out):
        src = max(scale * (o + 0.5) - 0.5, 0.0)
        i0 = min(int(math.floor(src)), size_in - 1)
        i1 = min(i0 + 1, size_in - 1)
        frac = src - i0
        weights[o, i0] += 1.0 - frac
        weights[o, i1] += frac
    return weights


def bilinear_resize(grid: Tensor, size: tuple[int, ...]) -> Tensor:
    """One sample (H, W, C) -> (H', W', C), or (T, C) -> (T', C), by the half-pixel formula."""
    out = grid.double()
    for axis, target in enumerate(size):
        out = torch.movedim(torch.tensordot(linear_weights(grid.shape[axis], target), torch.movedim(out, axis, 0),
                                            dims=1), 0, axis)
    return out.to(grid.dtype)


def reference_pool(x: Tensor, grid: tuple[int, ...], prefix: int, stride: int, mode: str, keep_prefix: bool) -> Tensor:
    """LLaVA-NeXT get_2dPool / OneVision bilinear / 1-D frame pooling, per sample."""
    outs = []
    for sample in x:
        g = sample[prefix:].reshape(*grid, -1)
        if mode == "bilinear":
            pooled = bilinear_resize(g, tuple(math.ceil(s / stride) for s in grid))
        else:
            pooled = window_pool(g, stride, mode)
        tokens = pooled.reshape(-1, sample.shape[-1])
        outs.append(torch.cat([sample[:prefix], tokens]) if keep_prefix else tokens)
    return torch.stack(outs)


# ------------------------------------------------------------------------------------------------- unshuffle


def unshuffle_formula(x: Tensor, grid: tuple[int, int], prefix: int, k: int) -> Tensor:
    """out[n, i, j, (k*di + dj)*C + c] = x[n, k*i + di, k*j + dj, c], by the index formula."""
    h, w = grid
    n, _, c = x.shape
    g = x[:, prefix:].reshape(n, h, w, c)
    out = torch.zeros(n, h // k, w // k, k * k * c, dtype=x.dtype)
    for i in range(h // k):
        for j in range(w // k):
            for di in range(k):
                for dj in range(k):
                    slot = (k * di + dj) * c
                    out[:, i, j, slot : slot + c] = g[:, k * i + di, k * j + dj, :]
    return out.reshape(n, -1, k * k * c)


def internvl_pixel_shuffle(x: Tensor, scale: float = 0.5) -> Tensor:
    """InternVL's published v2 sequence on (N, H, W, C): view, permute, view, permute."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(w * scale), int(h * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def internvl_pixel_shuffle_v1(x: Tensor, scale: float = 0.5) -> Tensor:
    """InternVL 1.2's published sequence (ps_version v1): the v2 sequence without its last permute."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, int(w * scale), int(h * scale), int(c / (scale * scale)))


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def linear(x: Tensor, sd: dict, name: str) -> Tensor:
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def mlp2x_gelu(x: Tensor, sd: dict, first: str, second: str) -> Tensor:
    return linear(gelu(linear(x, sd, first)), sd, second)


def reference_unshuffle_projector(x: Tensor, sd: dict, grid: tuple[int, int], prefix: int, k: int) -> Tensor:
    wide = unshuffle_formula(x, grid, prefix, k)
    normed = layer_norm(wide, sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    return mlp2x_gelu(normed, sd, "mlp1.1", "mlp1.3")


def reference_patch_merger(x: Tensor, sd: dict, grid: tuple[int, int], prefix: int) -> Tensor:
    """Qwen2-VL's PatchMerger on a row-major tower: the tokens put in window order (as Qwen2-VL's patch embedding
    emits them: each 2 x 2 window's four tokens one after another, windows row-major), ln_q on every token, the
    sequence viewed as (-1, 4C), mlp.0 -> GELU -> mlp.2."""
    h, w = grid
    n, _, c = x.shape
    g = x[:, prefix:].reshape(n, h, w, c)
    ordered = torch.stack([g[:, 2 * i + di, 2 * j + dj] for i in range(h // 2) for j in range(w // 2)
                           for di in range(2) for dj in range(2)], dim=1)
    normed = layer_norm(ordered, sd["ln_q.weight"], sd["ln_q.bias"], 1e-6)
    return mlp2x_gelu(normed.reshape(n, -1, 4 * c), sd, "mlp.0", "mlp.2")


# ---------------------------------------------------------------------------------------------- C-Abstractor


class HoneybeeCAbstractor(nn.Module):
    """Honeybee's CAbstractor as published: timm RegStage x2 around nn.AdaptiveAvgPool2d, build_mlp(2) readout.

    Its ``pos_emb`` has a class-token row (1, 1 + H*W, C), added before the class token is dropped.
    """

    def __init__(self, channels: int, hidden: int, out: int, hw: int, num_input_tokens: int, depth: int = 3):
        super().__init__()
        from timm.layers import LayerNorm2d
        from timm.models.regnet import RegStage

        block = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
        self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, channels))
        self.net = nn.Sequential(block(depth, channels, hidden), nn.AdaptiveAvgPool2d((hw, hw)),
                                 block(depth, hidden, hidden))
        self.readout = nn.Sequential(nn.Linear(hidden, out), nn.SiLU(), nn.Linear(out, out))

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = x + self.pos_emb
        x = x[:, 1:]
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
        x = self.net(x)
        return self.readout(x.flatten(2).transpose(1, 2))


# -------------------------------------------------------------------------------------------------- LLaMA-VID


def reference_llamavid(x: Tensor, queries: Tensor, sd: dict, grid: tuple[int, ...], prefix: int,
                       grid_size: int) -> Tensor:
    """LLaMA-VID token_generation per sample: context token by text-query attention, content by mean / grid."""
    outs = []
    for sample, query in zip(x, queries):
        v = sample[prefix:]
        c = v.shape[-1]
        text_q = linear(query, sd, "vlm_att_projector")
        k = linear(v, sd, "vlm_att_key_projector")
        scores = text_q @ k.T / c**0.5
        attn = torch.exp(scores - scores.max(-1, keepdim=True).values)
        attn = attn / attn.sum(-1, keepdim=True)
        ctx = linear((attn @ v).mean(0, keepdim=True), sd, "vlm_att_val_projector")
        if grid_size == 1:
            content = v.mean(0, keepdim=True)
        else:
            h, w = grid
            g = v.reshape(h, w, c)
            sh, sw = h // grid_size, w // grid_size
            cells = [g[i * sh : (i + 1) * sh, j * sw : (j + 1) * sw].reshape(-1, c).mean(0)
                     for i in range(h // sh) for j in range(w // sw)]
            content = torch.stack(cells)
        outs.append(torch.cat([ctx, mlp2x_gelu(content, sd, "mm_projector.0", "mm_projector.2")]))
    return torch.stack(outs)


# -------------------------------------------------------------------------------------------------- resampler


def mae_sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE / Qwen-VL get_2d_sincos_pos_embed (numpy, float32 as published)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def key_positions(embed_dim: int, queries: int, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(query positions (M, D), key positions (H*W, D)): first M cells of the ceil-square table; bicubic resize."""
    side = math.ceil(math.sqrt(queries))
    table = torch.from_numpy(mae_sincos_2d(embed_dim, side)).float()
    resized = F.interpolate(table.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=grid, mode="bicubic",
                            align_corners=False)
    return table[:queries], resized.permute(0, 2, 3, 1).reshape(-1, embed_dim)


def attention(q: Tensor, k: Tensor, v: Tensor, sd: dict, name: str, heads: int) -> Tensor:
    """Hand-written nn.MultiheadAttention: packed in-projection split in q, k, v order, per-head softmax."""
    d = q.shape[-1]
    wq, wk, wv = sd[f"{name}.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[f"{name}.in_proj_bias"].chunk(3)
    qh, kh, vh = q @ wq.T + bq, k @ wk.T + bk, v @ wv.T + bv
    hd = d // heads
    out = torch.zeros(q.shape[0], d)
    for head in range(heads):
        cols = slice(head * hd, (head + 1) * hd)
        scores = qh[:, cols] @ kh[:, cols].T / math.sqrt(hd)
        out[:, cols] = torch.softmax(scores, dim=-1) @ vh[:, cols]
    return out @ sd[f"{name}.out_proj.weight"].T + sd[f"{name}.out_proj.bias"]


def reference_resampler(x: Tensor, sd: dict, grid: tuple[int, int], prefix: int, heads: int, depth: int) -> Tensor:
    """Qwen-VL Resampler + ln_post + proj per sample, then the documented Perceiver layers for depth > 1."""
    dim = sd["proj"].shape[0]
    queries = sd["attn_pool.query"].shape[0]
    pos_q, pos_k = key_positions(dim, queries, grid)
    eps = 1e-6
    outs = []
    for sample in x:
        tokens = sample[prefix:]
        kv = tokens @ sd["attn_pool.kv_proj.weight"].T if "attn_pool.kv_proj.weight" in sd else tokens
        kv = layer_norm(kv, sd["attn_pool.ln_kv.weight"], sd["attn_pool.ln_kv.bias"], eps)
        q = layer_norm(sd["attn_pool.query"], sd["attn_pool.ln_q.weight"], sd["attn_pool.ln_q.bias"], eps) + pos_q
        h = attention(q, kv + pos_k, kv, sd, "attn_pool.attn", heads)
        for i in range(depth - 1):
            p = f"layers.{i}"
            normed = layer_norm(h, sd[f"{p}.ln_q.weight"], sd[f"{p}.ln_q.bias"], eps) + pos_q
            h = h + attention(normed, kv + pos_k, kv, sd, f"{p}.attn", heads)
            normed = layer_norm(h, sd[f"{p}.ln_ff.weight"], sd[f"{p}.ln_ff.bias"], eps)
            h = h + mlp2x_gelu(normed, sd, f"{p}.ff.0", f"{p}.ff.2")
        outs.append(layer_norm(h, sd["ln_post.weight"], sd["ln_post.bias"], eps) @ sd["proj"])
    return torch.stack(outs)
