"""Seed 001, "Resume from Checkpoint": trainer.train(resume_from_checkpoint="./outputs/checkpoint-100").

The seed is one line; the smallest setup that makes it mean something: a run to 200 steps that saves every
50 is interrupted after step 100 (a callback stops it, as a crash would), then a fresh model and trainer
resume from ./outputs/checkpoint-100 and finish the run.
"""

import os

from fusetune.compat.unsloth import FastLanguageModel
from trl import SFTTrainer, SFTConfig
from datasets import load_dataset
from transformers import TrainerCallback

MODEL = os.environ.get("SEED_MODEL", "unsloth/Llama-3.2-1B-Instruct")
CHECKPOINT_STEP = int(os.environ.get("SEED_MAX_STEPS", 100))  # where the first run is interrupted


class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == CHECKPOINT_STEP:
            control.should_training_stop = True


def make_trainer(callbacks=()):
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL, max_seq_length=2048, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16)
    dataset = load_dataset("json", data_files="train.jsonl")["train"]
    args = SFTConfig(
        output_dir="./outputs",
        max_steps=2 * CHECKPOINT_STEP,
        save_steps=CHECKPOINT_STEP // 2,
        logging_steps=1,
        per_device_train_batch_size=2,
        seed=3407,
    )
    return SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, args=args, callbacks=list(callbacks))


make_trainer([Interrupt()]).train()  # "interrupted" after CHECKPOINT_STEP steps

# If training was interrupted, resume from checkpoint
trainer = make_trainer()
trainer.train(resume_from_checkpoint=f"./outputs/checkpoint-{CHECKPOINT_STEP}")
print(f"resumed at step {CHECKPOINT_STEP}, finished at step {trainer.state.global_step}")
