"""QLoRA: LoRA adapters on a 4-bit (NF4) base, trained with 8-bit AdamW.

    python examples/04_qlora.py [--out outputs/examples/04_qlora] [--steps 20]

4-bit loading quantizes weights read from disk, and the tiny model ships without weights, so the
example first saves a randomly initialised tiny Llama (with its tokenizer) into the output folder,
then loads that folder with load_in_4bit=True. bitsandbytes 0.50 runs NF4 matmuls and its 8-bit
optimizers on CPU too, so this runs without a GPU (slowly: it is a demonstration, not a benchmark).
"""

import fusetune  # first: points TRL's SFTTrainer/SFTConfig at fusetune's classes  # noqa: F401, I001

import argparse
from collections import Counter
from pathlib import Path

import bitsandbytes as bnb
import torch
from datasets import Dataset
from transformers import set_seed

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.data.synthetic import synthetic_splits

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="outputs/examples/04_qlora")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

SEED = 0
torch.set_num_threads(1)
set_seed(SEED)
out = Path(args.out)

# 1. A base model with weights on disk: the random tiny Llama, saved with its tokenizer.
base_dir = out / "base"
model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=128, random_init=True)
model.save_pretrained(base_dir)
tokenizer.save_pretrained(base_dir)
del model

# 2. Load it quantized to 4 bits, and add LoRA with trainable embeddings.
model, tokenizer = FastModel.from_pretrained(str(base_dir), max_seq_length=128, load_in_4bit=True)
linear_4bit = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
assert linear_4bit, "the model was not loaded in 4 bits"
print(f"4-bit linear layers: {len(linear_4bit)}, e.g. {linear_4bit[0]}")
# Both embeddings train in full (modules_to_save), at embedding_learning_rate, as fp32 master weights; the
# layers and the fused loss head compute in the model's dtype (bf16 on a GPU).
trainable = ["embed_tokens", "lm_head"]
model = FastModel.get_peft_model(model, r=8, lora_alpha=16, modules_to_save=trainable)
model.print_trainable_parameters()

# 3. Train with bitsandbytes' 8-bit AdamW (bitsandbytes 0.50 runs it on CPU).
train_rows, _ = synthetic_splits(num_train=args.steps * 16, num_eval=0, seed=SEED)
config = FastSFTConfig(
    output_dir=str(out / "trainer"),
    optim="adamw_8bit",
    learning_rate=1e-2,
    embedding_learning_rate=1e-3,
    max_steps=args.steps,
    per_device_train_batch_size=16,
    warmup_steps=2,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    seed=SEED,
)
trainer = FastSFTTrainer(
    model=model, args=config, train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer
)
result = trainer.train()

optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
print(f"optimizer: {type(optimizer).__module__}.{type(optimizer).__name__}, optim_bits={optimizer.args.optim_bits}")
assert isinstance(optimizer, bnb.optim.AdamW) and optimizer.args.optim_bits == 8
# bitsandbytes keeps 8-bit (uint8) states for tensors of 4096+ elements and 32-bit ones for smaller
# tensors (most of these tiny LoRA factors); fusetune also keeps the embedding's states in 32 bits.
state_dtypes = Counter(str(s["state1"].dtype) for s in optimizer.state.values() if "state1" in s)
print(f"Adam first-moment states by dtype: {dict(state_dtypes)}")
assert state_dtypes["torch.uint8"] > 0

losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"steps={result.global_step} loss: mean of first 5 {start:.3f}, mean of last 5 {end:.3f}")
assert end < 0.9 * start, f"the loss did not fall: {losses}"
print("ok: QLoRA trained on a 4-bit base with 8-bit AdamW")
