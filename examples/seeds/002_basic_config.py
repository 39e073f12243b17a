"""Seed 002, "Basic SFT Configuration": every SFTConfig value the seed sets, including its precision idiom
fp16=not torch.cuda.is_bf16_supported(), bf16=torch.cuda.is_bf16_supported() (on a CPU host that asks for
fp16, which fusetune turns into fp32 on the CPU with one warning) and the older max_seq_length spelling.
"""

import os

from fusetune.compat.unsloth import FastLanguageModel
from trl import SFTTrainer, SFTConfig
from datasets import load_dataset
import torch

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")
MAX_STEPS = int(os.environ.get("SEED_MAX_STEPS", 60))

model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL, max_seq_length=2048, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=16)
dataset = load_dataset("json", data_files="train.jsonl")["train"]

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        # Output settings
        output_dir="outputs",
        # Training duration
        max_steps=MAX_STEPS,  # Or use num_train_epochs=1
        logging_steps=1,
        save_steps=50,
        # Batch size
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,  # Effective batch = 8
        # Learning rate
        learning_rate=2e-4,
        warmup_steps=10,
        lr_scheduler_type="linear",
        # Optimizer
        optim="adamw_8bit",  # 8-bit Adam saves VRAM
        # Precision
        fp16=not torch.cuda.is_bf16_supported(),
        bf16=torch.cuda.is_bf16_supported(),
        # Sequence settings
        max_seq_length=2048,
    ),
)

trainer.train()
