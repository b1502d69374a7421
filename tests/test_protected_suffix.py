"""Protected tokens at the end: YOLOS's detection tokens are found from the graph, kept last and in order."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tc_export.cli.main import main

from .reference import reference_adjacent, reference_prumerge, reference_topk
from .reference_encoders import Hooks, run
from .reference_suffix import before_suffix, hf_yolos_tokens, reference_yolos_tome

transformers = pytest.importorskip("transformers")


def _yolos(folder, mid_positions: bool = False):
    config = transformers.YolosConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=[32, 32],
        patch_size=8, num_detection_tokens=3, use_mid_position_embeddings=mid_positions, architectures=["YolosModel"],
    )
    torch.manual_seed(0)
    model = transformers.YolosModel(config).eval()
    with torch.no_grad():  # zero-initialised tokens, embeddings and biases would tie every score
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.5)
    model.save_pretrained(folder)
    return model


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_yolos_detection_tokens_stay_last_through_the_cli(tmp_path, capsys):
    model = _yolos(tmp_path / "yolos")
    code, out, err = _cli([f"hf:{tmp_path / 'yolos'}", "--method", "tome", "--r", "2", "--pooling", "tokens",
                           "-o", tmp_path / "y.onnx"], capsys)
    assert code == 0, err
    assert "protected tokens: 1 (found in the graph), 3 trailing (found in the graph)" in out
    assert "tokens per layer: 20 18 16" in out and "parity PyTorch vs ONNX Runtime" in out
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    want, counts = reference_yolos_tome(model, pixels, r=2)
    assert counts == [20, 18, 16]
    session = ort.InferenceSession(str(tmp_path / "y.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=2e-5)
    with torch.no_grad():  # the detection tokens' rows are the model's own, uncompressed ones only at layer 0
        assert got.shape == (1, 16, 32)


def test_yolos_reference_fails_when_the_suffix_is_merged(tmp_path):
    """Mutation: with protected_suffix=0 the detection tokens merge like patches, and the reference says so."""
    from tc_export.job.compress import compress
    from tc_export.models import ModelOptions, load_model
    from tc_export.passes.tome import ToMeConfig

    model = _yolos(tmp_path / "yolos")
    loaded = load_model(f"hf:{tmp_path / 'yolos'}", ModelOptions(pooling="tokens"), warn_random=False)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    want, _ = reference_yolos_tome(model, pixels, r=2)
    name = next(iter(loaded.example_inputs(batch=1)))
    for suffix, matches in ((None, True), (0, False)):
        compressed = compress(loaded, ToMeConfig(r=2, protected_suffix=suffix))
        with torch.no_grad():
            got = compressed(**{name: pixels})
        got = got[0] if isinstance(got, (tuple, list)) else got
        assert compressed.report.suffix == (3 if suffix is None else 0)
        assert torch.allclose(got, want, rtol=1e-4, atol=2e-5) is matches


def test_yolos_mid_position_embeddings_are_refused_by_name(tmp_path, capsys):
    _yolos(tmp_path / "yolos", mid_positions=True)
    code, _, err = _cli([f"hf:{tmp_path / 'yolos'}", "--method", "tome", "--r", "2", "--pooling", "tokens",
                         "-o", tmp_path / "y.onnx"], capsys)
    assert code != 0 and "mid_position_embeddings" in err and "position table" in err
    assert not (tmp_path / "y.onnx").exists()


def _cls(probs):
    return probs[:, 0, :].mean(dim=0)


SUFFIX_METHODS = {  # config keywords, (hook, step on the tokens in front of the suffix), prop_attn
    "topk": ({"keep": 0.5, "layers": (0,), "fuse": True, "protected": 1}, "after_attention",
             lambda i, x, s, k, p: reference_topk(x, s, _cls(p), 0.5, 1, True, False) if i == 0 else (x, s), False),
    "adjacent": ({"r": 3}, "after_attention", lambda i, x, s, k, p: reference_adjacent(x, k.mean(0), s, 3, 1), True),
    "prumerge": ({"tokens": 6, "layers": (1,), "protected": 1, "neighbours": 4}, "before_layer",
                 lambda i, x, s, q, k: reference_prumerge(x, s, q, k, 6, 1, True, 4) if i == 1 else (x, s), False),
}


@pytest.mark.parametrize("method", list(SUFFIX_METHODS))
def test_every_method_keeps_the_detection_tokens_last(tmp_path, method):
    from tc_export.job.compress import compress
    from tc_export.models import ModelOptions, load_model
    from tc_export.passes import METHODS

    settings, hook, step, prop_attn = SUFFIX_METHODS[method]
    model = _yolos(tmp_path / "yolos")
    loaded = load_model(f"hf:{tmp_path / 'yolos'}", ModelOptions(pooling="tokens"), warn_random=False)
    config = METHODS.get(method).config_type(**settings)
    compressed = compress(loaded, config)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    hooks = Hooks(prop_attn=prop_attn, **{hook: before_suffix(step, 3)})
    want, counts = run(hf_yolos_tokens(model), {"pixel_values": pixels}, hooks)
    with torch.no_grad():
        got = compressed(**{next(iter(loaded.example_inputs(batch=1))): pixels})
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    assert compressed.token_counts() == counts
