"""Seed 000, "Signature" and "Import": every keyword of the signature it shows, on TRL's SFTTrainer after
fusetune's import, with a plain transformers TrainingArguments as args. packing, dataset_text_field,
max_seq_length and dataset_num_proc moved into SFTConfig in later TRL releases: they are accepted here with a
FutureWarning and merged into the config built from the TrainingArguments.
"""

import os

# IMPORTANT: import fusetune FIRST to apply patches (was: from unsloth import FastLanguageModel)
from fusetune.compat.unsloth import FastLanguageModel

# Then import SFTTrainer (now patched)
from trl import SFTTrainer

# Or use UnslothTrainer for embedding_learning_rate support
from fusetune.compat.unsloth import UnslothTrainer
from datasets import load_dataset
from transformers import TrainingArguments

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")
MAX_STEPS = int(os.environ.get("SEED_MAX_STEPS", 60))

model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL, max_seq_length=2048, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=16)
train_dataset = load_dataset("json", data_files="train.jsonl")["train"]
args = TrainingArguments(output_dir="./outputs", max_steps=MAX_STEPS, per_device_train_batch_size=2, report_to="none")

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,  # or processing_class in newer TRL
    train_dataset=train_dataset,
    args=args,
    packing=False,
    dataset_text_field="text",
    max_seq_length=2048,
    dataset_num_proc=2,
    data_collator=None,
)

# Execute training
train_output = trainer.train()
assert isinstance(trainer, UnslothTrainer)  # the patched SFTTrainer is UnslothTrainer
print(train_output)
