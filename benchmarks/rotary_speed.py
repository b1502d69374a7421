"""A rotary model's speed-up under ToMe r=8 and Top-K against its MAC ratio: ONNX Runtime and PyTorch eager, CPU.

Both timings are interleaved: ONNX Runtime times the three exported models in one loop (spinning off, as
``tc-export bench``), PyTorch eager times them round by round; medians are reported, so load from other processes
hits all of them alike.

    python benchmarks/rotary_speed.py                     # vit_base_patch16_rope_224, batch 1 and 8
    python benchmarks/rotary_speed.py --smoke             # a 4-layer model at 64 px (the benchmark test)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tc_export import compress
from tc_export.export.macs import count_macs
from tc_export.models import ModelOptions, load_model
from tc_export.passes import ToMeConfig, TopKConfig
from tc_export.measure.tune.latency import time_models


def eager_ms(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            m(**inputs)
        for _ in range(rounds):
            for name, m in models.items():
                start = time.perf_counter()
                m(**inputs)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_base_patch16_rope_224")
    parser.add_argument("--batch", type=int, action="append", help="repeatable (default: 1 and 8)")
    parser.add_argument("--runs", type=int, default=20, help="ONNX Runtime timed runs per model")
    parser.add_argument("--rounds", type=int, default=5, help="PyTorch eager rounds")
    parser.add_argument("--smoke", action="store_true", help="a 4-layer model at 64 px, batch 1, 3 runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    arch = "vit_small_patch16_rope_224" if args.smoke else args.arch
    loaded = load_model(f"timm:{arch}", ModelOptions(img_size=64) if args.smoke else ModelOptions(), warn_random=False)
    if args.smoke:  # the first 4 blocks only
        loaded.module.blocks = loaded.module.blocks[:4]
    batches = [1] if args.smoke else (args.batch or [1, 8])
    runs, rounds = (3, 1) if args.smoke else (args.runs, args.rounds)
    one = loaded.example_inputs(batch=1)
    models = {"uncompressed": loaded.module,
              "tome r=8": compress(loaded, ToMeConfig(r=8), one).module,
              "topk keep=0.7 (3,6,9)": compress(loaded, TopKConfig(), one).module}
    macs = {name: count_macs(m, one) for name, m in models.items()}
    print(f"{arch}, 2 threads; ONNX Runtime CPU ({runs} interleaved runs) and PyTorch eager ({rounds} rounds)")
    print("| batch | model | GMACs/image | MAC ratio | ORT median (ms) | ORT speed-up | eager median (ms) | "
          "eager speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in batches:
        inputs = loaded.example_inputs(batch=batch)
        ort = dict(zip(models, time_models(loaded, list(models.values()), batch, 2, runs)))
        eager = eager_ms(models, inputs, rounds)
        for name in models:
            print(f"| {batch} | {name} | {macs[name] / 1e9:.2f} | {macs['uncompressed'] / macs[name]:.2f}x | "
                  f"{ort[name]:.1f} | {ort['uncompressed'] / ort[name]:.2f}x | {eager[name]:.1f} | "
                  f"{eager['uncompressed'] / eager[name]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
