"""A rotary model's speed-up under ToMe r=8 and Top-K against its MAC ratio (PyTorch eager, CPU, batch 8).

Interleaved: each round times the uncompressed model and each compressed one in turn, and the median over rounds
is reported, so load from other processes hits all of them alike. ``python benchmarks/rotary_speed.py``.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from tc_export import compress
from tc_export.export.macs import count_macs
from tc_export.passes import ToMeConfig, TopKConfig


def main(arch: str = "vit_base_patch16_rope_224", rounds: int = 7, batch: int = 8, smoke: bool = False) -> None:
    """``smoke``: a 4-layer model at 64 px, one round of batch 1 (the benchmark test's tiny mode)."""
    import timm

    torch.manual_seed(0)
    size = 64 if smoke else 224
    model = timm.create_model(arch, **({"depth": 4, "img_size": size} if smoke else {})).eval()
    inputs = {"x": torch.randn(batch, 3, size, size)}
    one = {"x": inputs["x"][:1]}
    models = {"uncompressed": model,
              "tome r=8": compress(model, ToMeConfig(r=8), one),
              "topk keep=0.7 (3,6,9)": compress(model, TopKConfig(), one)}
    macs = {name: count_macs(getattr(m, "module", m), one) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    torch.set_num_threads(2)
    with torch.no_grad():
        for m in models.values():
            m(**inputs)
        for _ in range(rounds):
            for name, m in models.items():
                start = time.perf_counter()
                m(**inputs)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["uncompressed"])
    print(f"{arch}, batch {batch}, {rounds} interleaved rounds, 2 threads (shared machine)")
    print("| model | GMACs/image | MAC ratio | median ms/batch | speed-up |")
    print("|---|---|---|---|---|")
    for name in models:
        t = statistics.median(times[name])
        print(f"| {name} | {macs[name] / 1e9:.2f} | {macs['uncompressed'] / macs[name]:.2f}x | {t * 1e3:.0f} | "
              f"{base / t:.2f}x |")


if __name__ == "__main__":
    if "--smoke" in sys.argv:
        main("vit_small_patch16_rope_224", rounds=1, batch=1, smoke=True)
    else:
        main(*sys.argv[1:2])
