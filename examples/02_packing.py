"""SFT with packing: short examples are packed into rows of up to max_length tokens.

    python examples/02_packing.py [--out outputs/examples/02_packing] [--steps 30]

TRL's best-fit-decreasing packing concatenates whole examples into rows of at most max_length
tokens and restarts the positions at each example, so attention never crosses two of them.
The synthetic examples are ~20 tokens each, so one packed row of 128 holds several of them and
a batch of 4 packed rows carries about as many tokens as a padded batch of ~25 examples.
"""

import fusetune  # first: points TRL's SFTTrainer/SFTConfig at fusetune's classes  # noqa: F401, I001

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from transformers import set_seed

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.data.synthetic import synthetic_splits

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="outputs/examples/02_packing")
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()

SEED = 0
MAX_LENGTH = 128
torch.set_num_threads(1)
set_seed(SEED)

model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=MAX_LENGTH, random_init=True)
train_rows, _ = synthetic_splits(num_train=1500, num_eval=0, seed=SEED)
train = Dataset.from_list(train_rows)

config = FastSFTConfig(
    output_dir=args.out,
    packing=True,
    max_length=MAX_LENGTH,
    max_steps=args.steps,
    per_device_train_batch_size=4,
    learning_rate=3e-3,
    warmup_steps=2,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    seed=SEED,
)
trainer = FastSFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)

packed = trainer.train_dataset
lengths = [len(ids) for ids in packed["input_ids"]]
print(
    f"packing: {len(train)} examples -> {len(packed)} rows, "
    f"mean row length {sum(lengths) / len(lengths):.1f} tokens, longest {max(lengths)} (max_length {MAX_LENGTH})"
)
assert len(packed) < len(train) / 3, "packing should put several examples in each row"
assert max(lengths) <= MAX_LENGTH

result = trainer.train()
losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"steps={result.global_step} loss: mean of first 5 {start:.3f}, mean of last 5 {end:.3f}")
assert end < 0.7 * start, f"the loss did not fall: {losses}"

# The trained model and its tokenizer (trainer.save_model saves both).
trainer.save_model(f"{args.out}/model")
for file in ["config.json", "model.safetensors", "tokenizer.json"]:
    assert Path(args.out, "model", file).is_file(), file
print("ok: packed rows, and the loss fell")
