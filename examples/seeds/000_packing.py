"""Seed 000, "With Sample Packing": SFTConfig(packing=True, max_seq_length=2048, bf16=True) through trl's
SFTTrainer, which fusetune's import makes its own. Short examples are packed into rows of up to 2048 tokens.
"""

import os

from fusetune.compat.unsloth import FastLanguageModel  # was: from unsloth import FastLanguageModel
from trl import SFTTrainer, SFTConfig
from datasets import load_dataset

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL,
    max_seq_length=2048,
    load_in_4bit=True,
)
model = FastLanguageModel.get_peft_model(model, r=16)
dataset = load_dataset("json", data_files="train.jsonl")["train"]  # the seed leaves `dataset` to the reader

# Enable sample packing for better GPU utilization
trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        output_dir="./outputs",
        packing=True,  # Pack multiple sequences
        max_seq_length=2048,
        per_device_train_batch_size=2,
        bf16=True,
    ),
)

trainer.train()
