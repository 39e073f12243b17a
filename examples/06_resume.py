"""Resume from a checkpoint: the resumed run logs the same losses as the uninterrupted one.

    python examples/06_resume.py [--out outputs/examples/06_resume] [--steps 12] [--resume-at 4]

Run A trains all the steps and saves a checkpoint every --resume-at steps. Run B is a fresh model and
a fresh trainer that resume from A's checkpoint at step --resume-at: the checkpoint restores the
weights, the optimizer and scheduler states, the RNG states and the position in the data, so on CPU
with the same seed B's losses for the remaining steps equal A's exactly.
"""

import fusetune  # first: points TRL's SFTTrainer/SFTConfig at fusetune's classes  # noqa: F401, I001

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback, set_seed

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.data.synthetic import synthetic_splits

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="outputs/examples/06_resume")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--resume-at", type=int, default=4)
args = parser.parse_args()

SEED = 0
torch.set_num_threads(1)
out = Path(args.out)
train_rows, _ = synthetic_splits(num_train=args.steps * 16, num_eval=0, seed=SEED)


class CountSteps(TrainerCallback):
    """Counts the optimizer steps a trainer actually runs (a resumed one skips those before the checkpoint)."""

    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def make_trainer(output_dir: Path) -> FastSFTTrainer:
    set_seed(SEED)
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=128, random_init=True)
    config = FastSFTConfig(
        output_dir=str(output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.resume_at,
        report_to=[],
        seed=SEED,
    )
    return FastSFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(train_rows),
        processing_class=tokenizer,
        callbacks=[CountSteps()],
    )


def logged_losses(trainer: FastSFTTrainer) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}


# Run A: uninterrupted.
run_a = make_trainer(out / "a")
run_a.train()
losses_a = logged_losses(run_a)

# Run B: a fresh model and trainer, resumed from A's checkpoint.
checkpoint = out / "a" / f"checkpoint-{args.resume_at}"
assert checkpoint.is_dir(), f"no checkpoint at {checkpoint}"
run_b = make_trainer(out / "b")
run_b.train(resume_from_checkpoint=str(checkpoint))
losses_b = logged_losses(run_b)
steps_run_b = next(c for c in run_b.callback_handler.callbacks if isinstance(c, CountSteps)).steps

print(f" step  run A     run B (resumed at step {args.resume_at}; earlier rows come from the checkpoint's state)")
for step in sorted(losses_a):
    b = losses_b.get(step)
    print(f"{step:5d}  {losses_a[step]:.6f}  {'-' if b is None else f'{b:.6f}'}")
print(f"run B ran {steps_run_b} steps itself and ended at global step {run_b.state.global_step}")
assert steps_run_b == args.steps - args.resume_at and run_b.state.global_step == args.steps
resumed_steps = [step for step in sorted(losses_a) if step > args.resume_at]
assert sorted(s for s in losses_b if s > args.resume_at) == resumed_steps, losses_b
mismatch = {s: (losses_a[s], losses_b[s]) for s in resumed_steps if losses_a[s] != losses_b[s]}
assert not mismatch, f"resumed losses differ from the uninterrupted run: {mismatch}"
print(f"ok: steps {resumed_steps[0]}..{resumed_steps[-1]} of the resumed run match the uninterrupted run exactly")
