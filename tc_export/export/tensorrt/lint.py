"""TensorRT lint: check an ONNX model against TensorRT's ONNX parser support without TensorRT or a GPU.

The rules live in ``trt_support.yaml`` (each with the TensorRT versions it applies to and its source); this
module only applies them: unsupported and data-dependent operators, build-time-constant inputs, attribute
values, TopK's K limit, Einsum and ScatterElements caveats, the opset range, static shapes (only a batch
dimension may stay symbolic) and the conventions of plugin-backed nodes in the ``tc_export`` domain.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import yaml
from onnx import numpy_helper

from ...errors import ConfigError, TCExportError
from ..files import read_onnx

TABLE_PATH = Path(__file__).with_name("trt_support.yaml")
DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_SHAPE_PROBLEMS = 5  # tensors named one by one before the rest are summarised


class LintError(TCExportError):
    """The model has TensorRT lint errors (raised before an engine build or a bundle)."""

    exit_code = 1


@dataclass(frozen=True)
class LintProblem:
    severity: str  # "error" | "warning"
    node: str
    op_type: str
    message: str
    suggestion: str = ""
    rule: str = ""
    source: str = ""

    def describe(self) -> str:
        fix = f"; fix: {self.suggestion}" if self.suggestion else ""
        return f"{self.severity}: {self.op_type} {self.node!r}: {self.message}{fix} [{self.rule}; {self.source}]"


@dataclass
class LintReport:
    trt_version: str
    problems: list[LintProblem] = field(default_factory=list)

    @property
    def errors(self) -> list[LintProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[LintProblem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        verdict = "clean" if not self.problems else ("passed with warnings" if self.ok else "FAILED")
        return (f"TensorRT {self.trt_version} lint: {verdict} ({len(self.errors)} errors, "
                f"{len(self.warnings)} warnings)")

    def describe(self) -> str:
        return "\n".join([*(p.describe() for p in self.problems), self.summary()])


def parse_version(text: str) -> tuple[int, ...]:
    """``"10.3"`` / ``"10.3.0.26"`` -> (10, 3, 0, 26); a ConfigError otherwise."""
    if not re.fullmatch(r"\d+(\.\d+)*", str(text).strip()):
        raise ConfigError(f"TensorRT version must look like 10.3 or 10.3.0, got {text!r}")
    return tuple(int(part) for part in str(text).strip().split("."))


def applies(rule: dict, version: tuple[int, ...]) -> bool:
    """A rule applies to versions in [since, until)."""
    since, until = rule.get("since"), rule.get("until")
    return (since is None or version >= parse_version(since)) and (until is None or version < parse_version(until))


@functools.lru_cache(maxsize=1)
def support_table() -> dict[str, Any]:
    with open(TABLE_PATH) as handle:
        return yaml.safe_load(handle)


def opset_range(trt_version: str) -> tuple[int, int, str] | None:
    """(min, max, source) of the default-domain opset TensorRT ``trt_version`` parses, if the table knows."""
    version = parse_version(trt_version)
    for rule in support_table()["opset"]:
        if applies(rule, version):
            return rule["min"], rule["max"], _source(rule)
    return None


def _source(rule: dict) -> str:
    sources = support_table()["sources"]
    return str(sources.get(rule.get("source", ""), rule.get("source", "")))


def lint_model(model_or_path: onnx.ModelProto | str | Path, trt_version: str = "10.3",
               allow_dynamic_batch: bool = True) -> LintReport:
    """Check every node (function bodies and subgraphs included), the opset and the shapes."""
    version = parse_version(trt_version)
    if isinstance(model_or_path, onnx.ModelProto):
        model, folder = model_or_path, None
    else:
        model, folder = read_onnx(model_or_path, "lint"), Path(model_or_path).resolve().parent
    linter = _Linter(model, version, folder)
    report = LintReport(trt_version=str(trt_version))
    report.problems.extend(linter.check_opset())
    report.problems.extend(linter.check_graph(model.graph, prefix=""))
    report.problems.extend(linter.check_functions())
    report.problems.extend(linter.check_shapes(allow_dynamic_batch))
    return report


def require_lint_clean(onnx_path: Path, trt_version: str, say=print) -> LintReport:
    """Lint before an engine build or a bundle: print warnings, raise ``LintError`` on errors."""
    report = lint_model(onnx_path, trt_version)
    for problem in report.problems:
        say(problem.describe())
    if not report.ok:
        first = report.errors[0]
        raise LintError(f"TensorRT {trt_version} lint found {len(report.errors)} error(s) in {onnx_path}, first: "
                        f"{first.op_type} {first.node!r}: {first.message} (run `tc-export lint {onnx_path}`)")
    return report


class _Linter:
    def __init__(self, model: onnx.ModelProto, version: tuple[int, ...], folder: Path | None = None) -> None:
        self.model = model
        self.folder = folder  # where the model's external-data files are (None: a model in memory)
        self.version = version
        self.table = support_table()
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.constants = {init.name: init for init in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                self.constants[node.output[0]] = _constant_value(node)
        self.called: dict[tuple[str, str], list[onnx.NodeProto]] = {}

    # --- opset ---------------------------------------------------------------------------------------
    def check_opset(self) -> Iterator[LintProblem]:
        opsets = {o.domain: o.version for o in self.model.opset_import}
        opset = opsets.get("", opsets.get("ai.onnx"))
        known = opset_range(".".join(map(str, self.version)))
        if known is None:
            yield LintProblem("warning", "(model)", "opset", f"no opset data for TensorRT {_v(self.version)}",
                              "lint for a TensorRT 10.x or 11.x version", "opset", "trt_support.yaml")
            return
        low, high, source = known
        if opset is None:
            return
        if opset < low:
            yield LintProblem("error", "(model)", "opset", f"opset {opset} is below TensorRT {_v(self.version)}'s "
                              f"minimum {low}", f"re-export with opset {low}..{high}", "opset", source)
        elif opset > high:
            yield LintProblem("warning", "(model)", "opset", f"opset {opset} is above TensorRT {_v(self.version)}'s "
                              f"maximum {high}: nodes whose definition changed may fail to import",
                              f"re-export with --opset {high} or lower", "opset", source)

    # --- nodes -----------------------------------------------------------------------------------------
    def check_graph(self, graph: onnx.GraphProto, prefix: str, constants: dict | None = None) -> Iterator[LintProblem]:
        constants = self.constants if constants is None else constants
        consumed = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        for index, node in enumerate(graph.node):
            name = prefix + (node.name or f"{node.op_type}#{index}")
            yield from self.check_node(node, name, constants, consumed)
            for attribute in node.attribute:
                for subgraph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else
                                 list(attribute.graphs)):
                    sub_constants = dict(constants)
                    sub_constants.update({i.name: i for i in subgraph.initializer})
                    yield from self.check_graph(subgraph, f"{name}/{attribute.name}:", sub_constants)

    def check_node(self, node: onnx.NodeProto, name: str, constants: dict, consumed: set) -> Iterator[LintProblem]:
        if node.domain not in DEFAULT_DOMAINS:
            self.called.setdefault((node.domain, node.op_type), []).append(node)
            yield from self.check_custom(node, name)
            return
        op = node.op_type
        for rule in self.table["unsupported"]:
            if op in rule["ops"] and applies(rule, self.version):
                yield self.problem("error", node, name, f"TensorRT {_v(self.version)} has no importer for {op}",
                                   rule.get("suggestion", ""), "unsupported-op", rule)
                return
        if not any(op in rule["ops"] and applies(rule, self.version) for rule in self.table["supported"]):
            yield self.problem("warning", node, name, f"{op} is not in TensorRT's ONNX operator table",
                               "check onnx-tensorrt's operators.md for your TensorRT version", "unknown-op",
                               {"source": "ops-10.15"})
        for rule in self.table["data_dependent"]:
            if op in rule["ops"]:
                yield self.problem("error", node, name, rule["message"], rule["suggestion"], "data-dependent-shape",
                                   rule)
        for rule in self.table["constant_inputs"]:
            index = rule["input"]
            if op in rule["ops"] and applies(rule, self.version) and len(node.input) > index and node.input[index]:
                if node.input[index] not in constants:
                    message = rule.get("message", f"input {rule['name']} must be a build-time constant")
                    yield self.problem(rule["severity"], node, name, message,
                                       f"make {rule['name']} an initializer (fold constants before export)",
                                       "constant-input", rule)
        for rule in self.table["attributes"]:
            if op in rule["ops"] and applies(rule, self.version):
                value = _attribute(node, rule["attribute"], rule["default"])
                if value not in rule["allowed"]:
                    yield self.problem(rule["severity"], node, name,
                                       f"{rule['attribute']}={value!r} is not supported (allowed: "
                                       f"{', '.join(map(str, rule['allowed']))})", rule["suggestion"],
                                       f"attribute-{rule['attribute']}", rule)
        for rule in self.table["first_output_only"]:
            if op in rule["ops"] and any(o and o in consumed for o in node.output[1:]):
                yield self.problem("error", node, name, f"only the first output of {op} is supported",
                                   "compute the other outputs with separate operators", "first-output-only", rule)
        if op == "TopK":
            yield from self.check_topk(node, name, constants)
        elif op == "ScatterElements":
            yield from self.check_scatter(node, name)
        elif op == "Einsum":
            yield from self.check_einsum(node, name)

    def check_topk(self, node, name, constants) -> Iterator[LintProblem]:
        rule = self.table["topk"]
        if len(node.input) > 1 and node.input[1] in constants and constants[node.input[1]] is not None:
            k = numpy_helper.to_array(constants[node.input[1]]).reshape(-1)
            if k.size and int(k[0]) >= rule["max_k_exclusive"]:
                yield self.problem("error", node, name, f"K={int(k[0])} but TensorRT's TopK needs "
                                   f"K < {rule['max_k_exclusive']}", "select in stages (TopK over blocks, then "
                                   "TopK over the candidates) or keep fewer tokens", "topk-k-limit", rule)

    def check_scatter(self, node, name) -> Iterator[LintProblem]:
        rule = self.table["scatter_reduction"]
        reduction = _attribute(node, "reduction", "none")
        if reduction == "none" or not applies(rule, self.version):
            return
        yield self.problem("warning", node, name, f"reduction={reduction!r}: {rule['message']}", rule["suggestion"],
                           "scatter-reduction", rule)
        if len(node.input) > 1 and self.types.get(node.input[1], onnx.TensorProto.INT64) != onnx.TensorProto.INT64:
            yield self.problem("error", node, name, "the ScatterElements plugin takes INT64 indices only",
                               "cast the indices to int64", "scatter-reduction-indices", rule)

    def check_einsum(self, node, name) -> Iterator[LintProblem]:
        rule = self.table["einsum"]
        if not applies(rule, self.version):
            return
        equation = str(_attribute(node, "equation", "")).replace(" ", "")
        terms = equation.split("->")[0].split(",")
        reasons = []
        if "..." in equation:
            reasons.append("ellipsis")
        if any(len(set(term)) != len(term) for term in terms if "..." not in term):
            reasons.append("a diagonal (repeated index in one operand)")
        if self._einsum_broadcasts(terms, node):
            reasons.append("broadcasting between inputs")
        if reasons:
            yield self.problem("error", node, name, f"Einsum {equation!r} uses {' and '.join(reasons)}, supported "
                               f"only from TensorRT {rule['until']}", rule["suggestion"], "einsum", rule)

    def _einsum_broadcasts(self, terms: list[str], node) -> bool:
        sizes: dict[str, set[int]] = {}
        for term, tensor in zip(terms, node.input):
            dims = self.shapes.get(tensor)
            if dims is None or "..." in term or len(dims) != len(term):
                continue
            for letter, dim in zip(term, dims):
                if isinstance(dim, int):
                    sizes.setdefault(letter, set()).add(dim)
        return any(len(values) > 1 and 1 in values for values in sizes.values())

    # --- plugin-backed nodes ---------------------------------------------------------------------------
    def check_custom(self, node: onnx.NodeProto, name: str) -> Iterator[LintProblem]:
        plugins = self.table["plugins"]
        has_function = (node.domain, node.op_type) in self.functions
        if node.domain != plugins["domain"]:
            if not has_function:
                yield self.problem("error", node, name, f"domain {node.domain!r} has no TensorRT importer and the "
                                   "model has no local function for it: it needs a TensorRT plugin named "
                                   f"{node.op_type}", "export it as a model-local function or with standard "
                                   "operators", "custom-op", plugins)
            return
        if not has_function:
            yield self.problem("error", node, name, f"no model-local function {node.domain}::{node.op_type}: "
                               "ONNX Runtime cannot run it and TensorRT has no body to fall back to",
                               "export with the tc_export functions (not --no-functions with plugin nodes)",
                               "plugin-function", plugins)
        attributes = {a.name: a for a in node.attribute}
        namespace = attributes.get("plugin_namespace")
        if namespace is None or namespace.type != onnx.AttributeProto.STRING or not namespace.s:
            yield self.problem("error", node, name, "missing string attribute plugin_namespace: from TensorRT "
                               f"{plugins['namespace_attribute_required_since']} the parser looks for a plugin "
                               "only when it is set", f"set plugin_namespace={plugins['domain']!r}",
                               "plugin-namespace", plugins)
        version = attributes.get("plugin_version")
        if version is None:
            yield self.problem("warning", node, name, "no plugin_version attribute (TensorRT assumes \"1\")",
                               "set plugin_version=\"1\"", "plugin-version", plugins)
        elif version.type != onnx.AttributeProto.STRING:
            yield self.problem("error", node, name, "plugin_version must be a string attribute",
                               "set plugin_version=\"1\"", "plugin-version", plugins)
        fields = plugins.get("fields", {}).get(node.op_type)
        conventions = {"plugin_namespace", "plugin_version", "aot"}
        for extra in sorted(set(attributes) - conventions - set(fields)) if fields is not None else ():
            yield self.problem("error", node, name, f"setting {extra} is not implemented by the shipped TensorRT "
                               f"plugin {plugins['domain']}::{node.op_type} (fields: {', '.join(fields)}): a "
                               "registered plugin would win over the function body and compute something else",
                               f"build without the {plugins['domain']} plugins (TensorRT runs the function body) "
                               f"or drop the {extra} option", "plugin-fields", plugins)
        aot = attributes.get("aot")
        if aot is not None:
            if aot.type != onnx.AttributeProto.INT or aot.i not in (0, 1):
                yield self.problem("error", node, name, "aot must be an int attribute, 0 or 1", "set aot=1 or 0",
                                   "plugin-aot", plugins)
        yield from self.check_plugin_tokens(node, name)

    def check_plugin_tokens(self, node: onnx.NodeProto, name: str) -> Iterator[LintProblem]:
        """The plugin kernels' token limits (plugins/launch.py): past them a ``--plugins on`` build fails."""
        from ...plugins.launch import PLUGIN_TOKEN_LIMITS

        plugin = next((p for p in PLUGIN_TOKEN_LIMITS if node.op_type == p or node.op_type.startswith(p + "_")), None)
        dims = self.shapes.get(node.input[0]) if plugin and node.input else None
        if dims and len(dims) > 1 and isinstance(dims[1], int) and dims[1] > PLUGIN_TOKEN_LIMITS[plugin]:
            yield self.problem("warning", node, name, f"{dims[1]} tokens: the {plugin} plugin kernel takes at most "
                               f"{PLUGIN_TOKEN_LIMITS[plugin]}, so a build with --plugins on fails here",
                               "build with --plugins off (TensorRT runs the function body)", "plugin-token-limit",
                               self.table["plugins"])

    def check_functions(self) -> Iterator[LintProblem]:
        """Function bodies are what TensorRT builds when no plugin is registered: lint them like the graph."""
        for (domain, fname), function in self.functions.items():
            constants: dict = {}
            for node in function.node:
                if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                    constants[node.output[0]] = _constant_value(node)
            calls = self.called.get((domain, fname), [])
            for position, formal in enumerate(function.input):
                actuals = [call.input[position] for call in calls if len(call.input) > position]
                if actuals and all(a in self.constants for a in actuals):
                    constants[formal] = self.constants[actuals[0]]
            # A body is generic over its input shapes: values computed from Shape/Size are build-time constants
            # once the call sites' shapes are static (checked on the graph), so count them as constants.
            for name in _shape_derived(function):
                constants.setdefault(name, None)
            graph = onnx.helper.make_graph(list(function.node), fname, [], [])
            graph.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                                for o in function.output)
            yield from self.check_graph(graph, f"{fname}:", constants)

    # --- shapes ----------------------------------------------------------------------------------------
    @functools.cached_property
    def batch_symbols(self) -> set[str]:
        """dim_params of the graph inputs' first dimension (the dynamic batch, if any)."""
        initializers = {init.name for init in self.model.graph.initializer}
        return {value.type.tensor_type.shape.dim[0].dim_param for value in self.model.graph.input
                if value.name not in initializers and value.type.tensor_type.shape.dim
                and value.type.tensor_type.shape.dim[0].HasField("dim_param")}

    @functools.cached_property
    def inferred(self) -> onnx.ModelProto | None:
        return _infer(self.model)

    @functools.cached_property
    def types(self) -> dict[str, int]:
        return _value_types(self.inferred or self.model)

    @functools.cached_property
    def shapes(self) -> dict[str, list]:
        return _shapes(self.inferred or self.model)

    def batch_shapes(self) -> dict[str, list] | None:
        """Every tensor's shape with the batch at 2 and at 3 (ONNX Runtime on zeros): dims that agree are static,
        dims that differ follow the batch.

        ONNX shape inference cannot multiply symbols (a Reshape to [-1, 17, 64] of [batch, 3, 17, 64] comes out
        unknown, so does a Range over the batch), so the shapes are observed instead. Data-dependent operators
        are flagged by their own rule.
        """
        runs = [_observed_shapes(self.model, self.types, self.batch_symbols, batch, self.folder) for batch in (2, 3)]
        if runs[0] is None or runs[1] is None:
            return None
        merged: dict[str, list] = {}
        for name, dims2 in runs[0].items():
            dims3 = runs[1].get(name)
            if dims3 is None or len(dims3) != len(dims2):
                merged[name] = [None] * len(dims2)
                continue
            merged[name] = [a if a == b else "batch" for a, b in zip(dims2, dims3)]
        return merged

    def check_shapes(self, allow_dynamic_batch: bool) -> Iterator[LintProblem]:
        batch_symbols = set(self.batch_symbols) if allow_dynamic_batch else set()
        graph = self.model.graph
        initializers = {init.name for init in graph.initializer}
        dynamic_inputs = []
        for value in graph.input:
            dims = self.shapes.get(value.name) if value.name not in initializers else []
            if dims is None or any(not isinstance(d, int) and d not in batch_symbols for d in dims) or (
                    any(d in batch_symbols for d in dims[1:])):
                dynamic_inputs.append((value.name, dims))
        for name, dims in dynamic_inputs:  # nothing after a dynamic input is static: name the inputs only
            shown = _format_dims(dims) if dims is not None else "unknown"
            yield LintProblem("error", name, "input", f"graph input {name!r} has shape {shown}: not static"
                              + (" (only the first, batch dimension may stay symbolic)" if allow_dynamic_batch else ""),
                              "export with fixed input shapes (static token counts)", "static-shapes", "reference")
        if dynamic_inputs:
            return
        shapes = self.batch_shapes() if batch_symbols else self.shapes
        if self.inferred is None or shapes is None:
            yield LintProblem("warning", "(model)", "shapes", "ONNX shape inference failed: shapes not checked",
                              "run onnx.shape_inference.infer_shapes to see why", "static-shapes", "onnx")
            return
        if batch_symbols:
            batch_symbols.add("batch")  # what batch_shapes() calls a batch-derived dim
        producers = {}
        for index, node in enumerate(graph.node):
            for output in node.output:
                producers[output] = (node.name or f"{node.op_type}#{index}", node.op_type)
        bad = []
        names = [v.name for v in graph.input if v.name not in initializers]
        names += [o for node in graph.node for o in node.output if o]
        for tensor in names:
            dims = shapes.get(tensor)
            if dims is None:
                bad.append((tensor, "has no known shape"))
            elif not all(isinstance(d, int) or (isinstance(d, str) and _batch_only(d, batch_symbols)) for d in dims):
                bad.append((tensor, f"has shape {_format_dims(dims)}"))
        for tensor, what in bad[:MAX_SHAPE_PROBLEMS]:
            node, op = producers.get(tensor, (tensor, "input"))
            yield LintProblem("error", node, op, f"tensor {tensor!r} {what}: not static"
                              + (" (only a batch dimension may stay symbolic)" if allow_dynamic_batch else ""),
                              "export with fixed input shapes (static token counts); fold constants",
                              "static-shapes", "reference")
        if len(bad) > MAX_SHAPE_PROBLEMS:
            yield LintProblem("error", "(model)", "shapes", f"{len(bad) - MAX_SHAPE_PROBLEMS} more tensors without a "
                              "static shape", "", "static-shapes", "reference")

    def problem(self, severity: str, node, name: str, message: str, suggestion: str, rule_id: str,
                rule: dict) -> LintProblem:
        return LintProblem(severity, name, node.op_type, message, suggestion, rule_id, _source(rule))


def _infer(model: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - the caller reports that shapes were not checked
        return None


def _observed_shapes(model: onnx.ModelProto, types: dict[str, int], batch_symbols: set[str],
                     batch: int, folder: Path | None = None) -> dict[str, list] | None:
    """Every tensor's shape in ONNX Runtime at this batch. A model with external data runs from a temporary file
    beside its data files (``folder``), so ONNX Runtime finds them without the weights being read here."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    del concrete.graph.value_info[:]
    del concrete.graph.output[:]
    initializers = {init.name for init in model.graph.initializer}
    feed = {}
    for value in concrete.graph.input:
        if value.name in initializers:
            continue
        dims = [batch if d.dim_param in batch_symbols else d.dim_value for d in value.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feed[value.name] = np.zeros(dims, dtype=dtype)
    names = [o for node in concrete.graph.node for o in node.output if o and types.get(o)]
    concrete.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in names)
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        if folder is not None and _has_external_data(concrete):
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".lint-", suffix=".onnx") as file:
                onnx.save_model(concrete, file.name)
                session = ort.InferenceSession(file.name, options, providers=["CPUExecutionProvider"])
        else:
            session = ort.InferenceSession(concrete.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(names, feed)
    except Exception:  # noqa: BLE001 - the caller reports that shapes were not checked
        return None
    shapes = {name: list(np.shape(v)) for name, v in zip(names, values)}
    shapes.update({name: list(v.shape) for name, v in feed.items()})
    return shapes


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    shapes = {}
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else
                                  (d.dim_param if d.HasField("dim_param") else None)
                                  for d in value.type.tensor_type.shape.dim]
    return shapes


def _shape_derived(function: onnx.FunctionProto) -> set[str]:
    """Tensors of a function body computed only from constants and the shapes (Shape, Size) of its tensors."""
    derived: set[str] = set()
    for node in function.node:  # bodies are topologically sorted
        if node.op_type in ("Constant", "Shape", "Size") or (
                node.input and all(not i or i in derived for i in node.input)):
            derived.update(o for o in node.output if o)
    return derived


def _batch_only(dim: str, batch_symbols: set[str]) -> bool:
    """``batch``, ``8*batch``, ``batch + 1``: an expression in the batch symbol(s) only."""
    if not batch_symbols:
        return False
    symbols = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", dim)
    rest = re.sub(r"[A-Za-z_][A-Za-z0-9_]*", "", dim)
    return bool(symbols) and set(symbols) <= batch_symbols and re.fullmatch(r"[\d\s*+()-]*", rest) is not None


def _format_dims(dims: Iterable) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attribute in node.attribute:
        if attribute.name == "value":
            return attribute.t
    return None  # value_int / value_floats ...: constant, value not needed


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {init.name: init.data_type for init in model.graph.initializer}
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _v(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))
