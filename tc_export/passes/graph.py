"""Recognising ops in FX graphs, whichever tracer made them.

``torch.fx.symbolic_trace`` records Python-level calls (``F.layer_norm``, ``operator.add``, ``x.softmax``,
leaf modules); ``torch.export`` records ATen ops. The predicates here accept both, so passes match structure,
not one library's class names.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops.attention import biased_attention

aten = torch.ops.aten

_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_SOFTMAX_FUNCS = {F.softmax, torch.softmax, aten._softmax.default, aten.softmax.int}
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm, aten.matmul.default, aten.bmm.default}
_ADD_FUNCS = {operator.add, torch.add, aten.add.Tensor}
_SHAPE_QUERIES = {aten.sym_size.int, torch.ops.aten.sym_size.default} if hasattr(aten, "sym_size") else set()
_ASSERTIONS = {torch._assert} | {getattr(aten, name).default for name in ("_assert_tensor_metadata", "_assert_scalar",
                                                                             "_assert_async") if hasattr(aten, name)}
_CAST_FUNCS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default}
_CAST_METHODS = {"to", "type", "type_as", "float", "half", "bfloat16", "double"}


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SDPA


def is_biased_attention(node: fx.Node) -> bool:
    """An attention a pass has already written out with a bias (``ops.attention.biased_attention``)."""
    return node.op == "call_function" and node.target is biased_attention


def is_softmax(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTMAX_FUNCS
    if node.op == "call_method":
        return node.target == "softmax"
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Softmax)


def is_matmul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _MATMUL_FUNCS
    return node.op == "call_method" and node.target in ("matmul", "bmm", "__matmul__")


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCS
    return node.op == "call_method" and node.target in ("add", "__add__")


def is_shape_query(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()`` and ATen ``sym_size``: they read a shape, not data."""
    if node.op == "call_function":
        return (node.target is getattr and node.args[1] == "shape") or node.target in _SHAPE_QUERIES
    return node.op == "call_method" and node.target in ("size", "dim")


def is_assertion(node: fx.Node) -> bool:
    """A check torch.export leaves in the graph (``_assert_tensor_metadata`` before a ``.to(dtype)``): it reads
    its input's metadata and returns nothing."""
    return node.op == "call_function" and node.target in _ASSERTIONS


def reads_no_data(node: fx.Node) -> bool:
    """A shape query or an assertion: a user that does not consume its input's values."""
    return is_shape_query(node) or is_assertion(node)


def data_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that consume its values (not shape queries or assertions)."""
    return [user for user in node.users if not reads_no_data(user)]


def is_cast(node: fx.Node) -> bool:
    """A dtype or device conversion (``x.to(torch.float32)``, ``x.float()``, ATen ``to`` / ``_to_copy``): the
    same tokens, perhaps in another precision."""
    if node.op == "call_function":
        return node.target in _CAST_FUNCS
    return node.op == "call_method" and node.target in _CAST_METHODS


def through_casts(node: fx.Node) -> fx.Node:
    """``node`` with any casts in front of it stripped: ``x.to(float32).float()`` -> ``x``."""
    while is_cast(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def tensor_meta_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape recorded by shape propagation (``ShapeProp`` or ``torch.export``), if any."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(d) for d in meta.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(d) for d in val.shape)
    return None


def node_kwarg(node: fx.Node, name: str, position: int) -> object:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else None


def descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.users)
    return seen


def descendants_of_all(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node computed from any of ``nodes`` (the nodes themselves excluded unless one feeds another)."""
    below: set[fx.Node] = set()
    for node in nodes:
        below |= descendants(node)
    return below


def ancestors(node: fx.Node, through_shape_queries: bool = True) -> set[fx.Node]:
    """Every node ``node`` depends on; with ``through_shape_queries=False`` a shape read cuts the path."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if through_shape_queries or not is_shape_query(current):
            stack.extend(current.all_input_nodes)
    return seen


def is_input_free(node: fx.Node) -> bool:
    """Computed from parameters, buffers and constants only (shape reads of the input allowed)."""
    return not any(n.op == "placeholder" for n in ancestors(node, through_shape_queries=False) | {node})


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes that carry activations (not parameters or buffers)."""
    return [n for n in node.all_input_nodes if n.op != "get_attr"]


def first(nodes: Iterable[fx.Node]) -> fx.Node | None:
    return next(iter(nodes), None)


_NORM_FUNCS = {F.layer_norm, F.rms_norm, aten.layer_norm.default}
_NORM_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


def is_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A normalisation over channels (layer/RMS norm), as a function or a module."""
    if node.op == "call_function":
        return node.target in _NORM_FUNCS
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return isinstance(module, _NORM_MODULES) or type(module).__name__.endswith(("LayerNorm", "RmsNorm", "RMSNorm"))
    return False


def copy_subgraph(graph: fx.Graph, source: fx.Node, targets: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Copy every node on a path from ``source`` to ``targets`` (``source`` itself is shared, not copied).

    The copies go before the output node; ``stable_toposort`` puts them in place. Returns original -> copy.
    """
    between = descendants(source)
    wanted: set[fx.Node] = set()
    for target in targets:
        wanted |= ({target} | ancestors(target)) & between
    env: dict[fx.Node, fx.Node] = {}
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        for node in graph.nodes:
            if node in wanted:
                env[node] = graph.node_copy(node, lambda n: env.get(n, n))
    return env


def stable_toposort(graph: fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, keeping the existing order wherever it is valid."""
    import heapq

    nodes = list(graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    waiting = {node: len(set(node.all_input_nodes)) for node in nodes}
    ready = [index[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    ordered: list[fx.Node] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        ordered.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, index[user])
    if len(ordered) != len(nodes):
        placed = set(ordered)
        stuck = [n.name for n in nodes if n not in placed]
        raise RuntimeError(f"the graph has a cycle after a pass (through {', '.join(stuck[:4])})")
    if ordered == nodes:
        return
    anchor = ordered[0]
    if anchor is not nodes[0]:
        nodes[0].prepend(anchor)
    for node in ordered[1:]:
        anchor.append(node)
        anchor = node
