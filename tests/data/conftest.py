"""Fixtures of the data tests."""

import pytest
import torch

from fusetune.loading import load_model


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny Llama, randomly initialised: enough for TRL to prepare data around it."""
    torch.manual_seed(0)
    return load_model("fusetune:tiny_llama", torch.float32, random_init=True)


def trainer_on(splits, model, tokenizer, tmp_path, **args):
    """A FastSFTTrainer prepared on ``splits`` through their cache (one step on the CPU, no logger): TRL's
    tokenization, data.too_long, truncation and packing run as in a training run."""
    from fusetune.training.trainer import FastSFTConfig, FastSFTTrainer

    config = FastSFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, **args)
    return FastSFTTrainer(
        model=model,
        args=config,
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=tokenizer,
        dataset_cache=splits.cache,
    )
