"""Seed 002, "With Sequence Packing": packing=True with the older max_seq_length spelling in SFTConfig."""

import os

from fusetune.compat.unsloth import FastLanguageModel
from trl import SFTTrainer, SFTConfig
from datasets import load_dataset

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")

model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL, max_seq_length=2048, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=16)
dataset = load_dataset("json", data_files="train.jsonl")["train"]

# Packing combines multiple short sequences into one
# More efficient use of max_seq_length
trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        output_dir="outputs",
        packing=True,  # Enable sequence packing
        max_seq_length=2048,
        # ... other settings
        per_device_train_batch_size=1,
    ),
)

trainer.train()
