"""Seed 002, "Monitoring Training": report_to="wandb" with a run_name, or report_to="tensorboard" with the
older logging_dir spelling (transformers 5 removed the field; fusetune hands it to the TensorBoard callback,
with a FutureWarning). W&B runs offline when no API key is configured (the tests set WANDB_MODE=offline).
"""

import os

from fusetune.compat.unsloth import FastLanguageModel
from trl import SFTTrainer, SFTConfig
from datasets import load_dataset

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")
MAX_STEPS = int(os.environ.get("SEED_MAX_STEPS", 60))

model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL, max_seq_length=2048, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=16)
dataset = load_dataset("json", data_files="train.jsonl")["train"]

# With Weights & Biases
trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        output_dir="outputs",
        report_to="wandb",
        run_name="my-qlora-run",
        # ... other settings
        max_steps=MAX_STEPS,
        logging_steps=5,
    ),
)
trainer.train()

# Or with TensorBoard
trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        output_dir="outputs",
        report_to="tensorboard",
        logging_dir="./logs",
        # ... other settings
        max_steps=MAX_STEPS,
        logging_steps=5,
    ),
)
trainer.train()
