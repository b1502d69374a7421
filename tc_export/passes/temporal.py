"""Temporal pruning's config: later frames keep the tokens that changed, dropped where the tower starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.temporal import BUDGETS, TemporalPrune
from .methods import register_method, setting
from .site import Point, Site


@register_method("temporal", "temporal pruning inside the tower: later frames keep their most changed tokens "
                             "(--retain, --budget frame|clip, --frames T)")
@dataclass(frozen=True)
class TemporalConfig:
    """``retain``: the fraction of each later frame's grid tokens kept, K = ceil(retain * M) (``budget`` frame: K in
    every later frame; clip: K * (T - 1) over the later frames together). Frame 0 and every frame's protected
    tokens always run. Acts where the first block starts; the model must end at tokens (``--features``) or at a
    window projector. With merge units (``--unit s``, or a window projector after it) later frames drop whole units:
    K = ceil(retain * U) units, each scored by the mean of its tokens' scores (docs/video.md)."""

    method: ClassVar[str] = "temporal"
    needs_class_token: ClassVar[bool] = False
    needs_frame_coordinate: ClassVar[bool] = True  # the attention mask reads it from the token state
    prop_attn: ClassVar[bool] = False
    protected: ClassVar[None] = None
    protected_suffix: ClassVar[None] = None
    layers: ClassVar[tuple[int, ...]] = (0,)
    handles_units: ClassVar[bool] = True  # shown the whole site (units on), not the unit view: it joins the frames

    retain: float = setting(0.25, "temporal: fraction of each later frame's grid tokens kept")
    budget: str = setting("frame", "temporal: frame (K tokens in each later frame) | clip (K x (T - 1) over the "
                                   "later frames, the most changed wherever they are)")

    def __post_init__(self) -> None:
        if isinstance(self.retain, bool) or not isinstance(self.retain, (int, float)) or not 0.0 < self.retain <= 1.0:
            raise ConfigError(f"temporal: retain must be a fraction in (0, 1], got {self.retain!r}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"temporal: budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")

    def insertion_point(self) -> Point:
        return "block_input"

    def default_layers(self, num_layers: int) -> list[int]:
        return [0]

    def check(self, site: Site) -> None:
        if site.frames is None or site.frames < 2:
            raise ConfigError("temporal compares each frame with the one before: give a clip with --frames T (T >= 2)")

    def make_op(self, site: Site) -> TemporalPrune:
        self.check(site)
        assert site.frames is not None
        unit = site.unit or 1
        units = (site.tokens - site.protected) // (unit * unit)  # grid tokens, or whole units of them
        keep = max(1, math.ceil(self.retain * units - 1e-9))
        return TemporalPrune(site.frames, site.tokens, site.protected, keep, self.budget, unit)
