"""Merge units at full size: a Qwen2-VL-2B-sized tower + its own merger, uncompressed vs unit Top-K and unit ToMe.

    nice -n 10 python benchmarks/units_speed.py [--depth 32] [--size 448] [--runs 5] [--smoke]

The Qwen2-VL-2B vision tower (depth 32, width 1280, 16 heads, MLP 5120, patch 14, merge 2, merger output 1536;
``video.py``'s builder) with random weights, saved to a temporary ``hf:DIR`` and loaded with its own PatchMerger
(``--pooling pooler``): at 448 px 1,024 patches, 256 merge units of 2x2, 256 tokens to the language model
uncompressed. Each configuration compresses through the library (``compress``: the token method at units, the
merger as the last stage), is exported (``write_onnx``) and timed with ONNX Runtime on CPU (2 threads, spinning
off, all models interleaved in one loop, median). Per row: tokens per layer, tokens handed to the language model,
GMACs and the MAC ratio to the uncompressed model (``count_macs``), ORT ms and the measured speed-up.

Unit Top-K (``--score received``: the tower has no class token) keeps 1/2 and 1/4 of the units after an early
layer's attention; unit ToMe merges r units at every layer, r chosen so that the language model gets the same
number of tokens as the Top-K row it sits next to. Results: ``benchmarks/results/units_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from tc_export.export.macs import count_macs
from tc_export.export.onnx_export import ExportConfig, write_onnx
from tc_export.job.compress import compress
from tc_export.measure.bench import make_session, time_side_by_side
from tc_export.models import ModelOptions, load_model
from tc_export.passes import ToMeConfig, TopKConfig
from video import QWEN_2B, save_qwen2_vl_tower  # benchmarks/video.py: the same tower builder

RESULTS = Path(__file__).resolve().parent / "results"


def configurations(units: int, depth: int, layer: int) -> dict[str, list]:
    """Unit Top-K keep 1/2 and 1/4 at ``layer``; unit ToMe with r units per layer reaching the same output count."""
    configs: dict[str, list] = {"uncompressed": []}
    for keep in (0.5, 0.25):
        kept = math.ceil(keep * units)
        configs[f"unit Top-K keep={keep} @{layer} (received)"] = [TopKConfig(keep=keep, layers=(layer,),
                                                                               score="received")]
        r = (units - kept) // depth
        configs[f"unit ToMe r={r} @0-{depth - 1}"] = [ToMeConfig(r=r)]
    return configs


def per_layer(counts: list[int]) -> str:
    """Run-length token counts per attention layer, e.g. ``1024 x3, 512 x5``."""
    runs: list[list[int]] = []
    for count in counts:
        if runs and runs[-1][0] == count:
            runs[-1][1] += 1
        else:
            runs.append([count, 1])
    return ", ".join(f"{count} x{n}" if n > 1 else str(count) for count, n in runs)


def measure(loaded, configs: dict[str, list], runs: int, timed: bool) -> list[dict]:
    """One row per configuration: tokens, MACs, ONNX Runtime ms (interleaved)."""
    inputs = loaded.example_inputs(batch=1)
    rows, models = [], {}
    for name, stages in configs.items():
        model = compress(loaded, stages, inputs)
        with torch.no_grad():
            out = model.module(**inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        models[name] = model
        rows.append({"name": name, "layers": per_layer([layer.tokens_in for layer in model.layers]),
                     "tokens_to_lm": int(out.shape[1]), "unit": model.report.unit,
                     "macs": count_macs(model.module, inputs), "ms": float("nan")})
        print(f"built {name}: {rows[-1]['tokens_to_lm']} tokens, {rows[-1]['macs'] / 1e9:.1f} GMACs", flush=True)
    for row in rows:
        row["mac_ratio"] = rows[0]["macs"] / row["macs"]
    if timed:
        with tempfile.TemporaryDirectory() as folder:
            sessions = []
            for name, model in models.items():
                path = Path(folder) / f"{len(sessions)}.onnx"
                write_onnx(model.module, inputs, path, ExportConfig(), input_names=list(inputs),
                           output_names=["tokens"])
                sessions.append(make_session(path, 2))
                models[name] = None  # the exported file is all the timing needs
            feeds = [{k: v.numpy() for k, v in inputs.items()} for _ in sessions]
            for row, ms in zip(rows, time_side_by_side(sessions, feeds, runs, 1)):
                row["ms"] = ms
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| configuration | tokens per layer | tokens to the LM | GMACs | MAC ratio | ORT ms | ORT speed-up |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['layers']} | {r['tokens_to_lm']} | {r['macs'] / 1e9:.1f} | {r['mac_ratio']:.2f}x | "
              f"{r['ms']:.0f} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=QWEN_2B["depth"], help="blocks (full width either way)")
    parser.add_argument("--size", type=int, default=448, help="image side in px (a multiple of 28)")
    parser.add_argument("--layer", type=int, default=2, help="the Top-K layer (zero-indexed)")
    parser.add_argument("--runs", type=int, default=5, help="ONNX Runtime timed runs per model (interleaved)")
    parser.add_argument("--no-time", action="store_true", help="tokens and MACs only")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer, 64-wide tower at 112 px; results not saved")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "units_speed", help="results stem")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = dict(QWEN_2B, depth=args.depth)
    size, runs, layer = args.size, args.runs, args.layer
    if args.smoke:
        config |= {"depth": 2, "embed_dim": 64, "hidden_size": 96, "num_heads": 2}
        size, runs, layer = 112, 2, 0
    side = size // config["patch_size"]
    units = (side // config["spatial_merge_size"]) ** 2
    with tempfile.TemporaryDirectory() as folder:
        save_qwen2_vl_tower(folder, config)
        loaded = load_model(f"hf:{folder}", ModelOptions(img_size=size), warn_random=False)
        rows = measure(loaded, configurations(units, config["depth"], layer), runs, not args.no_time)
    title = (f"Qwen2-VL-2B-sized tower + its merger (depth {config['depth']}, width {config['embed_dim']}), {size} px: "
             f"{side * side} patches, {units} merge units; ONNX Runtime CPU, 2 threads, {runs} interleaved runs")
    text = table(rows)
    print(f"\n{title}\n\n{text}")
    if not args.smoke:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".json").write_text(json.dumps({"title": title, "config": config, "size": size,
                                                                "runs": runs, "rows": rows}, indent=1) + "\n")
        args.output.with_suffix(".md").write_text(f"{title}\n\n{text}\n")


if __name__ == "__main__":
    main()
