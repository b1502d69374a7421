"""Token ops as model-local ONNX functions: one ``tc_export`` node per site, the body a shape-generic function.

Why shape-generic: TensorRT keys a model-local function by its name alone (the name must equal the node's
op_type, and ONNX ``overload``s are ignored), and a plugin is found by the same op_type. So every site of one op
type must share ONE body, although the sites differ in token count (it shrinks layer by layer), in ``r`` (per-layer
lists, capping) and in batch. Each body is therefore exported from the op alone with every input dimension
symbolic, and the op's integer settings that vary between sites (``FunctionOp.carried``: ``r``, ``keep``,
``tokens``) are read inside the body from the calling node's attributes (``Constant`` with ``ref_attr_name``,
which ONNX Runtime and TensorRT's parser both resolve). TensorRT builds with static input shapes, so every
shape computation in the body folds to a constant at build time.

The op's other settings (every int, bool or float instance attribute: the protected prefix, padding, fuse, ...)
change the body's structure and are baked in. When one model has sites of one op type that differ in them, each
variant gets its own function named ``<OpType>_<setting><value>...`` (plugins map only the plain name; those
variants run their bodies on every TensorRT version, still correct). ONNX Runtime executes the very body
TensorRT's parser would import for every site (one FunctionProto per name), so parity in ONNX Runtime covers the
TensorRT body path too.

Every call node carries ``plugin_namespace`` ("tc_export"), ``plugin_version`` ("1"), ``aot`` (1) and all the
op's settings as attributes (booleans as 0/1), the fields a TensorRT plugin of the same name receives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx
import torch
from onnx import helper
from torch import fx, nn

from ..errors import TCExportError
from ..ops.adjacent import AdjacentMerge
from ..ops.base import TokenOp
from ..ops.evs import EVSPrune
from ..ops.export_ops import calls_as_custom_ops, registered_sites, token_op
from ..ops.prumerge import PruMerge
from ..ops.tome import ToMeMerge
from ..ops.topk import TopKPrune

DOMAIN = "tc_export"
DOMAIN_VERSION = 1
PLUGIN_VERSION = "1"


@dataclass(frozen=True)
class FunctionOp:
    """How a ``TokenOp`` class exports: its ONNX op type and which settings are attributes of the body."""

    op_type: str
    carried: tuple[str, ...] = ()  # integer settings the body reads from the node (may differ between sites)


FUNCTION_OPS: dict[type[TokenOp], FunctionOp] = {}


def register_function_op(cls: type[TokenOp], op_type: str, carried: Sequence[str] = ()) -> None:
    """Export ``cls`` sites as ``tc_export.<op_type>`` function nodes (unregistered classes export flat).

    ``carried``: integer settings (instance attributes) that the body reads from the node's attributes, so sites
    that differ only in them share one body. They must be usable as symbolic ints by the op's forward.
    """
    FUNCTION_OPS[cls] = FunctionOp(op_type, tuple(carried))


register_function_op(ToMeMerge, "ToMeMerge", carried=("r",))
register_function_op(TopKPrune, "TopKSelect", carried=("keep",))
register_function_op(PruMerge, "PruMerge", carried=("tokens",))
register_function_op(AdjacentMerge, "AdjacentMerge", carried=("r",))
register_function_op(EVSPrune, "EVSSelect")

_NOT_SETTINGS = ("training", "creates_size")


@dataclass
class _Site:
    name: str  # submodule name in the GraphModule
    op: TokenOp
    spec: FunctionOp
    shapes: list[tuple[int, ...]]  # x, size, then one per signal (size filled in when the site had None)
    op_type: str = ""
    dtypes: list[torch.dtype] = field(default_factory=list)  # as shapes (a half-precision model: --dtype)

    def fixed(self) -> dict[str, int | float | None]:
        """The settings baked into the body: every plain instance attribute that is not carried."""
        return {
            key: int(value) if isinstance(value, bool) else value
            for key, value in vars(self.op).items()
            if not key.startswith("_") and key not in _NOT_SETTINGS + self.spec.carried
            and (value is None or isinstance(value, (bool, int, float)))
        }

    def state_columns(self) -> int:
        """Columns of the token state: 1 (sizes), or 1 + P with positions carried (``ops.state``)."""
        return self.shapes[1][-1]

    def variant(self) -> tuple:
        return (type(self.op), self.spec.op_type, len(self.shapes), tuple(sorted(self.fixed().items())),
                self.state_columns())

    def attributes(self) -> dict[str, int | float | str]:
        """The node's attributes: plugin conventions, carried settings, then the fixed ones (None left out)."""
        attrs: dict[str, int | float | str] = {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION, "aot": 1}
        attrs.update({name: _setting(self.op, name) for name in self.spec.carried})
        attrs.update({key: value for key, value in self.fixed().items() if value is not None})
        return attrs


def _label(value: object) -> str:
    return "None" if value is None else str(value).replace(".", "p").replace("-", "m")


def _setting(op: TokenOp, name: str) -> int:
    value = getattr(op, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TCExportError(f"{type(op).__name__}.{name} = {value!r}: a carried setting must be an int")
    return value


@dataclass
class FunctionPlan:
    """The export-time module (token op calls as one custom op each), its translation table, the functions."""

    module: fx.GraphModule
    sites: dict[str, _Site]
    functions: list[onnx.FunctionProto] = field(default_factory=list)
    flat: list[str] = field(default_factory=list)  # sites left flat (outside their body's traced range)

    def translation_table(self) -> dict[Callable, Callable]:
        calls = {name: (_onnx_op(site), site.attributes()) for name, site in self.sites.items()}

        def translate(x, size, signals, key: str):  # noqa: ANN001, ANN202 - called by the exporter
            op, attributes = calls[key]
            return op(x, size, *signals, **attributes)

        return {torch.ops.tc_export.token_op.default: translate}

    def registered(self):  # noqa: ANN201 - a context manager
        return registered_sites({name: site.op for name, site in self.sites.items()})

    def attach(self, model: onnx.ModelProto) -> None:
        """Add the function definitions and the ``tc_export`` opset import to ``model``."""
        model.functions.extend(self.functions)
        if not any(entry.domain == DOMAIN for entry in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))


def plan_functions(
    module: nn.Module, example_inputs: Mapping[str, torch.Tensor], opset: int, dynamic_batch: bool = False
) -> FunctionPlan | None:
    """Trace one shape-generic body per op variant and route every site it covers through it.

    Returns None when ``module`` has no registered token op sites (nothing to do).
    """
    if not isinstance(module, fx.GraphModule):
        return None
    sites = _record_sites(module, example_inputs)
    if not sites:
        return None
    groups: dict[tuple, list[_Site]] = {}
    for site in sites:
        groups.setdefault(site.variant(), []).append(site)
    per_type: dict[str, int] = {}
    for variant in groups:
        per_type[variant[1]] = per_type.get(variant[1], 0) + 1
    functions, used, flat = [], {}, []
    for variant, members in groups.items():
        spec = members[0].spec
        name = spec.op_type
        if per_type[spec.op_type] > 1:  # e.g. ToMeMerge_padded0_protected1
            name += "".join(f"_{key}{_label(value)}" for key, value in variant[3])
        if len({v[4] for v in groups if v[1] == spec.op_type}) > 1:  # sites with and without positions
            name += f"_state{variant[4]}"
        function, ranges = _trace_body(members[0], name, opset, dynamic_batch)
        covered = [site for site in members if _in_range(site, ranges)]
        flat.extend(site.name for site in members if site not in covered)
        if covered:
            functions.append(function)
        for site in covered:
            site.op_type = name
            used[site.name] = site
    export_module = calls_as_custom_ops(module, {name: name for name in used})
    return FunctionPlan(export_module, used, functions, flat)


def _record_sites(gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> list[_Site]:
    """The registered token op sites of ``gm`` with their input shapes, from one forward pass."""
    modules = dict(gm.named_modules())
    sites: list[_Site] = []
    hooks = []
    for node in gm.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        spec = FUNCTION_OPS.get(type(module)) if isinstance(module, TokenOp) else None
        if spec is None:
            continue
        site = _Site(str(node.target), module, spec, [])

        def record(_module: nn.Module, args: tuple, site: _Site = site) -> None:
            x, size, *signals = args
            size_shape = (x.shape[0], x.shape[1], 1) if size is None else tuple(size.shape)
            site.shapes = [tuple(x.shape), size_shape, *(tuple(s.shape) for s in signals)]
            site.dtypes = [x.dtype, x.dtype if size is None else size.dtype, *(s.dtype for s in signals)]

        hooks.append(module.register_forward_pre_hook(record))
        sites.append(site)
    if not sites:
        return []
    try:
        with torch.no_grad():
            gm(**example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return [site for site in sites if site.shapes]


class _Generic(nn.Module):
    """The op alone, with its carried settings read from the lengths of 1-D carrier inputs (symbolic in export)."""

    def __init__(self, op: TokenOp, carried: Sequence[str]) -> None:
        super().__init__()
        self.op, self.carried = copy.deepcopy(op), tuple(carried)

    def forward(self, x: torch.Tensor, size: torch.Tensor, signals: tuple, carriers: tuple):  # noqa: ANN201
        for name, carrier in zip(self.carried, carriers):
            setattr(self.op, name, carrier.shape[0])
        out_x, out_size = self.op(x, size, *signals)
        return out_x, size if out_size is None else out_size


def _trace_body(
    site: _Site, name: str, opset: int, dynamic_batch: bool = False
) -> tuple[onnx.FunctionProto, dict[tuple[int, int], tuple]]:
    """Export ``site``'s op with symbolic token counts and settings; returns the function and the traced ranges.

    Symbolic: the token dimension of every input, the carried settings, and the batch with ``dynamic_batch``.
    Channel widths stay static (one model has one width). A carried setting of 1 is traced as 2 (``torch.export``
    would specialise a 1); the returned ranges say where the body holds.
    """
    from .exporter_log import quiet as _quiet
    from .exporter_log import summary as _summary
    from .scatter_free import scatter_free_table

    torch.manual_seed(0)
    dtypes = site.dtypes or [torch.float32] * len(site.shapes)
    x, size, *signals = ((torch.rand(shape) + 0.5).to(dtype) for shape, dtype in zip(site.shapes, dtypes))
    carriers = tuple(torch.zeros(max(_setting(site.op, c), 2)) for c in site.spec.carried)
    auto = torch.export.Dim.AUTO
    tokens = {0: auto, 1: auto} if dynamic_batch else {1: auto}
    dynamic = (tokens, tokens, tuple(tokens for _ in signals), tuple({0: auto} for _ in carriers))
    try:
        with _quiet():
            exported = torch.export.export(
                _Generic(site.op, site.spec.carried), (x, size, tuple(signals), carriers), dynamic_shapes=dynamic
            )
            program = torch.onnx.export(
                exported, opset_version=opset, dynamo=True, optimize=True, verbose=False,
                custom_translation_table=scatter_free_table(),
            )
    except Exception as error:
        raise TCExportError(
            f"could not export {type(site.op).__name__} as an ONNX function ({_summary(error)}); "
            "export flat with --no-functions"
        ) from error
    return _to_function(program.model_proto, name, site, len(carriers)), _input_ranges(exported)


def _input_ranges(program: torch.export.ExportedProgram) -> dict[tuple[int, int], tuple]:
    """(user input index, dim) -> (low, high) the traced body assumed, for every symbolic input dimension."""
    from torch.export.graph_signature import InputKind

    user = {spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    ranges: dict[tuple[int, int], tuple] = {}
    for index, node in enumerate(placeholders):
        value = node.meta.get("val")
        for dim, extent in enumerate(getattr(value, "shape", ())):
            if isinstance(extent, int):
                ranges[(index, dim)] = (extent, extent)
                continue
            bound = program.range_constraints.get(extent.node.expr)
            if bound is not None:
                ranges[(index, dim)] = (int(bound.lower), bound.upper)
    return ranges


def _in_range(site: _Site, ranges: Mapping[tuple[int, int], tuple]) -> bool:
    values = [list(shape) for shape in site.shapes] + [[_setting(site.op, c)] for c in site.spec.carried]
    for (index, dim), (low, high) in ranges.items():
        value = values[index][dim]
        # torch.export assumes symbolic sizes >= 2 (it specialises 0 and 1); a 1 with no other bound is covered.
        if value < low and not (value == 1 and low == 2):
            return False
        if value > high:
            return False
    return True


def _to_function(model: onnx.ModelProto, name: str, site: _Site, num_carriers: int) -> onnx.FunctionProto:
    """The exported graph as a FunctionProto: carriers become attribute references, initializers Constants.

    Every value name gets the prefix ``<name>/``: TensorRT's parser binds function inputs by name and would
    confuse an input named like a tensor of the main graph.
    """
    graph = model.graph
    prefix = f"{name}/"

    def rename(value: str) -> str:
        return prefix + value if value else value

    inputs = [value.name for value in graph.input]
    carriers = dict(zip(inputs[len(inputs) - num_carriers:], site.spec.carried))
    nodes = [helper.make_node("Constant", [], [rename(t.name)], value=t) for t in graph.initializer]
    if carriers:
        nodes.append(helper.make_node("Constant", [], [rename("axes_0")], value_ints=[0]))
    for carrier, setting in carriers.items():
        scalar = onnx.AttributeProto(name="value_int", type=onnx.AttributeProto.INT, ref_attr_name=setting)
        constant = helper.make_node("Constant", [], [rename(f"{setting}_scalar")])
        constant.attribute.append(scalar)
        unsqueeze = helper.make_node("Unsqueeze", [rename(f"{setting}_scalar"), rename("axes_0")], [rename(carrier)])
        nodes += [constant, unsqueeze]
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or any(a.type in subgraphs for a in node.attribute):
            raise TCExportError(
                f"{name}: the exported body has a {node.domain or 'ai.onnx'}::{node.op_type} node that a function "
                "body cannot hold; export with --no-functions"
            )
        if node.op_type == "Shape" and node.input[0] in carriers:  # the carrier is 1-D: its shape is [setting]
            bounds = {a.name: a.i for a in node.attribute}
            if bounds.get("start", 0) not in (0, -1) or bounds.get("end", 1) < 1:
                raise TCExportError(f"{name}: unexpected read of a setting in the exported body")
            nodes.append(helper.make_node("Identity", [rename(node.input[0])], [rename(node.output[0])]))
            continue
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        del copied.input[:]
        del copied.output[:]
        copied.input.extend(rename(v) for v in node.input)
        copied.output.extend(rename(v) for v in node.output)
        copied.name = rename(node.name)
        del copied.metadata_props[:]
        nodes.append(copied)
    attributes = list(site.attributes())
    return helper.make_function(
        DOMAIN, name,
        inputs=[rename(v) for v in inputs[: len(inputs) - num_carriers]],
        outputs=[rename(v.name) for v in graph.output],
        nodes=nodes,
        opset_imports=[entry for entry in model.opset_import if entry.domain in ("", "ai.onnx")],
        attributes=attributes,
        doc_string=f"tc-export {type(site.op).__name__}: inputs (x, size, {', '.join(site.op.signals)}) -> (x, size)",
    )


def _onnx_op(site: _Site):  # noqa: ANN202 - an onnxscript Op
    """An onnxscript op for ``tc_export.<op_type>`` with the site's inputs and attributes (what the exporter calls)."""
    from onnxscript.values import Op, Opset

    Param = onnx.defs.OpSchema.FormalParameter
    Attr, AttrType = onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    inputs = [Param("x", "T"), Param("size", "T")] + [Param(signal, "T") for signal in site.op.signals]
    kinds = {str: AttrType.STRING, int: AttrType.INT, float: AttrType.FLOAT}
    attributes = [Attr(key, kinds[type(value)]) for key, value in site.attributes().items()]
    schema = onnx.defs.OpSchema(
        site.op_type, DOMAIN, DOMAIN_VERSION,
        inputs=inputs, outputs=[Param("x_out", "T"), Param("size_out", "T")],
        type_constraints=[("T", types, "float tensors")], attributes=attributes,
    )
    return Op(Opset(DOMAIN, DOMAIN_VERSION), site.op_type, schema)


def function_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ``tc_export`` function call nodes of ``model``'s main graph."""
    return [node for node in model.graph.node if node.domain == DOMAIN]


__all__ = [
    "FUNCTION_OPS", "FunctionOp", "FunctionPlan", "function_nodes", "plan_functions", "register_function_op",
    "token_op",
]
