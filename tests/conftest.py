import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker, or the workers' threads fight
    torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=UserWarning)


def tiny_timm_vit(img_size: int = 96, depth: int = 4, **kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=img_size, depth=depth, **kwargs).eval()


@pytest.fixture
def timm_vit():
    return tiny_timm_vit()
