"""Merge units on the real-accuracy yardstick: mnist_vit's held-out accuracy (1,000 digits) under unit compression.

mnist_vit is a 4-layer timm ViT on a 14 x 14 patch grid with a class token (``tc_export.models.mnist``); with
2 x 2 units it has 7 x 7 = 49 units. Measured, side by side on the same digits:
- Top-K at units, the unit scored by the mean, the sum or the max of its tokens' class attention (and by the
  attention its tokens receive), against Top-K on tokens at the same kept fraction;
- ToMe at units, units matched on the mean of their tokens' keys or on the keys concatenated, against ToMe on
  tokens merging as many tokens;
- PruMerge at units, mean / sum / max unit scores (the scores also weigh the merged neighbours).

    python benchmarks/merge_units_mnist.py            # writes benchmarks/results/merge_units_mnist.json
    python benchmarks/merge_units_mnist.py --smoke    # 100 digits, two rows (keeps the script working)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tc_export import compress
from tc_export.data.mnist import mnist_accuracy
from tc_export.models import load_model
from tc_export.passes import PruMergeConfig, ToMeConfig, TopKConfig

RESULTS = Path(__file__).resolve().parent / "results" / "merge_units_mnist.json"


def rows(smoke: bool) -> list[tuple[str, list[object], int | None]]:
    """(label, method configs, unit) to measure."""
    out: list[tuple[str, list[object], int | None]] = [("uncompressed", [], None)]
    for keep in ((0.5,) if smoke else (0.5, 0.3, 0.2, 0.1)):
        out.append((f"topk tokens keep={keep} @1", [TopKConfig(keep=keep, layers=(1,))], None))
        for how in (("mean",) if smoke else ("mean", "sum", "max")):
            out.append((f"topk units {how} keep={keep} @1", [TopKConfig(keep=keep, layers=(1,), unit_score=how)], 2))
        if not smoke:
            out.append((f"topk units received keep={keep} @1",
                        [TopKConfig(keep=keep, layers=(1,), score="received")], 2))
    if smoke:
        return out
    for r in (8, 12, 14):  # units merged per layer at layers 0-2 (tokens: 4 r per layer)
        out.append((f"tome tokens r={4 * r} @0-2", [ToMeConfig(r=4 * r, layers=(0, 1, 2))], None))
        for metric in ("mean", "concat"):
            out.append((f"tome units {metric} r={r} @0-2", [ToMeConfig(r=r, layers=(0, 1, 2), unit_metric=metric)],
                        2))
    for budget in (12, 6, 3):
        out.append((f"prumerge tokens {4 * budget} @1", [PruMergeConfig(tokens=4 * budget, layers=(1,))], None))
        for how in ("mean", "sum", "max"):
            out.append((f"prumerge units {how} {budget} @1",
                        [PruMergeConfig(tokens=budget, layers=(1,), unit_score=how)], 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("mnist_vit")
    limit = 100 if args.smoke else None
    example = {"x": torch.zeros(100, 1, 28, 28)}
    results = []
    for label, configs, unit in rows(args.smoke):
        module = compress(loaded, configs, example, unit=unit).module if configs or unit else loaded.module
        tokens = None
        if configs:
            tokens = compress(loaded, configs, {"x": example["x"][:1]}, unit=unit).token_counts()
        accuracy = mnist_accuracy(module, batch=100, limit=limit)
        results.append({"label": label, "unit": unit, "accuracy": accuracy, "tokens_per_layer": tokens})
        print(f"{label:40s} {accuracy * 100:6.1f}%  {tokens}")
    if not args.smoke:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
