"""Positions in the language model's coordinates (issue 23, point 5), held to a small Qwen2-VL model built from a
config with random weights (``reference_qwen_lm``): ``get_rope_index`` is the reference for every position, and
the language model run on the exported tokens at the emitted positions must equal the one run on the published
path (uncompressed tower + merger, the same windows selected, get_rope_index's positions selected the same way)."""

from __future__ import annotations

import pytest
import torch

from tc_export.ops.mrope import lm_positions

from . import reference_qwen_lm as lm

VISION = {"depth": 2, "embed_dim": 32, "hidden_size": 48, "num_heads": 2, "patch_size": 4, "mlp_ratio": 2,
          "spatial_merge_size": 2, "temporal_patch_size": 2}
SIZE = 40  # 10x10 patches, a 5x5 merged grid
ATOL = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The whole model saved to hf:DIR, and the adapter tc-export loads from it (its vision tower)."""
    from tc_export.models import load_model
    from tc_export.models.registry import ModelOptions

    folder = tmp_path_factory.mktemp("qwen2vl")
    model = lm.qwen2_vl_model(VISION)
    model.save_pretrained(folder)
    loaded = load_model(f"hf:{folder}", ModelOptions(img_size=SIZE), warn_random=False)
    return model, loaded


def unit_centres(rows: int, cols: int, merge: int = 2) -> torch.Tensor:
    """(rows/merge * cols/merge, 2): the mean (row, column) in patch units of each merge unit's patches, units
    row-major: what the token state carries for a unit kept whole."""
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).float()
    units = grid.view(rows // merge, merge, cols // merge, merge, 2).permute(0, 2, 1, 3, 4)
    return units.reshape(-1, merge * merge, 2).mean(1)


def test_rope_index_is_the_published_rule(saved):
    """get_rope_index on [3 text, 5x5 image, 2 text], written out from the rule: text 0..2 on all three axes, the
    image at (3, 3 + h, 3 + w), the text after at 3 + max(5, 5) = 8 onwards."""
    model, _ = saved
    want = [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    for h in range(5):
        for w in range(5):
            for axis, value in enumerate((3, 3 + h, 3 + w)):
                want[axis].append(value)
    for axis in range(3):
        want[axis] += [8, 9]
    assert lm.rope_index(model, 5, 5).tolist() == want


def test_lm_positions_of_whole_units_are_rope_index(saved):
    """A unit kept whole carries its patches' mean position; lm_positions turns it into get_rope_index's (t, h, w)
    relative to the image start, for every unit. A 3x3 merge, and a frame coordinate scaled by a time interval."""
    model, _ = saved
    rope = lm.rope_index(model, 5, 5)[:, 3:28] - 3
    got = lm_positions(unit_centres(10, 10)[None], 2)[0]
    assert torch.equal(got, rope.T.float())
    three = lm_positions(unit_centres(6, 9, 3)[None], 3)[0]
    assert three[:, 1:].tolist() == [[h, w] for h in range(2) for w in range(3)]
    framed = torch.cat([torch.full((6, 1), 3.0), unit_centres(6, 9, 3)], dim=1)
    assert lm_positions(framed[None], 3, time_interval=2.5)[0, :, 0].tolist() == [7.0] * 6  # int(3 x 2.5)


def test_lm_check_holds_uncompressed(saved):
    """The adapter's merger output (loaded from the whole checkpoint) at lm_positions of its units gives the
    language model the published path's hidden states."""
    model, loaded = saved
    pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = loaded.module(pixel_values=pixels)[0]
    got = lm.export_path(model, tokens, lm_positions(unit_centres(10, 10)[None], 2)[0], 5, 5)
    torch.testing.assert_close(got, lm.reference_path(model, pixels), rtol=1e-4, atol=ATOL)


KEPT = torch.tensor([0, 3, 7, 12, 13, 19, 24])


@pytest.mark.parametrize("mutation", [None, "t-off-by-one", "h-off-by-one-unit", "w-off-by-one-unit", "other-window",
                                      "text-after-one-late"])
def test_lm_check_sees_positions_and_windows(saved, mutation):
    """Units selected at the tower output (the merger's windows gathered, positions kept): the check holds, and it
    fails when one kept token's position is off by one unit on any axis, when a token comes from the neighbouring window, or
    when the text after the image resumes one position late."""
    model, loaded = saved
    pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        merged = loaded.module(pixel_values=pixels)[0]
    kept = KEPT.clone()
    positions = lm_positions(unit_centres(10, 10)[None], 2)[0][kept]
    for axis, name in enumerate(("t-off-by-one", "h-off-by-one-unit", "w-off-by-one-unit")):
        if mutation == name:
            positions[3, axis] += 1
    if mutation == "other-window":
        kept[2] += 1
    height = 6 if mutation == "text-after-one-late" else 5
    got = lm.export_path(model, merged[kept], positions, height, 5)
    want = lm.reference_path(model, pixels, KEPT)
    if mutation is None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=ATOL)
    else:
        assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("keep", [0.4, 0.6])
def test_lm_check_holds_for_unit_topk_at_the_tower_output(saved, keep):
    """The export itself: unit Top-K (received attention) at the last layer, where only per-token work follows, then
    the tower's own merger, with --emit-positions. The kept windows are found from the tokens alone (each exported
    token is the uncompressed merger's output at one window); the emitted (t, h, w) equal get_rope_index's for those
    windows, and the language model on [text, exported tokens, text] at the emitted positions equals the published
    path with the same windows selected."""
    from tc_export import compress
    from tc_export.passes import TopKConfig

    model, loaded = saved
    pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    config = TopKConfig(keep=keep, layers=(1,), score="received")
    compressed = compress(loaded, config, {"pixel_values": pixels}, emit_positions=True)
    with torch.no_grad():
        tokens, positions, _ = (t[0] for t in compressed(pixel_values=pixels))
    merged, height, width = lm.merged_tokens(model, pixels)
    kept = torch.cdist(tokens, merged).argmin(dim=1)
    assert len(set(kept.tolist())) == len(kept) == round(25 * keep + 0.49)
    torch.testing.assert_close(tokens, merged[kept], rtol=1e-4, atol=1e-5)
    rope = lm.rope_index(model, height, width)[:, len(lm.BEFORE) + kept] - len(lm.BEFORE)
    assert torch.equal(positions, rope.T.float())
    got = lm.export_path(model, tokens, positions, height, width)
    torch.testing.assert_close(got, lm.reference_path(model, pixels, kept), rtol=1e-4, atol=ATOL)
