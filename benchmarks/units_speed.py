"""Merge units at full size: a Qwen2-VL-2B-sized tower + its own merger, uncompressed vs unit Top-K and unit ToMe.

    nice -n 5 python benchmarks/units_speed.py [--depth 32] [--size 448] [--runs 5] [--smoke]

The Qwen2-VL-2B vision tower (depth 32, width 1280, 16 heads, MLP 5120, patch 14, merge 2, merger output 1536;
``video.py``'s builder) with random weights, saved to a temporary ``hf:DIR`` and loaded with its own PatchMerger
(``--pooling pooler``): at 448 px 1,024 patches, 256 merge units of 2x2, 256 tokens to the language model
uncompressed. Each configuration compresses through the library (``compress``: the token method at units, the
merger as the last stage), is exported (``write_onnx``; at full size ~2.5 GB of fp32 weights each, so external
data, in a temporary folder removed at the end) and timed with ONNX Runtime on CPU (2 threads, spinning off, all
sessions timed in turn in interleaved rounds). The torch models are dropped before the sessions are made: five
full-size sessions hold ~12 GiB (the 32-block run peaked at 15.8 GiB). Per row: tokens per layer, tokens handed to
the language model, GMACs and the MAC ratio to the uncompressed model (``count_macs``), ORT ms (median and min over
the rounds) and the speed-ups. The machine's load average before and after the timing goes with the results.

Unit Top-K (``--score received``: the tower has no class token) keeps 1/2 and 1/4 of the units after an early
layer's attention; unit ToMe merges r units at every layer, r chosen so that the language model gets the same
number of tokens as the Top-K row it sits next to. Results: ``benchmarks/results/units_speed.{json,md}`` (another
``--depth``: ``units_speed_depthN``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from tc_export.export.macs import count_macs
from tc_export.export.onnx_export import ExportConfig, write_onnx
from tc_export.job.compress import compress
from tc_export.measure.bench import make_session, time_interleaved
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


def build(loaded, configs: dict[str, list], folder: Path | None) -> list[dict]:
    """One row per configuration: tokens, MACs; with ``folder``, each model exported there as ``<i>.onnx`` right
    after it is built (one compressed graph alive at a time: the full-size exports carry 2.5 GB of weights each)."""
    inputs = loaded.example_inputs(batch=1)
    rows = []
    for i, (name, stages) in enumerate(configs.items()):
        model = compress(loaded, stages, inputs)
        with torch.no_grad():
            out = model.module(**inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        rows.append({"name": name, "layers": per_layer([layer.tokens_in for layer in model.layers]),
                     "tokens_to_lm": int(out.shape[1]), "unit": model.report.unit,
                     "macs": count_macs(model.module, inputs), "ms": float("nan"), "ms_min": float("nan"),
                     "samples_ms": []})
        if folder is not None:
            write_onnx(model.module, inputs, folder / f"{i}.onnx", ExportConfig(), input_names=list(inputs),
                       output_names=["tokens"])
        del model, out
        gc.collect()
        print(f"built {name}: {rows[-1]['tokens_to_lm']} tokens, {rows[-1]['macs'] / 1e9:.1f} GMACs", flush=True)
    for row in rows:
        row["mac_ratio"] = rows[0]["macs"] / row["macs"]
    return rows


def time_exports(rows: list[dict], folder: Path, feed: dict[str, np.ndarray], runs: int) -> dict[str, str]:
    """ONNX Runtime (2 threads, spinning off) on each exported model, all sessions timed in turn (interleaved
    rounds, alternating order, one warm-up round); fills each row's median, min and samples. Returns the load
    average before and after the timing."""
    load = {"before": uptime()}
    sessions = [make_session(folder / f"{i}.onnx", 2) for i in range(len(rows))]
    print(f"{len(sessions)} sessions ready; timing {runs} interleaved rounds", flush=True)
    for row, timing in zip(rows, time_interleaved([lambda s=s: s.run(None, feed) for s in sessions], runs, 1)):
        row["ms"], row["ms_min"], row["samples_ms"] = timing.median, min(timing.samples), list(timing.samples)
    load["after"] = uptime()
    return load


def uptime() -> str:
    """``uptime``'s load averages (1, 5, 15 min): the machine is shared, so the timings carry them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def table(rows: list[dict]) -> str:
    lines = ["| configuration | tokens per layer | tokens to the LM | GMACs | MAC ratio | ORT ms median (min) | "
             "ORT speed-up median (min) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        median, fastest = rows[0]["ms"] / r["ms"], rows[0]["ms_min"] / r["ms_min"]
        lines.append(f"| {r['name']} | {r['layers']} | {r['tokens_to_lm']} | {r['macs'] / 1e9:.1f} | "
                     f"{r['mac_ratio']:.2f}x | {r['ms']:.0f} ({r['ms_min']:.0f}) | {median:.2f}x ({fastest:.2f}x) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=QWEN_2B["depth"], help="blocks (full width either way)")
    parser.add_argument("--size", type=int, default=448, help="image side in px (a multiple of 28)")
    parser.add_argument("--layer", type=int, default=2, help="the Top-K layer (zero-indexed)")
    parser.add_argument("--runs", type=int, default=5, help="ONNX Runtime timed runs per model (interleaved)")
    parser.add_argument("--no-time", action="store_true", help="tokens and MACs only")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer, 64-wide tower at 112 px; results not saved")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="results stem (default: units_speed, or units_speed_depthN at another depth)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = dict(QWEN_2B, depth=args.depth)
    size, runs, layer = args.size, args.runs, args.layer
    if args.smoke:
        config |= {"depth": 2, "embed_dim": 64, "hidden_size": 96, "num_heads": 2}
        size, runs, layer = 112, 2, 0
    side = size // config["patch_size"]
    units = (side // config["spatial_merge_size"]) ** 2
    load: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as onnx_folder:
        save_qwen2_vl_tower(folder, config)
        loaded = load_model(f"hf:{folder}", ModelOptions(img_size=size), warn_random=False)
        feed = {k: v.numpy() for k, v in loaded.example_inputs(batch=1).items()}
        configs = configurations(units, config["depth"], layer)
        rows = build(loaded, configs, None if args.no_time else Path(onnx_folder))
        del loaded  # the sessions below need the memory: only the exported files remain
        gc.collect()
        if not args.no_time:
            load = time_exports(rows, Path(onnx_folder), feed, runs)
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"]
        row["speedup_min"] = rows[0]["ms_min"] / row["ms_min"]
    title = (f"Qwen2-VL-2B-sized tower + its merger (depth {config['depth']}, width {config['embed_dim']}), {size} px: "
             f"{side * side} patches, {units} merge units; ONNX Runtime CPU, 2 threads, spinning off, {runs} "
             f"interleaved rounds after one warm-up round: median and (min) per model")
    machine = (f"Machine load average (1, 5, 15 min, `uptime`): {load['before']} before the timing, {load['after']} "
               f"after." if load else "")
    text = table(rows)
    print(f"\n{title}\n\n{text}\n\n{machine}")
    if not args.smoke:
        stem = args.output or RESULTS / ("units_speed" if config["depth"] == QWEN_2B["depth"]
                                         else f"units_speed_depth{config['depth']}")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps({"title": title, "config": config, "size": size,
                                                         "runs": runs, "load": load, "rows": rows}, indent=1) + "\n")
        stem.with_suffix(".md").write_text(f"{title}\n\n{text}\n\n{machine}\n")

if __name__ == "__main__":
    main()
