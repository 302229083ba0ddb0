"""`device.accelerator`: CPU by default; asking for CUDA without a GPU is a one-line ConfigError (no GPU needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pflm.config import load_recipe
from pflm.device.spec import DeviceSpec
from pflm.device.trainer import DeviceTrainer
from pflm.errors import ConfigError


def spec(**extra) -> DeviceSpec:
    over = {"model.embedding_dim": 8, "model.hidden_dim": 8, **extra}
    return DeviceSpec.from_recipe(load_recipe(None, [f"{k}={v}" for k, v in over.items()]), 50)


def test_cpu_is_the_default():
    tr = DeviceTrainer(spec(), np.ones(50))
    assert tr.device == torch.device("cpu") and all(p.device.type == "cpu" for p in tr.model.parameters())
    assert tr.local_vocab.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(ConfigError, match="device.accelerator=cuda but torch sees no CUDA GPU") as e:
        DeviceTrainer(spec(**{"device.accelerator": "cuda"}), np.ones(50))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="device.accelerator"):
        spec(**{"device.accelerator": "tpu"})
