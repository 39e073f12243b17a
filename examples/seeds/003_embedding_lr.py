"""Seed 003, "With Separate Embedding Learning Rate": embed_tokens and lm_head trained in full
(modules_to_save) at embedding_learning_rate for three epochs. The seed stops at the arguments; the trainer
and train() complete it as in the page's first example.
"""

import os

from fusetune.compat.unsloth import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments
from datasets import load_dataset

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-3B-Instruct")

model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL, max_seq_length=2048, load_in_4bit=True)
dataset = load_dataset("json", data_files="train.jsonl")["train"]

# When training embed_tokens/lm_head via modules_to_save
model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    modules_to_save=["embed_tokens", "lm_head"],
)

args = UnslothTrainingArguments(
    output_dir="./outputs",
    learning_rate=2e-4,
    embedding_learning_rate=5e-5,  # Lower LR for embeddings
    num_train_epochs=3,
)

trainer = UnslothTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, args=args)
trainer.train()
