"""What carrying positions with the tokens costs: the same ToMe export with and without the position carry.

Both models are exported from one ViT with the same method; the second is compressed with ``emit_positions`` (the
token state carries (row, column) times size next to each size through every merge, and the model outputs each
token's position and size). Timed side by side in ONNX Runtime on CPU, runs interleaved, spinning off in both
sessions (``tc_export.measure.bench.make_session``). The goal is under 3% of the compressed model's time.

    python benchmarks/position_carry_cost.py --model vit_b --r 16 --batch 1 --batch 8
    python benchmarks/position_carry_cost.py --smoke     # a 2-layer tiny ViT, 3 runs (keeps the script working)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from token_count_floor import tome_timing_setup

from tc_export import ToMeConfig, compress
from tc_export.measure.bench import make_session, time_interleaved
from tc_export.export.onnx_export import ExportConfig, export_onnx
from tc_export.job.pipeline import emitted_output_names


def main() -> None:
    args, loaded = tome_timing_setup(__doc__.splitlines()[0])
    names = {spec.name: spec.export_name for spec in loaded.inputs}
    print(f"{loaded.name}, ToMe r={args.r}, ONNX Runtime CPU, {args.threads} threads, {args.runs} interleaved runs")
    print("| batch | ToMe (ms) | ToMe + positions (ms) | cost | cost (p25-p75 of paired ratios) |")
    print("|---|---|---|---|---|")
    for batch in args.batch or [1]:
        inputs = loaded.example_inputs(batch=batch)
        plain = compress(loaded, ToMeConfig(r=args.r), inputs)
        carried = compress(loaded, ToMeConfig(r=args.r), inputs, emit_positions=True)
        with tempfile.TemporaryDirectory() as folder:
            sessions = []
            for label, compressed in (("plain", plain), ("carried", carried)):
                path = Path(folder) / f"{label}.onnx"
                outputs = emitted_output_names(loaded.output_names, compressed.report.emitted_after)
                export_onnx(compressed.module, inputs, path, ExportConfig(batch=batch),
                            input_names=[names[k] for k in inputs], output_names=outputs)
                sessions.append(make_session(path, args.threads))
            feed = {names[k]: v.numpy() for k, v in inputs.items()}
            calls = [lambda s=session: s.run(None, feed) for session in sessions]
            base, with_positions = time_interleaved(calls, args.runs, warmup=5)
        ratios = sorted(b / a for a, b in zip(base.samples, with_positions.samples))
        quartiles = f"{ratios[len(ratios) // 4] - 1:+.1%} to {ratios[3 * len(ratios) // 4] - 1:+.1%}"
        print(f"| {batch} | {base.median:.1f} | {with_positions.median:.1f} | "
              f"{with_positions.median / base.median - 1:+.1%} | {quartiles} |")


if __name__ == "__main__":
    main()
