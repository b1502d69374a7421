"""Does a token count that is a multiple of 8 pay on ONNX Runtime CPU? (``tune --multiple 8``'s question.)

The model is truncated after its first attention to counts just below, at and above multiples of 8 (every later
layer runs at that count) and all of them are timed in one interleaved loop; a count that is a multiple of 8
pays when it runs faster than the count one below it, which does strictly less work.

    python benchmarks/token_multiples.py --model vit_b --batch 1
    python benchmarks/token_multiples.py --smoke       # vit_t at 64 px, 3 runs
"""

from __future__ import annotations

import argparse

from tc_export import compress
from tc_export.models import ModelOptions, load_model
from tc_export.measure.tune.latency import time_models
from tc_export.measure.tune.truncate import TruncateAt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--around", default="64,96,128", help="multiples of 8 to probe (each with -1 and +1)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.runs, args.around = "vit_t", 3, "8"
    loaded = load_model(args.model, ModelOptions(img_size=64) if args.smoke else ModelOptions(), warn_random=False)
    inputs = loaded.example_inputs(batch=1)
    counts = sorted({n + d for n in map(int, args.around.split(",")) for d in (-1, 0, 1)})
    modules = [compress(loaded, [TruncateAt(keep=n)], inputs).module for n in counts]
    times = dict(zip(counts, time_models(loaded, modules, args.batch, 2, args.runs)))
    print(f"{loaded.name}, batch {args.batch}, truncated after layer 0's attention, ONNX Runtime CPU, 2 threads, "
          f"{args.runs} interleaved runs")
    print("| tokens | median (ms) | vs one token fewer |")
    print("|---|---|---|")
    for n in counts:
        step = f"{100 * (times[n] / times[n - 1] - 1):+.1f}%" if n - 1 in times else "-"
        print(f"| {n}{' (x8)' if n % 8 == 0 else ''} | {times[n]:.2f} | {step} |")


if __name__ == "__main__":
    main()
