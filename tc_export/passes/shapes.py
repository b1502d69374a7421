"""Re-deriving baked-in token counts after a pass changed the number of tokens mid-graph.

``torch.export`` graphs carry shapes as constants (``view(x, [1, 197, -1, 64])``); once a merge makes 181 tokens
of 197, every later shape argument that spelled 197 must spell 181. This walks the graph with real tensors;
wherever a shape op's input no longer has the shape recorded before the pass, the changed dimensions give an
old -> new map of sizes, applied to the op's shape argument. ``torch.fx.symbolic_trace`` graphs read shapes from
tensors at run time and pass through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

_SHAPE_OPS = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default,
}


def _recorded_shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


class _Retargeter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.changed = 0

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "call_function" and node.target in _SHAPE_OPS and len(node.args) >= 2:
            self._retarget(node)
        return super().run_node(node)

    def _retarget(self, node: fx.Node) -> None:
        source, shape = node.args[0], node.args[1]
        old = _recorded_shape(source)
        value = self.env.get(source) if isinstance(source, fx.Node) else None
        if old is None or not isinstance(value, torch.Tensor) or tuple(value.shape) == old:
            return
        new = tuple(value.shape)
        if len(new) != len(old) or not isinstance(shape, (list, tuple)):
            return
        sizes = {o: n for o, n in zip(old, new) if o != n}
        updated = [sizes.get(v, v) if isinstance(v, int) and v > 1 else v for v in shape]
        if updated != list(shape):
            node.args = (source, updated, *node.args[2:])
            self.changed += 1


def retarget_token_dims(gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> int:
    """Rewrite stale token counts in shape arguments; returns how many ops changed (0 for symbolic graphs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = [example_inputs.get(str(n.target), n.args[0] if n.args else None) for n in placeholders]
    retargeter = _Retargeter(gm)
    with torch.no_grad():
        retargeter.run(*args)
    if retargeter.changed:
        gm.recompile()
    return retargeter.changed
