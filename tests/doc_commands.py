"""Run the commands the README and docs/*.md show, as shown, in order, in one fresh folder per page (issue 28).

How a command is run (docs/reproducibility.md, "The documented-commands test"):

- Every line of every ```bash block is a command (``\\`` continues a line, ``#`` starts a comment). Example output
  belongs in ```text blocks, which are not run.
- ``pip``, ``pytest`` (also ``python -m pytest``/``python -m pip``) and ``apt-get`` lines are skipped by name: they
  install or test, and CI has done both before this test runs.
- A command in ``SKIPPED`` is not run, for the reason given there (it needs hardware this machine has not).
- ``tc-export ...`` runs in a subprocess of this Python (``python -m tc_export.cli.main``), so the checkout under
  test is the one run. Anything else runs as is, through bash.
- ``STAND_INS``: a heavy command runs with a small model in its place. Only the model argument may change, never a
  flag (``check_stand_in`` refuses any other change). A command that is not in the table runs as shown.
- ``EXIT_CODES``: the commands documented to exit non-zero here, with the code and a line of the message (the
  TensorRT ones: 3, "TensorRT is not installed"). Every other command must exit 0.
- ``XFAIL``: a command known to fail on this branch, with the issue that owns it.
- ``FIXTURES``: files a command references that a user brings (their model directory, a weights file), made
  before the page's first command; ``TOWERS``: the checkpoint folders (``hf:Qwen2-VL-2B-Instruct``, ...) as configs
  of each model's shape at a tiny width. A ```yaml block whose first line is ``# NAME.yaml`` is written to NAME.yaml
  first (the recipe the page shows is the one its commands run).

A command added to a page without a working example therefore fails the test; a heavy one added without a stand-in
runs at full size (slow, and visible in the test's durations).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_PROGRAMS = ("pip", "pip3", "pytest", "apt-get")  # install and test lines: CI ran them already
TIMEOUT_S = 1200  # one command; a hang fails instead of holding CI

# Stand-ins (tiny, fast). TEST_VIT: timm's 6-layer test ViT (160 px, 10 x 10 patches + class token, width 64).
TEST_VIT = "timm:test_vit"
TWELVE = "vit_t"  # 12 layers and a class token (a 12-entry --r list, Top-K at --layers 3,6,9 or block 8), width 192

STAND_INS: dict[str, str] = {
    "tc-export vit_b --method tome --r 16 -o model.onnx": f"tc-export {TEST_VIT} --method tome --r 16 -o model.onnx",
    "tc-export vit_b --method tome --r 16 --inflect -0.5": f"tc-export {TEST_VIT} --method tome --r 16 --inflect -0.5",
    "tc-export vit_b --method tome --r 24,24,20,16,16,12,8,8,4,4,0,0 -o m.onnx":
        f"tc-export {TWELVE} --method tome --r 24,24,20,16,16,12,8,8,4,4,0,0 -o m.onnx",
    "tc-export timm:vit_base_patch16_384 --method tome --r 23 -o m384.onnx":
        f"tc-export {TEST_VIT} --method tome --r 23 -o m384.onnx",
    "tc-export vit_b --img-size 384 --batch 8 --method tome --r 16 -o m.onnx":
        f"tc-export {TEST_VIT} --img-size 384 --batch 8 --method tome --r 16 -o m.onnx",
    "tc-export vit_b --dynamic-batch --method tome --r 16 -o m.onnx":
        f"tc-export {TEST_VIT} --dynamic-batch --method tome --r 16 -o m.onnx",
    "tc-export vit_b --weights vit_b.safetensors --method tome --r 16 -o m.onnx":
        f"tc-export {TEST_VIT} --weights vit_b.safetensors --method tome --r 16 -o m.onnx",
    "tc-export deit_s --method topk --keep 0.7 --layers 3,6,9 --fuse -o evit.onnx":
        f"tc-export {TWELVE} --method topk --keep 0.7 --layers 3,6,9 --fuse -o evit.onnx",
    "tc-export vit_b --method prumerge --tokens 64 --extra -o pm.onnx":
        f"tc-export {TEST_VIT} --method prumerge --tokens 64 --extra -o pm.onnx",
    "tc-export vit_b --method adjacent --r 8 -o adj.onnx": f"tc-export {TEST_VIT} --method adjacent --r 8 -o adj.onnx",
    "tc-export vit_b --recipe vit_b_tome_then_topk -o two_stage.onnx":
        f"tc-export {TWELVE} --recipe vit_b_tome_then_topk -o two_stage.onnx",
    "tc-export minilm --method tome --r 14 -o minilm.onnx": "tc-export hf:./tiny-bert --method tome --r 14 -o minilm.onnx",
    "tc-export vit_b --method tome --r 16 -o model.engine": f"tc-export {TEST_VIT} --method tome --r 16 -o model.engine",
    "tc-export timm:vit_huge_patch14_clip_224 --method tome --r 8 -o h.onnx":
        f"tc-export {TEST_VIT} --method tome --r 8 -o h.onnx",
    "tc-export vit_b --method tome --r 16 --external-data -o m.onnx":
        f"tc-export {TEST_VIT} --method tome --r 16 --external-data -o m.onnx",
    "tc-export vit_b --method tome --r 16 --dtype fp16 -o m16.onnx":
        f"tc-export {TEST_VIT} --method tome --r 16 --dtype fp16 -o m16.onnx",
    "tc-export bench vit_b --method tome --r 16": f"tc-export bench {TEST_VIT} --method tome --r 16",
    "tc-export timm:deit_small_distilled_patch16_224 --method tome --r 8 --protected 2 -o d.onnx":
        "tc-export timm:deit_tiny_distilled_patch16_224 --method tome --r 8 --protected 2 -o d.onnx",
    "tc-export vit_b --method topk --keep 0.5 --emit-positions -o p.onnx":
        f"tc-export {TEST_VIT} --method topk --keep 0.5 --emit-positions -o p.onnx",
    "tc-export vit_s --method pool --stride 2 -o pooled.onnx": f"tc-export {TEST_VIT} --method pool --stride 2 -o pooled.onnx",
    "tc-export vit_s --method pool -o pooled.onnx": f"tc-export {TEST_VIT} --method pool -o pooled.onnx",
    "tc-export clip_vit_l_336 --recipe llava15_prumerge -o llava.onnx":
        "tc-export hf:./tiny-clip --recipe llava15_prumerge -o llava.onnx",
    "tc-export clip_vit_l_336 --recipe llava15_prumerge -o prumerge.onnx":
        "tc-export hf:./tiny-clip --recipe llava15_prumerge -o prumerge.onnx",
    "tc-export clip_vit_l_336 --recipe llava15_clip_l336 -o llava.onnx":
        "tc-export hf:./tiny-clip --recipe llava15_clip_l336 -o llava.onnx",
    "tc-export clip_vit_b --features -2 --frames 8 --method pool -o video.onnx":
        "tc-export hf:./tiny-clip --features -2 --frames 8 --method pool -o video.onnx",
    "tc-export vit_b --method tome --r 16 --target jetson-orin-nano -o bundle/":
        f"tc-export {TEST_VIT} --method tome --r 16 --target jetson-orin-nano -o bundle/",
    # docs/half-precision.md
    "tc-export vit_b --method tome --r 16 --dtype fp16 --parity-samples 4 -o m16.onnx":
        f"tc-export {TEST_VIT} --method tome --r 16 --dtype fp16 --parity-samples 4 -o m16.onnx",
    "tc-export vit_b --method topk --keep 0.5 --layers 3,6,9 --dtype fp16 --parity-samples 4 -o k16.onnx":
        f"tc-export {TWELVE} --method topk --keep 0.5 --layers 3,6,9 --dtype fp16 --parity-samples 4 -o k16.onnx",
    "tc-export vit_b --weights vitb.pt --method tome --r 16 --target jetson-orin-nano -o vb/":
        f"tc-export {TEST_VIT} --weights vitb.pt --method tome --r 16 --target jetson-orin-nano -o vb/",
    "tc-export vit_b --weights vitb.pt --method tome --r 16 --dtype fp16 -o vb16.onnx":
        f"tc-export {TEST_VIT} --weights vitb.pt --method tome --r 16 --dtype fp16 -o vb16.onnx",
    # docs/merge-units.md
    "tc-export vit_s --recipe R.yaml --emit-positions -o vit_s_units.onnx":
        f"tc-export {TEST_VIT} --recipe R.yaml --emit-positions -o vit_s_units.onnx",
    # docs/video.md
    "tc-export clip_vit_b --recipe video_clip_b_8frames_pool_evs --emit-positions -o clip.onnx":
        "tc-export hf:./tiny-clip --recipe video_clip_b_8frames_pool_evs --emit-positions -o clip.onnx",
    "tc-export clip_vit_b --frames 8 --features -2 --recipe temporal_pool.yaml -o t.onnx":
        "tc-export hf:./tiny-clip --frames 8 --features -2 --recipe temporal_pool.yaml -o t.onnx",
    "tc-export clip_vit_b --frames 8 --features -2 --method temporal --retain 0.25 -o t.onnx":
        "tc-export hf:./tiny-clip --frames 8 --features -2 --method temporal --retain 0.25 -o t.onnx",
    # docs/reproducibility.md
    "tc-export vit_t --method tome --r 16 -o a.onnx": f"tc-export {TEST_VIT} --method tome --r 16 -o a.onnx",
    "tc-export vit_t --method tome --r 16 -o b.onnx": f"tc-export {TEST_VIT} --method tome --r 16 -o b.onnx",
    "tc-export vit_t --method tome --r 16 --weights-seed 1 -o other.onnx":
        f"tc-export {TEST_VIT} --method tome --r 16 --weights-seed 1 -o other.onnx",
}

TRT_MISSING = "TensorRT is not installed"
EXIT_CODES: dict[str, tuple[int, str]] = {  # documented to exit non-zero on a machine without TensorRT
    "tc-export vit_b --method tome --r 16 -o model.engine": (3, TRT_MISSING),
    "tc-export build model.onnx -o model.engine --precision fp16": (3, TRT_MISSING),
}

SKIPPED: dict[str, str] = {
    "polygraphy run model.engine --model-type engine --trt --load-inputs bundle/inputs.json "
    "--load-outputs bundle/outputs.json --atol 0.05 --rtol 0.02 --check-error-stat elemwise":
        "runs a TensorRT engine: built on the device (bundle/build_and_verify.sh), not here",
    "tc-export tune mnist_vit --speedup 2 --batch 64 -o tuned.yaml":
        "searches until its --time-budget (default 20 min) runs out: measured 16 min for mnist_vit, and over 21 min "
        "for the timm:test_vit stand-in, on a loaded 2-core machine; a stand-in cannot shorten it without a flag. "
        "tests/test_tune.py runs the whole tune job on a tiny model with a short budget",
}

XFAIL: dict[str, str] = {}  # command -> reason (the issue and branch that own the failure); remove once it passes


@dataclass(frozen=True)
class Command:
    page: str  # README.md or docs/NAME.md
    line: int  # where the command starts
    text: str  # as shown, comments dropped and whitespace normalised: the key of the tables

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)


def bash_commands(page: Path) -> list[Command]:
    """Each command of each ```bash block of ``page``, in order."""
    commands: list[Command] = []
    inside, pending, start = False, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            inside = stripped == "```bash" if not inside else False
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = " ".join(shlex.split(pending + stripped, comments=True))
        pending = ""
        if text:
            commands.append(Command(page.name if page.parent != ROOT / "docs" else f"docs/{page.name}", start, text))
    return commands


def skipped_by_name(words: list[str]) -> bool:
    program = words[0]
    if program in ("python", "python3") and words[1:2] == ["-m"] and len(words) > 2:
        program = words[2]
    return program in SKIPPED_PROGRAMS


def model_argument(words: list[str]) -> int | None:
    """Index of the model (or first positional) argument of a ``tc-export`` command."""
    index = 2 if len(words) > 1 and words[1] in ("bench", "tune", "export") else 1
    return index if index < len(words) and not words[index].startswith("-") else None


def check_stand_in(shown: str, run: str) -> None:
    """A stand-in changes the model argument only."""
    a, b = shlex.split(shown), shlex.split(run)
    index = model_argument(a)
    same_elsewhere = len(a) == len(b) and all(x == y for i, (x, y) in enumerate(zip(a, b)) if i != index)
    assert index is not None and same_elsewhere, f"stand-in of {shown!r} changes more than the model: {run!r}"


def argv(text: str) -> list[str]:
    words = shlex.split(text)
    if words[0] == "tc-export":
        return [sys.executable, "-m", "tc_export.cli.main", *words[1:]]
    return ["bash", "-c", text]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    return env


# ----------------------------------------------------------------------------------------- fixtures (user files)


def _tiny_transformers(folder: Path, kind: str) -> None:
    import torch
    import transformers as tf

    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    torch.manual_seed(0)
    if kind == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=64, patch_size=16, num_labels=10, **small))
    elif kind == "yolos":  # 8 x 8 patches + class token + its 100 detection tokens (kept last: --protected-suffix 100)
        config = tf.YolosConfig(image_size=[128, 128], patch_size=16, num_detection_tokens=100,
                                use_mid_position_embeddings=False, **small)  # as yolos-small/tiny
        model = tf.YolosModel(config, add_pooling_layer=False)
    elif kind == "bert":  # a sentence encoder as minilm is (no pooler: mean pooled)
        model = tf.BertModel(tf.BertConfig(vocab_size=1000, **small), add_pooling_layer=False)
    else:  # clip: a 3-layer CLIP vision tower, 8 x 8 patches of 14 px + class token
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=112, patch_size=14, **(small | {"num_hidden_layers": 3})))
    model.save_pretrained(folder)


def _stand_in_weights(path: Path) -> None:
    """``vit_b.safetensors`` / ``vitb.pt`` for the ``--weights`` commands: weights of the stand-in, as a user's
    file would be (safetensors, or a PyTorch state dict)."""
    import torch
    from safetensors.torch import save_file

    import timm

    torch.manual_seed(1)
    model = timm.create_model(TEST_VIT.split(":", 1)[1])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))


# Checkpoint folders the pages name (hf:FOLDER), as a user has them after downloading: each holds the model's
# config with its real depth, patch size and windows, at a tiny width (random weights, saved; the text model is
# not needed: the tower's config alone is a folder tc-export loads).
NARROW = {"num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64}
TOWERS: dict[str, tuple[str, str, dict]] = {
    "Qwen2-VL-2B-Instruct": ("Qwen2VLVisionConfig", "qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel",
                             {"depth": 32, "embed_dim": 32, "hidden_size": 48, "num_heads": 2, "mlp_ratio": 2,
                              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}),
    "Qwen2.5-VL-3B-Instruct": ("Qwen2_5_VLVisionConfig",
                               "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel",
                               {"depth": 32, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                                "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                                "window_size": 112, "out_hidden_size": 40, "fullatt_block_indexes": [7, 15, 23, 31]}),
    "Qwen3-VL-2B-Instruct": ("Qwen3VLVisionConfig", "qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel",
                             {"depth": 24, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                              "out_hidden_size": 40, "num_position_embeddings": 2304,
                              "deepstack_visual_indexes": [5, 11, 17]}),
    "pixtral-12b": ("PixtralVisionConfig", "PixtralVisionModel",
                    {"image_size": 64, "patch_size": 16, "num_hidden_layers": 2, **NARROW}),
    "SmolVLM-256M-Instruct": ("SmolVLMVisionConfig", "SmolVLMVisionTransformer",
                              {"image_size": 64, "patch_size": 16, "num_hidden_layers": 2, **NARROW}),
    "siglip2-base-patch16-naflex": ("Siglip2VisionConfig", "Siglip2VisionModel",
                                    {"num_patches": 256, "patch_size": 16, "num_hidden_layers": 2, **NARROW,
                                     "hidden_size": 48, "intermediate_size": 96}),
    "Llama-4-Scout-17B-16E": ("Llama4VisionConfig", "Llama4VisionModel",
                              {"image_size": 112, "patch_size": 14, "num_hidden_layers": 2, **NARROW,
                               "intermediate_size": 128, "vision_output_dim": 32, "projector_input_dim": 32,
                               "projector_output_dim": 32}),
    "mlcd-vit-bigG-patch14-448": ("MLCDVisionConfig", "MLCDVisionModel",
                                  {"image_size": 112, "patch_size": 14, "num_hidden_layers": 8, **NARROW}),
}


def _tiny_tower(folder: Path, name: str) -> None:
    import importlib

    import torch
    import transformers as tf

    config_class, model_path, settings = TOWERS[name]
    module, _, model_class = model_path.rpartition(".")
    owner = importlib.import_module(f"transformers.models.{module}") if module else tf
    torch.manual_seed(0)
    tower = getattr(owner, model_class)(getattr(tf, config_class)(**settings))
    # attention peaked as a trained tower's: random init at width 32 is near uniform, every score near-tied, so
    # fp32 rounding flips Top-K's choices; much larger queries and keys (std 0.5) make 32 blocks chaotic instead
    for name, parameter in tower.named_parameters():
        if name.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight")):
            parameter.data.normal_(0, 0.3)
    tower.save_pretrained(folder)


FIXTURES: dict[str, Callable[[Path], None]] = {
    "my-vit": lambda p: _tiny_transformers(p, "vit"),
    "my-yolos": lambda p: _tiny_transformers(p, "yolos"),
    "tiny-bert": lambda p: _tiny_transformers(p, "bert"),
    "tiny-clip": lambda p: _tiny_transformers(p, "clip"),
    "vit_b.safetensors": _stand_in_weights,
    "vitb.pt": _stand_in_weights,
    **{name: (lambda p, name=name: _tiny_tower(p, name)) for name in TOWERS},
}


def named_files(page: Path) -> dict[str, str]:
    """The files a page shows whole: each ```yaml block whose first line is ``# NAME.yaml``, as NAME.yaml."""
    files, inside, name, lines = {}, False, None, []
    for line in page.read_text().splitlines():
        stripped = line.strip()
        if not inside and stripped == "```yaml":
            inside, name, lines = True, None, []
        elif inside and stripped.startswith("```"):
            inside = False
            if name:
                files[name] = "\n".join(lines) + "\n"
        elif inside:
            if not lines and name is None and re.fullmatch(r"#\s*[\w.-]+\.yaml", stripped):
                name = stripped.lstrip("#").strip()
                continue
            lines.append(line)
    return files


def make_fixtures(folder: Path, commands: list[Command], page: Path | None = None) -> None:
    """The user files the page's commands (or their stand-ins) name, and the files the page shows whole."""
    texts = " ".join(STAND_INS.get(c.text, c.text) for c in commands)
    for name, make in FIXTURES.items():
        if re.search(rf"(^|[\s/:]){re.escape(name)}(\s|$)", texts):
            make(folder / name)
    for name, text in (named_files(page) if page is not None else {}).items():
        (folder / name).write_text(text)


# ----------------------------------------------------------------------------------------------------- running


def run_page(page: Path, folder: Path) -> None:
    """Run every command of ``page`` in order in ``folder``; collect every failure, then fail once naming them."""
    commands = bash_commands(page)
    assert commands, f"{page} has no ```bash commands"
    make_fixtures(folder, commands, page)
    failures, unexpected_passes = [], []
    env = environment()
    for command in commands:
        words = command.words
        if skipped_by_name(words) or command.text in SKIPPED:
            continue
        shown = command.text
        text = STAND_INS.get(shown, shown)
        if text != shown:
            check_stand_in(shown, text)
        code, message = EXIT_CODES.get(shown, (0, ""))
        start = time.perf_counter()
        done = subprocess.run(argv(text), cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        seconds = time.perf_counter() - start
        print(f"{command.page}:{command.line} exit {done.returncode} in {seconds:.0f} s: {text}")
        ok = done.returncode == code and message in done.stdout + done.stderr
        where = f"{command.page}:{command.line}: {shown}" + (f" (run as: {text})" if text != shown else "")
        if shown in XFAIL:
            if ok:
                unexpected_passes.append(f"{where} passes: remove its XFAIL entry ({XFAIL[shown]})")
            continue
        if not ok:
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
            failures.append(f"{where}: exit {done.returncode}, documented {code}"
                            + (f" with {message!r}" if message else "") + ": " + " | ".join(tail))
    assert not failures, "\n".join(failures)
    assert not unexpected_passes, "\n".join(unexpected_passes)
    expected = [f"{c} ({XFAIL[c]})" for c in XFAIL if any(cmd.text == c for cmd in commands)]
    if expected:
        pytest.xfail("; ".join(expected))


# Pages with many commands, run by a test file of their own so that pytest-xdist (--dist loadfile) runs them beside
# the README's and the other pages'.
OWN_FILE = {"command-line.md": "tests/test_docs_command_line.py"}


def doc_pages() -> list[Path]:
    """docs/*.md pages with commands and no test file of their own, sorted."""
    return [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in OWN_FILE and bash_commands(p)]
