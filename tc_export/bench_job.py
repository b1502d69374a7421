"""``tc-export bench``: build both ONNX models of one configuration and time them side by side."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .bench import BenchConfig, BenchRow, run_bench
from .export.macs import count_macs
from .export.onnx_export import ExportConfig, export_onnx
from .models import ModelOptions, load_model
from .pipeline import compress_for_job


def bench_model(
    model_name: str,
    methods: Sequence[object],
    options: ModelOptions,
    config: BenchConfig,
    say: Callable[[str], None] = print,
    profile: bool = False,
    recipe: str | None = None,
) -> list[BenchRow]:
    loaded = load_model(model_name, options, warn_random=False)
    one = loaded.example_inputs(batch=1)
    compressed = compress_for_job(loaded, methods, one, recipe)
    mac_ratio = count_macs(loaded.module, one) / count_macs(compressed.module, one)
    say(f"{loaded.name}: tokens per layer {' '.join(map(str, compressed.token_counts()))}")
    names = {spec.name: spec.export_name for spec in loaded.inputs}

    def export_pair(batch: int, folder: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
        inputs = loaded.example_inputs(batch=batch)
        paths = []
        for label, module in (("baseline", loaded.module), ("compressed", compressed.module)):
            path = folder / f"{label}-b{batch}.onnx"
            export_onnx(module, inputs, path, ExportConfig(batch=batch), input_names=[names[k] for k in inputs],
                        output_names=loaded.output_names)
            paths.append(path)
        return paths[0], paths[1], {names[k]: v.numpy() for k, v in inputs.items()}

    return run_bench(export_pair, mac_ratio, config, say=say, profile=profile)
