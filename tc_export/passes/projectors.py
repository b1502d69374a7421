"""Projector methods: pooling, pixel unshuffle, C-Abstractor, LLaMA-VID, resampler and LLaVA's MLP.

Each is a config registered like any method; it acts at the encoder output by default (the model then outputs
the projected tokens, as a vision-language model's tower + projector does) or, with ``at=N``, after block N
where the width and the class/register tokens are kept. Every projector drops the class/register tokens by default
(as the models they come from do: LLaVA's ``patch`` selection, InternVL, Honeybee, Qwen-VL); ``pool`` and ``mlp``
can keep them in front (``prefix_mode keep``, LLaVA's ``cls_patch``). Projectors need the patch grid where they use it
(found from the patch embedding); merging and pruning destroy the grid, so a projector after them is an error
unless it needs no grid (``mlp``, ``llamavid`` with one content token).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from ..models.seeding import seeded_weights
from ..ops.projectors import (
    CAbstractor,
    Gemma3Projector,
    Idefics3Projector,
    LlamaVidProjector,
    Llama4Projector,
    MLPProjector,
    PatchMergerProjector,
    PoolProjector,
    Projector,
    ResamplerProjector,
    UnshuffleProjector,
)
from ..ops.projectors.unshuffle import block_size
from ..ops.projectors.windows import UnitWindows
from .layers import PREFIX_MODE_HELP, check_prefix_mode, parse_prefix_mode
from .methods import register_method, setting
from .site import Point, Site

QUERIES_INPUT = "text_queries"  # LLaMA-VID's second model input


def parse_at(text: str) -> str:
    if text == "encoder":
        return text
    try:
        return str(int(text))
    except ValueError:
        raise ConfigError(f"--at takes 'encoder' or a block index, got {text!r}") from None


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "auto"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"expected a whole number, got {text!r}") from None


def _at() -> Any:
    return setting("encoder", "projectors: where to act: encoder (the output) or a block index N", parse_at)


def _weights() -> Any:
    return setting(None, "projectors: safetensors file with the projector's weights", str)


def _scale() -> Any:
    return setting(0.5, "unshuffle / patchmerger: downscale 1/k (each k x k window -> one token of k*k*C channels)")


def _out_channels() -> Any:
    return setting(None, "projectors: output width D (default: the input width)", _optional_int)


@dataclass(frozen=True)
class ProjectorConfig:
    """What every projector config shares: where it acts and an optional weights file."""

    projector: ClassVar[type[Projector]]
    needs_grid: ClassVar[bool] = True
    needs_class_token: ClassVar[bool] = False
    prop_attn: ClassVar[bool] = False
    protected: ClassVar[None] = None
    can_keep_prefix: ClassVar[bool] = False  # the projector can pass the class/register tokens through in front

    prefix_mode: str | None = setting(None, PREFIX_MODE_HELP, parse_prefix_mode)
    at: str = dataclasses.field(kw_only=True, default="encoder", metadata=_at().metadata)
    projector_weights: str | None = dataclasses.field(kw_only=True, default=None, metadata=_weights().metadata)

    def __post_init__(self) -> None:
        check_prefix_mode(self.method, self.prefix_mode)  # type: ignore[attr-defined]
        if self.prefix_mode == "keep" and not self.can_keep_prefix:
            raise ConfigError(
                f"{self.method} turns the patch grid into new tokens and drops the class/register tokens, as its "  # type: ignore[attr-defined]
                "published model does; prefix_mode keep is for pool and mlp"
            )

    def insertion_point(self) -> Point:
        return "encoder" if self.at == "encoder" else "block"  # type: ignore[attr-defined]

    @property
    def layers(self) -> tuple[int, ...] | None:
        at = self.at  # type: ignore[attr-defined]
        return None if at == "encoder" else (int(at),)

    def default_layers(self, num_layers: int) -> list[int]:
        return []

    def check(self, site: Site) -> None:
        if self.insertion_point() == "block" and int(self.at) >= site.num_layers:  # type: ignore[attr-defined]
            raise ConfigError(f"{self.method}: --at {self.at} is out of range: the model has "  # type: ignore[attr-defined]
                              f"{site.num_layers} blocks (0-{site.num_layers - 1})")

    def settings(self) -> dict[str, Any]:
        """The projector's keyword settings: every field but ``at`` and ``projector_weights`` (and ``prefix_mode``
        for a projector that always drops the prefix)."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("at", "projector_weights", "prefix_mode")}
        if self.can_keep_prefix:
            settings["prefix_mode"] = self.prefix_mode or "drop"
        return settings

    def window(self) -> int | None:
        """The side s of the s x s windows this projector reads one by one (each window -> one output token), or
        None when it reads no grid or mixes windows. A token method before it acts on units of that side."""
        return None

    def make_op(self, site: Site) -> nn.Module:
        if site.unit is not None and self.needs_grid:
            return self._unit_op(site)
        grid = site.grid
        if grid is None:
            if self.needs_grid and self.window() is None:
                raise ConfigError(
                    f"{self.method} needs the patch grid at {site.describe()}, but there is none there (an earlier "  # type: ignore[attr-defined]
                    f"merge or pruning reorders tokens, or the model has no patch grid); {self.mixes}, so it cannot "
                    "follow compression even at merge units: put it before them, or use patchmerger, unshuffle or "
                    "pool (avg/max), which read one window at a time"
                )
            if self.needs_grid:
                raise ConfigError(
                    f"{self.method} needs the patch grid at {site.describe()}, but there is none there (an earlier "
                    "merge or pruning reorders tokens, or the model has no patch grid); put it before them"
                )
            grid = (site.tokens - site.protected,)
        with seeded_weights():  # the model's weights seed (0 unless --weights-seed), whatever ran before
            op = self.projector(site.channels, grid, site.protected, **self.settings())
        weights = getattr(self, "projector_weights", None)
        if weights is not None:
            from ..models.weights import load_weights

            load_weights(op, Path(weights))
        return op

    def _unit_op(self, site: Site) -> nn.Module:
        """The projector on unit-ordered tokens (merge units): each unit is one window, one output token."""
        unit = site.unit
        window = self.window()
        if window is None:
            raise ConfigError(
                f"{self.method} mixes neighbouring windows of the patch grid ({self.mixes}), so it cannot "  # type: ignore[attr-defined]
                f"take merge units of {unit}x{unit} patches (an earlier merge or pruning, or --unit); put it before "
                "them, or use patchmerger, unshuffle or pool (avg/max), which read one window at a time"
            )
        if window != unit:
            raise ConfigError(f"{self.method} reads {window}x{window} windows and the merge unit is {unit}x{unit}: "  # type: ignore[attr-defined]
                              f"give --unit {window}, or set the projector's window to {unit}")
        units = (site.tokens - site.protected) // (unit * unit)
        grid = site.patch_grid or ()
        op = self.make_op(dataclasses.replace(site, unit=None, grid=grid, tokens=site.protected + math.prod(grid)))
        return UnitWindows(op, units, unit, raster=site.grid is not None)

    mixes: ClassVar[str] = "it reads the whole grid"


@register_method("pool", "2-D pooling on the patch grid, LLaVA-NeXT/OneVision (--stride, --mode avg|max|bilinear)")
@dataclass(frozen=True)
class PoolConfig(ProjectorConfig):
    projector: ClassVar[type[Projector]] = PoolProjector
    can_keep_prefix: ClassVar[bool] = True

    stride: int = setting(2, "pool: stride on each grid axis")
    mode: str = setting("avg", "pool: avg | max (floor(H/s)) | bilinear (ceil(H/s), LLaVA-OneVision)")

    mixes: ClassVar[str] = "bilinear pooling to ceil(H/s) interpolates across windows"

    def window(self) -> int | None:
        return None if self.mode == "bilinear" else self.stride


@dataclass(frozen=True)
class ShuffleConfig(ProjectorConfig):
    """A projector that folds each k x k window (k = 1 / scale) into one token: unit projectors of side k."""

    scale: float = _scale()

    def window(self) -> int | None:
        return block_size(self.scale)


@register_method("unshuffle", "InternVL pixel unshuffle + MLP (--scale 0.5)")
@dataclass(frozen=True)
class UnshuffleConfig(ShuffleConfig):
    projector: ClassVar[type[Projector]] = UnshuffleProjector

    ps_version: str = setting("v2", "unshuffle: InternVL's pixel shuffle v2, or v1 (InternVL 1.2: output grid "
                                 "transposed)")
    out_channels: int | None = _out_channels()


@register_method("idefics3", "Idefics3 / SmolVLM connector: pixel shuffle (--scale 1/s) + Linear, no bias")
@dataclass(frozen=True)
class Idefics3Config(ShuffleConfig):
    projector: ClassVar[type[Projector]] = Idefics3Projector

    out_channels: int | None = _out_channels()


@register_method("llama4", "Llama 4 adapter: pixel shuffle 0.5, MLP (GELU after each layer), projector Linear")
@dataclass(frozen=True)
class Llama4Config(ShuffleConfig):
    projector: ClassVar[type[Projector]] = Llama4Projector

    adapter_channels: int | None = setting(None, "llama4: width of the pixel-shuffle MLP (Llama 4: 4096; default "
                                                 "the input width)", _optional_int)
    out_channels: int | None = _out_channels()


@register_method("gemma3", "Gemma 3 projector: 4x4 average pool, soft-embedding RMSNorm, projection matrix")
@dataclass(frozen=True)
class Gemma3Config(ProjectorConfig):
    projector: ClassVar[type[Projector]] = Gemma3Projector

    stride: int = setting(4, "gemma3: average-pool kernel = stride (Gemma 3: 64 patches / 16 tokens per side)")
    out_channels: int | None = _out_channels()


@register_method("patchmerger", "Qwen2-VL PatchMerger: LayerNorm, 2x2 windows -> 4C, MLP (--scale 0.5)")
@dataclass(frozen=True)
class PatchMergerConfig(ShuffleConfig):
    projector: ClassVar[type[Projector]] = PatchMergerProjector

    out_channels: int | None = _out_channels()


@register_method("cabstractor", "Honeybee C-Abstractor (--tokens M, a square)")
@dataclass(frozen=True)
class CAbstractorConfig(ProjectorConfig):
    projector: ClassVar[type[Projector]] = CAbstractor

    tokens: int = setting(144, "output tokens M (cabstractor: a perfect square)")
    hidden: int | None = setting(None, "cabstractor: width of its RegNet stages (Honeybee: 1024)", _optional_int)
    depth: int = setting(3, "cabstractor / resampler: blocks per stage / attention layers")
    out_channels: int | None = _out_channels()

    mixes: ClassVar[str] = "its convolutions and adaptive pooling mix windows"


@register_method("llamavid", "LLaMA-VID: a context and a content token per image (text queries as a 2nd input)")
@dataclass(frozen=True)
class LlamaVidConfig(ProjectorConfig):
    projector: ClassVar[type[Projector]] = LlamaVidProjector
    needs_grid: ClassVar[bool] = False

    grid_size: int = setting(1, "llamavid: content tokens: 1 = the mean token, g > 1 = a g x g pooled grid")
    queries: int = setting(32, "llamavid / resampler: number of (text or learned) queries")
    query_channels: int = setting(768, "llamavid: width of the text queries (Q-Former: 768)")
    out_channels: int | None = _out_channels()

    def make_op(self, site: Site) -> nn.Module:
        if self.grid_size > 1 and (site.grid is None or site.unit is not None):
            raise ConfigError(f"llamavid --grid-size {self.grid_size} needs the patch grid; use --grid-size 1")
        op = super().make_op(site)
        op.signals = (QUERIES_INPUT,)  # type: ignore[assignment]
        op.input_shapes = {QUERIES_INPUT: (self.queries, self.query_channels)}  # type: ignore[assignment]
        return op


@register_method("resampler", "Qwen-VL query resampler (--queries M learned queries, --depth)")
@dataclass(frozen=True)
class ResamplerConfig(ProjectorConfig):
    projector: ClassVar[type[Projector]] = ResamplerProjector

    queries: int = setting(256, "llamavid / resampler: number of (text or learned) queries")
    heads: int | None = setting(None, "resampler: attention heads (default: max(1, D // 128))", _optional_int)
    depth: int = setting(1, "cabstractor / resampler: blocks per stage / attention layers")
    out_channels: int | None = _out_channels()


@register_method("mlp", "LLaVA's two-layer GELU projector (mlp2x_gelu); class token dropped unless --prefix-mode keep")
@dataclass(frozen=True)
class MLPConfig(ProjectorConfig):
    projector: ClassVar[type[Projector]] = MLPProjector
    needs_grid: ClassVar[bool] = False
    can_keep_prefix: ClassVar[bool] = True

    out_channels: int | None = _out_channels()
