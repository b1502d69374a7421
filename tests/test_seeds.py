"""Random weights from a fixed seed (issue 28): the same command builds the same model, the same ONNX values and,
where the exporter allows, the same bytes (docs/reproducibility.md)."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tc_export.errors import ConfigError
from tc_export.models import LoadedModel, ModelOptions, RandomWeightsWarning, load_model
from tc_export.models.seeding import current_weights_seed, seeded_weights

from .test_cli import run_cli

TINY = ["timm:test_vit", "--img-size", "64"]  # timm's 6-layer test ViT at 16 tokens + class token


def weights(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded.module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(a[k].is_floating_point() and not torch.equal(a[k], b[k]) for k in a)


def tiny_hf_directory(folder):
    """A transformers config saved without weights: ``hf:DIR`` builds it with random weights."""
    import transformers

    config = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64)
    folder.mkdir()
    config.save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(params=["timm", "hf_preset", "hf_dir", "video"])
def model_case(request, tmp_path):
    """(name, options) of each way a model is built: timm, a transformers preset, hf:DIR, the video wrapper."""
    if request.param == "timm":
        return "timm:test_vit", {"img_size": 64}
    if request.param == "hf_preset":
        pytest.importorskip("transformers")
        return "whisper_tiny_enc", {}
    if request.param == "hf_dir":
        pytest.importorskip("transformers")
        return tiny_hf_directory(tmp_path / "vit"), {}
    return "timm:test_vit", {"img_size": 64, "frames": 2}


def test_same_seed_builds_the_same_weights_whatever_ran_before(model_case):
    name, options = model_case
    torch.manual_seed(123)
    first = weights(load_model(name, ModelOptions(**options), warn_random=False))
    torch.manual_seed(456)  # another global state, and draws in between: the weights do not see either
    torch.rand(1000)
    second = weights(load_model(name, ModelOptions(**options), warn_random=False))
    assert_same(first, second)
    other = weights(load_model(name, ModelOptions(**options, weights_seed=1), warn_random=False))
    assert differs(first, other), "--weights-seed 1 drew the same weights as seed 0"


def test_building_leaves_the_callers_random_state_alone():
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    load_model("timm:test_vit", ModelOptions(img_size=64, weights_seed=5), warn_random=False)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def test_seeded_weights_nests_and_restores():
    assert current_weights_seed() == 0
    with seeded_weights(4):
        a = torch.rand(2)
        with seeded_weights():  # the enclosing seed
            assert current_weights_seed() == 4
            assert torch.equal(torch.rand(2), a)
        with seeded_weights(9):
            assert current_weights_seed() == 9
        assert current_weights_seed() == 4
    assert current_weights_seed() == 0


def test_the_warning_says_the_seed():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model("timm:test_vit", ModelOptions(img_size=64, weights_seed=3))
    assert loaded.weights_seed == 3
    messages = [str(w.message) for w in caught if issubclass(w.category, RandomWeightsWarning)]
    assert len(messages) == 1 and "seed 3" in messages[0] and "--weights-seed" in messages[0]


def test_seed_out_of_range_is_refused(capsys):
    with pytest.raises(ConfigError, match="--weights-seed"):
        ModelOptions(weights_seed=-1)
    with pytest.raises(ConfigError, match="--weights-seed"):
        ModelOptions(weights_seed=2**63)
    code, _, err = run_cli([*TINY, "--weights-seed", "-1", "-o", "never.onnx"], capsys)
    assert code == 2 and "--weights-seed" in err and len(err.strip().splitlines()) == 1


def test_projector_weights_follow_the_model_seed():
    """A projector without --projector-weights draws from the model's seed, not from the global random state."""
    from tc_export import compress
    from tc_export.passes.projectors import MLPConfig

    def projector(seed: int, noise: int) -> dict[str, torch.Tensor]:
        loaded = load_model("timm:test_vit", ModelOptions(img_size=64, weights_seed=seed), warn_random=False)
        torch.manual_seed(noise)
        compressed = compress(loaded, [MLPConfig(out_channels=16)], features=-2)
        state = compressed.module.state_dict()
        mlp = {k: v.clone() for k, v in state.items() if k not in loaded.module.state_dict()}
        assert mlp, "no projector weights found"
        return mlp

    first = projector(0, noise=1)
    assert_same(first, projector(0, noise=2))
    assert differs(first, projector(2, noise=1))


def ort_outputs(path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)


def test_two_exports_give_the_same_bytes_and_outputs(tmp_path, capsys):
    """The issue's done-when on a tiny model: two runs of one command, max abs difference 0 (and equal files);
    another --weights-seed, another model."""
    paths = [tmp_path / name for name in ("a.onnx", "b.onnx", "c.onnx")]
    for path, extra in zip(paths, ([], [], ["--weights-seed", "1"])):
        code, out, err = run_cli([*TINY, "--method", "tome", "--r", "4", *extra, "-o", path], capsys)
        assert code == 0, err
        assert f"seed {extra[1] if extra else 0}" in out
    assert paths[0].read_bytes() == paths[1].read_bytes()
    x = {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    a, b, c = (ort_outputs(p, x)[0] for p in paths)
    assert float(np.abs(a - b).max()) == 0.0
    assert float(np.abs(a - c).max()) > 0.0


def test_a_bundle_matches_a_separate_export_and_rebuilds_byte_for_byte(tmp_path, capsys, monkeypatch):
    """README: `model.onnx` and `bundle/` from two commands verify against each other; with SOURCE_DATE_EPOCH two
    bundles are the same bytes, file for file."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    monkeypatch.chdir(tmp_path)
    common = [*TINY, "--method", "tome", "--r", "4"]
    for output in ("model.onnx", "bundle/", "again/"):
        target = ["--target", "jetson-orin-nano"] if output.endswith("/") else []
        code, _, err = run_cli([*common, *target, "-o", output], capsys)
        assert code == 0, err
    code, out, err = run_cli(["verify", "model.onnx", "--against", "bundle/"], capsys)
    assert code == 0, err + out
    files = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in files:
        assert (tmp_path / "bundle" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["created"] == "2026-01-01T00:00:00+00:00"


def test_source_date_epoch_must_be_a_number(monkeypatch):
    from tc_export.export.files import created_timestamp

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH"):
        created_timestamp()
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert created_timestamp().endswith("+00:00")


@pytest.mark.parametrize("command", ["export", "bench", "tune"])
def test_every_command_that_builds_a_model_takes_the_seed(command):
    from click.testing import CliRunner

    from tc_export.cli.main import cli

    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "--weights-seed" in result.output
