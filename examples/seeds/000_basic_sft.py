"""Seed 000, "Basic SFT Training": Unsloth's flow with fusetune's import lines.

4-bit base, LoRA r=16, UnslothTrainingArguments with 8-bit AdamW and bf16, and the older TRL spelling
that passes dataset_text_field and max_seq_length to the trainer (accepted with a FutureWarning).
The tests run it with SEED_MODEL set to a tiny local model and a small train.jsonl in the working folder.
"""

import os

from fusetune.compat.unsloth import FastLanguageModel, UnslothTrainingArguments  # was: from unsloth import ...
from trl import SFTTrainer
from datasets import load_dataset

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")
MAX_STEPS = int(os.environ.get("SEED_MAX_STEPS", 60))

# 1. Load model
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL,
    max_seq_length=2048,
    load_in_4bit=True,
)

# 2. Apply LoRA
model = FastLanguageModel.get_peft_model(model, r=16)

# 3. Load dataset (pre-formatted with chat template)
dataset = load_dataset("json", data_files="train.jsonl")["train"]

# 4. Configure training
training_args = UnslothTrainingArguments(
    output_dir="./outputs",
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    max_steps=MAX_STEPS,
    learning_rate=2e-4,
    optim="adamw_8bit",
    bf16=True,
)

# 5. Create trainer and train
trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=training_args,
    dataset_text_field="text",
    max_seq_length=2048,
)

trainer.train()
