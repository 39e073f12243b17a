"""Seed 001, "Full Training Loop Example": load in 4 bits, add LoRA, load a dataset by name, train with
8-bit AdamW, print the results, save the adapter and tokenizer. The hub dataset "your_dataset" is a local
dataset folder here (SEED_DATASET), which load_dataset reads the same way.
"""

import os

import fusetune  # was: import unsloth
from fusetune.compat.unsloth import FastLanguageModel
from trl import SFTTrainer, SFTConfig
from datasets import load_dataset
import torch

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")
DATASET = os.environ.get("SEED_DATASET", "your_dataset")
MAX_STEPS = int(os.environ.get("SEED_MAX_STEPS", 100))

# 1. Load model
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL,
    max_seq_length=2048,
    load_in_4bit=True,
)

# 2. Add LoRA
model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    lora_alpha=16,
)

# 3. Load dataset (pre-formatted with "text" column)
dataset = load_dataset(DATASET, split="train")

# 4. Configure training
training_args = SFTConfig(
    output_dir="./outputs",
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    max_steps=MAX_STEPS,
    learning_rate=2e-4,
    optim="adamw_8bit",
    logging_steps=1,
    save_steps=50,
    seed=3407,
)

# 5. Create trainer
trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=training_args,
)

# 6. Train!
print("Starting training...")
trainer_stats = trainer.train()

# 7. Results
print(f"\n{'=' * 50}")
print("Training Complete!")
print(f"Steps: {trainer_stats.global_step}")
print(f"Loss: {trainer_stats.training_loss:.4f}")
print(f"{'=' * 50}")

# 8. Save model
model.save_pretrained("./trained_model")
tokenizer.save_pretrained("./trained_model")
print(f"fusetune {fusetune.__version__}, torch {torch.__version__}")
