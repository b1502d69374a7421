"""The verification variant of an ONNX: its token-op sites' values and decisions as extra graph outputs under
fixed names, so a runtime that exposes only its outputs (a TensorRT engine) gives ``verify`` what the pinned
replay needs, and ONNX Runtime's pinned replay reads the decisions the graph took instead of recomputing them.

Per ``tc_export`` node ``i`` (in graph order): ``tc_export_site_i_in_j`` (its inputs: tokens, size, signals),
``tc_export_site_i_out_k`` (its output tokens and sizes), and per TopK ``j`` of its function body
``tc_export_site_i_topk_j_values`` / ``_indices`` (the function gets those as extra outputs; a TopK over int64 is an
index sort, not a decision: its values tell them apart). Self-contained (only ``onnx``): the bundle's
``verify_outputs.py`` is this file's source, run on the device to build the verification engine.
"""

from __future__ import annotations

import sys

DOMAIN = "tc_export"
PREFIX = "tc_export_site"


def site_output(site: int, kind: str, index: int | str) -> str:
    """The graph output name of site ``site``'s ``kind`` (``in``, ``out``, ``topk``) number ``index``."""
    return f"{PREFIX}_{site}_{kind}_{index}"


def topk_output(site: int, number: int, part: str) -> str:
    """The graph output name of TopK ``number`` of site ``site``'s function, ``part`` ``values`` or ``indices``."""
    return site_output(site, "topk", f"{number}_{part}")


def site_nodes_of(model) -> list:
    """The ``tc_export`` token-op nodes (those with a size output) of ``model``, in graph order."""
    return [node for node in model.graph.node if node.domain == DOMAIN and len(node.output) > 1]


def add_site_outputs(model) -> dict[int, int]:
    """Add the sites' values and decisions to ``model``'s outputs (in place); returns per site its TopK count."""
    import onnx
    from onnx import helper

    functions = {(f.domain, f.name, getattr(f, "overload", "")): f for f in model.functions}
    widened: dict[tuple, tuple[int, int]] = {}  # function -> (its own output count, TopKs exposed)
    topks: dict[int, int] = {}
    exposed: list[str] = []
    for site, node in enumerate(site_nodes_of(model)):
        key = (node.domain, node.op_type, getattr(node, "overload", ""))
        function = functions.get(key)
        if function is not None and key not in widened:
            own, number = len(function.output), 0
            for inner in list(function.node):
                if inner.op_type != "TopK":
                    continue
                while len(inner.output) < 2:
                    inner.output.append("")
                for k, part in enumerate(("values", "indices")):
                    if not inner.output[k]:
                        inner.output[k] = f"{PREFIX}_topk_{number}_{part}_unused"
                    name = f"{PREFIX}_topk_{number}_{part}"
                    function.node.append(helper.make_node("Identity", [inner.output[k]], [name]))
                    function.output.append(name)
                number += 1
            widened[key] = (own, number)
        own, number = widened.get(key, (len(node.output), 0))
        while len(node.output) < own:
            node.output.append("")
        for j in range(number):
            for part in ("values", "indices"):
                node.output.append(topk_output(site, j, part))
        topks[site] = number
        for kind, names in (("in", node.input), ("out", node.output[:2])):
            for j, name in enumerate(names):
                if name:
                    model.graph.node.append(helper.make_node("Identity", [name], [site_output(site, kind, j)]))
                    exposed.append(site_output(site, kind, j))
        exposed += [topk_output(site, j, part) for j in range(number) for part in ("values", "indices")]
    inferred = _inferred(model, exposed)
    present = {o.name for o in model.graph.output}
    for name in exposed:
        if name in present:
            continue
        if name in inferred:
            model.graph.output.append(inferred[name])
        else:  # a type shape inference could not follow: TopK indices are int64, the rest float
            elem = onnx.TensorProto.INT64 if name.endswith("_indices") else onnx.TensorProto.FLOAT
            model.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return topks


def _inferred(model, names: list[str]) -> dict:
    """The value infos (type and shape) of ``names`` by ONNX shape inference through the local functions."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types are a help; the fallback is above
        return {}
    wanted = set(names)
    return {value.name: value for value in (*inferred.graph.value_info, *inferred.graph.output)
            if value.name in wanted and value.type.tensor_type.elem_type and value.type.tensor_type.HasField("shape")}


def main(argv: list[str]) -> int:
    """``python3 verify_outputs.py model.onnx model.verify.onnx``: write the verification variant."""
    import onnx

    if len(argv) != 2:
        print("usage: python3 verify_outputs.py MODEL.onnx VERIFY.onnx", file=sys.stderr)
        return 2
    model = onnx.load(argv[0])
    topks = add_site_outputs(model)
    onnx.save(model, argv[1])
    print(f"verify_outputs.py: {argv[1]} exposes {len(topks)} token-op sites' values and "
          f"{sum(topks.values())} TopKs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
