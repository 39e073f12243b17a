"""Seed 001, "Monitoring Training": logging_steps=1 and report_to="tensorboard"; the events land under
./outputs (transformers' default folder, runs/<date>_<host>), which `tensorboard --logdir ./outputs` reads.
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

# Enable verbose logging
training_args = SFTConfig(
    output_dir="./outputs",
    logging_steps=1,  # Log every step
    report_to="tensorboard",  # or "wandb"
    max_steps=MAX_STEPS,  # the seed's "..."
    per_device_train_batch_size=2,
)

trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, args=training_args)

# Training will log metrics every step
trainer.train()

# View logs in TensorBoard
# tensorboard --logdir ./outputs
