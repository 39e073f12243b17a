"""Older spellings (fusetune.compat.renames) and Unsloth's names (fusetune.compat.unsloth)."""

import dataclasses
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from fusetune import FastLanguageModel, FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.compat import unsloth
from fusetune.compat.renames import CONFIG_RENAMES, TRAINER_KEYWORDS
from fusetune.errors import FusetuneError
from fusetune.patching import remove_kernels

CONFIG_FIELDS = {f.name for f in dataclasses.fields(FastSFTConfig)}
OLD_VALUES = {  # a value for each older config spelling, and what it becomes
    "evaluation_strategy": ("steps", "eval_strategy", "steps"),
    "max_seq_length": (77, "max_length", 77),
    "no_cuda": (True, "use_cpu", True),
    "per_gpu_train_batch_size": (3, "per_device_train_batch_size", 3),
    "per_gpu_eval_batch_size": (5, "per_device_eval_batch_size", 5),
    "push_to_hub_token": ("secret", "hub_token", "secret"),
    "warmup_ratio": (0.25, "warmup_steps", 0.25),
    "group_by_length": (True, "train_sampling_strategy", "group_by_length"),
    "save_safetensors": (True, None, None),
    "overwrite_output_dir": (True, None, None),
    "include_tokens_per_second": (True, None, None),
    "logging_dir": ("tb", "logging_dir", "tb"),
}


@pytest.fixture(autouse=True)
def unpatch_kernels():
    yield
    remove_kernels()


def config(tmp_path, **kwargs) -> FastSFTConfig:
    return FastSFTConfig(output_dir=str(tmp_path), report_to=[], **kwargs)


def test_the_table_names_real_fields_and_only_older_ones():
    assert set(OLD_VALUES) == set(CONFIG_RENAMES), "every older config spelling is tested"
    installed = {f.name for f in dataclasses.fields(TrainingArguments)}
    for rename in CONFIG_RENAMES.values():
        assert rename.new is None or rename.new in CONFIG_FIELDS, rename
        if rename.new != rename.old:
            assert rename.old not in CONFIG_FIELDS | installed, f"{rename.old} is a field again: drop its rename"
    for rename in TRAINER_KEYWORDS.values():
        assert rename.new is None or rename.new in CONFIG_FIELDS, rename


@pytest.mark.parametrize("old", sorted(OLD_VALUES))
def test_an_older_config_spelling_warns_and_works(old, tmp_path):
    value, new, expected = OLD_VALUES[old]
    with pytest.warns(FutureWarning, match=rf"\({old}=\.\.\.\)") as caught:
        args = config(tmp_path, **{old: value})
    assert len([w for w in caught if f"({old}=" in str(w.message)]) == 1
    if new is not None:
        got = getattr(args, new)
        assert (got.value if hasattr(got, "value") else got) == expected
        if new != old:
            assert new in str(caught[0].message)


def test_both_spellings_that_agree_are_fine_and_that_disagree_fail(tmp_path):
    with pytest.warns(FutureWarning):
        assert config(tmp_path, evaluation_strategy="steps", eval_strategy="steps", eval_steps=3).eval_steps == 3
    with pytest.raises(FusetuneError, match="evaluation_strategy='epoch' and eval_strategy='steps' disagree"):
        config(tmp_path, evaluation_strategy="epoch", eval_strategy="steps")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"save_safetensors": False}, "saves only safetensors"),
        ({"warmup_ratio": 1.5}, r"warmup_ratio must be in \[0, 1\)"),
    ],
)
def test_an_older_value_that_cannot_be_honoured_is_an_error(kwargs, message, tmp_path):
    with pytest.warns(FutureWarning), pytest.raises(FusetuneError, match=message):
        config(tmp_path, **kwargs)


def test_half_precision_without_cuda_trains_in_fp32_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flag in ("bf16", "fp16"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args = config(tmp_path, **{flag: True})
        said = [str(w.message) for w in caught if "no CUDA GPU" in str(w.message)]
        assert said == [f"{flag}=True, but there is no CUDA GPU: training in fp32 on the CPU"]
        assert not args.bf16 and not args.fp16


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    remove_kernels()
    return model, tokenizer


def text_rows(n=16):
    return Dataset.from_list([{"body": f"add {i} {i}={2 * i}"} for i in range(n)])


def test_older_trainer_keywords_merge_into_a_config_built_from_training_arguments(tiny, tmp_path):
    model, tokenizer = tiny
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    with pytest.warns(FutureWarning) as caught:
        trainer = FastSFTTrainer(
            model=model,
            tokenizer=tokenizer,
            train_dataset=text_rows(),
            args=args,
            dataset_text_field="body",
            max_seq_length=48,
            packing=True,
            dataset_num_proc=1,
            dataset_kwargs={"skip_prepare_dataset": False},
            dataset_batch_size=1000,
            infinite=True,
        )
    said = " | ".join(str(w.message) for w in caught)
    for keyword in ("dataset_text_field", "max_seq_length", "packing", "dataset_num_proc", "dataset_kwargs"):
        assert f"FastSFTTrainer({keyword}=...) is an older spelling: set SFTConfig(" in said
    assert "FastSFTTrainer(infinite=...) was removed; it is ignored (use max_steps)" in said
    assert isinstance(trainer.args, FastSFTConfig)
    assert (trainer.args.dataset_text_field, trainer.args.max_length, trainer.args.packing) == ("body", 48, True)
    assert trainer.train().global_step == 1


def test_a_trainer_keyword_that_disagrees_with_args_is_an_error(tiny, tmp_path):
    model, tokenizer = tiny
    args = config(tmp_path, dataset_text_field="body", max_steps=1, use_cpu=True)
    with pytest.warns(FutureWarning), pytest.raises(FusetuneError, match="dataset_text_field='text' given to the"):
        FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_rows(), args=args,
                       dataset_text_field="text")  # fmt: skip


def test_logging_dir_reaches_tensorboard_and_must_agree_with_the_environment(tiny, tmp_path, monkeypatch):
    from transformers.integrations import TensorBoardCallback

    model, tokenizer = tiny
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)

    def make(**kwargs):
        with pytest.warns(FutureWarning):
            args = FastSFTConfig(output_dir=str(tmp_path), report_to=["tensorboard"], max_steps=1, use_cpu=True,
                                 dataset_text_field="body", logging_dir=str(tmp_path / "tb"), **kwargs)  # fmt: skip
        return FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_rows(), args=args)

    trainer = make()
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback))
    assert callback.logging_dir == str(tmp_path / "tb")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(FusetuneError, match="disagrees with TENSORBOARD_LOGGING_DIR"):
        make()


def test_the_unsloth_names(tiny):
    assert unsloth.FastLanguageModel is FastModel is FastLanguageModel
    assert unsloth.UnslothTrainer is FastSFTTrainer and unsloth.UnslothTrainingArguments is FastSFTConfig
    assert unsloth.is_bfloat16_supported() == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    import trl

    assert trl.SFTTrainer is unsloth.UnslothTrainer and trl.SFTConfig is unsloth.UnslothTrainingArguments


def test_get_peft_model_takes_unsloth_s_lora_arguments():
    model, _ = FastLanguageModel.from_pretrained(model_name="fusetune:tiny_llama", max_seq_length=64, dtype=None,
                                                 load_in_4bit=False, random_init=True)  # fmt: skip
    model = FastLanguageModel.get_peft_model(
        model,
        r=8,
        target_modules=["q_proj", "v_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=True,
        loftq_config=None,
        layers_to_transform=[0, 1],
    )
    config = model.peft_config["default"]
    assert config.use_rslora and config.r == 8 and set(config.target_modules) == {"q_proj", "v_proj"}
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 16 / 8**0.5
    assert not hasattr(model.base_model.model.model.layers[2].self_attn.q_proj, "lora_A")
    FastLanguageModel.for_inference(model)
    assert not model.training and model.get_base_model().config.use_cache
    FastLanguageModel.for_training(model)
    assert model.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling is not supported"),
        ({"fast_inference": True}, "vLLM"),
        ({"full_finetuning": True, "load_in_4bit": True}, "cannot be combined"),
    ],
)
def test_unsupported_loading_options_are_clear_errors(kwargs, message):
    with pytest.raises(FusetuneError, match=message):
        FastLanguageModel.from_pretrained(model_name="fusetune:tiny_llama", random_init=True, **kwargs)


def test_loftq_is_a_clear_error(tiny):
    with pytest.raises(FusetuneError, match="loftq_config is not supported"):
        FastLanguageModel.get_peft_model(tiny[0], r=4, loftq_config={"loftq_bits": 4})
