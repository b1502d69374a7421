"""ToMe's local-window match search (``window``, an option for long 1-D sequences, default off).

Each A token at A-index i searches only the B tokens at B-index i - window .. i + window; the rest is ToMe. Held to
``reference_merge(window=...)``, a per-token loop; a window covering the sequence is the global search; a tiny
Whisper encoder exports with ONNX Runtime parity; the flag parses and rejects bad values in one line.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tc_export import ExportConfig, compress, export_onnx
from tc_export.cli.main import main
from tc_export.cli.options import MethodFlags, method_configs
from tc_export.errors import ConfigError
from tc_export.export.tensorrt.lint import lint_model
from tc_export.models import ModelOptions
from tc_export.models.hf_models import build_whisper_encoder
from tc_export.ops.tome import ToMeMerge, tome_merge
from tc_export.passes import ToMeConfig, config_from_dict, config_to_dict
from tc_export.passes.site import Site

from .reference import reference_merge

CASES = [  # tokens, r, protected, window, sized, padded
    (20, 5, 0, 2, False, False),
    (21, 6, 1, 1, True, False),
    (30, 8, 3, 3, True, False),
    (17, 4, 2, 8, True, False),
    (24, 6, 0, 2, True, True),
    (25, 7, 1, 3, True, True),
    (32, 16, 0, 4, True, False),  # every unprotected A token merges
]


@pytest.mark.parametrize("tokens,r,protected,window,sized,padded", CASES)
def test_window_matches_per_token_reference(tokens, r, protected, window, sized, padded):
    torch.manual_seed(tokens + window)
    x, metric = torch.randn(3, tokens, 8), torch.randn(3, tokens, 6)
    size = torch.randint(1, 4, (3, tokens, 1)).float() if sized else None
    if padded:
        size[0, -5:] = 0  # trailing padding in one sample, scattered pads in another
        size[1, 3::4] = 0
    out, out_size = tome_merge(x, metric, size, r, protected, padded=padded, window=window)
    for b in range(3):
        sample_size = torch.ones(tokens, 1) if size is None else size[b]
        want, want_size = reference_merge(x[b], metric[b], sample_size, r, protected, padded=padded, window=window)
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_size[b], want_size, rtol=0, atol=0)


def test_window_differs_from_global_on_long_sequences():
    torch.manual_seed(0)
    x, metric = torch.randn(1, 64, 8), torch.randn(1, 64, 6)
    assert not torch.allclose(tome_merge(x, metric, None, 12, 0, window=2)[0], tome_merge(x, metric, None, 12, 0)[0])


@pytest.mark.parametrize("tokens,protected,padded", [(20, 0, False), (21, 1, False), (24, 2, True)])
def test_window_covering_the_sequence_is_the_global_search(tokens, protected, padded):
    torch.manual_seed(1)
    x, metric = torch.randn(2, tokens, 8), torch.randn(2, tokens, 6)
    size = torch.randint(1, 3, (2, tokens, 1)).float()
    if padded:
        size[:, -4:] = 0
    want = tome_merge(x, metric, size, 6, protected, padded=padded)
    for window in ((tokens + 1) // 2 - 1, tokens // 2, tokens):
        got = tome_merge(x, metric, size, 6, protected, padded=padded, window=window)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the config hands such a site the global op itself (bit for bit the published search)
    site = Site("attention", 0, 1, tokens, protected, 8, padded=padded)
    assert ToMeConfig(r=6, window=(tokens + 1) // 2 - 1).make_op(site).window is None
    assert ToMeConfig(r=6, window=(tokens + 1) // 2 - 2).make_op(site).window == (tokens + 1) // 2 - 2
    assert ToMeConfig(r=6).make_op(site).window is None


def tiny_whisper():
    torch.manual_seed(0)
    return build_whisper_encoder(ModelOptions(), d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                 encoder_ffn_dim=64, max_source_positions=48, num_mel_bins=16)


@pytest.mark.parametrize("functions", [True, False], ids=["functions", "flat"])
def test_whisper_window_exports_with_parity(functions, tmp_path):
    loaded = tiny_whisper()
    inputs = loaded.example_inputs(batch=1)
    compressed = compress(loaded, ToMeConfig(r=6, window=8), inputs)
    assert compressed.token_counts() == [48, 42, 36]
    windows = [op.window for op in compressed.module.modules() if isinstance(op, ToMeMerge)]
    assert windows == [8, 8]
    global_out = compress(loaded, ToMeConfig(r=6), inputs)(**inputs)
    path = tmp_path / "m.onnx"
    model = export_onnx(compressed.module, inputs, path, ExportConfig(functions=functions),
                        output_names=loaded.output_names)
    if functions:
        calls = [node for node in model.graph.node if node.domain == "tc_export"]
        assert len(calls) == 2
        assert all(onnx.helper.get_attribute_value(a) == 8 for node in calls for a in node.attribute
                   if a.name == "window")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})[0]
    with torch.no_grad():
        want = compressed(**inputs)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=2e-5)
    problems = lint_model(str(path)).problems  # the band's ops are TensorRT-clean; the plugin lacks the window
    if functions:
        assert {(p.rule, p.severity) for p in problems} == {("plugin-fields", "error")}
        assert all("setting window" in p.message for p in problems)
    else:
        assert not problems
    assert not np.allclose(got, global_out.detach().numpy(), atol=1e-4)  # the window did change the matches


def test_window_flag_and_recipe_key():
    (config,), label = method_configs(MethodFlags("tome", None, (("r", "4"), ("window", "16"))))
    assert config.window == 16
    assert config_from_dict(config_to_dict(config)) == config
    assert config_from_dict({"method": "tome", "window": 8}).window == 8
    assert ToMeConfig().window is None
    for text, message in (("0", "--window must be >= 1"), ("2.5", "--window must be a whole number")):
        with pytest.raises(ConfigError, match=message):
            method_configs(MethodFlags("tome", None, (("window", text),)))
    for value in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="window must be a whole number >= 1"):
            ToMeConfig(window=value)
    with pytest.raises(ConfigError, match="window must be a whole number >= 1"):
        config_from_dict({"method": "tome", "window": 0})


@pytest.mark.parametrize("value,message", [("0", "--window must be >= 1"), ("x", "--window must be a whole number")])
def test_bad_window_on_the_command_line_is_one_line(value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["timm:vit_tiny_patch16_224", "--img-size", "64", "--method", "tome", "--window", value,
              "-o", str(tmp_path / "m.onnx")])
    out, err = capsys.readouterr()
    assert exit_info.value.code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tc-export: error:"), err
    assert message in lines[0]
    assert "Traceback" not in out + err
    assert not (tmp_path / "m.onnx").exists()
