"""Rotary encoders rewritten one sample at a time, each token carrying its original position.

The rotary tables are the models' own: timm's rope modules (axial, mixed, EVA-02, DINOv3, PE) build their
coordinate grid with ``_build_grid`` and the rest from it; here that grid is evaluated at each token's carried
coordinates (the model's grid is affine in the patch index, so a fractional position is the same affine map), and
the model's own frequency code turns it into sin/cos. transformers' ModernBERT takes its position ids directly
(and its sliding-window layers count their window in them); transformers' DINOv3ViT's patch-centre grid is evaluated
at the carried coordinates like timm's.
Attention, norms and MLPs are written from the weights. A method enters through ``step(layer, x, size, pos, keys,
probs)`` after each attention residual add, as tc-export places ToMe and Top-K; a merged token's position is the
size-weighted mean of its members' (carried as extra columns of ``x`` through the merge), a kept token's is its
own. Imports nothing from tc_export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

Step = Callable[[int, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def unchanged(i: int, x: Tensor, size: Tensor, pos: Tensor, keys: Tensor, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x, size, pos


def with_positions(method: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, size: Tensor,
                   pos: Tensor, fused: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Run a token method on ``x`` with the positions as extra columns: merged rows get their size-weighted mean,
    gathered rows keep theirs. ``fused``: the method appends one token summing the pruned ones (EViT), whose
    position is the size-weighted mean of the pruned tokens' positions."""
    index = torch.arange(x.shape[0], dtype=x.dtype)[:, None]
    out, out_size = method(torch.cat([x, pos, index], dim=-1), size)
    width = x.shape[1]
    new_x, new_pos = out[:, :width], out[:, width:-1]
    if fused:
        kept = {int(i) for i in out[:-1, -1].round()}
        pruned = [i for i in range(x.shape[0]) if i not in kept]
        weights = size[pruned]
        new_pos = torch.cat([new_pos[:-1], (pos[pruned] * weights).sum(0, keepdim=True) / weights.sum()])
    return new_x, out_size, new_pos


def attend(q: Tensor, k: Tensor, v: Tensor, size: Tensor, prop_attn: bool, scale: float | None = None,
           mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(H, N, d) queries/keys/values of one sample; log(size) of each key with proportional attention."""
    logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if prop_attn:
        logits = logits + size[:, 0].log()
    if mask is not None:
        logits = logits + mask
    probs = logits.softmax(dim=-1)
    return (probs @ v).transpose(0, 1).reshape(q.shape[1], -1), probs


# --- timm (Eva: RoPE ViTs, EVA-02, DINOv3, PE) ----------------------------------------------------------------------

@contextlib.contextmanager
def timm_grid_at(coords: Tensor) -> Iterator[None]:
    """timm's rope grid evaluated at ``coords`` (n, 2) (row, column) instead of the whole feature map: the model's
    own grid for its feature shape, extended affinely (it is affine in the patch index by construction)."""
    import timm.layers.pos_embed_sincos as sincos

    original = sincos._build_grid

    def grid(feat_shape, *args, **kwargs):  # noqa: ANN001, ANN202
        full = original(list(timm_grid_at.feat_shape), *args, **kwargs)  # (H, W, 2)
        origin, down, right = full[0, 0], full[1, 0] - full[0, 0], full[0, 1] - full[0, 0]
        points = origin + coords[:, :1].to(full.dtype) * down + coords[:, 1:2].to(full.dtype) * right
        return points.reshape(coords.shape[0], 1, 2)

    sincos._build_grid = grid
    try:
        yield
    finally:
        sincos._build_grid = original


def timm_rope(model: torch.nn.Module, coords: Tensor) -> Tensor:
    """The model's rope embedding ([sin, cos] concatenated) at ``coords``: (n, 2*dim), or (depth, H, n, 2*dim) for
    mixed ropes."""
    rope = model.rope
    timm_grid_at.feat_shape = tuple(model.patch_embed.grid_size)
    with timm_grid_at(coords):
        if type(rope).__name__ == "RotaryEmbeddingCat":
            return rope._build_embed_cat([coords.shape[0], 1], rope.bands)
        return rope.get_embed(shape=[coords.shape[0], 1])


def _rotate(x: Tensor, half: bool) -> Tensor:
    if half:
        a, b = x.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)


def _apply_rope(x: Tensor, embed: Tensor, half: bool) -> Tensor:
    sin, cos = embed.chunk(2, dim=-1)
    return x * cos + _rotate(x, half) * sin


def _eva_qkv(attn: torch.nn.Module, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if getattr(attn, "qkv", None) is not None:
        weight, bias = attn.qkv.weight, attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        return torch.nn.functional.linear(y, weight, bias).chunk(3, dim=-1)
    return attn.q_proj(y), attn.k_proj(y), attn.v_proj(y)


def _heads(t: Tensor, heads: int) -> Tensor:
    n, c = t.shape
    return t.view(n, heads, c // heads).transpose(0, 1)


def _full(t: Tensor) -> Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _eva_attention_inputs(model: torch.nn.Module, block: torch.nn.Module, index: int, x: Tensor, pos: Tensor,
                          prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """(H, N, d) queries and keys rotated at the tokens' positions (the prefix is not rotated), and values."""
    attn = block.attn
    embed = timm_rope(model, pos[prefix:])
    if embed.dim() == 4:
        embed = embed[index]  # mixed: per layer and head
    q, k, v = (_heads(t, attn.num_heads) for t in _eva_qkv(attn, block.norm1(x)))
    q, k = attn.q_norm(q), attn.k_norm(k)
    half = getattr(attn, "rotate_half", False)
    q = torch.cat([q[:, :prefix], _apply_rope(q[:, prefix:], embed, half)], dim=1)
    k = torch.cat([k[:, :prefix], _apply_rope(k[:, prefix:], embed, half)], dim=1)
    return q, k, v


@torch.no_grad()
def run_timm_eva(model: torch.nn.Module, images: Tensor, step: Step, prop_attn: bool,
                 before: Step | None = None) -> tuple[Tensor, list[int]]:
    """A timm Eva model (any rope type) per sample; ``step`` after each attention residual add, ``before`` where
    the stream enters each block (with that block's full-width q and k instead of keys and probabilities)."""
    prefix = model.num_prefix_tokens
    h, w = model.patch_embed.grid_size
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    grid = torch.stack([r.flatten(), c.flatten()], dim=-1).float()
    outputs, counts = [], []
    for image in images:
        x, _ = model._pos_embed(model.patch_embed(image[None]))
        x = model.norm_pre(x)[0]
        size = torch.ones(x.shape[0], 1)
        pos = torch.cat([-torch.ones(prefix, 2), grid])
        counts = []
        for index, block in enumerate(model.blocks):
            attn = block.attn
            if before is not None:  # PruMerge: full-width q and k as the attention sees them (normed, rotated)
                q, k, _ = _eva_attention_inputs(model, block, index, x, pos, prefix)
                x, size, pos = before(index, x, size, pos, _full(q), _full(k))
            counts.append(x.shape[0])
            q, k, v = _eva_attention_inputs(model, block, index, x, pos, prefix)
            attended, probs = attend(q, k, v, size, prop_attn)
            out = attn.proj(attn.norm(attended))
            x = x + (block.gamma_1 * out if block.gamma_1 is not None else out)
            x, size, pos = step(index, x, size, pos, k, probs)
            out = block.mlp(block.norm2(x))
            x = x + (block.gamma_2 * out if block.gamma_2 is not None else out)
        counts.append(x.shape[0])
        outputs.append(_timm_head(model, x, size, prefix, prop_attn))
    return torch.stack(outputs), counts


def _timm_head(model: torch.nn.Module, x: Tensor, size: Tensor, prefix: int, prop_attn: bool) -> Tensor:
    x = model.norm(x)
    if getattr(model, "attn_pool", None) is not None:  # PE: a MAP head over all tokens with their sizes
        from .reference_encoders import attention_pool

        return model.head(model.fc_norm(attention_pool(model.attn_pool, x, size, prop_attn)))
    if model.global_pool == "avg":
        x = (x[prefix:] * size[prefix:]).sum(0) / size[prefix:].sum()
    else:
        x = x[0]
    return model.head(model.fc_norm(x))


# --- transformers ModernBERT (1-D, padded, global and sliding-window layers) ------------------------------------

WINDOW_ROUNDING = 1e-4  # a merged position is a float mean: a key at distance w plus rounding is inside the window


def attend_masked(q: Tensor, k: Tensor, v: Tensor, size: Tensor, prop_attn: bool,
                  allowed: Tensor | None) -> tuple[Tensor, Tensor]:
    """``attend`` with pads (size 0) hidden from every query and ``allowed`` (N, N) the keys each query may see; a
    pad query that sees no key attends nothing (its row carries no weight anywhere)."""
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    present = size[:, 0] > 0
    logits = logits + (size[:, 0].log() if prop_attn else torch.where(present, 0.0, float("-inf")))
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    blind = torch.isinf(logits).all(dim=-1, keepdim=True)
    probs = torch.where(blind, 0.0, logits.softmax(dim=-1))
    return (probs @ v).transpose(0, 1).reshape(q.shape[1], -1), probs


@torch.no_grad()
def run_modernbert(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, step: Step, prop_attn: bool,
                   window_at: str = "carried") -> tuple[Tensor, list[int]]:
    """transformers' ModernBertModel (the wrapper's ``.model`` or the model itself) per sample, mean pooled over the
    real tokens by size. Sizes start from the attention mask (a pad has size 0: no attention, no weight). Positions
    are the indices; the model's own rotary module turns the carried (fractional) position ids into cos/sin with
    each layer's theta. A sliding-window layer (``config.sliding_window`` = local_attention // 2) lets query i see
    key j when ``|pos_i - pos_j| <= sliding_window``, at the carried positions (``window_at="carried"``); the
    mutations ``"row"`` (by the current row index) and ``"none"`` (no window) are what a pass that forgot the
    positions or the window would compute."""
    model = model if hasattr(model, "layers") else model.model
    config = model.config
    heads = config.num_attention_heads
    outputs, counts = [], []
    for ids, mask in zip(input_ids, attention_mask):
        x = model.embeddings(input_ids=ids[None])[0]
        size = mask[:, None].float()
        pos = torch.arange(x.shape[0]).float()[:, None]
        counts = []
        for index, layer in enumerate(model.layers):
            counts.append(x.shape[0])
            attn = layer.attn
            q, k, v = (_heads(t, heads) for t in attn.Wqkv(layer.attn_norm(x)).chunk(3, dim=-1))
            layer_type = config.layer_types[index]
            cos, sin = model.rotary_emb(x[None], pos[:, 0][None], layer_type)
            q = q * cos + _rotate(q, True) * sin
            k = k * cos + _rotate(k, True) * sin
            allowed = None
            if layer_type == "sliding_attention" and window_at != "none":
                where = pos[:, 0] if window_at == "carried" else torch.arange(x.shape[0]).float()
                allowed = (where[:, None] - where[None, :]).abs() <= config.sliding_window + WINDOW_ROUNDING
            attended, probs = attend_masked(q, k, v, size, prop_attn, allowed)
            x = x + attn.Wo(attended)
            x, size, pos = step(index, x, size, pos, k, probs)
            x = x + layer.mlp(layer.mlp_norm(x))
        counts.append(x.shape[0])
        x = model.final_norm(x)
        outputs.append((x * size).sum(0) / size.sum())
    return torch.stack(outputs), counts


# --- transformers DINOv3ViT (2-D, class + registers, layer scale) ------------------------------------------------

@contextlib.contextmanager
def hf_dinov3_coords_at(coords: Tensor) -> Iterator[None]:
    """transformers' DINOv3ViT patch-centre coordinates (normalised to [-1, 1]) evaluated at ``coords`` (n, 2)
    (row, column): the model's own grid, extended affinely (it is affine in the patch index by construction)."""
    import transformers.models.dinov3_vit.modeling_dinov3_vit as dinov3

    original = dinov3.get_patches_center_coordinates

    def at(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        full = original(height, width, dtype, device).reshape(height, width, 2)
        origin, down, right = full[0, 0], full[1, 0] - full[0, 0], full[0, 1] - full[0, 0]
        return origin + coords[:, :1].to(dtype) * down + coords[:, 1:2].to(dtype) * right

    dinov3.get_patches_center_coordinates = at
    try:
        yield
    finally:
        dinov3.get_patches_center_coordinates = original


@torch.no_grad()
def run_hf_dinov3(model: torch.nn.Module, pixel_values: Tensor, step: Step,
                  prop_attn: bool) -> tuple[Tensor, list[int]]:
    """transformers' DINOv3ViTModel (the wrapper's ``.model`` or the model itself) per sample, returning the
    pooler output (the normed class token). The class and register tokens are not rotated; each patch token is
    rotated by the model's own rope module (in eval mode: no coordinate augmentation) at its carried position.
    Layer scale on both residual branches."""
    model = model if hasattr(model, "rope_embeddings") else model.model
    config = model.config
    prefix = 1 + config.num_register_tokens
    h, w = pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    grid = torch.stack([r.flatten(), c.flatten()], dim=-1).float()
    heads = config.num_attention_heads
    outputs, counts = [], []
    for image in pixel_values:
        x = model.embeddings(image[None])[0]
        size = torch.ones(x.shape[0], 1)
        pos = torch.cat([-torch.ones(prefix, 2), grid])
        counts = []
        for index, layer in enumerate(model.model.layer):
            counts.append(x.shape[0])
            attn = layer.attention
            y = layer.norm1(x)
            q, k, v = (_heads(t, heads) for t in (attn.q_proj(y), attn.k_proj(y), attn.v_proj(y)))
            with hf_dinov3_coords_at(pos[prefix:]):
                cos, sin = model.rope_embeddings(image[None])
            q = torch.cat([q[:, :prefix], q[:, prefix:] * cos + _rotate(q[:, prefix:], True) * sin], dim=1)
            k = torch.cat([k[:, :prefix], k[:, prefix:] * cos + _rotate(k[:, prefix:], True) * sin], dim=1)
            attended, probs = attend(q, k, v, size, prop_attn)
            x = x + layer.layer_scale1(attn.o_proj(attended))
            x, size, pos = step(index, x, size, pos, k, probs)
            x = x + layer.layer_scale2(layer.mlp(layer.norm2(x)))
        counts.append(x.shape[0])
        outputs.append(model.norm(x)[0])
    return torch.stack(outputs), counts


# --- transformers Qwen2-VL vision tower (2x2 merge-window order, cu_seqlens attention) ------------------------------

@torch.no_grad()
def run_qwen2_vl(tower: torch.nn.Module, pixel_values: Tensor, step: Step,
                 prop_attn: bool) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """transformers' Qwen2VisionTransformerPretrainedModel per image, ending at its last block (before the
    PatchMerger): the image processor's own ``patchify`` (the frame repeated over the temporal patch, tokens in
    2x2 merge-window order), the tower's own ``patch_embed`` and position ids (``get_vision_position_ids``), the
    tokens then sorted by those ids into row-major order (ToMe's alternating split is taken over that order, as
    tc-export takes it over the patch grid). Each block: its own norms, qkv, proj and MLP, and its own rotary module
    and ``apply_rotary_pos_emb_vision`` evaluated at the carried positions (fractional for merged tokens).
    Returns the last block's tokens, their positions and sizes (B, n, .) and the token counts per layer."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_position_ids

    config = tower.config
    patches, rows, cols = Qwen2VLImageProcessor().patchify(
        pixel_values, patch_size=config.patch_size, merge_size=config.spatial_merge_size,
        temporal_patch_size=config.temporal_patch_size)
    ids = get_vision_position_ids(torch.tensor([[1, rows, cols]]), config.spatial_merge_size)
    row_major = torch.argsort(ids[:, 0] * cols + ids[:, 1])
    heads = config.num_heads
    outputs, positions, sizes, counts = [], [], [], []
    for sample in patches:
        x = tower.patch_embed(sample)[row_major]
        pos = ids[row_major].float()
        size = torch.ones(x.shape[0], 1)
        counts = []
        for index, block in enumerate(tower.blocks):
            counts.append(x.shape[0])
            attn = block.attn
            q, k, v = attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = tower.rotary_pos_emb(x, pos)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, n, head_dim)
            attended, probs = attend(q, k, v, size, prop_attn, scale=attn.scaling)
            x = x + attn.proj(attended)
            x, size, pos = step(index, x, size, pos, k, probs)
            x = x + block.mlp(block.norm2(x))
        counts.append(x.shape[0])
        outputs.append(x)
        positions.append(pos)
        sizes.append(size)
    return torch.stack(outputs), torch.stack(positions), torch.stack(sizes), counts


# --- transformers RoFormer (1-D sinusoidal rotary, eager attention with an additive padding mask, post-norm) --------

def _rotate_pairs(x: Tensor) -> Tensor:
    """RoFormer's rotation of interleaved pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape_as(x)


def roformer_angles(pos: Tensor, dim: int) -> Tensor:
    """The rotary angles (N, dim / 2) at positions ``pos`` (N, 1): pos / 10000^(2j / dim), RoFormer's sinusoids."""
    return pos * (1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


@torch.no_grad()
def run_roformer(model: torch.nn.Module, inputs: dict[str, Tensor], step: Step, prop_attn: bool
                 ) -> tuple[Tensor, list[int]]:
    """transformers' RoFormerModel (the wrapper's ``.model`` or the model) per sample, mean pooled over the real
    tokens by size. Sizes start from the attention mask; each token's rotary angles are RoFormer's sinusoids at its
    carried (for a merged token, size-weighted mean) position. Post-norm layers: the method runs after the
    attention's residual add and its LayerNorm, where the stream feeds the MLP."""
    model = model if hasattr(model, "encoder") else model.model
    config = model.config
    heads = config.num_attention_heads
    dim = config.hidden_size // heads
    outputs, counts = [], []
    types = inputs.get("token_type_ids", torch.zeros_like(inputs["input_ids"]))
    for ids, mask, kinds in zip(inputs["input_ids"], inputs["attention_mask"], types):
        x = model.embeddings(input_ids=ids[None], token_type_ids=kinds[None])[0]
        if hasattr(model, "embeddings_project"):
            x = model.embeddings_project(x)
        size = mask[:, None].float()
        pos = torch.arange(x.shape[0]).float()[:, None]
        counts = []
        for index, layer in enumerate(model.encoder.layer):
            counts.append(x.shape[0])
            attn = layer.attention.self
            q, k, v = (_heads(projection(x), heads) for projection in (attn.query, attn.key, attn.value))
            angles = roformer_angles(pos, dim)
            sin, cos = angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)
            q, k = q * cos + _rotate_pairs(q) * sin, k * cos + _rotate_pairs(k) * sin
            attended, probs = attend_masked(q, k, v, size, prop_attn, None)
            x = layer.attention.output.LayerNorm(x + layer.attention.output.dense(attended))
            x, size, pos = step(index, x, size, pos, k, probs)
            x = layer.output.LayerNorm(x + layer.output.dense(layer.intermediate(x)))
        counts.append(x.shape[0])
        outputs.append((x * size).sum(0) / size.sum())
    return torch.stack(outputs), counts
