"""Shared fixtures: compose configs in-process, and the tiny tokenizer."""

import os
import tempfile
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before fusetune is imported: it asks the hub once unless this is set

from fusetune.app.config import expand_resume_shorthand, register_configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# The self-check's verdicts: shared by this worker and the runs it starts, never by the user's cache.
os.environ.setdefault("FUSETUNE_CACHE_DIR", tempfile.mkdtemp(prefix="fusetune-cache-"))
register_configs()
torch.set_num_threads(1)


# W&B is an optional extra (GPU hosts are often carried without it): its tests skip, saying so, where it is absent
needs_wandb = pytest.mark.skipif(find_spec("wandb") is None, reason="wandb is not installed (the wandb extra)")


@pytest.fixture
def compose_cfg():
    def _compose(overrides=(), output_dir="/tmp/unused"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=expand_resume_shorthand(list(overrides)))  # resume=X, as train.py
        cfg.output_dir = str(output_dir)
        return cfg

    return _compose


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from fusetune.loading import load_tokenizer

    return load_tokenizer("fusetune:tiny_llama")


@pytest.fixture(autouse=True)
def no_saved_tensor_hooks_left():
    """A test leaves no autograd saved-tensor hooks installed. One that fails inside torch.utils.checkpoint leaves
    the checkpoint's hooks in place while pytest holds its traceback, and every later test of the worker would
    then fail in its backward: the hooks are removed here, and the test that left them gets an error that says so."""
    yield
    left = 0
    while torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        torch._C._autograd._pop_saved_tensors_default_hooks()
        left += 1
    if left:
        pytest.fail(f"this test left {left} saved-tensor hook(s) installed (removed now)", pytrace=False)
