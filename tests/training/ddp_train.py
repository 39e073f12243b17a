"""Run by test_ddp.py under torchrun (2 CPU processes, gloo): a few FastSFTTrainer steps, rank 0 writes the log.

torchrun --standalone --nproc_per_node 2 tests/training/ddp_train.py OUT_JSON fused|trl
"""

import json
import sys

import torch
from datasets import Dataset

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.compat.trl import original
from fusetune.data.synthetic import synthetic_splits


def main(out_json: str, variant: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    rows, eval_rows = synthetic_splits(64, 16, seed=1)
    args = FastSFTConfig(
        output_dir=f"{out_json}.trainer",
        report_to=[],
        use_cpu=True,
        max_steps=4,
        logging_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        seed=3,
        save_strategy="no",
        fused_loss=None if variant == "fused" else False,  # None: the fused path wherever it applies
    )
    trainer = FastSFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows),
        args=args,
    )
    if variant == "fused":  # the model reaches compute_loss wrapped in DDP: the fused path must still be taken

        def trls_compute_loss(*args, **kwargs):
            raise SystemExit("TRL's compute_loss ran where the fused path applies")

        original("SFTTrainer").compute_loss = trls_compute_loss
    trainer.train()
    trainer.evaluate()
    if trainer.is_world_process_zero():
        world = trainer.accelerator.num_processes
        with open(out_json, "w") as f:
            json.dump({"world_size": world, "log_history": trainer.state.log_history}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
