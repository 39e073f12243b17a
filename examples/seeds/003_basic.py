"""Seed 003, "Basic SFT Training": UnslothTrainer with UnslothTrainingArguments for one epoch, precision from
is_bf16_supported (fp32 on a CPU host, with one warning), a save at the end of the epoch.
"""

import os

import torch
from fusetune.compat.unsloth import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments
from datasets import load_dataset

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-3B-Instruct")

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL,
    max_seq_length=2048,
    load_in_4bit=True,
)
model = FastLanguageModel.get_peft_model(model, r=16)
dataset = load_dataset("json", data_files="train.jsonl")["train"]

args = UnslothTrainingArguments(
    output_dir="./outputs",
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    num_train_epochs=1,
    learning_rate=2e-4,
    fp16=not torch.cuda.is_bf16_supported(),
    bf16=torch.cuda.is_bf16_supported(),
    logging_steps=10,
    save_strategy="epoch",
)

trainer = UnslothTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=args,
)

trainer.train()
