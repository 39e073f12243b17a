"""Each formatter turns a small local file into the right text and the right labels, through real TRL."""

import json

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from fusetune.app.config import DataConfig
from fusetune.data import build_splits, generation_pair
from fusetune.data.formatters import ALPACA_PROMPT
from fusetune.errors import FusetuneError
from fusetune.loading import load_model
from fusetune.training.trainer import FastSFTConfig, FastSFTTrainer

ROWS = {
    "chat": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}],
    "alpaca": [{"instruction": "Double it", "input": "3", "output": "6"}],
    "text": [{"text": "plain words"}],
    "completion": [{"prompt": "ping ", "completion": "pong"}],
}
# (what the model reads, what it is trained to predict) for each formatter on the tiny chat tokenizer
EXPECTED = {
    "chat": ("<s><|user|>hi<|end|><|assistant|>yo<|end|>", "yo<|end|>"),
    "sharegpt": ("<s><|user|>2+2?<|end|><|assistant|>4<|end|>", "4<|end|>"),
    "alpaca": ("<s><|user|>Double it\n\n3<|end|><|assistant|>6<|end|>", "6<|end|>"),
    "text": ("plain words<|end|>", "lain words<|end|>"),  # the first token is never a target
    "completion": ("ping pong<|end|>", "pong<|end|>"),
}


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return load_model("fusetune:tiny_llama", torch.float32, random_init=True)


def trained_text(model, tokenizer, dataset, tmp_path, **args):
    """What TRL feeds the model for the first record, and the text of its labelled tokens."""
    config = FastSFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, **args)
    trainer = FastSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # The first token is never a target (nothing precedes it), whatever its label says.
    return tokenizer.decode(ids), tokenizer.decode(ids[1:][labels[1:] != -100])


@pytest.mark.parametrize("formatter", list(ROWS))
def test_formatter_text_and_labels(formatter, tiny_tokenizer, tiny_model, tmp_path):
    path = write(tmp_path / f"{formatter}.jsonl", ROWS[formatter])
    splits = build_splits(data_cfg(formatter=formatter, path=str(path)), tiny_tokenizer, seed=0)
    assert len(splits.train) == 1 and splits.eval is None
    args = {"assistant_only_loss": True} if formatter in ("chat", "sharegpt") else {}
    text, labelled = trained_text(tiny_model, tiny_tokenizer, splits.train, tmp_path, **args)
    assert (text, labelled) == EXPECTED[formatter]


def test_alpaca_without_chat_template_uses_the_alpaca_prompt(tiny_tokenizer, tiny_model, tmp_path):
    path = write(tmp_path / "a.jsonl", ROWS["alpaca"])
    splits = build_splits(data_cfg(formatter="alpaca", path=str(path), use_chat_template=False), tiny_tokenizer, 0)
    text, labelled = trained_text(tiny_model, tiny_tokenizer, splits.train, tmp_path)
    prompt = ALPACA_PROMPT.format(
        context=", paired with an input that provides further context",
        instruction="Double it",
        input_block="### Input:\n3\n\n",
    )
    assert text == prompt + "6<|end|>" and labelled == "6<|end|>"


@pytest.mark.parametrize("suffix", [".json", ".parquet", ".csv"])
def test_every_file_type_loads(suffix, tiny_tokenizer, tmp_path):
    path = write(tmp_path / f"c{suffix}", ROWS["completion"] * 3)
    splits = build_splits(data_cfg(formatter="completion", path=str(path)), tiny_tokenizer, seed=0)
    assert splits.train[0] == {"prompt": "ping ", "completion": "pong"} and len(splits.train) == 3


def test_eval_fraction_holds_out_and_gives_generation_pairs(tiny_tokenizer, tmp_path):
    rows = [{"prompt": f"q{i}=", "completion": f"a{i}"} for i in range(20)]
    path = write(tmp_path / "c.jsonl", rows)
    cfg = data_cfg(formatter="completion", path=str(path), eval_fraction=0.25, num_generate=3)
    splits = build_splits(cfg, tiny_tokenizer, seed=0)
    assert len(splits.train) == 15 and len(splits.eval) == 5
    assert len(splits.generation) == 3
    held_out = {r["prompt"] for r in splits.eval}
    assert all(p in held_out and a == "a" + p[1:-1] for p, a in splits.generation)


def test_chat_generation_pair_uses_the_template(tiny_tokenizer):
    record = {"messages": ROWS["chat"][0]["messages"]}
    assert generation_pair(record, tiny_tokenizer) == ("<s><|user|>hi<|end|><|assistant|>", "yo")
    assert generation_pair({"text": "x"}, tiny_tokenizer) is None


def test_only_desirable_kto_answers_are_generation_targets(tiny_tokenizer):
    prompt, answer = f"q{torch.randint(0, 999, ()).item()}", f"a{torch.randint(0, 999, ()).item()}"
    assert generation_pair({"prompt": prompt, "completion": answer, "label": True}, tiny_tokenizer) == (prompt, answer)
    assert generation_pair({"prompt": prompt, "completion": answer, "label": False}, tiny_tokenizer) is None


def test_synthetic_split_is_deterministic_and_disjoint(tiny_tokenizer):
    cfg = data_cfg(formatter="synthetic", num_train=300, num_eval=50, num_generate=10)
    a, b = build_splits(cfg, tiny_tokenizer, seed=3), build_splits(cfg, tiny_tokenizer, seed=3)
    assert a.train[:] == b.train[:] and a.generation == b.generation
    assert not {r["prompt"] for r in a.train} & {r["prompt"] for r in a.eval}
    assert build_splits(cfg, tiny_tokenizer, seed=4).train[:] != a.train[:]


@pytest.mark.parametrize(
    "formatter,rows,message",
    [
        ("alpaca", [{"instruction": "x"}], "needs a 'output' column"),
        ("sharegpt", [{"conversations": [{"from": "robot", "value": "x"}]}], "message 1 has from 'robot', not one of"),
        ("chat", [{"messages": [{"content": "x"}]}], "message 1 has no 'role'"),
        ("text", [{"body": "x"}], "needs a 'text' column"),
    ],
)
def test_bad_records_fail_with_one_clear_line(formatter, rows, message, tiny_tokenizer, tmp_path):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(FusetuneError, match=message):
        build_splits(data_cfg(formatter=formatter, path=str(path)), tiny_tokenizer, seed=0)


def test_missing_file_and_unknown_suffix(tiny_tokenizer, tmp_path):
    with pytest.raises(FusetuneError, match="no such file"):
        build_splits(data_cfg(formatter="text", path=str(tmp_path / "nope.jsonl")), tiny_tokenizer, 0)
    with pytest.raises(FusetuneError, match="must end in one of"):
        build_splits(data_cfg(formatter="text", path=str(tmp_path / "x.txt")), tiny_tokenizer, 0)
