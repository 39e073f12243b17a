"""Seed 002, "With Evaluation": the older evaluation_strategy spelling (accepted with a FutureWarning),
eval_steps=50, step saves, and the best checkpoint by eval_loss loaded at the end. The seed's
"... other settings" are filled in: 100 steps, saves every 50, a held-out eval.jsonl.
"""

import os

from fusetune.compat.unsloth import FastLanguageModel
from trl import SFTTrainer, SFTConfig
from datasets import load_dataset

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")

model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL, max_seq_length=2048, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=16)
train_dataset = load_dataset("json", data_files="train.jsonl")["train"]
eval_dataset = load_dataset("json", data_files="eval.jsonl")["train"]

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    args=SFTConfig(
        output_dir="outputs",
        evaluation_strategy="steps",
        eval_steps=50,
        save_strategy="steps",
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        # ... other settings
        max_steps=100,
        save_steps=50,
        per_device_train_batch_size=2,
        learning_rate=2e-4,
    ),
)

trainer.train()
print(f"best checkpoint: {trainer.state.best_model_checkpoint} (eval_loss {trainer.state.best_metric:.4f})")
