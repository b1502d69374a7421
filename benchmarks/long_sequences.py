"""Long sequences: does merging still pay at Whisper-encoder lengths, and what does the merge itself cost?

Builds the Whisper tiny encoder (4 layers, width 384, 6 heads; random weights) at several frame counts N (1500 is
the real model's; the others change only ``max_source_positions``), applies ToMe and adjacent merging with the
same r per layer, chosen for about 2x fewer MACs, and times uncompressed / ToMe / adjacent side by side in ONNX
Runtime (`tc-export bench` settings). Then it times the merge ops alone: each layer's ToMeMerge / AdjacentMerge
exported on its own at that layer's token count, summed over the layers. ToMe scores all (N/2)^2 A-B pairs, so
its similarity is quadratic in N; adjacent merging scores N/2 pairs. ``--window W`` adds ToMe with the local match
search (``ToMeConfig(window=W)``, each A token compared with 2W+1 B tokens; not the published method) at the same
r, timed in the same interleaved loop. Each compressed model's fidelity is the cosine of its ONNX Runtime output
averaged over its frames (as ``tc-export``'s fidelity report does) to the uncompressed model's, mean and min over
a few seeded inputs (random weights: compare the rows with each other, not with a trained model's).

    python benchmarks/long_sequences.py --frames 250 --frames 500 --frames 1000 --frames 1500 --frames 3000
    python benchmarks/long_sequences.py --frames 1500 --window 16 --window 64
    python benchmarks/long_sequences.py --smoke        # tiny: 2 layers, width 64, 40 frames, window 4, 3 runs
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

from tc_export import compress
from tc_export.measure.bench import make_session, time_interleaved
from tc_export.measure.bench_job import compare_outputs
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


def cosines(sessions: list, feeds: list[dict]) -> list[tuple[float, float]]:
    """(mean, min) cosine of each session's first output to the first session's, over ``feeds``: the sweep's
    fidelity measure (outputs with fewer frames are averaged over their frames first)."""
    outputs = [[session.run(None, feed)[0] for feed in feeds] for session in sessions]
    scores = [compare_outputs(outputs[0], runs, classes=False, samples=len(feeds)) for runs in outputs]
    return [(score["cosine"], score["min_cosine"]) for score in scores]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, action="append", help="encoder frames N (repeat); default 250..3000")
    parser.add_argument("--target", type=float, default=2.0, help="MAC ratio to aim r at")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, action="append", default=[],
                        help="add ToMe with a local match window W (repeat for several)")
    parser.add_argument("--fidelity-inputs", type=int, default=4, help="seeded inputs for the cosine")
    parser.add_argument("--smoke", action="store_true", help="tiny encoder, one short length, window 4, 3 runs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    overrides = SMOKE if args.smoke else {}
    frames_list = args.frames or ([40] if args.smoke else [250, 500, 1000, 1500, 3000])
    runs = 3 if args.smoke else args.runs

    windows = args.window or ([4] if args.smoke else [])
    fidelity_inputs = 2 if args.smoke else args.fidelity_inputs

    print("| frames | variant | r | tokens per layer | MAC ratio | ms | speed-up | merge ops (ms, % of model) "
          f"| cosine vs uncompressed (mean, min of {fidelity_inputs}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for frames in frames_list:
        torch.manual_seed(0)
        loaded = build_whisper_encoder(ModelOptions(), max_source_positions=frames, **overrides)
        example = loaded.example_inputs(batch=1)
        base_macs = count_macs(loaded.module, example)
        r, _ = pick_r(loaded, example, args.target, base_macs, (2.5,) if args.smoke else (5.0, 4.0, 3.5, 3.0, 2.5))
        configs = {"ToMe (global)": ToMeConfig(r=r)}
        configs.update({f"ToMe window={w}": ToMeConfig(r=r, window=w) for w in windows})
        configs["adjacent"] = AdjacentConfig(r=r)
        modules = {"uncompressed": loaded.module}
        modules.update({label: compress(loaded, config, example) for label, config in configs.items()})
        names = {spec.name: spec.export_name for spec in loaded.inputs}
        feed = {names[k]: v.numpy() for k, v in example.items()}
        feeds = [feed] + [{names[k]: v.numpy() for k, v in loaded.example_inputs(batch=1, seed=seed).items()}
                          for seed in range(1, fidelity_inputs)]
        with tempfile.TemporaryDirectory() as folder:
            sessions = []
            for index, module in enumerate(modules.values()):
                path = Path(folder) / f"model{index}.onnx"
                export_onnx(getattr(module, "module", module), example, path, ExportConfig(),
                            input_names=[names[k] for k in example], output_names=loaded.output_names)
                sessions.append(make_session(path, args.threads))
            times = [t.median for t in time_interleaved([lambda s=s: s.run(None, feed) for s in sessions],
                                                         runs, warmup=2)]
            fidelity = cosines(sessions, feeds)
            op_times = [None] + [time_ops(module.module, example, Path(folder), args.threads, runs)
                                 for module in list(modules.values())[1:]]
        base = times[0]
        for (label, module), ms, ops, (cos_mean, cos_min) in zip(modules.items(), times, op_times, fidelity):
            if ops is None:
                print(f"| {frames} | {label} | - | {frames} | 1.00x | {base:.1f} | 1.00x | - | 1.0000 |")
                continue
            ratio = base_macs / count_macs(module.module, example)
            counts = " ".join(map(str, module.token_counts()))
            print(f"| {frames} | {label} | {r} | {counts} | {ratio:.2f}x | {ms:.1f} | {base / ms:.2f}x | "
                  f"{ops:.2f} ({ops / ms:.1%}) | {cos_mean:.4f} ({cos_min:.4f}) |", flush=True)

if __name__ == "__main__":
    main()
