"""Seed 001, "Training with Memory Tracking": CUDA memory before, after and at the peak of training.
Without a GPU the three numbers are 0 (torch's CUDA counters answer 0 on a CPU host).
"""

import os

import torch
from fusetune.compat.unsloth import FastLanguageModel
from trl import SFTTrainer, SFTConfig
from datasets import load_dataset

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")
MAX_STEPS = int(os.environ.get("SEED_MAX_STEPS", 60))

model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL, max_seq_length=2048, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=16)
dataset = load_dataset("json", data_files="train.jsonl")["train"]
trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(output_dir="./outputs", max_steps=MAX_STEPS, per_device_train_batch_size=2),
)

# Check memory before
print(f"Memory before: {torch.cuda.memory_allocated() / 1e9:.2f} GB")

# Train
trainer.train()

# Check memory after (should be similar due to efficient cleanup)
print(f"Memory after: {torch.cuda.memory_allocated() / 1e9:.2f} GB")

# Peak memory usage
print(f"Peak memory: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
