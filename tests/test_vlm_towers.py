"""The vision towers of deployed VLMs from ``hf:DIR`` (saved alone and inside a whole checkpoint): Pixtral,
Idefics3 / SmolVLM, SigLIP2 NaFlex at a fixed size, Llama 4 vision and MLCD. Uncompressed, each equals the tower's
own forward on its own processor's inputs; compressed, each equals the independent per-sample reference of
tests/reference_towers.py (rotary angles written from the published formulas at the carried positions); through the
command line each loads, counts MACs, exports and passes parity. wav2vec2-Conformer's cached 1-D rotary table
follows adjacent merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tc_export import compress
from tc_export.errors import TCExportError
from tc_export.passes import AdjacentConfig, ToMeConfig, TopKConfig

from . import reference_towers as towers
from .reference import reference_adjacent, reference_merge, reference_topk
from .reference_rotary import with_positions

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
CONFIGS = {
    "pixtral": ("PixtralVisionConfig", "PixtralVisionModel", {"image_size": 64, "patch_size": 8, **SMALL}),
    "idefics3": ("Idefics3VisionConfig", "Idefics3VisionTransformer", {"image_size": 64, "patch_size": 8, **SMALL}),
    "smolvlm": ("SmolVLMVisionConfig", "SmolVLMVisionTransformer", {"image_size": 64, "patch_size": 8, **SMALL}),
    # hidden 48: not the token count 64, which would make the head's projection look like a position table
    "siglip2": ("Siglip2VisionConfig", "Siglip2VisionModel", {"num_patches": 64, "patch_size": 8, **SMALL,
                                                              "hidden_size": 48, "intermediate_size": 96}),
    "llama4": ("Llama4VisionConfig", "Llama4VisionModel", {"image_size": 64, "patch_size": 8, **SMALL,
                                                           "intermediate_size": 256, "vision_output_dim": 64,
                                                           "projector_input_dim": 64, "projector_output_dim": 64}),
    "mlcd": ("MLCDVisionConfig", "MLCDVisionModel", {"image_size": 64, "patch_size": 8, **SMALL}),
}
TOKENS = {"pixtral": 64, "idefics3": 64, "smolvlm": 64, "siglip2": 64, "llama4": 65, "mlcd": 65}
POOLING = {"llama4": "tokens"}  # its own output is the pixel shuffle, which reads the whole grid
REFERENCE = {"pixtral": towers.run_pixtral, "idefics3": towers.run_idefics3, "smolvlm": towers.run_idefics3,
             "siglip2": towers.run_siglip2, "llama4": towers.run_llama4, "mlcd": towers.run_mlcd}
PREFIX = {"mlcd": 1}


def save_tower(kind: str, folder, qk_std: float = 0.3):
    """A small random tower saved alone to ``folder``; queries and keys large enough that positions matter."""
    import transformers as tf

    config_class, model_class, settings = CONFIGS[kind]
    torch.manual_seed(0)
    tower = getattr(tf, model_class)(getattr(tf, config_class)(**settings))
    for name, parameter in tower.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            parameter.data.normal_(0, qk_std)
    tower.save_pretrained(folder)
    return tower.eval()


def load(folder, pooling: str | None = None, img_size: int | None = None):
    from tc_export.models import load_model
    from tc_export.models.registry import ModelOptions

    return load_model(f"hf:{folder}", ModelOptions(pooling=pooling, img_size=img_size), warn_random=False)


def own_output(kind: str, tower, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's own forward on what its processor gives for full images of this size."""
    batch, _, height, width = pixels.shape
    patch = tower.config.patch_size
    with torch.no_grad():
        if kind == "pixtral":  # one sequence of both images, attention blocked per image
            out = tower(pixels, image_sizes=torch.tensor([[height, width]] * batch)).last_hidden_state
            return out.reshape(batch, -1, out.shape[-1])
        if kind in ("idefics3", "smolvlm"):  # a full tile: any pixel in every patch
            mask = torch.ones(batch, height // patch, width // patch, dtype=torch.bool)
            return tower(pixels, patch_attention_mask=mask).last_hidden_state
        if kind == "siglip2":
            from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

            patches = torch.stack([convert_image_to_patches(image, patch) for image in pixels])
            shape = torch.tensor([[height // patch, width // patch]] * batch)
            mask = torch.ones(batch, patches.shape[1], dtype=torch.int32)
            return tower(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shape).pooler_output
        if kind == "llama4":
            return tower(pixels).last_hidden_state
        return tower(pixels).pooler_output  # mlcd


def _assert_is_the_tower(kind: str, folder, tower):
    """hf:folder loads with the saved weights and its default output is ``tower``'s own, at batch 2."""
    loaded = load(folder)
    assert not loaded.random_init
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    with torch.no_grad():
        got = loaded.module(pixel_values=pixels)
    torch.testing.assert_close(got, own_output(kind, tower, pixels), rtol=1e-4, atol=2e-5)
    return loaded, pixels


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_uncompressed_equals_the_tower(tmp_path, kind):
    """The adapter (default output) is the tower on its processor's inputs, batch 2; the reference with no method
    equals the uncompressed model too (the yardstick itself is right)."""
    tower = save_tower(kind, tmp_path / kind)
    _, pixels = _assert_is_the_tower(kind, tmp_path / kind, tower)
    reference = load(tmp_path / kind, POOLING.get(kind))
    want, counts = REFERENCE[kind](reference.module, pixels, towers.unchanged, True)
    with torch.no_grad():
        torch.testing.assert_close(reference.module(pixel_values=pixels), want, rtol=1e-4, atol=2e-5)
    assert counts == [TOKENS[kind]] * 3


def _whole(kind: str, folder):
    """A whole VLM checkpoint holding the tower (its text model tiny); returns its vision tower."""
    import transformers as tf

    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 500, "head_dim": 16}
    vision = CONFIGS[kind][2]
    torch.manual_seed(0)
    if kind == "pixtral":
        config = tf.Mistral3Config(vision_config={**vision, "model_type": "pixtral"},
                                   text_config={**text, "model_type": "mistral"})
        model = tf.Mistral3ForConditionalGeneration(config)
    elif kind == "smolvlm":
        config = tf.SmolVLMConfig(vision_config=vision, text_config={**text, "model_type": "llama"})
        model = tf.SmolVLMForConditionalGeneration(config)
    elif kind == "llama4":
        config = tf.Llama4Config(vision_config=vision, text_config={**text, "intermediate_size_mlp": 128,
                                                                    "num_local_experts": 2})
        model = tf.Llama4ForConditionalGeneration(config)
    else:  # siglip2
        config = tf.Siglip2Config(vision_config=vision, text_config={"hidden_size": 48, "intermediate_size": 96,
                                                                     "num_hidden_layers": 1,
                                                                     "num_attention_heads": 4, "vocab_size": 500})
        model = tf.Siglip2Model(config)
    model.save_pretrained(folder)
    inner = getattr(model, "model", model)
    return getattr(inner, "vision_tower", None) or getattr(inner, "vision_model").eval()


@pytest.mark.parametrize("kind", ["pixtral", "smolvlm", "llama4", "siglip2"])
def test_loads_from_a_whole_checkpoint(tmp_path, kind):
    """hf:DIR of a whole VLM (Mistral 3, SmolVLM, Llama 4, SigLIP2 dual encoder) gives its vision tower with the
    checkpoint's weights: equal to that tower's own output."""
    _assert_is_the_tower(kind, tmp_path / kind, _whole(kind, tmp_path / kind).eval())


def _merge_step(merge, r: int, protected: int, carry: bool = True):
    step = towers.merge_step(merge, r, protected)
    if carry:
        return step

    def stale(i, x, size, pos, keys, probs):  # the positions not carried: each row keeps the original row's
        new_x, new_size, _ = step(i, x, size, pos, keys, probs)
        return new_x, new_size, pos[: new_x.shape[0]]

    return stale


@pytest.mark.parametrize("kind,method", [(k, "tome") for k in CONFIGS] + [("pixtral", "adjacent"),
                                                                         ("llama4", "adjacent")])
def test_merging_matches_reference(tmp_path, kind, method):
    """ToMe r=3 (adjacent r=3) at batch 2 equals the per-sample reference with rotary angles at the carried
    positions; for the rotary towers, not carrying the positions (the stale table) differs."""
    save_tower(kind, tmp_path / kind)
    loaded = load(tmp_path / kind, POOLING.get(kind))
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    config = ToMeConfig(r=3) if method == "tome" else AdjacentConfig(r=3)
    compressed = compress(loaded, config, {"pixel_values": pixels})
    merge = reference_merge if method == "tome" else reference_adjacent
    protected = PREFIX.get(kind, 0)
    want, counts = REFERENCE[kind](loaded.module, pixels, _merge_step(merge, 3, protected), True)
    assert counts == compressed.token_counts() == [TOKENS[kind], TOKENS[kind] - 3, TOKENS[kind] - 6]
    with torch.no_grad():
        got = compressed(pixel_values=pixels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    if kind in ("pixtral", "llama4", "mlcd"):
        assert any("rotary position embedding" in line for line in compressed.report.rewired)
        stale, _ = REFERENCE[kind](loaded.module, pixels, _merge_step(merge, 3, protected, carry=False), True)
        assert not torch.allclose(got, stale, rtol=1e-4, atol=2e-5)


def test_mlcd_topk_matches_reference(tmp_path):
    """Top-K (EViT, fused token) on MLCD's class token first: kept tokens keep their exact positions, the fused one
    sits at the size-weighted mean of the pruned ones'."""
    save_tower("mlcd", tmp_path / "m")
    loaded = load(tmp_path / "m")
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    compressed = compress(loaded, TopKConfig(keep=0.5, layers=(1,), fuse=True), {"pixel_values": pixels})

    def step(i, x, size, pos, keys, probs):
        if i != 1:
            return x, size, pos
        return with_positions(lambda t, s: reference_topk(t, s, probs[:, 0].mean(0), 0.5, 1, True, False),
                              x, size, pos, fused=True)

    want, counts = towers.run_mlcd(loaded.module, pixels, step, False)
    assert counts == compressed.token_counts()
    with torch.no_grad():
        torch.testing.assert_close(compressed(pixel_values=pixels), want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_exports_through_the_cli(tmp_path, capsys, kind):
    from .test_cli import run_cli

    save_tower(kind, tmp_path / kind)
    capsys.readouterr()
    extra = ["--pooling", POOLING[kind]] if kind in POOLING else []
    code, out, err = run_cli([f"hf:{tmp_path / kind}", *extra, "--method", "tome", "--r", "2", "-o",
                              tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    n = TOKENS[kind]
    assert f"tokens per layer: {n} {n - 2} {n - 4}" in out and "MACs per image" in out
    assert "passed" in out and "fidelity vs uncompressed" in out and (tmp_path / "m.onnx").is_file()
    if kind in ("pixtral", "llama4", "mlcd"):
        assert "rotary position embedding" in out
    if kind == "llama4":
        assert "1 trailing" in out


@pytest.mark.parametrize("kind,args,cause", [
    ("llama4", ["--method", "tome", "--r", "2"], "pixel shuffle regroups each 2x2 block"),
    ("llama4", ["--img-size", 48], "learned position table"),
    ("idefics3", ["--img-size", 48], "tiles of image_size 64"),
    ("pixtral", ["--img-size", 128], "larger than Pixtral's image_size"),
    ("pixtral", ["--method", "topk", "--keep", "0.5"], "no class token"),
    ("siglip2", ["--pooling", "cls"], "--pooling cls does not apply"),
    ("llama4", ["--pooling", "tokens", "--method", "llama4", "--at", "1"], "1 protected tokens after it that later"),
], ids=["llama4-shuffle", "llama4-size", "idefics3-size", "pixtral-size", "pixtral-topk", "siglip2-pooling",
        "llama4-projector-inside"])
def test_cli_refusals_are_one_line(tmp_path, capsys, kind, args, cause):
    from .test_cli import run_cli

    save_tower(kind, tmp_path / kind)
    capsys.readouterr()
    code, _, err = run_cli([f"hf:{tmp_path / kind}", *args, "-o", tmp_path / "m.onnx"], capsys)
    assert code not in (0, 70) and cause in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def _conformer(folder):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Wav2Vec2ConformerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, position_embeddings_type="rotary", conv_dim=(16, 16),
                                        conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8,
                                        num_conv_pos_embedding_groups=2, conv_depthwise_kernel_size=3)
    tf.Wav2Vec2ConformerModel(config).save_pretrained(folder)


def test_conformer_rotary_follows_adjacent_merging(tmp_path, capsys):
    """wav2vec2-Conformer's cached 1-D rotary table (sequence first, (N, 1, 1, d)) is recomputed from the carried
    index: adjacent merging exports with parity through the command line."""
    from .test_cli import run_cli

    _conformer(tmp_path / "w")
    capsys.readouterr()
    code, out, err = run_cli([f"hf:{tmp_path / 'w'}", "--method", "adjacent", "--r", "8", "-o", tmp_path / "m.onnx"],
                             capsys)
    assert code == 0, err
    assert "tokens per layer: 799 791 783" in out and "rotary position embedding" in out and "passed" in out


_CELLS: dict = {}


def _tower_cells(family):
    from .support_matrix import METHODS, run_cell

    if family.label not in _CELLS:
        _CELLS[family.label] = [run_cell(family, method) for method in METHODS]
    return _CELLS[family.label]


def _tower_families():
    from .support_matrix import TOWERS

    return TOWERS


@pytest.mark.slow
@pytest.mark.parametrize("family", _tower_families(), ids=[f.label for f in _tower_families()])
def test_tower_matrix_row(family):
    """Each tower x method of the matrix: ToMe through the command-line job, the rest through compress and ONNX
    Runtime; every one that works equals the per-sample reference (PruMerge on Llama 4, class token last: parity only)."""
    from .support_matrix import CAUSES

    for cell in _tower_cells(family):
        expected = family.refused.get(cell.method)
        if expected is not None:
            assert cell.outcome == f"refused: {expected}" and CAUSES[expected] in cell.detail, cell
        elif cell.method in family.unreferenced:
            assert cell.outcome == "works", cell
        else:
            assert cell.outcome == "works, matches reference", cell


@pytest.mark.slow
def test_docs_show_the_tower_matrix():
    from pathlib import Path

    from .support_matrix import markdown

    families = _tower_families()
    cells = [cell for family in families for cell in _tower_cells(family)]
    page = (Path(__file__).parents[1] / "docs" / "vlm-towers.md").read_text()
    assert markdown(cells, families) in page, "docs/vlm-towers.md is stale: run python -m tests.support_matrix towers"


def _scrambled_rotary(loaded) -> torch.Tensor:
    """MLCD's rotary replaced by a fixed table of arbitrary angles per patch (no frequencies fit it); returns the
    (64, head_dim) angles of the patches in row-major order."""
    rope = loaded.module.model.vision_rotary_embedding
    torch.manual_seed(1)
    half = torch.rand(64, 8) * 6
    rope.register_buffer("scrambled", half)
    rope.forward = lambda x, position_ids: (torch.cat([rope.scrambled] * 2, -1).cos(),
                                            torch.cat([rope.scrambled] * 2, -1).sin())
    return torch.cat([half, half], dim=-1)


def test_a_table_no_frequencies_fit_is_gathered_under_pruning(tmp_path):
    """A rotary table that is not a function of the position is gathered by the carried positions under Top-K
    (exact: every kept token reads its own original row), equal to the reference reading each kept token's own
    row; merging is refused by name, as is EViT's fused token (it has no row of its own)."""
    import dataclasses

    save_tower("mlcd", tmp_path / "m")
    loaded = load(tmp_path / "m")
    table = _scrambled_rotary(loaded)
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    compressed = compress(loaded, TopKConfig(keep=0.5, layers=(0,)), {"pixel_values": pixels})
    assert compressed.token_counts() == [65, 33, 33] and "layer 1: rotary position embedding" in compressed.report.rewired

    def step(i, x, size, pos, keys, probs):
        if i != 0:
            return x, size, pos
        return with_positions(lambda t, s: reference_topk(t, s, probs[:, 0].mean(0), 0.5, 1, False, False),
                              x, size, pos)

    tower = dataclasses.replace(towers.mlcd(loaded.module.model),
                                angles=lambda pos: table[(pos[:, 0] * 8 + pos[:, 1]).long()])
    want, counts = towers.run(tower, pixels, step, False)
    with torch.no_grad():
        torch.testing.assert_close(compressed(pixel_values=pixels), want, rtol=1e-4, atol=2e-5)
    import onnxruntime as ort

    from tc_export import ExportConfig, export_onnx

    export_onnx(compressed.module, {"pixel_values": pixels[:1]}, tmp_path / "g.onnx", ExportConfig(),
                input_names=["pixel_values"])
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"pixel_values": pixels[:1].numpy()})[0])
    torch.testing.assert_close(got, want[:1], rtol=1e-3, atol=1e-4)
    for config, method in ((ToMeConfig(r=2), "tome"), (TopKConfig(keep=0.5, layers=(0,), fuse=True), "topk")):
        with pytest.raises(TCExportError, match=f"not a rotary function of the position.*merged by {method}"):
            compress(loaded, config, {"pixel_values": pixels})


def _llama4_onnx(tmp_path, capsys, stages: str, name: str) -> tuple[np.ndarray, str]:
    """The Llama 4 tower (--pooling tokens) with a recipe of ``stages`` through the command line: the ONNX output
    on the job's first seeded input, and the job's output."""
    from .test_cli import run_cli

    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"stages:\n{stages}")
    capsys.readouterr()
    out_path = tmp_path / f"{name}.onnx"
    code, out, err = run_cli([f"hf:{tmp_path / 'l4'}", "--pooling", "tokens", "--recipe", recipe, "-o", out_path],
                             capsys)
    assert code == 0, err
    import onnxruntime as ort

    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)).numpy()
    return session.run(None, {session.get_inputs()[0].name: pixels})[0], out


def test_llama4_projector_after_tome_at_merge_units(tmp_path, capsys):
    """The llama4 projector drops the trailing class token (as the published [:, :-1]); after ToMe it reads 2x2
    merge units: uncompressed in unit order (--unit 2) it equals the projector without units, and ToMe r=2 (two
    units merged per layer) exports with parity and one output token per surviving unit."""
    save_tower("llama4", tmp_path / "l4")
    plain, _ = _llama4_onnx(tmp_path, capsys, "  - {method: llama4}\n", "plain")
    units, out = _llama4_onnx(tmp_path, capsys, "  - {method: llama4}\nunit: 2\n", "units")
    assert plain.shape == (1, 16, 64) and "1 trailing" in out
    np.testing.assert_allclose(units, plain, rtol=1e-4, atol=1e-5)
    merged, out = _llama4_onnx(tmp_path, capsys, "  - {method: tome, r: 2}\n  - {method: llama4}\n", "tome")
    assert "tokens per layer: 65 57 12" in out and "passed" in out
    assert merged.shape == (1, 12, 64) and not np.allclose(merged[:, :12], plain[:, :12], atol=1e-3)


@pytest.mark.parametrize("kind", ["pixtral", "idefics3", "siglip2", "llama4"])
def test_topk_received_matches_reference(tmp_path, kind):
    """Top-K with --score received on a tower without a class token (keep 0.5 at layer 0) equals the per-sample
    reference ranking by the attention each token receives (mean over heads and queries), kept tokens at their
    exact positions; ranking by token 0's attention (the class-token rule) instead differs."""
    save_tower(kind, tmp_path / kind)
    loaded = load(tmp_path / kind, POOLING.get(kind))
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    compressed = compress(loaded, TopKConfig(keep=0.5, layers=(0,), score="received"), {"pixel_values": pixels})

    def step_by(score):
        def step(i, x, size, pos, keys, probs):
            if i != 0:
                return x, size, pos
            return with_positions(lambda t, s: reference_topk(t, s, score(probs), 0.5, 0, False, False),
                                  x, size, pos)
        return step

    want, counts = REFERENCE[kind](loaded.module, pixels, step_by(lambda p: p.mean(dim=(0, 1))), True)
    assert counts == compressed.token_counts() == [TOKENS[kind], TOKENS[kind] - 32, TOKENS[kind] - 32]
    with torch.no_grad():
        got = compressed(pixel_values=pixels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    by_class, _ = REFERENCE[kind](loaded.module, pixels, step_by(lambda p: p[:, 0].mean(0)), True)
    assert not torch.allclose(got, by_class, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kind", ["pixtral", "idefics3", "siglip2"])
@pytest.mark.parametrize("method", [["topk", "--keep", "0.5"], ["prumerge", "--tokens", "16"]],
                         ids=["topk", "prumerge"])
def test_received_score_through_the_cli(tmp_path, capsys, kind, method):
    """Top-K and PruMerge with --score received export with parity through the command line; without it the
    refusal names --score received."""
    from .test_cli import run_cli

    save_tower(kind, tmp_path / kind)
    capsys.readouterr()
    code, _, err = run_cli([f"hf:{tmp_path / kind}", "--method", *method, "--layers", "0", "-o",
                            tmp_path / "r.onnx"], capsys)
    assert code not in (0, 70) and "--score received" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run_cli([f"hf:{tmp_path / kind}", "--method", *method, "--layers", "0", "--score", "received",
                              "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    tokens = "64 32 32" if method[0] == "topk" else "17 17 17"
    assert f"tokens per layer: {tokens}" in out and "passed" in out and "fidelity vs uncompressed" in out
