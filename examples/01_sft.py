"""Basic SFT: full fine-tuning of the embedded tiny Llama on the built-in synthetic tasks.

    python examples/01_sft.py [--out outputs/examples/01_sft] [--steps 40]

The tiny model ships as a config without weights, so it starts from random init. Full fine-tuning
is used here: every weight of a random model needs to move, and LoRA's low-rank updates on frozen
random weights learn slowly (see 03_embedding_lr.py for the LoRA path).
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
parser.add_argument("--out", default="outputs/examples/01_sft")
parser.add_argument("--steps", type=int, default=40)
args = parser.parse_args()

SEED = 0
torch.set_num_threads(1)  # the tiny model is fastest on one thread
set_seed(SEED)

model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=128, random_init=True)
train_rows, _ = synthetic_splits(num_train=args.steps * 32, num_eval=0, seed=SEED)
train = Dataset.from_list(train_rows)  # {"prompt", "completion"}: the loss is on the completion only

config = FastSFTConfig(
    output_dir=args.out,
    max_steps=args.steps,
    per_device_train_batch_size=32,
    learning_rate=3e-3,
    lr_scheduler_type="cosine",
    warmup_steps=2,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    seed=SEED,
)
trainer = FastSFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
result = trainer.train()

losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(
    f"steps={result.global_step} loss: first {losses[0]:.3f}, mean of first 5 {start:.3f}, "
    f"mean of last 5 {end:.3f}, last {losses[-1]:.3f}"
)
assert end < 0.7 * start, f"the loss did not fall: {losses}"

# The trained model and its tokenizer (trainer.save_model saves both).
trainer.save_model(f"{args.out}/model")
for file in ["config.json", "model.safetensors", "tokenizer.json"]:
    assert Path(args.out, "model", file).is_file(), file
print("ok: the loss fell")
