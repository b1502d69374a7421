"""Video token reduction: EVS after the tower vs temporal pruning inside it, at (nearly) equal output token counts.

    nice -n 10 python benchmarks/video.py [--runs 5] [--qwen-size 224] [--qwen-depth 8] [--smoke] [--part units]

Two towers, 8 frames each, random weights: ``clip_vit_b`` (--features -2, 8 x 197 tokens) and a Qwen2-VL-2B-sized
vision tower (width 1280, 16 heads, MLP 5120, patch 14, temporal patch 2: 4 steps per 8-frame clip) saved to a
temporary ``hf:DIR``, read at its last block (``--pooling tokens``) so that both methods act on the same tokens;
the serving row runs EVS after the tower's own PatchMerger. Inputs: moving-digit clips (``tc_export.data.clips``).

Per row: tokens handed on (the language model's), the MAC ratio to the uncompressed clip, ONNX Runtime ms (2
threads, spinning off, interleaved, median), and fidelity against the uncompressed clip's tokens: ``kept cos``, the
mean cosine of each kept token to the uncompressed token at the same (frame, place) (EVS: 1 by construction), and
``clip cos``, every grid token of the clip rebuilt by holding a dropped token's place from the previous frame (what
a consumer without the dropped tokens sees), against the uncompressed clip. The full 2B tower at 448 px (4 x 1,024
tokens per clip, 32 layers) takes minutes per ONNX Runtime run on this 2-core machine: the default runs the same
structure at ``--qwen-size 224`` and ``--qwen-depth 8``.

``--part units``: the same two towers ending at their window projector (clip_vit_b: ``pool --stride 2``, 7 x 7 per
frame; Qwen2-VL: its own PatchMerger), EVS after the projector against temporal pruning on 2x2 merge units inside
the tower, at equal tokens to the language model; fidelity against the uncompressed projector's tokens.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from tc_export.measure.bench import make_session, time_side_by_side
from tc_export.job.compress import compress
from tc_export.data.clips import clip_batch
from tc_export.export.macs import count_macs
from tc_export.export.onnx_export import ExportConfig, export_onnx
from tc_export.models import ModelOptions, load_model
from tc_export.passes.evs import EVSConfig
from tc_export.passes.temporal import TemporalConfig

QWEN_2B = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
           "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}


def _grid_rows(out: torch.Tensor, positions: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid tokens of one output (N, D) with their frame and place (row * width + col); protected rows dropped."""
    body = positions[:, -1] >= 0
    frame, row, col = positions[body, 0].long(), positions[body, 1].long(), positions[body, 2].long()
    return out[body], frame, row * width + col


def fidelity(full: torch.Tensor, out: torch.Tensor, positions: torch.Tensor, frames: int, prefix: int,
             width: int) -> tuple[float, float]:
    """(kept cos, clip cos) of one clip: ``full`` (T * (prefix + M), D) uncompressed tokens, ``out`` / ``positions``
    the compressed tokens and their (t, h, w)."""
    reference = full.reshape(frames, -1, full.shape[-1])[:, prefix:]  # (T, M, D)
    tokens, frame, place = _grid_rows(out, positions, width)
    kept = torch.nn.functional.cosine_similarity(tokens, reference[frame, place], dim=-1).mean().item()
    rebuilt = torch.zeros_like(reference)
    for t in range(frames):
        if t:
            rebuilt[t] = rebuilt[t - 1]
        mine = frame == t
        rebuilt[t, place[mine]] = tokens[mine]
    clip = torch.nn.functional.cosine_similarity(rebuilt, reference, dim=-1).mean().item()
    return kept, clip


def rows_for(loaded, configs: dict, features: int | None, frames: int, prefix: int, width: int, clips: torch.Tensor,
             runs: int, timed: bool, base: list | None = None) -> list[dict]:
    """Measure the uncompressed model (``base``: its stages, e.g. a projector) and each configuration on
    ``clips``; one dict per row."""
    inputs = {loaded.inputs[0].name: clips[:1]}
    models = {"uncompressed": compress(loaded, list(base or []), inputs, features=features, emit_positions=True)}
    models |= {name: compress(loaded, stages, inputs, features=features, emit_positions=True)
               for name, stages in configs.items()}
    base_macs = count_macs(models["uncompressed"].module, inputs)
    rows = []
    with torch.no_grad():
        fulls = [models["uncompressed"].module(**{loaded.inputs[0].name: clip[None]})[0][0] for clip in clips]
    for name, model in models.items():
        kept, whole = [], []
        with torch.no_grad():
            for clip, full in zip(clips, fulls):
                out, positions, _ = model.module(**{loaded.inputs[0].name: clip[None]})
                k, c = fidelity(full, out[0], positions[0], frames, prefix, width)
                kept.append(k)
                whole.append(c)
        rows.append({"name": name, "tokens": int(out.shape[1]), "macs": count_macs(model.module, inputs),
                     "kept": sum(kept) / len(kept), "clip": sum(whole) / len(whole), "ms": float("nan")})
    for row in rows:
        row["ratio"] = base_macs / row["macs"]
    if timed:
        with tempfile.TemporaryDirectory() as folder:
            sessions, feeds = [], []
            for name, model in models.items():
                path = Path(folder) / f"{name}.onnx"
                export_onnx(model.module, inputs, path, ExportConfig(), input_names=list(inputs),
                            output_names=["tokens", "positions", "sizes"])
                sessions.append(make_session(path, 2))
                feeds.append({k: v.numpy() for k, v in inputs.items()})
            for row, ms in zip(rows, time_side_by_side(sessions, feeds, runs, 1)):
                row["ms"] = ms
    return rows


def temporal_retain(target: int, frames: int, prefix: int, grid: int) -> float:
    """The retain fraction whose output (T P + M + (T - 1) K) comes closest to ``target`` tokens."""
    per_frame = max(1, round((target - frames * prefix - grid) / (frames - 1)))
    return per_frame / grid


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    print("| configuration | tokens out | MACs ratio | ORT ms | kept cos | clip cos |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['tokens']} | {row['ratio']:.2f}x | {row['ms']:.0f} | {row['kept']:.4f} | "
              f"{row['clip']:.4f} |")


def clip_rows(args) -> None:
    frames = 8
    layers = {"num_hidden_layers": 2} if args.smoke else {}
    from tc_export.models import hf_models  # noqa: F401 - registers clip_vit_b
    from tc_export.models.registry import MODELS

    torch.manual_seed(0)
    loaded = MODELS.get("clip_vit_b").build(ModelOptions(), **layers)
    from tc_export.models.video import video_model

    loaded = video_model(loaded, frames)
    grid, prefix, q = 196, 1, 0.75
    target = max(grid, int(grid * frames * (1 - q)))
    retain = temporal_retain(target + frames * prefix, frames, prefix, grid)
    configs = {f"EVS after the tower, q={q}": [EVSConfig(q=q)],
               f"temporal inside, budget frame, retain {retain:.3f}": [TemporalConfig(retain=retain)],
               f"temporal inside, budget clip, retain {retain:.3f}": [TemporalConfig(retain=retain, budget="clip")]}
    clips = clip_batch(2, frames, 224, seed=11)
    rows = rows_for(loaded, configs, -2, frames, prefix, 14, clips, args.runs, not args.no_time)
    print_rows(f"clip_vit_b --frames {frames} --features -2 ({frames} x 197 tokens; moving-digit clips)", rows)


def save_qwen2_vl_tower(folder: str | Path, config: dict) -> None:
    """Save a Qwen2-VL vision tower of ``config`` (``QWEN_2B`` keys) with seed-0 random weights to ``folder``
    (for ``hf:folder``)."""
    import transformers as tf
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    Qwen2VisionTransformerPretrainedModel(tf.Qwen2VLVisionConfig(**config)).save_pretrained(folder)


def qwen_rows(args) -> None:
    frames, size = 8, args.qwen_size
    config = dict(QWEN_2B, depth=args.qwen_depth)
    if args.smoke:
        config |= {"depth": 2, "embed_dim": 64, "hidden_size": 96, "num_heads": 2}
    with tempfile.TemporaryDirectory() as folder:
        save_qwen2_vl_tower(folder, config)
        options = ModelOptions(img_size=size, frames=frames, pooling="tokens")
        loaded = load_model(f"hf:{folder}", options, warn_random=False)
        steps, side = frames // 2, size // config["patch_size"]
        grid, q = side * side, 0.5
        target = max(grid, int(grid * steps * (1 - q)))
        retain = temporal_retain(target, steps, 0, grid)
        configs = {f"EVS after the tower, q={q}": [EVSConfig(q=q)],
                   f"temporal inside, budget frame, retain {retain:.3f}": [TemporalConfig(retain=retain)],
                   f"temporal inside, budget clip, retain {retain:.3f}": [TemporalConfig(retain=retain, budget="clip")]}
        clips = clip_batch(2, frames, size, seed=11)
        rows = rows_for(loaded, configs, -1, steps, 0, side, clips, args.runs, not args.no_time)
        print_rows(f"Qwen2-VL-2B-sized tower (depth {config['depth']}, width {config['embed_dim']}), {size} px, "
                   f"--frames {frames} ({steps} steps x {grid} tokens), last block's tokens", rows)
        merged = load_model(f"hf:{folder}", ModelOptions(img_size=size, frames=frames), warn_random=False)
        inputs = {merged.inputs[0].name: clips[:1]}
        evs = compress(merged, [EVSConfig(q=q)], inputs, emit_positions=True)
        full = compress(merged, [], inputs)
        print(f"\nserving path (EVS q={q} after the tower's own PatchMerger): {grid // 4 * steps} -> "
              f"{evs.output_tokens} merged tokens, MACs ratio {count_macs(full.module, inputs) / count_macs(evs.module, inputs):.2f}x")


def unit_retain(target: int, frames: int, units: int) -> float:
    """The retain fraction whose output (U + (T - 1) K units, one token each) comes closest to ``target``."""
    return max(1, round((target - units) / (frames - 1))) / units


def clip_unit_rows(args) -> None:
    frames, q = 8, 0.75
    layers = {"num_hidden_layers": 2} if args.smoke else {}
    from tc_export.models import hf_models  # noqa: F401 - registers clip_vit_b
    from tc_export.models.registry import MODELS
    from tc_export.models.video import video_model
    from tc_export.passes.projectors import PoolConfig

    torch.manual_seed(0)
    loaded = video_model(MODELS.get("clip_vit_b").build(ModelOptions(), **layers), frames)
    units = 49
    target = max(units, int(units * frames * (1 - q)))
    retain = unit_retain(target, frames, units)
    configs = {f"EVS after the projector, q={q}": [PoolConfig(stride=2), EVSConfig(q=q)],
               f"temporal on units, budget frame, retain {retain:.3f}": [TemporalConfig(retain=retain),
                                                                          PoolConfig(stride=2)],
               f"temporal on units, budget clip, retain {retain:.3f}": [TemporalConfig(retain=retain, budget="clip"),
                                                                         PoolConfig(stride=2)]}
    clips = clip_batch(2, frames, 224, seed=11)
    rows = rows_for(loaded, configs, -2, frames, 0, 7, clips, args.runs, not args.no_time,
                    base=[PoolConfig(stride=2)])
    print_rows(f"clip_vit_b --frames {frames} --features -2, pool --stride 2 ({frames} x 49 tokens to the LM; "
               "moving-digit clips)", rows)


def qwen_unit_rows(args) -> None:
    frames, size, q = 8, args.qwen_size, 0.5
    config = dict(QWEN_2B, depth=args.qwen_depth)
    if args.smoke:
        config |= {"depth": 2, "embed_dim": 64, "hidden_size": 96, "num_heads": 2}
    with tempfile.TemporaryDirectory() as folder:
        save_qwen2_vl_tower(folder, config)
        loaded = load_model(f"hf:{folder}", ModelOptions(img_size=size, frames=frames), warn_random=False)
        steps, side = frames // 2, size // config["patch_size"] // 2
        units = side * side
        target = max(units, int(units * steps * (1 - q)))
        retain = unit_retain(target, steps, units)
        configs = {f"EVS after the merger, q={q}": [EVSConfig(q=q)],
                   f"temporal on units, budget frame, retain {retain:.3f}": [TemporalConfig(retain=retain)],
                   f"temporal on units, budget clip, retain {retain:.3f}": [TemporalConfig(retain=retain,
                                                                                             budget="clip")]}
        clips = clip_batch(2, frames, size, seed=11)
        rows = rows_for(loaded, configs, None, steps, 0, side, clips, args.runs, not args.no_time)
        print_rows(f"Qwen2-VL-2B-sized tower (depth {config['depth']}, width {config['embed_dim']}), {size} px, "
                   f"--frames {frames} ({steps} steps x {units} merged tokens), its own PatchMerger", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--qwen-size", type=int, default=224)
    parser.add_argument("--qwen-depth", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny towers, so the script cannot rot")
    parser.add_argument("--no-time", action="store_true", help="tokens, MACs and fidelity only")
    parser.add_argument("--part", choices=("all", "tokens", "units"), default="all",
                        help="tokens: the towers' tokens; units: ending at a window projector, temporal on units")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.part in ("all", "tokens"):
        clip_rows(args)
        qwen_rows(args)
    if args.part in ("all", "units"):
        clip_unit_rows(args)
        qwen_unit_rows(args)


if __name__ == "__main__":
    main()
