"""How fast can a model with ToMe's token counts be, whatever the merge costs? A bound for `tc-export bench`.

Times three ONNX models of the same ViT side by side in ONNX Runtime (same settings as `tc-export bench`):
the uncompressed model, a "truncated" model that keeps the first N - r tokens after each attention block (the
exact token counts of ToMe, with no merge work and no proportional attention), and the real ToMe export. The
truncated model's speed-up is the most any merge implementation can reach on this machine; the gap between it and
ToMe is what the merge ops cost.

    python benchmarks/token_count_floor.py --model vit_b --r 16 --batch 1 --batch 8
    python benchmarks/token_count_floor.py --smoke     # a 2-layer tiny ViT, 3 runs (keeps the script working)
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

from tc_export import ToMeConfig, compress
from tc_export.measure.bench import make_session, time_side_by_side
from tc_export.export.onnx_export import ExportConfig, export_onnx
from tc_export.models import ModelOptions, load_model
from tc_export.models.base import InputSpec, LoadedModel
from tc_export.measure.tune.truncate import TruncateLikeToMe


def tiny_vit() -> LoadedModel:
    import timm

    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    return LoadedModel("tiny_vit", module, [InputSpec("x", (3, 32, 32), onnx_name="pixel_values")])


def tome_timing_setup(description: str) -> tuple[argparse.Namespace, LoadedModel]:
    """The arguments of a ToMe timing script (model, r, batches, runs, threads, --smoke) and its model."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny 2-layer ViT at 32 px, r=1, 3 runs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.smoke:
        args.r, args.runs, args.batch = 1, 3, args.batch or [1]
        return args, tiny_vit()
    return args, load_model(args.model, ModelOptions(), warn_random=False)


def main() -> None:
    args, loaded = tome_timing_setup(__doc__.splitlines()[0])
    names = {spec.name: spec.export_name for spec in loaded.inputs}
    print("| batch | uncompressed (ms) | truncated (ms) | ToMe (ms) | truncated speed-up | ToMe speed-up |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch or [1, 8]:
        inputs = loaded.example_inputs(batch=batch)
        modules = {
            "uncompressed": loaded.module,
            "truncated": compress(loaded, TruncateLikeToMe(r=args.r), inputs).module,
            "tome": compress(loaded, ToMeConfig(r=args.r), inputs).module,
        }
        with tempfile.TemporaryDirectory() as folder:
            sessions = []
            for label, module in modules.items():
                path = Path(folder) / f"{label}.onnx"
                export_onnx(module, inputs, path, ExportConfig(batch=batch), input_names=[names[k] for k in inputs],
                            output_names=loaded.output_names)
                sessions.append(make_session(path, args.threads))
            feed = {names[k]: v.numpy() for k, v in inputs.items()}
            base, truncated, tome = time_side_by_side(sessions, [feed] * 3, args.runs, warmup=5)
        print(f"| {batch} | {base:.1f} | {truncated:.1f} | {tome:.1f} | {base / truncated:.2f}x | {base / tome:.2f}x |")


if __name__ == "__main__":
    main()
