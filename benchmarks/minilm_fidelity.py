"""MiniLM (all-MiniLM-L6-v2, real weights) under compression: sentence-embedding cosine on real sentences.

Embeds the offline sentence set (standard-library docstrings, ``tc_export.data.sentences``) with the original and
the compressed model at a fixed sequence length and reports the MAC ratio and the mean / min cosine. With static
shapes the padding is paid for: at a length that leaves many pads, merges go to the pads first (they pair only
with each other) and cost nothing; at a length most sentences fill, merges hit real tokens.

    python benchmarks/minilm_fidelity.py --length 128 --r 14      # ToMe and adjacent merging, r=14 per layer
    python benchmarks/minilm_fidelity.py --length 32 --r 4
"""

from __future__ import annotations

import argparse
import warnings

import torch

from tc_export import compress
from tc_export.data import sentences
from tc_export.export.macs import count_macs
from tc_export.models.hf_models import build_minilm, tokenize
from tc_export.models.registry import ModelOptions
from tc_export.passes import AdjacentConfig, ToMeConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=128, help="fixed sequence length")
    parser.add_argument("--method", action="append", choices=["tome", "adjacent"], help="default: tome and adjacent")
    parser.add_argument("--r", type=int, action="append", help="tokens merged per layer (repeat for several)")
    parser.add_argument("--sentences", type=int, default=1000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    texts = list(sentences())[: args.sentences]
    print(f"{len(texts)} sentences from standard-library docstrings")
    print("| length | real tokens (mean) | method | tokens per layer | MAC ratio | mean cosine | min cosine |")
    print("|---|---|---|---|---|---|---|")
    length = args.length
    loaded = build_minilm(ModelOptions(), length=length)
    batches = [tokenize(loaded.tokenizer, texts[i : i + 64], length) for i in range(0, len(texts), 64)]
    real = float(torch.cat([b["attention_mask"] for b in batches]).sum(1).float().mean())
    with torch.no_grad():
        reference = torch.cat([loaded.module(**batch) for batch in batches])
    for r in args.r or [length // 9]:
        for method in args.method or ["tome", "adjacent"]:
            config = ToMeConfig(r=r) if method == "tome" else AdjacentConfig(r=r)
            compressed = compress(loaded, config, batches[0])
            one = {k: v[:1] for k, v in batches[0].items()}
            ratio = count_macs(loaded.module, one) / count_macs(compressed.module, one)
            with torch.no_grad():
                got = torch.cat([compressed(**batch) for batch in batches])
            cosine = torch.nn.functional.cosine_similarity(got.double(), reference.double(), dim=1)
            counts = " ".join(map(str, compressed.token_counts()))
            print(f"| {length} | {real:.1f} | {method} r={r} | {counts} | {ratio:.2f}x | "
                  f"{float(cosine.mean()):.4f} | {float(cosine.min()):.4f} |")


if __name__ == "__main__":
    main()
