"""Export cost at scale: wall time and peak resident memory of ``tc-export MODEL --method tome``, per model.

Each export runs in its own process (the CLI, as a user runs it), started by a small wrapper process that
reports its child's maximum resident set size (``getrusage(RUSAGE_CHILDREN)``), so the peak covers the whole job:
load, compress, MAC counts, ONNX export, parity in ONNX Runtime and fidelity. The weights are random (no
``--weights``): memory and time do not depend on their values.

    python benchmarks/export_memory.py                         # vit_b, vit_l at 336 px (the issue's setting)
    python benchmarks/export_memory.py --models vit_b --img-size 224
    python benchmarks/export_memory.py --smoke                 # vit_t: seconds
    python benchmarks/export_memory.py --models timm:vit_huge_patch14_clip_224,timm:vit_giant_patch14_dinov2 \
        --img-size 224                                         # big towers: weights in an external-data file

Prints a Markdown table: model, image size, fp32 weights (GB), export wall time (s), peak resident (GB),
peak / weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ToMe tokens merged per layer: the r 23 for vit_l (24 layers); 8 fits the 12-layer models at 224 px.
DEFAULT_R = {"vit_l": 23}
FALLBACK_R = 8

# Runs argv[1:] and prints its maximum resident set size in bytes (ru_maxrss is in KiB on Linux).
_WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:], stdout=sys.stderr, stderr=sys.stderr)\n"
    "print(json.dumps({'code': code, 'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
)


def weight_bytes(model: str, img_size: int | None) -> int:
    """Bytes of the model's parameters in fp32 (counted without building the weights, see models/footprint.py)."""
    from tc_export.models import ModelOptions, load_model
    from tc_export.models.footprint import parameter_count

    count = parameter_count(model, ModelOptions(img_size=img_size))
    if count is None:  # a built-in model: build it
        loaded = load_model(model, ModelOptions(img_size=img_size), warn_random=False)
        count = sum(p.numel() for p in loaded.module.parameters())
        del loaded
        gc.collect()
    return count * 4


def measure(model: str, img_size: int | None, r: int, folder: Path, extra: list[str] = ()) -> tuple[float, int]:
    """Wall time (s) and peak resident bytes of one ``tc-export`` run (``extra``: more flags, e.g. --dtype)."""
    command = [sys.executable, "-c", "from tc_export.cli.main import main; main()", model,
               "--method", "tome", "--r", str(r), "-o", str(folder / f"{model.replace(':', '_')}.onnx"), *extra]
    if img_size is not None:
        command += ["--img-size", str(img_size)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{model}: the wrapper failed:\n{done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result["code"] != 0:
        raise SystemExit(f"{model}: tc-export exited with {result['code']}:\n{done.stderr[-2000:]}")
    for line in done.stderr.splitlines():  # the job's own report: parity, fidelity
        if line.startswith(("exported", "parity", "fidelity")):
            print(f"{model}: {line}", file=sys.stderr, flush=True)
    return seconds, result["maxrss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_b,vit_l", help="comma-separated model names (default vit_b,vit_l)")
    parser.add_argument("--img-size", type=int, default=336, help="input resolution (default 336)")
    parser.add_argument("--r", type=int, default=None,
                        help=f"ToMe r for every model (default: {DEFAULT_R} per model, else {FALLBACK_R})")
    parser.add_argument("--smoke", action="store_true", help="vit_t at 224 px only, in seconds")
    parser.add_argument("--flags", default="", help="more tc-export flags for every run, e.g. '--dtype fp16'")
    args = parser.parse_args()
    models = ["vit_t"] if args.smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    img_size = 224 if args.smoke else args.img_size
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    rows = []
    with tempfile.TemporaryDirectory(prefix="export-memory-") as folder:
        for model in models:
            weights = weight_bytes(model, img_size)
            r = args.r if args.r is not None else DEFAULT_R.get(model, FALLBACK_R)
            seconds, peak = measure(model, img_size, r, Path(folder), args.flags.split())
            rows.append((model, img_size, weights, seconds, peak, r))
            print(f"{model}: {seconds:.1f} s, peak {peak / 1e9:.2f} GB", file=sys.stderr, flush=True)

    print("| model | image size | fp32 weights (GB) | export wall time (s) | peak resident (GB) | peak / weights |")
    print("|---|---|---|---|---|---|")
    for model, size, weights, seconds, peak, r in rows:
        print(f"| {model} (ToMe r {r}) | {size} | {weights / 1e9:.2f} | {seconds:.1f} | {peak / 1e9:.2f} "
              f"| {peak / weights:.1f}x |")


if __name__ == "__main__":
    main()
