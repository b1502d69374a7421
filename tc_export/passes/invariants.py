"""What every token op promises, checked on a real run after each pass (torch.fx's ``ensures`` idea).

- its output has the token count ``tokens_out`` promised to the pass, and sizes (when any) match it; the batch rows
  stay, or, for an op that joins a clip's ``frames`` rows into one (``joins_frames``), divide by ``frames``;
- the protected prefix (class, distillation, register tokens) leaves it unchanged, first and in order (unless the
  op drops it at the tower's output: ``prefix_out()`` is then 0).
(``compress`` also checks that every self-attention found before the pass is still one after it: its queries and
keys see the tokens of its stream.)
A violation is a bug in tc-export, reported as an internal error that names the op.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from ..errors import InternalError
from ..ops.base import TokenOp


class _Checker(fx.Interpreter):
    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        result = super().call_module(target, args, kwargs)
        module = self.fetch_attr(str(target))
        if isinstance(module, TokenOp):
            _check(str(target), module, args[0], result)
        return result


def _check(name: str, op: TokenOp, x: torch.Tensor, result: Any) -> None:
    out, size = result
    want = op.tokens_out(x.shape[1])
    frames = getattr(op, "frames", 1) if getattr(op, "joins_frames", False) else 1  # one row per clip after it
    if out.shape[1] != want or out.shape[0] * frames != x.shape[0]:
        raise InternalError(f"{name} promised {want} tokens and returned {tuple(out.shape)} from {tuple(x.shape)}")
    if size is not None and (size.shape[0], size.shape[1]) != (out.shape[0], op.state_rows(out.shape[1])):
        raise InternalError(f"{name} returned sizes {tuple(size.shape)} for tokens {tuple(out.shape)}")
    protected = op.prefix_out() if hasattr(op, "prefix_out") else getattr(op, "protected", 0)
    if protected and not torch.equal(out[:, :protected], x[:, :protected]):
        raise InternalError(f"{name} moved or changed the {protected} protected leading tokens")


def ensure_token_ops(gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> None:
    """Run ``gm`` once on the example inputs, checking each token op's promises."""
    if not any(isinstance(m, TokenOp) for m in gm.modules()):
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = [example_inputs.get(str(n.target), n.args[0] if n.args else None) for n in placeholders]
    with torch.no_grad():
        _Checker(gm).run(*args)
