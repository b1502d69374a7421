"""Long sequences: does merging still pay at Whisper-encoder lengths, and what does the merge itself cost?

Builds the Whisper tiny encoder (4 layers, width 384, 6 heads; random weights) at several frame counts N (1500 is
the real model's; the others change only ``max_source_positions``), applies ToMe and adjacent merging with the
same r per layer, chosen for about 2x fewer MACs, and times uncompressed / ToMe / adjacent side by side in ONNX
Runtime (`tc-export bench` settings). Then it times the merge ops alone: each layer's ToMeMerge / AdjacentMerge
exported on its own at that layer's token count, summed over the layers. ToMe scores all (N/2)^2 A-B pairs, so
its similarity is quadratic in N; adjacent merging scores N/2 pairs.

    python benchmarks/long_sequences.py --frames 250 --frames 500 --frames 1000 --frames 1500 --frames 3000
    python benchmarks/long_sequences.py --smoke        # tiny: 2 layers, width 64, 40 frames, 3 runs
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

from tc_export import compress
from tc_export.bench import make_session, time_interleaved
from tc_export.export.macs import count_macs
from tc_export.export.onnx_export import ExportConfig, export_onnx
from tc_export.models.hf_models import build_whisper_encoder
from tc_export.models.registry import ModelOptions
from tc_export.ops.base import TokenOp
from tc_export.passes import AdjacentConfig, ToMeConfig

SMOKE = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 128}


def pick_r(loaded, example, target: float, base_macs: int, divisors=(5.0, 4.0, 3.5, 3.0, 2.5)) -> tuple[int, float]:
    """The ToMe r per layer whose MAC ratio is closest to ``target`` (a few candidates, N/5 .. N/2.5)."""
    frames = next(iter(example.values())).shape[-1] // 2
    best = None
    for divisor in divisors:
        r = max(1, int(frames / divisor))
        ratio = base_macs / count_macs(compress(loaded, ToMeConfig(r=r), example).module, example)
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (r, ratio)
    return best


def time_ops(module: torch.nn.Module, example: dict, folder: Path, threads: int, runs: int) -> float:
    """Milliseconds of all token ops of ``module``, each exported and timed on its own at its input shapes."""
    captured: list[tuple[TokenOp, tuple]] = []
    hooks = [op.register_forward_hook(lambda m, args, out: captured.append((m, args)))
             for op in module.modules() if isinstance(op, TokenOp)]
    with torch.no_grad():
        module(**example)
    for hook in hooks:
        hook.remove()
    sessions, feeds = [], []
    for index, (op, (x, size, metric)) in enumerate(captured):
        size = torch.ones(*x.shape[:2], 1) if size is None else size
        path = folder / f"op{index}.onnx"
        export_onnx(op, {"x": x, "size": size, "metric": metric}, path, ExportConfig(functions=False),
                    input_names=["x", "size", "metric"], output_names=["tokens", "sizes"])
        sessions.append(make_session(path, threads))
        feeds.append({"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})
    calls = [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)]
    return sum(t.median for t in time_interleaved(calls, runs, warmup=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, action="append", help="encoder frames N (repeat); default 250..3000")
    parser.add_argument("--target", type=float, default=2.0, help="MAC ratio to aim r at")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny encoder, two short lengths, 3 runs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    overrides = SMOKE if args.smoke else {}
    frames_list = args.frames or ([40] if args.smoke else [250, 500, 1000, 1500, 3000])
    runs = 3 if args.smoke else args.runs

    print("| frames | r | tokens per layer | MAC ratio tome / adjacent | uncompressed (ms) | tome (ms) | adjacent (ms) "
          "| tome speed-up | adjacent speed-up | tome merges (ms, % of model) | adjacent merges (ms, % of model) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for frames in frames_list:
        torch.manual_seed(0)
        loaded = build_whisper_encoder(ModelOptions(), max_source_positions=frames, **overrides)
        example = loaded.example_inputs(batch=1)
        base_macs = count_macs(loaded.module, example)
        r, tome_ratio = pick_r(loaded, example, args.target, base_macs, (2.5,) if args.smoke else (5.0, 4.0, 3.5, 3.0, 2.5))
        modules = {"uncompressed": loaded.module,
                   "tome": compress(loaded, ToMeConfig(r=r), example),
                   "adjacent": compress(loaded, AdjacentConfig(r=r), example)}
        adjacent_ratio = base_macs / count_macs(modules["adjacent"].module, example)
        names = {spec.name: spec.export_name for spec in loaded.inputs}
        feed = {names[k]: v.numpy() for k, v in example.items()}
        with tempfile.TemporaryDirectory() as folder:
            sessions = []
            for label, module in modules.items():
                path = Path(folder) / f"{label}.onnx"
                export_onnx(getattr(module, "module", module), example, path, ExportConfig(),
                            input_names=[names[k] for k in example], output_names=loaded.output_names)
                sessions.append(make_session(path, args.threads))
            base, tome, adjacent = (t.median for t in time_interleaved(
                [lambda s=s: s.run(None, feed) for s in sessions], runs, warmup=2))
            tome_ops = time_ops(modules["tome"].module, example, Path(folder), args.threads, runs)
            adjacent_ops = time_ops(modules["adjacent"].module, example, Path(folder), args.threads, runs)
        counts = " ".join(map(str, modules["tome"].token_counts()))
        print(f"| {frames} | {r} | {counts} | {tome_ratio:.2f}x / {adjacent_ratio:.2f}x | {base:.1f} | {tome:.1f} | "
              f"{adjacent:.1f} | {base / tome:.2f}x | {base / adjacent:.2f}x | {tome_ops:.2f} ({tome_ops / tome:.1%}) | "
              f"{adjacent_ops:.2f} ({adjacent_ops / adjacent:.1%}) |", flush=True)


if __name__ == "__main__":
    main()
