import os

import pytest
import torch

# Tests never reach out for data; CIFAR tests build their own files in CIFAR's format.
os.environ["GVR_LAB_OFFLINE"] = "1"
torch.set_num_threads(2)


@pytest.fixture
def tiny_config(tmp_path):
    """A Config factory for seconds-long runs on the synthetic dataset."""
    from gvr_lab import Config

    def make(**overrides):
        base = dict(dataset="synthetic", model="tiny_cnn", epochs=2, batch_size=64, lr=0.05, train_subset=512,
                    device="cpu", progress=False, out_dir=str(tmp_path / "run"))
        base.update(overrides)
        return Config(**base)

    return make
