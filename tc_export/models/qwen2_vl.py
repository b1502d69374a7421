"""Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's vision towers as fixed-size image models.

Each tower takes flattened patches in 2x2 merge-window order plus ``grid_thw`` and attends within each image
through ``cu_seqlens``; its PatchMerger then concatenates every 4 consecutive tokens (one 2x2 window). The adapter
gives the token passes an ordinary model instead, built from the tower's own modules:

* pixel_values (B, 3, H, W) at a fixed size (a multiple of patch_size * spatial_merge_size): the frame repeated
  ``temporal_patch_size`` times, as the image processor does, and the tower's own Conv3d patch embedding run on it
  as one volume (B, 3, T, H, W) -> (B, C, 1, H/p, W/p). Each output cell reads exactly the patch the processor
  flattens, so the tokens come out in raster order, with their grid visible to the passes. Qwen3-VL adds its
  learned position table resampled to the grid with its own taps and weights (constants, permuted to raster order).
* the tower's own blocks, batch first, full attention within each image (what ``cu_seqlens`` does with one image
  per sequence), its own rotary module evaluated at its own position ids (``get_vision_position_ids``) permuted
  from window order to raster order: a table the rotary finder fits as affine in (row, column).
* Qwen2.5-VL: attention windows of ``window_size`` px (8x8 patches = 4x4 merge units) except in
  ``fullatt_block_indexes``: queries, keys and values gathered to the tower's own window order
  (``get_vision_window_index``) and the windows folded into the heads (ONNX attention is 4-D). Edge windows:
  an image side that is not a multiple of ``window_size`` is refused (the tower's shorter edge windows would need
  per-window padding masks, not built).
* ``pooler`` (default): the tokens permuted back to window order and the tower's own merger forward on each image:
  equal to the tower's ``pooler_output`` on the processor's patches (Qwen2.5-VL's reverse window order included:
  the output is in raster order of the merged grid). Qwen3-VL adds one output per ``deepstack_visual_indexes``
  layer (``deepstack_<layer>``: that layer's stream through its own merger). ``tokens``: the last block's tokens in
  raster order (the tower's ``last_hidden_state`` reordered).

Compression (docs/qwen-vl.md): with the default pooling the export is the ``tokens`` adapter followed by the merger
as a projector at merge units (``TowerMergerConfig``), so the token methods act on whole 2x2 units (Qwen3-VL: each
deepstack layer's stream carried with the same unit decisions, then its own merger, ``DeepstackMerger``); the
``WindowMerger`` of the plain adapter is marked (``tc_export_refuses_compression``). Qwen2.5-VL's compressed path
(``window_stream``) expects the token pass to put the stream in window-then-unit order (``window_units``): its
windowed blocks then only fold the windows into the heads, which holds after pruning with the same number of units
in every window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.projectors.base import Grid, Projector
from ..ops.state import unit_window_order
from ..passes.opaque import REFUSAL_ATTRIBUTE, TOKEN_GRID_ATTRIBUTE
from ..passes.projectors import PatchMergerConfig
from .base import InputSpec, LoadedModel
from .registry import ModelOptions

MERGER_REFUSAL = ("{family}'s PatchMerger concatenates each 2x2 window of 4 consecutive tokens, and merged or "
                  "pruned tokens no longer form those windows in this raster-order module; compress the loaded model "
                  "(load_model('hf:DIR'), or the command line), whose merger follows at 2x2 merge units")
DEEPSTACK_REFUSAL = ("Qwen3-VL's deepstack output of layer {layer} (that layer's stream through its own merger, added "
                     "into the language model at the same visual positions) needs the same unit decisions as the "
                     "merger's output, which this raster-order adapter's mergers cannot follow: compress the tower "
                     "loaded from hf:DIR with its own mergers (the default pooling carries the deepstack streams)")
POOLINGS = {"pooler": "pooler_output", "tokens": "last_hidden_state"}
DEFAULT_GRID_UNITS = 8  # default image side: 8 merge windows (224 px for patch 14, merge 2)


def window_positions(tower: nn.Module, rows: int, cols: int) -> torch.Tensor:
    """The tower's own (h, w) position ids (N, 2) of one image, in its 2x2 merge-window token order."""
    from transformers.vision_utils import get_vision_position_ids

    return get_vision_position_ids(torch.tensor([[1, rows, cols]]), tower.spatial_merge_size).long()


class WindowMerger(nn.Module):
    """One of the tower's PatchMergers on (B, N, C) raster-order tokens: back to window order, then the merger's
    own forward on the image's tokens flattened (its ``view(-1, 4C)`` takes each 4 consecutive tokens)."""

    def __init__(self, merger: nn.Module, to_window: torch.Tensor, family: str, refusal: str | None = None,
                 merged_grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.merger = merger
        # On this wrapper, not the merger: the compressed path runs the same merger as a projector (TowerMerger).
        setattr(self, REFUSAL_ATTRIBUTE, refusal or MERGER_REFUSAL.format(family=family))
        if merged_grid is not None:  # its output: one token per 2x2 window, in raster order of the merged grid (what
            last = [module for module in merger.modules() if not list(module.children())][-1]  # EVS reads), on its
            setattr(last, TOKEN_GRID_ATTRIBUTE, merged_grid)  # last layer: the trace names the tower's own modules
        self.register_buffer("to_window", to_window, persistent=False)
        # and on its window gather, which a trace of the bare module keeps while it rebuilds this wrapper empty
        setattr(self.to_window, REFUSAL_ATTRIBUTE, getattr(self, REFUSAL_ATTRIBUTE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windowed = x[:, self.to_window]
        merged = self.merger(windowed.reshape(-1, x.shape[-1]))
        return merged.reshape(x.shape[0], -1, merged.shape[-1])


def merge_windows(merger: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """(B, U, s*s, C) windows in the tower's 2x2 order -> (B, U, D): a Qwen-VL merger's own forward on them."""
    merged = merger(windows.reshape(-1, windows.shape[-1]))
    return merged.reshape(windows.shape[0], windows.shape[1], merged.shape[-1])


class DeepstackMerger(nn.Module):
    """One of Qwen3-VL's deepstack mergers on the windows of the final units (B, U, s*s, C) -> (B, U, D): its
    layer's tokens carried with the same unit decisions as the stream (``TokenPass.taps``)."""

    def __init__(self, merger: nn.Module) -> None:
        super().__init__()
        self.merger = merger

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return merge_windows(self.merger, windows)


class TowerMerger(Projector):
    """The tower's own merger as a window projector: (B, H*W, C) raster tokens -> (B, H/s * W/s, D), and at merge
    units (``window_forward``) each unit's s x s tokens -> one token, so it follows unit compression
    (docs/qwen-vl.md). ``lm_positions``: emitted positions are given in the language model's (t, h, w)."""

    name = "merger"
    lm_positions = True

    def __init__(self, channels: int, grid: tuple[int, int] | tuple[int], prefix: int, *, merger: nn.Module,
                 family: str, merge: int) -> None:
        super().__init__(channels, grid, prefix)
        h, w = self.require_2d()
        self.merger, self.family, self.block = merger, family, merge
        self.out_grid: Grid = (h // merge, w // merge)
        self.register_buffer("order", unit_window_order((h, w), merge), persistent=False)
        self.width = [m for m in merger.modules() if isinstance(m, nn.Linear)][-1].out_features

    def window_forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, U, s*s, C) windows in the tower's 2x2 order -> (B, U, D): the merger's own forward on them."""
        return merge_windows(self.merger, windows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        windows = x[:, self.prefix:][:, self.order]
        return self.window_forward(windows.reshape(x.shape[0], -1, self.block * self.block, x.shape[-1]))

    def tokens_out(self) -> int:
        return self.out_grid[0] * self.out_grid[1]

    def channels_out(self) -> int:
        return self.width

    def output_grid(self) -> Grid:
        return self.out_grid

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, family={self.family}, merge={self.block}"


@dataclass(frozen=True)
class TowerMergerConfig(PatchMergerConfig):
    """The last stage of a compressed Qwen-VL tower: a patchmerger that is the tower's own merger module (so not a
    method of its own on the command line). A token method before it acts on units of ``merge`` x ``merge``."""

    projector: ClassVar[type[Projector]] = TowerMerger

    merger: nn.Module | None = field(default=None, compare=False, repr=False)
    family: str = "Qwen2-VL"
    merge: int = 2
    window_units: int | None = None  # Qwen2.5-VL: attention windows of this many units a side (the pass's order)
    # Qwen3-VL: (layer, DeepstackMerger) for each deepstack layer: that layer's tokens, carried with the same unit
    # decisions, through its own merger, as outputs after the merger's (``TokenPass.taps``)
    deepstack: tuple[tuple[int, nn.Module], ...] = field(default=(), compare=False, repr=False)

    def window(self) -> int | None:
        return self.merge

    def settings(self) -> dict[str, Any]:
        return {"merger": self.merger, "family": self.family, "merge": self.merge}


class QwenVisionAdapter(nn.Module):
    """pixel_values (B, 3, H, W) -> the tower's merger output (``pooling="pooler"``) or last block's tokens.

    The stream stays in raster order (the passes see the patch grid); ``windows`` (Qwen2.5-VL): the blocks not in
    ``full_attention`` attend within each window, their queries, keys and values gathered to the tower's own
    window order (``window_tokens``) and reshaped to (B, H x windows, tokens per window, d). Qwen3-VL: its learned
    position table resampled to the grid is added after the patch embedding, and with ``pooler`` the stream after
    each of ``deepstack_visual_indexes`` goes through its own merger: further outputs after the merger's."""

    def __init__(self, tower: nn.Module, image_size: int, pooling: str = "pooler",
                 window_tokens: torch.Tensor | None = None, full_attention: tuple[int, ...] = (),
                 family: str = "Qwen2-VL", window_stream: bool = False) -> None:
        super().__init__()
        config = tower.config
        self.tower, self.pooling = tower, pooling
        self.grouped_input = False  # True: inputs are (B, temporal, 3, H, W) groups of video frames
        self.patch_size, self.temporal = config.patch_size, config.temporal_patch_size
        self.rows = self.cols = image_size // config.patch_size
        self.heads = config.num_heads
        ids = window_positions(tower, self.rows, self.cols)
        to_raster = torch.argsort(ids[:, 0] * self.cols + ids[:, 1])  # raster token i is window token to_raster[i]
        self.register_buffer("position_ids", ids[to_raster], persistent=False)
        to_window = torch.argsort(to_raster)
        merged = (self.rows // config.spatial_merge_size, self.cols // config.spatial_merge_size)
        self.window_merger = WindowMerger(tower.merger, to_window, family, merged_grid=merged) \
            if pooling == "pooler" else None
        deepstack = list(getattr(tower, "deepstack_visual_indexes", None) or []) if pooling == "pooler" else []
        self.deepstack = {layer: WindowMerger(merger, to_window, family, DEEPSTACK_REFUSAL.format(layer=layer))
                          for layer, merger in zip(deepstack, tower.deepstack_merger_list)} if deepstack else {}
        if deepstack and self.window_merger is not None:  # compressing would shorten the merger's output only
            setattr(self.window_merger, REFUSAL_ATTRIBUTE, DEEPSTACK_REFUSAL.format(layer=deepstack[0]))
        self.deepstack_mergers = nn.ModuleList(self.deepstack.values())
        self.full_attention = frozenset(full_attention)
        # the token pass puts the stream in window-then-unit order before the first block (TowerMergerConfig's
        # window_units): the windowed blocks then only fold the windows into the heads, which holds after pruning
        self.window_stream = window_stream
        self.windows = 0 if window_tokens is None else int(window_tokens.shape[0])
        if window_tokens is not None:  # (windows, tokens per window) raster indices in the tower's window order
            self.register_buffer("to_windows", window_tokens.flatten(), persistent=False)
            self.register_buffer("from_windows", torch.argsort(window_tokens.flatten()), persistent=False)
        if hasattr(tower, "pos_embed"):  # Qwen3-VL: the tower's own resampling of its table, in raster order
            index, weight = position_table_taps(tower, self.rows, self.cols)
            self.register_buffer("table_index", index[to_raster], persistent=False)
            self.register_buffer("table_weight", weight[to_raster], persistent=False)
        self.rotate_half = rotate_half_of(tower)

    @property
    def frames_per_step(self) -> int:
        """Frames of a video the tower embeds together (its temporal patch): ``--frames T`` runs T / this steps."""
        return self.temporal

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's Conv3d on one temporal patch: an image (B, 3, H, W) repeated over it, as the image processor
        does, or with ``grouped_input`` a video's ``temporal_patch_size`` consecutive frames (B, t, 3, H, W).
        (B, N, C) in raster order."""
        if self.grouped_input:  # video: the frames of one temporal patch, in order (set by ``video.FrameTower``)
            volume = pixel_values.transpose(1, 2)
        else:
            volume = pixel_values.unsqueeze(2).expand(-1, -1, self.temporal, -1, -1)
        cells = self.tower.patch_embed.proj(volume.to(self.tower.patch_embed.proj.weight.dtype))
        x = cells.flatten(2).transpose(1, 2)
        if hasattr(self, "table_index"):
            x = x + (self.tower.pos_embed(self.table_index) * self.table_weight[..., None]).sum(1)
        return x

    def attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  windowed: bool = False) -> torch.Tensor:
        """The tower's VisionAttention batch first: its qkv, its rotation of q and k, softmax attention over the
        image's tokens (``windowed``: over each window's; scale head_dim^-0.5, the tower's), its proj."""
        batch, tokens, channels = x.shape
        qkv = attn.qkv(x).reshape(batch, tokens, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        if windowed:
            heads = q.shape[1]  # windows folded into the heads: ONNX attention takes 4-D q, k, v
            if not self.window_stream:
                q, k, v = (t[:, :, self.to_windows] for t in (q, k, v))
            q, k, v = (t.reshape(batch, heads * self.windows, -1, t.shape[-1]) for t in (q, k, v))
            out = nn.functional.scaled_dot_product_attention(q, k, v).reshape(batch, heads, tokens, -1)
            if not self.window_stream:
                out = out[:, :, self.from_windows]
        else:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        return attn.proj(out.transpose(1, 2).reshape(batch, tokens, channels))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self.embed(pixel_values)
        cos, sin = self.tower.rotary_pos_emb(self.position_ids, self.position_ids)
        deep = []
        for index, block in enumerate(self.tower.blocks):
            windowed = self.windows > 0 and index not in self.full_attention
            x = x + self.attention(block.attn, block.norm1(x), cos, sin, windowed)
            x = x + block.mlp(block.norm2(x))
            if index in self.deepstack:
                deep.append(self.deepstack[index](x))
        if self.window_merger is None:
            return x
        merged = self.window_merger(x)
        return (merged, *deep) if deep else merged


def position_table_taps(tower: nn.Module, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL: the rows of its learned position table and their weights (N, taps) that its own
    ``get_vision_interpolation_indices_and_weights`` gives each token, in its merge-window token order."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    return get_vision_interpolation_indices_and_weights(
        torch.tensor([[1, rows, cols]]), num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
        align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.config.spatial_merge_size)


def rotate_half_of(tower: nn.Module) -> Any:
    """The ``rotate_half`` of the tower's own modeling module (Qwen2-VL's or Qwen2.5-VL's)."""
    import sys

    return sys.modules[type(tower).__module__].rotate_half


def image_size(config: Any, options: ModelOptions, name: str, family: str = "Qwen2-VL") -> int:
    unit = config.patch_size * config.spatial_merge_size
    window = getattr(config, "window_size", None)
    default = DEFAULT_GRID_UNITS * unit if window is None else window * max(1, -(-DEFAULT_GRID_UNITS * unit // window))
    size = options.img_size if options.img_size is not None else default
    if size % unit:
        raise ConfigError(f"{name}: --img-size {size} is not a multiple of patch_size x spatial_merge_size = {unit} "
                          f"({config.patch_size} x {config.spatial_merge_size}), which {family}'s 2x2 merge windows "
                          "need")
    if window is not None and window % unit:
        raise ConfigError(f"{name}: window_size {window} is not a multiple of patch_size x spatial_merge_size = "
                          f"{unit}, so {family}'s attention windows would split merge units")
    if window is not None and size % window:
        raise ConfigError(f"{name}: --img-size {size} is not a multiple of window_size = {window} px, and the "
                          f"adapter builds whole attention windows only (an edge window of {size % window} px would "
                          "need a per-window padding mask, not built): give a multiple of " + str(window))
    return size


def window_tokens(tower: nn.Module, rows: int, cols: int) -> torch.Tensor:
    """(windows, tokens per window): the raster index of each token in Qwen2.5-VL's window order (the tower's own
    ``get_vision_window_index`` over merge units, each unit's tokens in its 2x2 order)."""
    from transformers.vision_utils import get_vision_window_index

    config = tower.config
    units, bounds = get_vision_window_index(torch.tensor([[1, rows, cols]]), config.spatial_merge_size,
                                            config.window_size, config.patch_size)
    ids = window_positions(tower, rows, cols)
    ordered = ids.view(units.numel(), -1, 2)[units].reshape(-1, 2)
    lengths = bounds.diff()
    if not bool((lengths == lengths[0]).all()):
        raise ConfigError(f"Qwen2.5-VL's windows over a {rows}x{cols} grid are not all the same size")
    return (ordered[:, 0] * cols + ordered[:, 1]).view(lengths.numel(), -1)


FAMILIES = {"Qwen2VLVisionConfig": "Qwen2-VL", "Qwen2_5_VLVisionConfig": "Qwen2.5-VL", "Qwen3VLVisionConfig": "Qwen3-VL"}


def build_qwen2_vl_tower(name: str, choice: Any, folder: Path | None, options: ModelOptions) -> LoadedModel:
    """``hf:DIR`` holding a Qwen2-VL or Qwen2.5-VL config (or its vision config): the adapter around its vision
    tower (Qwen2.5-VL's with its attention windows and full-attention blocks)."""
    from .hf_auto import instantiate, load_given_weights, refuse_pretrained

    config = choice.config
    family = FAMILIES[type(config).__name__]
    pooling = options.pooling or "pooler"
    if pooling not in POOLINGS:
        raise ConfigError(f"{name}: --pooling {pooling} does not apply to {family}'s vision tower (it gives pooler: "
                          "the PatchMerger's output, or tokens: the last block's tokens)")
    size = image_size(config, options, name, family)
    if config.rope_parameters.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{name}: {family}'s vision rope type {config.rope_parameters['rope_type']!r} is not the "
                          "axial rope the adapter reads")
    refuse_pretrained(options, name)
    tower, random_init = instantiate(choice, folder, name)
    if load_given_weights(tower, options, name):
        random_init = False
    windows, full = None, ()
    if getattr(config, "window_size", None) is not None:
        grid = size // config.patch_size
        windows, full = window_tokens(tower, grid, grid), tuple(config.fullatt_block_indexes)
    adapter = QwenVisionAdapter(tower, size, pooling, windows, full, family).eval()
    spec = InputSpec("pixel_values", (config.in_channels, size, size))
    deep = [f"deepstack_{layer}" for layer in adapter.deepstack]
    own = None
    if pooling == "pooler":
        tokens = QwenVisionAdapter(tower, size, "tokens", windows, full, family, window_stream=windows is not None)
        side = None if windows is None else config.window_size // (config.patch_size * config.spatial_merge_size)
        taps = tuple((layer, DeepstackMerger(module.merger)) for layer, module in adapter.deepstack.items())
        own = (tokens.eval(), TowerMergerConfig(merger=tower.merger, family=family, merge=config.spatial_merge_size,
                                                window_units=side, deepstack=taps))
    refusal = None
    if deep:  # with --features (the merger and the deepstack mergers not part of the export)
        refusal = (f"{family}'s deepstack outputs (layers {', '.join(map(str, adapter.deepstack))} through their own "
                   "mergers) follow compression only with its merger (the default pooling, no --features), which a "
                   "--features cut leaves out; compress its last block's tokens instead (--pooling tokens)")
    if windows is not None:
        refusal = (f"{family}'s window attention (windows of {config.window_size} px in every block but "
                   f"{', '.join(map(str, full)) or 'none'}) compresses only with its own merger (the default pooling, "
                   "no --features): units with a fixed count per window")
    return LoadedModel(name, adapter, [spec], [POOLINGS[pooling], *deep], random_init, own_projector=own,
                       compression_refusal=refusal)
