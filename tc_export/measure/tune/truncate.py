"""A token op that keeps the first ``keep`` tokens: a schedule's token counts at no merge cost.

The latency model times the model truncated this way at each token count it needs (``latency.py``); the
``token_count_floor`` benchmark uses it to bound what any merge implementation can reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...ops.base import TokenOp
from ...passes.tome import ToMeConfig


class Truncate(TokenOp):
    """Keep the first ``keep`` tokens; a token state coming in (a padded text's sizes) is cut alike, none is made."""

    creates_size = False

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x[:, : self.keep], None if size is None else size[:, : self.keep]

    def tokens_out(self, tokens_in: int) -> int:
        return self.keep

    def extra_repr(self) -> str:
        return f"keep={self.keep}"


@dataclass(frozen=True)
class TruncateLikeToMe(ToMeConfig):
    """ToMe's placement and token counts (inherited, so it follows the method protocol), but a Truncate op."""

    method: ClassVar[str] = "truncate"
    prop_attn: bool = False

    def make_op(self, *args: Any, **kwargs: Any) -> Truncate | None:
        merge = super().make_op(*args, **kwargs)
        if merge is None:
            return None
        site = args[0] if args else kwargs["site"]
        return Truncate(merge.tokens_out(site.tokens))


@dataclass(frozen=True)
class TruncateAt(ToMeConfig):
    """Truncate to ``keep`` tokens after the attention of layer ``layer`` (ToMe's placement), any count.

    Unlike ToMe, ``keep`` may be below half the tokens: the latency table needs every layer after the first at
    any count.
    """

    method: ClassVar[str] = "truncate"
    keep: int = 1
    layer: int = 0
    r: int | tuple[int, ...] = 1
    prop_attn: bool = False

    def check(self, site: Any) -> None:
        if self.keep <= site.protected:
            from ...errors import ConfigError

            raise ConfigError(f"truncate: keep={self.keep} must be above the {site.protected} protected tokens")

    def make_op(self, site: Any) -> Truncate | None:
        if site.layer != self.layer or self.keep >= site.tokens:
            return None
        return Truncate(self.keep)
