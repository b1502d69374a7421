"""The vision towers of deployed VLMs (Pixtral, Idefics3, SigLIP2 NaFlex, Llama 4, MLCD) one image at a time, each
token carrying its original (row, column) position.

Written from the published rules (tc-export's adapters are not used): each tower's patch embedding as its own module
computes it on the image processor's layout, its position table or rotary angles written out from the formula
(Pixtral: rows use the frequencies ``f[0::2]`` and columns ``f[1::2]`` of ``1 / theta^(2i / head_dim)``, rotate-half;
Llama 4: ``(col + 1) f`` on the first half of the interleaved channel pairs and ``(row + 1) f`` on the second, the
class token (appended last) unrotated; MLCD: ``[row f, col f]`` with ``f = 1 / theta^(2i / (head_dim / 2))``, its
learned ``class_pos_emb`` as the class token's angles, rotate-half), evaluated at each token's carried position (a
merged token's is the size-weighted mean of its members'). Attention, norms and MLPs from the weights. A method
enters through ``step(layer, x, size, pos, keys, probs)`` after each attention residual add, on the tokens between
the protected prefix and suffix. Imports nothing from tc_export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .reference_rotary import Step, attend, unchanged, with_positions


def _heads(t: Tensor, heads: int) -> Tensor:
    n, c = t.shape
    return t.view(n, heads, c // heads).transpose(0, 1)


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def rotate_pairs(x: Tensor) -> Tensor:
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


@dataclass(frozen=True)
class Tower:
    """``embed(image (C, H, W)) -> (N, C)`` tokens in the tower's order; ``angles(pos (n, 2)) -> (n, head_dim)``
    rotary angles of unprotected tokens (None: no rotary) and ``fixed_angles`` those of the protected ones
    (prefix rows then suffix rows); ``layers``: (project y -> q, k, v; out; mlp; norm1; norm2; scale) per layer."""

    embed: Callable[[Tensor], Tensor]
    grid: tuple[int, int]
    heads: int
    layers: list[tuple]
    head: Callable[[Tensor, Tensor, bool], Tensor]
    prefix: int = 0
    suffix: int = 0
    angles: Callable[[Tensor], Tensor] | None = None
    fixed_angles: Tensor | None = None
    rotate: Callable[[Tensor], Tensor] = rotate_half


def grid_positions(rows: int, cols: int) -> Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], dim=-1).float()


def _rope(tower: Tower, pos: Tensor, tokens: int) -> tuple[Tensor, Tensor] | None:
    if tower.angles is None:
        return None
    body = tower.angles(pos[tower.prefix: tokens - tower.suffix])
    fixed = tower.fixed_angles
    angles = torch.cat([fixed[: tower.prefix], body, fixed[tower.prefix:]]) if fixed is not None else body
    return angles.cos(), angles.sin()


def _rotated(tower: Tower, index: int, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Layer ``index``'s queries, keys (rotated at ``pos``) and values of ``x``, in heads (H, N, d)."""
    project, _, _, norm1, _, _ = tower.layers[index]
    q, k, v = (_heads(t, tower.heads) for t in project(norm1(x)))
    rope = _rope(tower, pos, x.shape[0])
    if rope is not None:
        cos, sin = rope
        q, k = ((t.float() * cos + tower.rotate(t.float()) * sin).type_as(t) for t in (q, k))
    return q, k, v


# ``before(layer, x, size, pos, q (N, C), k (N, C))`` where the stream enters a layer, with that layer's full-width
# queries and keys (heads side by side, rotated at the incoming positions): PruMerge's placement
Before = Callable[[int, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


@torch.no_grad()
def run(tower: Tower, pixel_values: Tensor, step: Step = unchanged, prop_attn: bool = True,
        before: Before | None = None) -> tuple[Tensor, list[int]]:
    """The tower on each image of ``pixel_values`` (B, C, H, W); returns the stacked head outputs and the token
    counts seen by each layer and the head (of the last image)."""
    outputs, counts = [], []
    for image in pixel_values:
        x = tower.embed(image)
        pos = torch.cat([torch.full((tower.prefix, 2), -1.0), grid_positions(*tower.grid),
                         torch.full((tower.suffix, 2), -1.0)])
        size = torch.ones(x.shape[0], 1)
        counts = []
        for index, (_, out, mlp, _, norm2, scale) in enumerate(tower.layers):
            if before is not None:
                full = [t.transpose(0, 1).reshape(x.shape[0], -1) for t in _rotated(tower, index, x, pos)[:2]]
                x, size, pos = before(index, x, size, pos, *full)
            counts.append(x.shape[0])
            q, k, v = _rotated(tower, index, x, pos)
            attended, probs = attend(q, k, v, size, prop_attn, scale=scale)
            x = x + out(attended)
            x, size, pos = _before_suffix(step, tower.suffix)(index, x, size, pos, k, probs)
            x = x + mlp(norm2(x))
        counts.append(x.shape[0])
        outputs.append(tower.head(x, size, prop_attn))
    return torch.stack(outputs), counts


def _before_suffix(step: Step, suffix: int) -> Step:
    """``step`` on the tokens in front of the ``suffix`` last ones (keys cut alike; the attention cut to the
    body's keys, every query kept: the attention a token receives counts the suffix's queries too); the suffix
    rejoins after them unchanged (Llama 4's class token, appended last)."""
    if not suffix:
        return step

    def wrapped(i: int, x: Tensor, size: Tensor, pos: Tensor, keys: Tensor, probs: Tensor):
        body = x.shape[0] - suffix
        new_x, new_size, new_pos = step(i, x[:body], size[:body], pos[:body], keys[:, :body],
                                        probs[:, :, :body])  # every query's attention to the body's tokens
        return torch.cat([new_x, x[body:]]), torch.cat([new_size, size[body:]]), torch.cat([new_pos, pos[body:]])

    return wrapped


def merge_step(merge: Callable, r: int, protected: int) -> Step:
    """A merge (``reference.reference_merge`` / ``reference_adjacent``) keyed by the mean key over heads, the
    positions carried through it."""

    def step(i: int, x: Tensor, size: Tensor, pos: Tensor, keys: Tensor, probs: Tensor):
        return with_positions(lambda t, s: merge(t, keys.mean(0), s, r, protected), x, size, pos)

    return step


def _layers(blocks, attention: str, norm1: str, norm2: str, out: str, scale: Callable) -> list[tuple]:
    layers = []
    for block in blocks:
        a = getattr(block, attention)
        layers.append((lambda y, a=a: (a.q_proj(y), a.k_proj(y), a.v_proj(y)), getattr(a, out),
                       block.mlp if hasattr(block, "mlp") else block.feed_forward, getattr(block, norm1),
                       getattr(block, norm2), scale(a)))
    return layers


def pixtral(tower: torch.nn.Module, size: int) -> Tower:
    """PixtralVisionModel on one image filling (size x size): conv, row-major tokens, ln_pre (RMSNorm), 2-D rope."""
    config = tower.config
    side = size // config.patch_size
    hd = config.hidden_size // config.num_attention_heads
    f = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))

    def angles(pos: Tensor) -> Tensor:
        half = torch.cat([pos[:, :1] * f[0::2], pos[:, 1:] * f[1::2]], dim=-1)
        return torch.cat([half, half], dim=-1)

    def embed(image: Tensor) -> Tensor:
        return tower.ln_pre(tower.patch_conv(image[None]).flatten(2)[0].T)

    blocks = tower.transformer.layers
    layers = _layers(blocks, "attention", "attention_norm", "ffn_norm", "o_proj", lambda a: hd ** -0.5)
    return Tower(embed, (side, side), config.num_attention_heads, layers, lambda x, s, p: x, angles=angles)


def idefics3(tower: torch.nn.Module) -> Tower:
    """Idefics3VisionTransformer on one full tile: conv, the position table in row-major order (a full tile's
    bucketed fractional coordinates are the grid itself), SigLIP layers, post_layernorm."""
    config = tower.config
    side = config.image_size // config.patch_size
    e = tower.embeddings

    def embed(image: Tensor) -> Tensor:
        return e.patch_embedding(image[None]).flatten(2)[0].T + e.position_embedding.weight[: side * side]

    hd = config.hidden_size // config.num_attention_heads
    layers = _layers(tower.encoder.layers, "self_attn", "layer_norm1", "layer_norm2", "out_proj", lambda a: hd ** -0.5)
    return Tower(embed, (side, side), config.num_attention_heads, layers,
                 lambda x, s, p: tower.post_layernorm(x))


def siglip2(tower: torch.nn.Module, size: int, pooling: str = "pooler") -> Tower:
    """Siglip2VisionModel on one image at (size x size): the image processor's own patch layout
    (``convert_image_to_patches``), the tower's own embedding module at that spatial shape (its resized table),
    SigLIP layers, post_layernorm and the attention-pooling head over the sized tokens."""
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    config = tower.config
    side = size // config.patch_size
    hd = config.hidden_size // config.num_attention_heads

    def embed(image: Tensor) -> Tensor:
        patches = convert_image_to_patches(image, config.patch_size)[None]
        return tower.embeddings(patches, torch.tensor([[side, side]]))[0]

    def head(x: Tensor, size_: Tensor, prop_attn: bool) -> Tensor:
        x = tower.post_layernorm(x)
        if pooling == "tokens":
            return x
        pool = tower.head
        mha = pool.attention
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        probe = pool.probe[0]
        q = _heads(probe @ wq.T + bq, mha.num_heads)
        k, v = (_heads(x @ w.T + b, mha.num_heads) for w, b in ((wk, bk), (wv, bv)))
        attended, _ = attend(q, k, v, size_, prop_attn)
        h = mha.out_proj(attended)
        return (h + pool.mlp(pool.layernorm(h)))[0]

    layers = _layers(tower.encoder.layers, "self_attn", "layer_norm1", "layer_norm2", "out_proj", lambda a: hd ** -0.5)
    return Tower(embed, (side, side), config.num_attention_heads, layers, head)


def llama4(tower: torch.nn.Module) -> Tower:
    """Llama4VisionModel up to layernorm_post (the tokens its pixel shuffle reads): unfold + Linear patches, the class
    token appended last, the learned position table, layernorm_pre, layers with the interleaved-pair rope."""
    config = tower.config
    side = config.image_size // config.patch_size
    hd = config.hidden_size // config.num_attention_heads
    freq_dim = hd // 2
    f = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, freq_dim, 2)[: freq_dim // 2].float() / freq_dim))

    def angles(pos: Tensor) -> Tensor:
        pairs = torch.cat([(pos[:, 1:] + 1) * f, (pos[:, :1] + 1) * f], dim=-1)  # (col, row) halves of the pairs
        return pairs.repeat_interleave(2, dim=-1)

    def embed(image: Tensor) -> Tensor:
        unfolded = torch.nn.functional.unfold(image[None], config.patch_size, stride=config.patch_size)[0].T
        x = torch.cat([tower.patch_embedding.linear(unfolded), tower.class_embedding[None]])
        return tower.layernorm_pre(x + tower.positional_embedding_vlm)

    layers = _layers(tower.model.layers, "self_attn", "input_layernorm", "post_attention_layernorm", "o_proj",
                     lambda a: hd ** -0.5)
    return Tower(embed, (side, side), config.num_attention_heads, layers,
                 lambda x, s, p: tower.layernorm_post(x)[:-1], suffix=1, angles=angles,
                 fixed_angles=torch.zeros(1, hd), rotate=rotate_pairs)


def mlcd(tower: torch.nn.Module) -> Tower:
    """MLCDVisionModel's pooler output: class token first, pre_layrnorm, rope [row f, col f] (class token: its learned
    class_pos_emb), layers, post_layernorm of token 0."""
    config = tower.config
    side = config.image_size // config.patch_size
    hd = config.hidden_size // config.num_attention_heads
    spatial = hd // 2
    f = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, spatial, 2).float() / spatial))

    def angles(pos: Tensor) -> Tensor:
        half = torch.cat([pos[:, :1] * f, pos[:, 1:] * f], dim=-1)
        return torch.cat([half, half], dim=-1)

    def embed(image: Tensor) -> Tensor:
        e = tower.embeddings
        x = torch.cat([e.class_embedding[None], e.patch_embedding(image[None]).flatten(2)[0].T])
        return tower.pre_layrnorm(x)

    cls = tower.class_pos_emb.detach()
    layers = _layers(tower.encoder.layers, "self_attn", "layer_norm1", "layer_norm2", "out_proj", lambda a: hd ** -0.5)
    return Tower(embed, (side, side), config.num_attention_heads, layers,
                 lambda x, s, p: tower.post_layernorm(x[0]), prefix=1, angles=angles,
                 fixed_angles=torch.cat([cls, cls], dim=-1))


# --- entry points of the support matrix: (module tc-export loaded, pixel_values, step, prop_attn) ----------------

def _size(pixel_values: Tensor) -> int:
    return pixel_values.shape[-1]


def run_pixtral(module, pixel_values, step, prop_attn, before=None):
    return run(pixtral(module.tower, _size(pixel_values)), pixel_values, step, prop_attn, before)


def run_idefics3(module, pixel_values, step, prop_attn, before=None):
    return run(idefics3(module.tower), pixel_values, step, prop_attn, before)


def run_siglip2(module, pixel_values, step, prop_attn, before=None):
    return run(siglip2(module.tower, _size(pixel_values), module.pooling), pixel_values, step, prop_attn, before)


def run_llama4(module, pixel_values, step, prop_attn, before=None):
    return run(llama4(module.tower), pixel_values, step, prop_attn, before)


def run_mlcd(module, pixel_values, step, prop_attn, before=None):
    return run(mlcd(module.model), pixel_values, step, prop_attn, before)
