"""Fixtures of the data tests."""

import pytest
import torch

from fusetune.loading import load_model


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny Llama, randomly initialised: enough for TRL to prepare data around it."""
    torch.manual_seed(0)
    return load_model("fusetune:tiny_llama", torch.float32, random_init=True)
