"""LoRA with trainable embeddings at their own learning rate (embedding_learning_rate).

    python examples/03_embedding_lr.py [--out outputs/examples/03_embedding_lr] [--steps 30]

LoRA adapters go on every attention and MLP projection; embed_tokens and lm_head are listed in
modules_to_save, so PEFT trains full copies of them. FastSFTConfig's embedding_learning_rate puts
those copies in an optimizer group of their own (the usual advice: a lower rate than the adapters').
On the random tiny model the trainable embeddings are also what lets LoRA learn at all.
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
parser.add_argument("--out", default="outputs/examples/03_embedding_lr")
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()

SEED = 0
LR, EMBEDDING_LR = 1e-2, 1e-3
torch.set_num_threads(1)
set_seed(SEED)

model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=128, random_init=True)
model = FastModel.get_peft_model(model, r=8, lora_alpha=16, modules_to_save=["embed_tokens", "lm_head"])
model.print_trainable_parameters()

train_rows, _ = synthetic_splits(num_train=args.steps * 32, num_eval=0, seed=SEED)
config = FastSFTConfig(
    output_dir=args.out,
    learning_rate=LR,
    embedding_learning_rate=EMBEDDING_LR,
    max_steps=args.steps,
    per_device_train_batch_size=32,
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

# The scheduler has moved each group's "lr" by now; "initial_lr" is the rate the group was built with.
name_of = {id(param): name for name, param in trainer.model.named_parameters()}
embedding_groups = []
for i, group in enumerate(trainer.optimizer.param_groups):
    base_lr = group.get("initial_lr", group["lr"])
    names = [name_of[id(param)] for param in group["params"]]
    kinds = sorted({"embedding" if "embed_tokens" in n or "lm_head" in n else "lora" for n in names})
    print(f"param group {i}: lr={base_lr:g} tensors={len(names)} ({', '.join(kinds)}), e.g. {names[0]}")
    if kinds == ["embedding"]:
        embedding_groups.append(base_lr)
assert embedding_groups == [EMBEDDING_LR], f"expected one embedding group at {EMBEDDING_LR}, got {embedding_groups}"

losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"steps={result.global_step} loss: mean of first 5 {start:.3f}, mean of last 5 {end:.3f}")
assert end < 0.8 * start, f"the loss did not fall: {losses}"

# The trained adapter and its tokenizer (trainer.save_model saves both).
trainer.save_model(f"{args.out}/adapter")
for file in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]:
    assert Path(args.out, "adapter", file).is_file(), file
print("ok: the embeddings trained in their own group at embedding_learning_rate")
