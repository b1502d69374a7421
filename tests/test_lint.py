"""TensorRT lint: one small hand-built graph per rule, and the tool's own exports lint clean."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tc_export import ExportConfig, compress, export_onnx
from tc_export.cli.main import main
from tc_export.errors import ConfigError
from tc_export.export.tensorrt.lint import LintError, lint_model, parse_version, require_lint_clean
from tc_export.passes import AdjacentConfig, PruMergeConfig, ToMeConfig, TopKConfig

from .conftest import tiny_timm_vit

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def model(nodes, inputs, outputs, initializers=(), opset=18, functions=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def vi(name, dims, dtype=F):
    return helper.make_tensor_value_info(name, dtype, dims)


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def rules(report, severity=None):
    return {p.rule for p in report.problems if severity is None or p.severity == severity}


def test_clean_graph_has_no_problems():
    m = model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [2, 4])], [vi("y", [2, 4])])
    report = lint_model(m)
    assert report.ok and not report.problems and bool(report)


def test_nonzero_is_a_data_dependent_shape_error():
    m = model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [vi("x", [2, 4])], [vi("y", None, I64)])
    report = lint_model(m)
    assert not report.ok
    problem = next(p for p in report.errors if p.rule == "data-dependent-shape")
    assert (problem.node, problem.op_type) == ("nz", "NonZero")
    assert "TopK" in problem.suggestion and problem.source
    assert "static-shapes" in rules(report, "error")  # its output has no static shape either


def test_unsupported_op_depends_on_version():
    unique = model([helper.make_node("Unique", ["x"], ["y"], name="u")], [vi("x", [4])], [vi("y", None)])
    assert "unsupported-op" in rules(lint_model(unique), "error")
    window = model([helper.make_node("HannWindow", ["n"], ["w"], name="hann")], [], [vi("w", [8])],
                   [const("n", 8)])
    assert "unsupported-op" in rules(lint_model(window, "10.3"), "error")  # added in 10.4
    assert "unsupported-op" not in rules(lint_model(window, "10.4"))


def test_topk_sorted_and_k_limit():
    unsorted = model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="t", sorted=0)],
                     [vi("x", [1, 8])], [vi("v", [1, 2]), vi("i", [1, 2], I64)], [const("k", [2])])
    problems = [p for p in lint_model(unsorted).errors if p.rule == "attribute-sorted"]
    assert problems and problems[0].node == "t" and "sorted=0" in problems[0].message
    big = model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="big")],
                [vi("x", [1, 4000])], [vi("v", [1, 3840]), vi("i", [1, 3840], I64)], [const("k", [3840])])
    assert "topk-k-limit" in rules(lint_model(big), "error")
    ok = model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="ok")],
               [vi("x", [1, 4000])], [vi("v", [1, 3839]), vi("i", [1, 3839], I64)], [const("k", [3839])])
    assert lint_model(ok).ok
    dynamic_k = model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="dk")],
                      [vi("x", [1, 8]), vi("k", [1], I64)], [vi("v", None), vi("i", None, I64)])
    report = lint_model(dynamic_k)
    assert "constant-input" in rules(report, "warning") and "static-shapes" in rules(report, "error")


def test_scatter_elements_reduction_is_a_warning_with_int64_indices():
    nodes = [helper.make_node("ScatterElements", ["x", "idx", "u"], ["y"], name="sc", axis=0, reduction="add")]
    m = model(nodes, [vi("x", [4]), vi("u", [2])], [vi("y", [4])], [const("idx", [0, 0])])
    report = lint_model(m)
    assert report.ok and "scatter-reduction" in rules(report, "warning")
    assert "nondeterministic" in report.warnings[0].message
    m32 = model(nodes, [vi("x", [4]), vi("u", [2])], [vi("y", [4])], [const("idx", [0, 0], np.int32)])
    assert "scatter-reduction-indices" in rules(lint_model(m32), "error")
    plain = model([helper.make_node("ScatterElements", ["x", "idx", "u"], ["y"], name="sc", axis=0)],
                  [vi("x", [4]), vi("u", [2])], [vi("y", [4])], [const("idx", [0, 1])])
    assert not lint_model(plain).problems


def test_scatter_nd_reduction_is_an_error():
    m = model([helper.make_node("ScatterND", ["x", "idx", "u"], ["y"], name="snd", reduction="add")],
              [vi("x", [4]), vi("u", [1])], [vi("y", [4])], [const("idx", [[1]])])
    assert "attribute-reduction" in rules(lint_model(m), "error")


def test_einsum_ellipsis_diagonal_broadcast_before_10_12():
    def einsum(equation, a, b, out):
        return model([helper.make_node("Einsum", ["a", "b"], ["y"], name="e", equation=equation)],
                     [vi("a", a), vi("b", b)], [vi("y", out)])

    matmul = einsum("ij,jk->ik", [2, 3], [3, 4], [2, 4])
    assert lint_model(matmul).ok
    for m in (einsum("...ij,...jk->...ik", [5, 2, 3], [5, 3, 4], [5, 2, 4]),
              einsum("ii,ij->ij", [3, 3], [3, 4], [3, 4]),
              einsum("bij,bjk->bik", [1, 2, 3], [5, 3, 4], [5, 2, 4])):
        assert "einsum" in rules(lint_model(m, "10.3"), "error")
        assert "einsum" not in rules(lint_model(m, "10.12"))


def test_cumsum_axis_must_be_constant():
    m = model([helper.make_node("CumSum", ["x", "axis"], ["y"], name="cs")],
              [vi("x", [2, 3]), vi("axis", [], I64)], [vi("y", [2, 3])])
    problem = next(p for p in lint_model(m).errors if p.rule == "constant-input")
    assert problem.node == "cs" and "axis" in problem.message
    const_axis = model([helper.make_node("CumSum", ["x", "axis"], ["y"], name="cs")],
                       [vi("x", [2, 3])], [vi("y", [2, 3])], [const("axis", 1)])
    assert lint_model(const_axis).ok


def test_opset_range():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])], opset=23)
    assert "opset" in rules(lint_model(m, "10.3"), "warning")  # 10.3 parses up to opset 20
    assert not lint_model(m, "11.0").problems
    old = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])], opset=8)
    assert "opset" in rules(lint_model(old), "error")


def test_static_shapes_allow_only_a_batch_dimension():
    relu = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    batch = model(relu, [vi("x", ["batch", 4])], [vi("y", ["batch", 4])])
    assert lint_model(batch).ok
    assert "static-shapes" in rules(lint_model(batch, allow_dynamic_batch=False), "error")
    sequence = model(relu, [vi("x", ["batch", "seq"])], [vi("y", ["batch", "seq"])])
    problems = [p for p in lint_model(sequence).errors if p.rule == "static-shapes"]
    assert problems and "seq" in problems[0].message


def test_reshape_of_a_dynamic_batch_stays_batch_derived():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="r"),
             helper.make_node("Shape", ["x"], ["s"], name="s", end=1),
             helper.make_node("Squeeze", ["s"], ["b"], name="sq"),
             helper.make_node("Range", ["zero", "b", "one"], ["ids"], name="range")]
    m = model(nodes, [vi("x", ["batch", 3, 4])], [vi("y", [None, 4]), vi("ids", [None], I64)],
              [const("shape", [-1, 4]), const("zero", 0), const("one", 1)])
    assert lint_model(m).ok, lint_model(m).describe()


def test_first_output_only():
    m = model([helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="ln")],
              [vi("x", [2, 4]), vi("g", [4])], [vi("y", [2, 4]), vi("mean", [2, 1])])
    assert "first-output-only" in rules(lint_model(m), "error")


def plugin_model(with_function=True, **attributes):
    body = [helper.make_node("Identity", ["x"], ["y"])]
    function = helper.make_function("tc_export", "ToMeMerge", ["x"], ["y"], body,
                                    [helper.make_opsetid("", 18)], attributes=list(attributes))
    call = helper.make_node("ToMeMerge", ["a"], ["b"], name="merge0", domain="tc_export", **attributes)
    return model([call], [vi("a", [1, 5, 8])], [vi("b", [1, 5, 8])], functions=[function] if with_function else [],
                 extra_opsets=["tc_export"])


def test_plugin_node_conventions():
    good = plugin_model(plugin_namespace="tc_export", plugin_version="1", aot=1)
    report = lint_model(good)
    assert not report.problems, report.describe()
    no_function = lint_model(plugin_model(False, plugin_namespace="tc_export", plugin_version="1"))
    assert "plugin-function" in rules(no_function, "error")
    assert no_function.errors[0].node == "merge0"
    assert "plugin-namespace" in rules(lint_model(plugin_model(plugin_version="1")), "error")
    assert "plugin-version" in rules(lint_model(plugin_model(plugin_namespace="tc_export")), "warning")
    assert "plugin-version" in rules(lint_model(plugin_model(plugin_namespace="tc_export", plugin_version=1)), "error")
    assert "plugin-aot" in rules(lint_model(plugin_model(plugin_namespace="tc_export", plugin_version="1", aot=2)))
    shipped = plugin_model(plugin_namespace="tc_export", plugin_version="1", r=2, protected=1, padded=0)
    assert not lint_model(shipped).problems
    windowed = lint_model(plugin_model(plugin_namespace="tc_export", plugin_version="1", r=2, window=4))
    assert rules(windowed, "error") == {"plugin-fields"}
    assert "setting window" in windowed.errors[0].message


def test_function_bodies_are_linted_and_other_domains_need_a_function():
    body = [helper.make_node("NonZero", ["x"], ["y"], name="inner")]
    function = helper.make_function("tc_export", "Bad", ["x"], ["y"], body, [helper.make_opsetid("", 18)])
    call = helper.make_node("Bad", ["a"], ["b"], name="bad0", domain="tc_export", plugin_namespace="tc_export",
                            plugin_version="1")
    report = lint_model(model([call], [vi("a", [4])], [vi("b", None, I64)], functions=[function],
                              extra_opsets=["tc_export"]))
    assert any(p.rule == "data-dependent-shape" and p.node == "Bad:inner" for p in report.errors)
    custom = model([helper.make_node("Gelu2", ["a"], ["b"], name="g", domain="com.example")],
                   [vi("a", [4])], [vi("b", [4])], extra_opsets=["com.example"])
    assert "custom-op" in rules(lint_model(custom), "error")


def test_bad_version_and_path_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        parse_version("ten")
    with pytest.raises(ConfigError):
        lint_model(tmp_path / "missing.onnx")
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)


def test_require_lint_clean_raises_on_errors(tmp_path):
    path = tmp_path / "nz.onnx"
    onnx.save(model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [vi("x", [2])], [vi("y", None, I64)]),
              path)
    with pytest.raises(LintError) as info:
        require_lint_clean(path, "10.3", say=lambda _: None)
    assert info.value.exit_code == 1 and "NonZero" in str(info.value)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_lint_cli_exit_codes(tmp_path, capsys):
    bad = tmp_path / "nz.onnx"
    onnx.save(model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [vi("x", [2])], [vi("y", None, I64)]), bad)
    code, out, _ = run_cli(["lint", bad], capsys)
    assert code == 1 and "error: NonZero 'nz'" in out and "FAILED" in out
    warn = tmp_path / "w.onnx"
    onnx.save(model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])], opset=23), warn)
    code, out, _ = run_cli(["lint", warn, "--trt-version", "10.3"], capsys)
    assert code == 0 and "warning" in out
    code, out, _ = run_cli(["lint", warn, "--target", "datacenter"], capsys)
    assert code == 0 and "TensorRT 10.9" in out


# --- the tool's own exports ----------------------------------------------------------------------------------

STAGES = [ToMeConfig(r=1, layers=(0,)), AdjacentConfig(r=1, layers=(1,)), TopKConfig(keep=0.7, layers=(2,)),
          PruMergeConfig(tokens=1, layers=(3,))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ViT with all four methods (one per layer, static batch, tc_export functions), and ToMe with a dynamic
    batch (flat graph: the function export is ~4x slower and the shape logic is the same)."""
    directory = tmp_path_factory.mktemp("lint")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    paths = {}
    for name, depth, stages, config in (("static", 4, STAGES, ExportConfig(batch=2)),
                                        ("dynamic", 2, [ToMeConfig(r=1)],
                                         ExportConfig(batch=2, dynamic_batch=True, functions=False))):
        compressed = compress(tiny_timm_vit(img_size=32, depth=depth), stages, {"x": images})
        paths[name] = directory / f"{name}.onnx"
        export_onnx(compressed.module, {"x": images}, paths[name], config, input_names=["pixel_values"])
    return paths


@pytest.mark.parametrize("trt_version", ["10.3", "10.9"])
@pytest.mark.parametrize("variant", ["static", "dynamic"])
def test_real_exports_lint_clean(exported, variant, trt_version):
    proto = onnx.load(str(exported[variant]))
    report = lint_model(proto, trt_version)
    assert not report.problems, report.describe()
    if variant == "dynamic":
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
        assert not lint_model(proto, trt_version, allow_dynamic_batch=False).ok
    else:
        calls = [n for n in proto.graph.node if n.domain == "tc_export"]
        assert calls  # the token ops export as tc_export local functions (ToMeMerge, PruMerge, ...)
        assert {n.op_type for n in calls} <= {f.name for f in proto.functions if f.domain == "tc_export"}
        assert all(any(a.name == "plugin_namespace" for a in n.attribute) for n in calls)
