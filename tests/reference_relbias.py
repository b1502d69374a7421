"""Encoders with relative position biases, one sample at a time, the bias looked up from the model's own table at
the positions the tokens carry.

BEiT and Data2VecVision (a table of (2H-1)(2W-1) offsets plus three class-token entries), timm's relpos ViTs (an
MLP over log-spaced offsets; the class token gets no bias) and T5's encoder (a table of buckets of the signed 1-D
distance, shared by every layer) are rewritten from their weights and the published formulas; nothing is imported
from tc_export. Each token carries its original coordinates next to its features: the method hooks merge or
gather the carried coordinates as they do the features (a merge gives the size-weighted mean), and the bias of a
merged token is read at its coordinates rounded half up; protected tokens are looked up by their index.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference_encoders import Hooks, size_weighted_mean

# (rows (n, P) of integer coordinates, -1 for protected tokens) -> (heads, n, n)
BiasLookup = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class RelLayer:
    heads: int
    scale: float
    project: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # normed x (N, C) -> q, k, v (N, C)
    attention_out: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    norm1: Callable[[Tensor], Tensor]
    norm2: Callable[[Tensor], Tensor]
    bias: BiasLookup
    post_norm: bool = False  # timm's residual-post-norm blocks: x + norm1(attn(x)), x + norm2(mlp(x))


@dataclass(frozen=True)
class RelEncoder:
    """``embed(sample) -> (x, size)``, the start coordinates (N, P) (-1 rows: protected tokens; None: the index
    along a 1-D sequence), layers, head."""

    embed: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]]
    positions: Tensor | None
    layers: list[RelLayer]
    head: Callable[[Tensor, Tensor], Tensor]

    def run(self, inputs: dict[str, Tensor], hooks: Hooks, fused: bool = False) -> tuple[Tensor, list[int]]:
        return run(self, inputs, hooks, fused)


def lookup_coordinates(positions: Tensor) -> Tensor:
    """The documented rule for merged tokens: each carried coordinate rounded half up (pruned tokens are exact); a
    mean just below a half (by float rounding: within 1e-3) counts as the half."""
    return torch.where(positions < 0, positions, torch.floor(positions + 0.5 + 1e-3)).long()


def _heads(t: Tensor, heads: int) -> Tensor:
    n, c = t.shape
    return t.view(n, heads, c // heads).transpose(0, 1)


def _carry(step, index: int, x: Tensor, positions: Tensor, size: Tensor, a: Tensor, b: Tensor, fused: bool):
    """A method hook applied to the features with the coordinates as extra columns: they move with the tokens (a
    merge gives the size-weighted mean). ``fused``: the hook fuses what it prunes into one last token (EViT) by
    attention weights; that token's position is the size-weighted mean of the tokens it absorbed (the rule for
    every token standing for several), i.e. the mass the kept tokens do not hold."""
    out, new_size = step(index, torch.cat([x, positions], dim=-1), size, a, b)
    new_positions = out[:, x.shape[1]:]
    if fused and out.shape[0] < x.shape[0]:
        body, kept = positions[:, 0] >= 0, new_positions[:-1, 0] >= 0
        mass = (size[body] * positions[body]).sum(0) - (new_size[:-1][kept] * new_positions[:-1][kept]).sum(0)
        absorbed = size[body].sum() - new_size[:-1][kept].sum()
        new_positions = torch.cat([new_positions[:-1], (mass / absorbed)[None]])
    return out[:, :x.shape[1]], new_positions, new_size


@torch.no_grad()
def run(encoder: RelEncoder, inputs: dict[str, Tensor], hooks: Hooks, fused: bool = False) -> tuple[Tensor, list[int]]:
    """The encoder on each sample; ``fused``: the method fuses pruned tokens into one last token (see ``_carry``)."""
    batch = next(iter(inputs.values())).shape[0]
    outputs, counts = [], []
    for i in range(batch):
        x, size = encoder.embed({name: value[i:i + 1] for name, value in inputs.items()})
        positions = torch.arange(x.shape[0], dtype=torch.float32)[:, None] if encoder.positions is None \
            else encoder.positions.clone()
        counts = []
        for index, layer in enumerate(encoder.layers):
            y = x if layer.post_norm else layer.norm1(x)
            x, positions, size = _carry(hooks.before_layer, index, x, positions, size, *layer.project(y)[:2], fused)
            counts.append(x.shape[0])
            y = x if layer.post_norm else layer.norm1(x)
            q, k, v = (_heads(t, layer.heads) for t in layer.project(y))
            logits = (q @ k.transpose(-1, -2)) * layer.scale + layer.bias(lookup_coordinates(positions))
            sizes = size[:, 0].log() if hooks.prop_attn else torch.where(size[:, 0] > 0, 0.0, float("-inf"))
            probs = (logits + sizes).softmax(dim=-1)
            attended = (probs @ v).transpose(0, 1).reshape(x.shape[0], -1)
            branch = layer.attention_out(attended)
            x = x + (layer.norm1(branch) if layer.post_norm else branch)
            x, positions, size = _carry(hooks.after_attention, index, x, positions, size, k, probs, fused)
            x = x + (layer.norm2(layer.mlp(x)) if layer.post_norm else layer.mlp(layer.norm2(x)))
        counts.append(x.shape[0])
        outputs.append(encoder.head(x, size))
    return torch.stack(outputs), counts


def grid_positions(prefix: int, height: int, width: int) -> Tensor:
    rows = torch.arange(height, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, dtype=torch.float32).repeat(height)
    return torch.cat([torch.full((prefix, 2), -1.0), torch.stack([rows, cols], dim=1)])


# --- the bias formulas --------------------------------------------------------------------------------------------

def beit_bias(table: Tensor, window: tuple[int, int]) -> BiasLookup:
    """BEiT's table (num_relative_distance, heads): (dh + Wh - 1) * (2 Ww - 1) + (dw + Ww - 1) for two patches
    (dh = row_i - row_j), then class->patch, patch->class and class->class entries (the last three rows)."""
    rows = table.shape[0]

    def lookup(coords: Tensor) -> Tensor:
        dh = coords[:, None, 0] - coords[None, :, 0]
        dw = coords[:, None, 1] - coords[None, :, 1]
        index = (dh + window[0] - 1) * (2 * window[1] - 1) + (dw + window[1] - 1)
        query_cls, key_cls = coords[:, None, 0] < 0, coords[None, :, 0] < 0
        index = torch.where(query_cls, rows - 3, index)
        index = torch.where(key_cls, rows - 2, index)
        index = torch.where(query_cls & key_cls, rows - 1, index)
        return table[index].permute(2, 0, 1)

    return lookup


def relpos_mlp_bias(rel_pos: torch.nn.Module, window: tuple[int, int]) -> BiasLookup:
    """timm's RelPosMlp: its MLP over the log-spaced offsets (2Wh-1, 2Ww-1, 2), read at (dh, dw); the class token
    gets zero bias both ways."""
    table = rel_pos.bias_act(rel_pos.mlp(rel_pos.rel_coords_log).permute(2, 0, 1))
    if rel_pos.bias_gain is not None:
        table = rel_pos.bias_gain * table

    def lookup(coords: Tensor) -> Tensor:
        dh = coords[:, None, 0] - coords[None, :, 0] + window[0] - 1
        dw = coords[:, None, 1] - coords[None, :, 1] + window[1] - 1
        patch = (coords[:, None, 0] >= 0) & (coords[None, :, 0] >= 0)
        return torch.where(patch, table[:, dh.clamp(0, 2 * window[0] - 2), dw.clamp(0, 2 * window[1] - 2)], 0.0)

    return lookup


def t5_bucket(distance: Tensor, buckets: int, max_distance: int) -> Tensor:
    """T5's bidirectional bucket of ``distance`` = key position - query position (Raffel et al., mesh-tensorflow)."""
    half = buckets // 2
    bucket = (distance > 0).long() * half
    n = distance.abs()
    exact = half // 2
    large = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return bucket + torch.where(n < exact, n, large.clamp(max=half - 1))


def t5_bias(embedding: Tensor, buckets: int, max_distance: int) -> BiasLookup:
    def lookup(coords: Tensor) -> Tensor:
        distance = coords[None, :, 0] - coords[:, None, 0]
        return embedding[t5_bucket(distance, buckets, max_distance)].permute(2, 0, 1)

    return lookup


# --- the families ---------------------------------------------------------------------------------------------

def _avg_or_class_head(model, prefix: int) -> Callable[[Tensor, Tensor], Tensor]:
    def head(x: Tensor, size: Tensor) -> Tensor:
        x = model.norm(x)
        pooled = size_weighted_mean(x[prefix:], size[prefix:]) if model.global_pool == "avg" else x[0]
        return model.head(model.fc_norm(pooled))

    return head


def timm_beit(model: torch.nn.Module) -> RelEncoder:
    prefix = 1
    window = model.patch_embed.grid_size

    def embed(sample):
        x = model.patch_embed(sample["x"])
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return x[0], torch.ones(x.shape[1], 1)

    def layer(block) -> RelLayer:
        attn = block.attn
        bias = None if attn.q_bias is None else torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        gamma1 = block.gamma_1 if block.gamma_1 is not None else 1.0
        gamma2 = block.gamma_2 if block.gamma_2 is not None else 1.0
        return RelLayer(attn.num_heads, attn.scale, lambda y: F.linear(y, attn.qkv.weight, bias).chunk(3, dim=-1),
                        lambda a: gamma1 * attn.proj(a), lambda t: gamma2 * block.mlp(t), block.norm1, block.norm2,
                        beit_bias(attn.relative_position_bias_table, window))

    return RelEncoder(embed, grid_positions(prefix, *window), [layer(b) for b in model.blocks],
                      _avg_or_class_head(model, prefix))


def timm_relpos(model: torch.nn.Module) -> RelEncoder:
    prefix = model.num_prefix_tokens
    window = model.patch_embed.grid_size

    def embed(sample):
        x = model.patch_embed(sample["x"])
        if model.cls_token is not None:
            x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x[0], torch.ones(x.shape[1], 1)

    def layer(block) -> RelLayer:
        attn = block.attn
        post = type(block).__name__ == "ResPostRelPosBlock"
        out = attn.proj if post else (lambda a: block.ls1(attn.proj(a)))
        mlp = block.mlp if post else (lambda t: block.ls2(block.mlp(t)))
        return RelLayer(attn.num_heads, attn.scale, lambda y: attn.qkv(y).chunk(3, dim=-1), out, mlp, block.norm1,
                        block.norm2, relpos_mlp_bias(attn.rel_pos, window), post_norm=post)

    return RelEncoder(embed, grid_positions(prefix, *window), [layer(b) for b in model.blocks],
                      _avg_or_class_head(model, prefix))


def hf_data2vec_vision(wrapper: torch.nn.Module) -> RelEncoder:
    """transformers Data2VecVisionModel with its per-layer relative position bias (BEiT's table and index)."""
    model = wrapper.model
    config = model.config
    window = (config.image_size // config.patch_size,) * 2

    def layer(block) -> RelLayer:
        a = block.attention.attention
        scale1 = block.lambda_1 if block.lambda_1 is not None else 1.0
        scale2 = block.lambda_2 if block.lambda_2 is not None else 1.0
        return RelLayer(config.num_attention_heads, a.attention_head_size ** -0.5,
                        lambda y: (a.query(y), a.key(y), a.value(y)),
                        lambda t: scale1 * block.attention.output.dense(t),
                        lambda t: scale2 * block.output.dense(block.intermediate.intermediate_act_fn(
                            block.intermediate.dense(t))), block.layernorm_before, block.layernorm_after,
                        beit_bias(a.relative_position_bias.relative_position_bias_table, window))

    def embed(sample):
        x = model.embeddings(sample["pixel_values"])[0][0]
        return x, torch.ones(x.shape[0], 1)

    def head(x, size):
        x = model.layernorm(x)
        return x[0] if wrapper.pooling == "cls" else size_weighted_mean(x, size)

    return RelEncoder(embed, grid_positions(1, *window), [layer(b) for b in model.encoder.layer], head)


def hf_t5_encoder(wrapper: torch.nn.Module) -> RelEncoder:
    """transformers T5EncoderModel (mean pooled over the sizes: pads have size 0): RMS norms without a mean, no
    logit scaling, the first layer's bucketed bias table used by every layer."""
    model = wrapper.model
    config = model.config
    blocks = model.encoder.block
    first = blocks[0].layer[0].SelfAttention
    bias = t5_bias(first.relative_attention_bias.weight, config.relative_attention_num_buckets,
                   config.relative_attention_max_distance)

    def rms(norm) -> Callable[[Tensor], Tensor]:
        return lambda t: norm.weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

    def layer(block) -> RelLayer:
        attention, ff = block.layer[0], block.layer[1]
        a = attention.SelfAttention
        dense = ff.DenseReluDense
        return RelLayer(config.num_heads, 1.0, lambda y: (a.q(y), a.k(y), a.v(y)), a.o,
                        lambda t: dense.wo(dense.act(dense.wi(t))), rms(attention.layer_norm), rms(ff.layer_norm),
                        bias)

    def embed(sample):
        x = model.encoder.embed_tokens(sample["input_ids"])[0]
        return x, sample["attention_mask"][0].float()[:, None]

    def head(x, size):
        return size_weighted_mean(rms(model.encoder.final_layer_norm)(x), size)

    return RelEncoder(embed, None, [layer(b) for b in blocks], head)
