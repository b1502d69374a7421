"""Merge units on the real-accuracy yardstick: mnist_vit's held-out accuracy (1,000 digits) under unit compression.

Accuracy is on the 1,000 held-out digits; agreement (the uncompressed model's prediction kept) and the cosine of
the logits to the uncompressed model's are finer yardsticks where accuracy saturates (ToMe: MNIST loses almost
nothing even at ToMe's maximum rate). mnist_vit is a 4-layer timm ViT on a 14 x 14 patch grid with a class token (``tc_export.models.mnist``); with
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
from tc_export.data.mnist import heldout_split
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
    for r, layers in ((8, (0, 1, 2)), (12, (0, 1, 2)), (14, (0, 1, 2)), (24, (0, 1, 2, 3))):
        span = f"@{layers[0]}-{layers[-1]}"  # units merged per layer (tokens: 4 r per layer)
        out.append((f"tome tokens r={4 * r} {span}", [ToMeConfig(r=4 * r, layers=layers)], None))
        for metric in ("mean", "concat"):
            out.append((f"tome units {metric} r={r} {span}", [ToMeConfig(r=r, layers=layers, unit_metric=metric)],
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
    images, labels = heldout_split()
    if args.smoke:
        images, labels = images[:100], labels[:100]
    example = {"x": images[:100]}
    results, reference = [], None
    for label, configs, unit in rows(args.smoke):
        module = compress(loaded, configs, example, unit=unit).module if configs or unit else loaded.module
        tokens = compress(loaded, configs, {"x": images[:1]}, unit=unit).token_counts() if configs else None
        with torch.no_grad():
            logits = torch.cat([module(x=images[i:i + 100]) for i in range(0, images.shape[0], 100)])
        reference = logits if reference is None else reference
        accuracy = float((logits.argmax(-1) == labels).double().mean())
        agreement = float((logits.argmax(-1) == reference.argmax(-1)).double().mean())
        cosine = float(torch.nn.functional.cosine_similarity(logits, reference, dim=-1).mean())
        results.append({"label": label, "unit": unit, "accuracy": accuracy, "agreement": agreement,
                        "logit_cosine": cosine, "tokens_per_layer": tokens})
        print(f"{label:40s} {accuracy * 100:6.1f}%  agree {agreement * 100:5.1f}%  cos {cosine:.4f}  {tokens}")
    if not args.smoke:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
