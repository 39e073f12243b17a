"""Seed 000, "With UnslothTrainer for Embedding LR": a 4-bit base with trainable embed_tokens and lm_head
(modules_to_save) at their own, lower learning rate (embedding_learning_rate).
"""

import os

from fusetune.compat.unsloth import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments
from datasets import load_dataset

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")
MAX_STEPS = int(os.environ.get("SEED_MAX_STEPS", 100))

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL,
    max_seq_length=2048,
    load_in_4bit=True,
)

# Train embeddings too
model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    modules_to_save=["embed_tokens", "lm_head"],
)
dataset = load_dataset("json", data_files="train.jsonl")["train"]

training_args = UnslothTrainingArguments(
    output_dir="./outputs",
    learning_rate=2e-4,
    embedding_learning_rate=5e-5,  # Lower LR for embeddings
    max_steps=MAX_STEPS,
    bf16=True,
)

# Use UnslothTrainer for embedding_learning_rate support
trainer = UnslothTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=training_args,
)

trainer.train()
