"""FastSFTTrainer.compute_loss: TRL's loss and metrics, from our fused pass, read on the host only at log time.

The same run through TRL's own compute_loss (our forward's per-token ``fused_lm_head`` outputs,
metrics read every micro-batch) is the reference: the losses, gradient norms, entropy, token
accuracy and token counts in the log must agree, for padded and padding-free batches, with
gradient accumulation (``num_items_in_batch``), completion-only loss and evaluation.
"""

import os

import pytest
import torch
from datasets import Dataset

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.compat.trl import metric_lists, original
from fusetune.data.synthetic import synthetic_splits
from fusetune.errors import FusetuneError
from fusetune.patching import apply_kernels, is_applied, remove_kernels
from fusetune.training.token_stats import TokenStats
from fusetune.training.trainer import fused_loss_blocker

METRICS = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
EVAL_METRICS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens")
TRL_SFT_TRAINER = original("SFTTrainer")  # trl.SFTTrainer names FastSFTTrainer once fusetune is imported
TOLERANCE = {"reference": 1e-5, "triton": 1e-4}  # fp32 on CPU; the two runs only reorder float sums


@pytest.fixture(autouse=True)
def unpatch_kernels():
    yield
    remove_kernels()


def run(tmp_path, kernels: str, fused: bool, monkeypatch, steps=4, batch=4, **overrides):
    """Train ``steps`` steps and evaluate; returns (trainer, how many times TRL's own compute_loss ran)."""
    calls = []
    original = TRL_SFT_TRAINER.compute_loss

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TRL_SFT_TRAINER, "compute_loss", counted)
    torch.manual_seed(0)
    model, tokenizer = FastModel.from_pretrained(
        "fusetune:tiny_llama", max_seq_length=64, random_init=True, kernels=kernels
    )
    if kernels == "triton" and not torch.cuda.is_available():  # interpreted: the loss head alone (what is compared)
        remove_kernels()
        apply_kernels(model, "triton", rms_norm=False, add_norm=False, rope=False, glu=False, lora=False)
    model = FastModel.get_peft_model(model, r=4, modules_to_save=["lm_head"], use_gradient_checkpointing=False)
    rows, eval_rows = synthetic_splits(12 * batch, 3 * batch, seed=1)
    args = FastSFTConfig(
        output_dir=str(tmp_path / ("fused" if fused else "trl")),
        report_to=[],
        max_steps=steps,
        logging_steps=steps // 2,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        learning_rate=3e-3,
        seed=3,
        kernels=kernels,
        fused_loss=fused,
        **overrides,
    )
    trainer = FastSFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows),
        args=args,
    )
    trainer.train()
    trainer.evaluate()
    assert is_applied(trainer.model) and trainer.args.kernels == kernels
    return trainer, len(calls)


def logged(trainer, keys):
    return [{k: log[k] for k in keys} for log in trainer.state.log_history if keys[0] in log]


@pytest.mark.parametrize(
    "kernels, overrides",
    [
        ("reference", {}),  # padding-free, completion-only loss (the prompt/completion data)
        ("reference", {"padding_free": False, "gradient_accumulation_steps": 2}),  # padded, num_items_in_batch
        # the Triton interpreter runs every program instance in Python: 2 steps of 2 rows, the loss op alone
        ("triton", {"completion_only_loss": False, "steps": 2, "batch": 2}),
    ],
    ids=["padding-free", "padded-accumulated", "triton-all-tokens"],
)
def test_fused_loss_and_metrics_match_trls_compute_loss(tmp_path, monkeypatch, kernels, overrides):
    if kernels == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1: Triton kernels cannot run")
    fused, trl_calls_fused = run(tmp_path, kernels, True, monkeypatch, **overrides)
    trl, trl_calls_trl = run(tmp_path, kernels, False, monkeypatch, **overrides)
    assert trl_calls_fused == 0 and trl_calls_trl > 0  # each run really took the path it names
    assert fused.args.padding_free == overrides.get("padding_free", True)
    for keys in (METRICS, EVAL_METRICS):
        got, want = logged(fused, keys), logged(trl, keys)
        assert len(got) == len(want) == (2 if keys is METRICS else 1)
        for g, w in zip(got, want, strict=True):
            assert g["num_tokens" if keys is METRICS else "eval_num_tokens"] > 0
            for k in keys:
                assert g[k] == pytest.approx(w[k], rel=TOLERANCE[kernels], abs=1e-6), (k, got, want)


def test_metrics_are_read_once_per_log(tmp_path, monkeypatch):
    """The sums wait on the device: three steps leave three pending entries and no host values until the log."""
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    args = FastSFTConfig(output_dir=str(tmp_path), report_to=[], max_steps=3, logging_steps=3, seed=3, fused_loss=True)
    rows = Dataset.from_list(synthetic_splits(32, 0, seed=1)[0])
    trainer = FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=rows, args=args)
    seen = []
    original_flush = TokenStats.flush

    def flush(self, trainer):
        seen.append((len(self.pending["train"]), len(metric_lists(trainer, "train").get("entropy", []))))
        original_flush(self, trainer)

    monkeypatch.setattr(TokenStats, "flush", flush)
    trainer.train()
    assert seen[0] == (3, 0)  # at the step-3 log: three steps pending, nothing read yet
    assert 0.0 <= trainer.state.log_history[0]["mean_token_accuracy"] <= 1.0
    assert trainer.state.log_history[0]["num_tokens"] > 0
    assert not trainer.args.logging_nan_inf_filter  # HF's filter would read the loss every step


@pytest.mark.parametrize(
    "overrides, fused",
    [({}, True), ({"label_smoothing_factor": 0.1}, False), ({"loss_type": "dft"}, False)],
    ids=["plain", "label-smoothing", "dft-loss"],
)
def test_fused_path_only_where_it_computes_trls_loss(tmp_path, overrides, fused):
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    args = FastSFTConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, **overrides)
    rows = Dataset.from_list(synthetic_splits(8, 0, seed=1)[0])
    trainer = FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=rows, args=args)
    assert (fused_loss_blocker(trainer, trainer.model) is None) is fused
    remove_kernels()  # a model whose forward is not ours any more
    assert "not fusetune's" in fused_loss_blocker(trainer, trainer.model)


def test_fused_loss_true_is_an_error_where_it_cannot_apply(tmp_path):
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    args = FastSFTConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, fused_loss=True, loss_type="dft")
    rows = Dataset.from_list(synthetic_splits(8, 0, seed=1)[0])
    with pytest.raises(FusetuneError, match="fused_loss=True: not possible here: loss_type='dft'"):
        FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=rows, args=args)
