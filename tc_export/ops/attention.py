"""Attention with an additive bias, written out (no fused kernel).

Used where a pass adds a bias (proportional attention, a padding mask) to an attention that was a
``scaled_dot_product_attention`` call: the exporter's handling of SDPA with a float mask records strides that
its own decomposition later contradicts, and the written-out form exports to the same MatMul/Softmax ops.
"""

from __future__ import annotations

import torch
from torch import Tensor


def biased_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(scale * q k^T + bias) v for (..., N, d) queries, keys and values."""
    logits = (query * scale) @ key.transpose(-2, -1)
    return torch.softmax(logits + bias.to(logits.dtype), dim=-1) @ value  # the bias from an fp32 state


def proportional_bias(size: Tensor) -> Tensor:
    """log(size) of each key token as an additive attention bias, shaped (B, 1, 1, N); size 0 gives -inf."""
    return size.log().flatten(1)[:, None, None, :]


def window_bias(bias: Tensor, windows: int, heads: int) -> Tensor:
    """A key bias (B, 1, 1, N) over tokens that run window after window, folded as an attention that attends within
    ``windows`` equal windows folds its queries and keys into the heads ((B, H, N, d) -> (B, H x windows, N /
    windows, d), folded head h * windows + w): (B, ``heads`` = H x windows, 1, N / windows), window w's keys' bias
    in every folded head of window w (Qwen2.5-VL's windowed blocks after ToMe, docs/qwen-vl.md)."""
    folded = bias.reshape(bias.shape[0], windows, 1, bias.shape[-1] // windows)
    return folded.repeat(1, heads // windows, 1, 1)


def presence_bias(size: Tensor) -> Tensor:
    """0 for tokens with size > 0, -inf for size-0 (padding) tokens, shaped (B, 1, 1, N)."""
    return (size > 0).to(size.dtype).log().flatten(1)[:, None, None, :]


def class_attention(query: Tensor, key: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """The class token's attention row averaged over heads, (B, N), from (B, H, N, d) queries and keys.

    Fused attention kernels do not return their weights, so the one row is recomputed: N*d work per head.
    """
    logits = (query[..., :1, :] * scale) @ key.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return _head_mean_of_first_row(torch.softmax(logits, dim=-1))


def received_attention(query: Tensor, key: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """The attention each token receives, (B, N): the softmax probabilities of (B, H, N, d) queries over the keys,
    averaged over the queries and the heads (HiPrune's and QuietPrune's score for towers without a class token).
    Fused kernels do not return their weights, so the probabilities are recomputed: N^2 * d work per head."""
    logits = (query * scale) @ key.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return received_attention_from_probs(torch.softmax(logits, dim=-1))


def received_attention_from_probs(probs: Tensor) -> Tensor:
    """The attention each token receives from explicit probabilities (B, H, N, N) or (B, N, N): the mean over
    the queries (and the heads)."""
    return probs.mean(dim=(1, 2)) if probs.dim() == 4 else probs.mean(dim=1)


def class_attention_from_probs(probs: Tensor) -> Tensor:
    """The class token's row of explicit attention probabilities (B, H, N, N) or (B, N, N), head-averaged."""
    return _head_mean_of_first_row(probs[..., :1, :])


def _head_mean_of_first_row(rows: Tensor) -> Tensor:
    rows = rows[..., 0, :]
    return rows.mean(dim=1) if rows.dim() == 3 else rows
