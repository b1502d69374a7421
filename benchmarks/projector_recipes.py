"""Token counts, MACs and ONNX Runtime latency of the shipped tower + projector recipes (docs/projectors.md).

    python benchmarks/projector_recipes.py [--runs 10] [--smoke] [--no-time]

For each recipe: the tower alone at the recipe's --features layer (its output tokens) and the tower + projector,
exported and timed side by side (2 threads, spinning off, interleaved, median). ``--smoke`` runs one small
configuration so the script cannot rot.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tc_export.measure.bench import make_session, time_side_by_side
from tc_export.job.compress import compress
from tc_export.export.macs import count_macs
from tc_export.export.onnx_export import ExportConfig, export_onnx
from tc_export.models import ModelOptions, load_model
from tc_export.passes.projectors import PoolConfig
from tc_export.recipes import load_recipe

RECIPES = ["llava15_clip_l336", "llava15_prumerge", "llava_next_video_clip_l336", "llava_onevision_video_siglip",
           "internvl_clip_l336_unshuffle", "honeybee_clip_l336_cabstractor", "llava_clip_l336_pool_mlp",
           "video_clip_b_8frames_pool"]


def measure(model: str, stages: tuple, features: int, frames: int | None, runs: int, options: ModelOptions,
            timed: bool = True) -> dict:
    loaded = load_model(model, ModelOptions(img_size=options.img_size, frames=frames), warn_random=False)
    inputs = loaded.example_inputs(batch=1)
    tower = compress(loaded, [], inputs, features=features)
    full = compress(loaded, list(stages), inputs, features=features)
    extra = full.extra_inputs(1)
    row = {"tokens_tower": tower.token_counts()[-1], "tokens_out": full.token_counts()[-1],
           "macs_tower": count_macs(tower.module, inputs), "macs_full": count_macs(full.module, inputs | extra),
           "ms_tower": float("nan"), "ms_full": float("nan")}
    if not timed:
        return row
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for label, compressed, feed in (("tower", tower, inputs), ("full", full, inputs | extra)):
            path = Path(folder) / f"{label}.onnx"
            export_onnx(compressed.module, feed, path, ExportConfig(), input_names=list(feed), output_names=["tokens"])
            paths.append((path, {k: v.numpy() for k, v in feed.items()}))
        sessions = [make_session(path, 2) for path, _ in paths]
        row["ms_tower"], row["ms_full"] = time_side_by_side(sessions, [feed for _, feed in paths], runs, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="one tiny configuration (vit_t at 64 px, pool)")
    parser.add_argument("--no-time", action="store_true", help="tokens and MACs only (no export, no timing)")
    args = parser.parse_args()
    print("| recipe | tower tokens | output tokens | tower GMACs | + projector GMACs | tower ms | tower + projector ms |")
    print("|---|---|---|---|---|---|---|")
    if args.smoke:
        jobs = [("smoke: vit_t pool", "vit_t", (PoolConfig(),), -1, None, ModelOptions(img_size=64))]
    else:
        jobs = []
        for name in RECIPES:
            recipe = load_recipe(name)
            jobs.append((name, recipe.model, recipe.stages, recipe.features, recipe.frames, ModelOptions()))
    for name, model, stages, features, frames, options in jobs:
        row = measure(model, stages, features, frames, args.runs if not args.smoke else 3, options, not args.no_time)
        print(f"| {name} | {row['tokens_tower']} | {row['tokens_out']} | {row['macs_tower'] / 1e9:.2f} | "
              f"{(row['macs_full'] - row['macs_tower']) / 1e9:.2f} | {row['ms_tower']:.1f} | {row['ms_full']:.1f} |")


if __name__ == "__main__":
    main()
