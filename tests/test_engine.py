"""TensorRT engines: configs, presets, the sidecar, fp32 pinning logic, and the no-TensorRT path.

Nothing here builds an engine (no GPU, no TensorRT on these machines); the tests that would are marked
``tensorrt`` and skip with the reason.
"""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tc_export.cli.main import main
from tc_export.errors import BackendUnavailableError, ConfigError
from tc_export.export.tensorrt.engine import (
    TARGETS,
    EngineConfig,
    OnnxInput,
    batch_shapes,
    build_engine,
    finish_command,
    is_function_layer,
    keep_fp32_layers,
    parse_size,
    sidecar_content,
    sidecar_path,
    tensorrt_missing_reason,
)
from tc_export.export.tensorrt.lint import LintError

NO_TRT = tensorrt_missing_reason()


def tiny_onnx(path, batch=2, nonzero=False):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])]
    if nonzero:
        nodes.append(helper.make_node("NonZero", ["x"], ["nz"], name="nz"))
        outputs.append(helper.make_tensor_value_info("nz", TensorProto.INT64, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])], outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "fp8"}, "--precision must be one of"),
    ({"workspace": 0}, "--workspace"),
    ({"opt_level": 6}, "--opt-level"),
    ({"batch_profile": (4, 2, 8)}, "min <= opt <= max"),
    ({"batch_profile": (0, 1, 1)}, "min <= opt <= max"),
    ({"target": "jetson-xavier"}, "unknown --target"),
    ({"plugins": True, "trt_version": "10.3"}, "no AOT Python plugins"),
])
def test_engine_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**kwargs)


def test_presets():
    nano, agx, dc = TARGETS["jetson-orin-nano"], TARGETS["jetson-agx-orin"], TARGETS["datacenter"]
    assert (nano.compute_capability, agx.compute_capability, dc.compute_capability) == ("8.7", "8.7", "9.0")
    assert nano.tensorrt == agx.tensorrt == "10.3" and not nano.plugins and not agx.plugins  # JetPack 6.2
    assert dc.plugins and tuple(map(int, dc.tensorrt.split("."))) >= (10, 9)
    assert nano.workspace < agx.workspace < dc.workspace and nano.workspace <= nano.memory_gb * 2**30 // 4
    config = EngineConfig.for_target("jetson-orin-nano")
    assert (config.precision, config.plugins, config.trt_version, config.compute_capability) == \
        ("fp16", False, "10.3", "8.7")
    overridden = EngineConfig.for_target("datacenter", precision="bf16", plugins=False, opt_level=5)
    assert (overridden.precision, overridden.plugins, overridden.opt_level, overridden.trt_version) == \
        ("bf16", False, 5, "10.9")
    with pytest.raises(ConfigError, match="no AOT Python plugins"):
        EngineConfig.for_target("jetson-agx-orin", plugins=True)
    assert EngineConfig.for_target(None).precision == "fp32"


@pytest.mark.parametrize("text, expected", [("1G", 2**30), ("512M", 512 * 2**20), ("64K", 65536), ("4096", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_batch_profiles():
    dynamic = [OnnxInput("pixel_values", ("batch", 3, 32, 32))]
    assert batch_shapes(dynamic, (1, 4, 16)) == {
        "pixel_values": ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))}
    assert batch_shapes([OnnxInput("x", (2, 4))], None) == {}
    with pytest.raises(ConfigError, match="other than the batch"):
        batch_shapes([OnnxInput("x", ("batch", "seq"))], (1, 1, 2))
    config = EngineConfig.for_target("jetson-agx-orin")
    assert config.profile_for(dynamic=True) == TARGETS["jetson-agx-orin"].batch_profile
    assert config.profile_for(dynamic=False) is None


def test_finish_command_carries_the_settings(tmp_path):
    config = EngineConfig.for_target("jetson-orin-nano", precision="int8", opt_level=4, batch_profile=(1, 2, 4))
    command = finish_command(tmp_path / "m.onnx", tmp_path / "m.engine", config=config,
                             inputs=[OnnxInput("x", ("batch", 3, 8, 8))])
    for part in ("--int8", "--fp16", "--memPoolSize=workspace:1024M", "--builderOptimizationLevel=4",
                 "--minShapes=x:1x3x8x8", "--optShapes=x:2x3x8x8", "--maxShapes=x:4x3x8x8"):
        assert part in command
    assert finish_command(tmp_path / "m.onnx", tmp_path / "m.engine") == \
        f"trtexec --onnx={tmp_path / 'm.onnx'} --saveEngine={tmp_path / 'm.engine'}"


def test_sidecar_content(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    config = EngineConfig.for_target("jetson-orin-nano")
    content = sidecar_content(config, onnx_path, tmp_path / "m.engine", "10.3.0", "8.7", fp32_layers=12)
    assert content["target"] == "jetson-orin-nano" and content["precision"] == "fp16"
    assert content["tensorrt_version"] == "10.3.0" and content["tensorrt_expected"] == "10.3"
    assert content["compute_capability"] == "8.7" and content["engine_path"] == "function bodies"
    assert content["options"]["workspace_bytes"] == 2**30 and content["options"]["plugins"] is False
    assert content["options"]["fp32_function_layers"] == 12
    import hashlib

    assert content["onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    json.dumps(content)  # serialisable
    assert sidecar_path(tmp_path / "m.engine").name == "m.engine.json"


class FakeTensor:
    def __init__(self, dtype):
        self.dtype = dtype


class FakeLayer:
    def __init__(self, name, metadata, dtypes):
        self.name, self.metadata, self.precision = name, metadata, "unset"
        self.outputs = [FakeTensor(d) for d in dtypes]
        self.output_types = {}

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_output(self, index):
        return self.outputs[index]

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype


class FakeNetwork:
    def __init__(self, layers):
        self.layers = layers

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, index):
        return self.layers[index]


def test_keep_fp32_layers_pins_only_function_bodies_and_float_outputs():
    layers = [
        FakeLayer("node_matmul_3", "[ONNX Layer: node_matmul_3]", ["f16"]),
        FakeLayer("node_topk_1__1", "[ONNX Layer: node_token_op__1 (ToMeMerge) / node_topk_1__1]", ["f16", "i64"]),
        FakeLayer("ToMeMerge/node_gather", "", ["f16"]),
    ]
    pinned = keep_fp32_layers(FakeNetwork(layers), {"node_token_op__1"}, {"ToMeMerge"}, ("f32", "f16"), "f32")
    assert pinned == ["node_topk_1__1", "ToMeMerge/node_gather"]
    assert layers[0].precision == "unset" and layers[0].output_types == {}
    assert layers[1].precision == "f32" and layers[1].output_types == {0: "f32"}  # the int64 indices keep their type
    assert is_function_layer("x", "", set(), {"TopKSelect"}) is False


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.skipif(NO_TRT is None, reason="TensorRT is present: the no-TensorRT path does not apply")
def test_build_without_tensorrt_exit_3_keeps_onnx_and_writes_nothing(tmp_path, capsys):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    before = onnx_path.read_bytes()
    code, out, err = run_cli(["build", onnx_path, "-o", tmp_path / "m.engine", "--target", "jetson-orin-nano"], capsys)
    assert code == 3
    assert len(err.strip().splitlines()) == 1
    assert NO_TRT in err and "trtexec --onnx=" in err and "--fp16" in err and "--memPoolSize=workspace:1024M" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and onnx_path.read_bytes() == before
    with pytest.raises(BackendUnavailableError):
        build_engine(onnx_path, tmp_path / "m.engine", EngineConfig.for_target("datacenter"), say=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_lint_runs_before_the_build(tmp_path, capsys):
    onnx_path = tiny_onnx(tmp_path / "bad.onnx", nonzero=True)
    code, out, err = run_cli(["build", onnx_path, "--target", "jetson-orin-nano"], capsys)
    assert code == 1 and "NonZero" in err and "lint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
    with pytest.raises(LintError):
        build_engine(onnx_path, tmp_path / "bad.engine", EngineConfig(), say=lambda _: None)


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp8"], "fp8"),
    (["--target", "jetson-orin-nano", "--plugins", "on"], "no AOT Python plugins"),
    (["--workspace", "lots"], "--workspace"),
    (["--batch-profile", "1,2"], "--batch-profile"),
])
def test_build_flag_errors(tmp_path, capsys, args, message):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    code, out, err = run_cli(["build", onnx_path, *args], capsys)
    assert code == 2 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_build_needs_a_profile_shape_compatible_onnx(tmp_path, capsys):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    code, _, err = run_cli(["build", tmp_path / "missing.onnx"], capsys)
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(["build", onnx_path, "-o", tmp_path / "m.bin"], capsys)
    assert code == 2 and ".engine" in err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    code, _, err = run_cli(["build", garbage], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "not a readable ONNX model" in err


@pytest.mark.tensorrt
@pytest.mark.skipif(NO_TRT is not None, reason=f"needs TensorRT and a GPU: {NO_TRT}")
def test_build_engine_on_gpu(tmp_path):  # pragma: no cover - GPU only
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    result = build_engine(onnx_path, tmp_path / "m.engine", EngineConfig(precision="fp16"), say=print)
    assert result.engine_path.is_file() and result.sidecar_path.is_file()
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["precision"] == "fp16" and sidecar["tensorrt_version"]
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    with TrtRunner(EngineFromBytes(BytesFromPath(str(result.engine_path)))) as runner:
        np.testing.assert_allclose(runner.infer({"x": x})["y"], np.maximum(x, 0), atol=1e-3)

