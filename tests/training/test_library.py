"""The library flow: import-time patching of TRL, FastSFTConfig defaults, aliases, parameter groups."""

import pytest
import torch
from datasets import Dataset

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.data.synthetic import synthetic_splits
from fusetune.errors import FusetuneError
from fusetune.patching import remove_kernels
from fusetune.state import state_of


@pytest.fixture(autouse=True)
def unpatch_kernels():
    yield
    remove_kernels()


def tiny(lora=False, **peft_kwargs):
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    if lora:
        model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, **peft_kwargs)
    return model, tokenizer


def dataset(n=32):
    return Dataset.from_list(synthetic_splits(n, 0, seed=1)[0])


def config(tmp_path, **kwargs):
    return FastSFTConfig(output_dir=str(tmp_path), report_to=[], max_steps=2, logging_steps=1, **kwargs)


def test_import_points_trl_at_fusetune():
    import trl
    from trl import SFTConfig, SFTTrainer

    from fusetune.compat.trl import original, point_trl_at, restore_trl

    assert SFTTrainer is FastSFTTrainer and SFTConfig is FastSFTConfig
    assert trl.trainer.sft_trainer.SFTTrainer is FastSFTTrainer and issubclass(FastSFTTrainer, original("SFTTrainer"))
    restore_trl()
    try:
        assert trl.SFTTrainer is original("SFTTrainer") is not FastSFTTrainer
        assert trl.trainer.sft_config.SFTConfig is original("SFTConfig") is not FastSFTConfig
    finally:
        point_trl_at(FastSFTTrainer, FastSFTConfig)
    assert trl.SFTTrainer is FastSFTTrainer and trl.trainer.SFTConfig is FastSFTConfig


def test_precision_comes_from_the_hardware(tmp_path):
    cfg = config(tmp_path)
    assert (cfg.bf16, cfg.fp16) == ((False, False) if not torch.cuda.is_available() else (cfg.bf16, not cfg.bf16))
    assert config(tmp_path, fp16=False, bf16=False).bf16 is False
    assert (config(tmp_path, use_cpu=True).bf16, config(tmp_path, use_cpu=True).fp16) == (False, False)


def test_batches_reach_a_gpu_without_a_host_wait(tmp_path):
    """On CUDA the batch copy is non-blocking (pinned memory); elsewhere, or where the user chose, it is left alone."""
    on_cuda = torch.cuda.is_available()
    assert config(tmp_path).accelerator_config.non_blocking is on_cuda
    assert config(tmp_path, use_cpu=True).accelerator_config.non_blocking is False
    assert config(tmp_path, dataloader_pin_memory=False).accelerator_config.non_blocking is False
    chosen = config(tmp_path, accelerator_config={"non_blocking": False, "split_batches": True}).accelerator_config
    assert chosen.non_blocking is False and chosen.split_batches is True


def test_older_trl_names_still_work(tmp_path):
    assert config(tmp_path, max_seq_length=48).max_length == 48
    model, tokenizer = tiny()
    trainer = FastSFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset(), args=config(tmp_path))
    assert trainer.processing_class is tokenizer
    assert trainer.train().global_step == 2


def test_kernels_are_applied_by_the_trainer(tmp_path):
    from transformers import AutoModelForCausalLM

    from fusetune.loading import resolve

    model = AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.from_pretrained(resolve("fusetune:tiny_llama"))
    )
    _, tokenizer = tiny()
    FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset(), args=config(tmp_path))
    assert state_of(model).backend == ("triton" if torch.cuda.is_available() else "reference")


def test_padding_free_is_on_where_safe_and_logged_where_not(tmp_path, caplog):
    model, tokenizer = tiny()
    trainer = FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset(), args=config(tmp_path))
    assert trainer.padding_free and trainer.args.max_length == 64
    assert max(len(r["input_ids"]) for r in trainer.train_dataset) <= 64  # we truncate, since TRL's collator won't
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    with caplog.at_level("INFO", logger="fusetune.training.trainer"):
        off = FastSFTTrainer(
            model=model,
            processing_class=tokenizer,
            train_dataset=dataset(),
            data_collator=collator,
            args=config(tmp_path),
        )
    assert not off.padding_free and "custom data collator" in caplog.text


def group_names(trainer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
        for g in trainer.create_optimizer().param_groups
    ]


def test_parameter_groups_with_lora_and_saved_embeddings(tmp_path):
    model, tokenizer = tiny(lora=True, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    args = config(tmp_path, learning_rate=1e-3, embedding_learning_rate=5e-5, weight_decay=0.1)
    trainer = FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset(), args=args)
    groups = group_names(trainer, model)
    assert [(lr, wd) for lr, wd, _ in groups] == [(1e-3, 0.1), (5e-5, 0.1)]
    lora, embeddings = groups[0][2], groups[1][2]
    assert len(lora) == 4 * 2 * 2 and all("lora_" in n for n in lora)
    assert embeddings == [
        "base_model.model.lm_head.modules_to_save.default.weight",
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
    ]


def test_parameter_groups_in_full_finetuning(tmp_path):
    model, tokenizer = tiny()
    args = config(tmp_path, learning_rate=1e-3, embedding_learning_rate=5e-5, weight_decay=0.1)
    trainer = FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset(), args=args)
    (decay_lr, decay_wd, decay), (norm_lr, norm_wd, norms), (emb_lr, emb_wd, emb) = group_names(trainer, model)
    assert (decay_lr, decay_wd, norm_lr, norm_wd, emb_lr, emb_wd) == (1e-3, 0.1, 1e-3, 0.0, 5e-5, 0.1)
    assert emb == ["lm_head.weight", "model.embed_tokens.weight"]
    assert len(norms) == 4 * 2 + 1 and all("norm" in n for n in norms)
    assert len(decay) == 4 * 7 and not any("norm" in n or "embed" in n for n in decay)


def test_embedding_lr_without_trainable_embeddings_warns(tmp_path):
    model, tokenizer = tiny(lora=True, target_modules=["q_proj"])
    args = config(tmp_path, embedding_learning_rate=5e-5)
    trainer = FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset(), args=args)
    with pytest.warns(UserWarning, match="no full embed_tokens/lm_head weight is trainable"):
        trainer.create_optimizer()


def test_lora_on_embeddings_warns():
    model, _ = FastModel.from_pretrained("fusetune:tiny_llama", random_init=True)
    with pytest.warns(UserWarning, match=r"target_modules has \['lm_head'\]"):
        FastModel.get_peft_model(model, r=4, target_modules=["q_proj", "lm_head"], use_gradient_checkpointing=False)


def test_bad_dtype_is_one_clear_error():
    from fusetune.errors import FusetuneError

    with pytest.raises(FusetuneError, match="dtype: expected one of"):
        FastModel.from_pretrained("fusetune:tiny_llama", dtype="float8", random_init=True)


def test_resume_gives_the_same_losses_step_for_step(tmp_path):
    def losses(trainer):
        return [log["loss"] for log in trainer.state.log_history if "loss" in log]

    def make(out):
        torch.manual_seed(0)
        model, tokenizer = tiny()
        args = FastSFTConfig(
            output_dir=str(out),
            report_to=[],
            max_steps=6,
            logging_steps=1,
            save_steps=3,
            save_strategy="steps",
            learning_rate=3e-3,
            per_device_train_batch_size=4,
            seed=3,
        )
        return FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset(64), args=args)

    whole = make(tmp_path / "whole")
    whole.train()
    resumed = make(tmp_path / "whole")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert len(losses(whole)) == 6
    assert losses(resumed)[-3:] == losses(whole)[-3:]


def test_save_merged_loads_in_plain_transformers_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny(lora=True, modules_to_save=["lm_head"])
    with torch.no_grad():  # make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 100, (2, 11), device=model.device)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float().cpu()
    remove_kernels()
    merged = tmp_path / "merged"
    # The folder already holds this model's adapter and a stale sharded checkpoint: an index naming a missing shard.
    model.save_pretrained(merged)
    (merged / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {"x": "gone.safetensors"}}')
    (merged / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    with pytest.raises(FusetuneError, match="is not empty; pass overwrite=True"):
        FastModel.save_merged(model, tokenizer, str(merged))
    FastModel.save_merged(model, tokenizer, str(merged), overwrite=True)
    assert not (merged / "adapter_config.json").exists() and not (merged / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in merged.glob("*.safetensors")) == ["model.safetensors"]
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert plain.dtype == torch.bfloat16
    with torch.no_grad():
        got = plain(input_ids=ids.cpu()).logits.float()
    # One bf16 rounding (the merged weights) against an fp32 model; two when the trained model is bf16 (GPU).
    # A leftover adapter_config.json would apply the LoRA a second time: about 0.1 off, ten times this tolerance.
    tolerance = 1e-2 if model.dtype == torch.float32 else 3e-2
    assert ((got - expected).norm() / expected.norm()).item() < tolerance
    assert not any("lora" in k for k in plain.state_dict())


def test_trl_renames_warn_instead_of_failing(tmp_path):
    with pytest.warns(FutureWarning, match="older spelling: use max_length"):
        assert FastSFTConfig(output_dir=str(tmp_path), report_to=[], max_seq_length=32).max_length == 32
    model, tokenizer = tiny()
    with pytest.warns(FutureWarning, match="older name for processing_class"):
        FastSFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset(), args=config(tmp_path))


def test_installed_trl_is_in_the_declared_range():
    import importlib.metadata

    from packaging.requirements import Requirement

    declared = next(Requirement(r) for r in importlib.metadata.requires("fusetune") if r.startswith("trl"))
    assert importlib.metadata.version("trl") in declared.specifier, declared


def test_a_dataset_without_a_column_sft_trains_on_is_one_line(tmp_path):
    model, tokenizer = tiny()
    data = Dataset.from_list([{"body": "add 1 1=2"}] * 4)
    expected = r"the train dataset has columns \['body'\], none that SFT trains on: give 'text'"
    with pytest.raises(FusetuneError, match=expected):
        FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=config(tmp_path))
