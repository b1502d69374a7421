"""Finding a block's output and the encoder's output tokens, and making them the model's output.

A block's output is where the stream enters the next block (the skip input of its attention residual add). The
last block's output is its MLP residual add (after a post-norm, in post-norm models); the encoder output follows
that through the final norm. Found from the graph alone, like the attention sites.
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import StructureNotFoundError
from .graph import ancestors, data_inputs, data_users, descendants, is_add, is_norm, through_casts
from .structure import Structure


def _mlp_residual_add(gm: fx.GraphModule, stream: fx.Node) -> fx.Node:
    """The add that joins ``stream`` with a branch computed from it (the MLP residual); either side may reach
    the add through a cast (``.to(float32)``) of the stream."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    below = descendants(stream)
    for node in sorted(below, key=order.__getitem__):
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        joined = [through_casts(t) is through_casts(stream) for t in tensors]
        if is_add(node) and len(tensors) == 2 and any(joined):
            other = tensors[1] if joined[0] else tensors[0]
            if other in below:
                return node
    raise StructureNotFoundError(f"found no MLP residual add after {stream.name} (the last block's output)")


def block_output(gm: fx.GraphModule, structure: Structure, layer: int) -> fx.Node:
    """The stream leaving block ``layer``."""
    sites = structure.sites
    if layer + 1 < len(sites):
        following = sites[layer + 1].block_input
        if following is None:
            raise StructureNotFoundError(f"no block input found for attention {sites[layer + 1].name}")
        return following
    site = sites[layer]
    output = _mlp_residual_add(gm, site.stream)
    post_norm = site.stream is not site.residual_add
    modules = dict(gm.named_modules())
    consumers = data_users(output)
    if post_norm and len(consumers) == 1 and is_norm(consumers[0], modules):
        return consumers[0]
    return output


def encoder_output(gm: fx.GraphModule, structure: Structure) -> fx.Node:
    """The tower's output tokens: the last block's output after any final norm(s), before pooling or a head."""
    node = block_output(gm, structure, len(structure.sites) - 1)
    modules = dict(gm.named_modules())
    for _ in range(3):
        consumers = data_users(node)
        if len(consumers) != 1 or not is_norm(consumers[0], modules) or len(data_inputs(consumers[0])) != 1:
            break
        node = consumers[0]
    return node


def frames_to_sequence(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*T, M, D) per-frame tokens -> (B, T*M, D): a video's frames one after another."""
    return tokens.reshape(tokens.shape[0] // frames, frames * tokens.shape[1], tokens.shape[2])


def cut_output(gm: fx.GraphModule, node: fx.Node, frames: int | None = None, keep: frozenset[fx.Node] = frozenset()
               ) -> None:
    """Make ``node`` (tokens) the model's only output; with ``frames``, per-frame tokens become one sequence.
    ``keep``: nodes that outputs added later will read (the token state), kept with what they read."""
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    if frames:
        with graph.inserting_before(output):
            node = graph.call_function(frames_to_sequence, (node, frames))
    _set_output(output, node)
    _drop_unreachable(graph, output, keep)


def _drop_unreachable(graph: fx.Graph, output: fx.Node, extra: frozenset[fx.Node] = frozenset()) -> None:
    """Erase what no longer feeds the output (or ``extra``): the blocks after a --features cut, the old head, and
    the shape assertions torch.export left on them (dead code elimination keeps those, as they could have side
    effects)."""
    keep = ancestors(output) | {output} | set(extra)
    for node in extra:
        keep |= ancestors(node)
    for node in reversed(list(graph.nodes)):
        if node not in keep and node.op != "placeholder" and not node.users:
            graph.erase_node(node)


def _set_output(output: fx.Node, node: fx.Node) -> None:
    current = output.args[0]
    if isinstance(current, (tuple, list)):  # torch.export graphs return flat output lists
        if len(current) != 1:
            raise StructureNotFoundError(f"the model has {len(current)} outputs; tokens can replace only a single one")
        output.args = (type(current)([node]),)
    else:
        output.args = (node,)


def append_outputs(gm: fx.GraphModule, nodes: list[fx.Node]) -> int:
    """Add ``nodes`` as outputs after the model's own (which become a flat tuple); returns how many it had."""
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    current = output.args[0]
    if isinstance(current, fx.Node):
        current = [current]
    if not isinstance(current, (tuple, list)) or not all(isinstance(n, fx.Node) for n in current):
        raise StructureNotFoundError(
            f"the model returns a {type(current).__name__} of outputs; positions can only be added to a tensor or a "
            "tuple of tensors"
        )
    output.args = (tuple([*current, *nodes]),)
    _flat_output_spec(gm, len(current) + len(nodes))
    return len(current)


def _flat_output_spec(gm: fx.GraphModule, count: int) -> None:
    """A torch.export module rebuilds its output from a pytree spec: make it a flat tuple of ``count``."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
    from torch.utils import _pytree

    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        return
    spec = _pytree.tree_structure(tuple(range(count)))
    info = codegen.pytree_info
    gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, spec))
    gm._out_spec = spec
