"""Seed 001, "Basic Training": trainer.train() returns a TrainOutput with global_step and training_loss.
The seed's "Setup model, tokenizer, and dataset..." is filled in with the smallest 4-bit LoRA setup.
"""

import os

from fusetune.compat.unsloth import FastLanguageModel
from trl import SFTTrainer, SFTConfig
from datasets import load_dataset

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")
MAX_STEPS = int(os.environ.get("SEED_MAX_STEPS", 60))

# Setup model, tokenizer, and dataset...
model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL, max_seq_length=2048, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=16)
dataset = load_dataset("json", data_files="train.jsonl")["train"]
training_args = SFTConfig(output_dir="./outputs", max_steps=MAX_STEPS, per_device_train_batch_size=2)

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=training_args,
)

# Execute training
trainer_stats = trainer.train()

# Check results
print(f"Training completed in {trainer_stats.global_step} steps")
print(f"Final loss: {trainer_stats.training_loss:.4f}")
