"""Evaluate during training and keep the best checkpoint (load_best_model_at_end).

    python examples/05_eval_best.py [--out outputs/examples/05_eval_best] [--steps 40]

Every eval_steps the trainer scores the held-out split and saves a checkpoint (save_steps must be a
multiple of eval_steps); at the end it reloads the checkpoint with the lowest eval_loss. The training
split is kept tiny (32 examples, one batch) at a high constant learning rate so that the model overfits:
eval_loss turns back up, and the best checkpoint is not the last one.
"""

import fusetune  # first: points TRL's SFTTrainer/SFTConfig at fusetune's classes  # noqa: F401, I001

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from transformers import set_seed

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.data.synthetic import synthetic_splits

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="outputs/examples/05_eval_best")
parser.add_argument("--steps", type=int, default=40)
args = parser.parse_args()

SEED = 0
EVAL_STEPS = 5
torch.set_num_threads(1)
set_seed(SEED)

model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=128, random_init=True)
train_rows, eval_rows = synthetic_splits(num_train=32, num_eval=64, seed=SEED)
config = FastSFTConfig(
    output_dir=args.out,
    max_steps=args.steps,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    learning_rate=1e-2,
    lr_scheduler_type="constant",
    logging_steps=1,
    eval_strategy="steps",
    eval_steps=EVAL_STEPS,
    save_strategy="steps",
    save_steps=EVAL_STEPS,
    save_total_limit=2,  # the best checkpoint is always kept on top of the most recent ones
    load_best_model_at_end=True,
    metric_for_best_model="eval_loss",  # greater_is_better defaults to False for a loss
    report_to=[],
    seed=SEED,
)
trainer = FastSFTTrainer(
    model=model,
    args=config,
    train_dataset=Dataset.from_list(train_rows),
    eval_dataset=Dataset.from_list(eval_rows),
    processing_class=tokenizer,
)
trainer.train()

evals = {row["step"]: row["eval_loss"] for row in trainer.state.log_history if "eval_loss" in row}
for step, loss in evals.items():
    print(f"step {step:3d}: eval_loss {loss:.4f}")
best = trainer.state.best_model_checkpoint
print(f"best checkpoint: {best} (eval_loss {trainer.state.best_metric:.4f}; last step {args.steps})")

assert sorted(evals) == list(range(EVAL_STEPS, args.steps + 1, EVAL_STEPS)), evals
best_step = min(evals, key=evals.get)
assert Path(best).name == f"checkpoint-{best_step}" and Path(best).is_dir(), (best, evals)
assert trainer.state.best_metric == evals[best_step]
# The model in memory is now the best checkpoint's: evaluating it again gives that checkpoint's eval_loss.
reloaded = trainer.evaluate()["eval_loss"]
print(f"eval_loss of the model loaded at the end: {reloaded:.4f}")
assert abs(reloaded - evals[best_step]) < 1e-4, (reloaded, evals[best_step])
print("ok: the best checkpoint was kept and loaded")
