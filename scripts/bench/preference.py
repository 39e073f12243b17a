"""Inside a job subprocess of a DPO scenario (D1, D8): the synthetic preference pairs, the variant's DPO trainer,
its batches, and what its row adds.

Pairs: per step, ``batch`` pairs of seeded random token ids from the tokenizer's ordinary vocabulary (neither
special nor added, and below the model's vocabulary): a prompt of ``prompt`` tokens shared by a chosen and a
rejected completion, drawn apart and each ending in EOS, so that either sequence is exactly ``seq`` tokens. Each
trainer is given them as text (the ids decoded) and makes the batches with its own tokenization and collator;
every batch is checked to hold exactly those ids, so every variant trains on the same tokens.

Trainers: each gets the variant's PEFT model (built as in the SFT scenarios, with their checkpointing), no
ref_model, loss_type sigmoid, the scenario's beta, the run's seed and max_length ``seq``:

- hf: TRL's DPOTrainer;
- liger: the same with ``use_liger_kernel=True``: Liger's layer kernels, applied as the HF Trainer applies them
  when train() starts (``transformers.integrations.liger.apply_liger_kernel`` with the config TRL gives it, which
  keeps TRL's own fused log-prob head);
- unsloth: TRL's DPOTrainer after Unsloth's ``PatchDPOTrainer()``, which the worker calls right after importing
  Unsloth, before anything else loads;
- fusetune_*: FastDPOTrainer with the variant's kernels (its fused preference loss wherever it applies; the row
  says whether it did).

Given a PEFT model, TRL copies its adapter into a frozen "ref" adapter to serve as the reference. The copy is
deleted, so every reference is the policy with its adapters disabled, as TRL makes it for a new adapter
(``peft_config``): no second model and no second adapter. LoRA B starts at zero, so both are the same weights.

The bench's loop runs the trainer's compute_loss (the policy's forward over the chosen and rejected sequences, the
reference's forward under no_grad, the loss and its logged metrics), then backward, fused AdamW and zero_grad as
in every scenario. The trainer's own train() (data loader, scheduler, logging) is not timed. At step 1 the policy
is its reference, so every variant's loss is ln 2. The log-probs the trainers log (``dpo_metrics``, per step) and
the losses from step 2 on show whether the variants compute the same thing.
"""

import functools
from pathlib import Path
from typing import NamedTuple

from .scenarios import DPO_LOSS_TYPE, LR

# What the trainers log per step (TRL's names, fusetune's too) that the row keeps
KEPT_METRICS = ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies")


def ordinary_ids(tokenizer, vocab: int) -> list[int]:
    """The ids the random text is drawn from: the tokenizer's, neither special nor added, below the model's vocab."""
    other = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    return sorted(i for i in set(tokenizer.get_vocab().values()) if i < vocab and i not in other)


def draw(pool, n: int, generator, torch) -> list[int]:
    return pool[torch.randint(len(pool), (n,), generator=generator)].tolist()


def synthetic_pairs(spec: dict, tokenizer, vocab: int, torch) -> list[list[dict]]:
    """Per step, its pairs as token ids ({"prompt", "chosen", "rejected"}), seeded by the run's seed and the step."""
    sc = spec["scenario"]
    eos = tokenizer.eos_token_id
    if eos is None or eos >= vocab:
        raise ValueError(f"the tokenizer's EOS id {eos} is not in the model's vocabulary of {vocab}")
    pool, completion = torch.tensor(ordinary_ids(tokenizer, vocab)), sc["seq"] - sc["prompt"]
    steps = []
    for step in range(len(spec["lengths"])):
        g = torch.Generator().manual_seed(spec["seed"] * 1000 + step)
        steps.append(
            [
                {
                    "prompt": draw(pool, sc["prompt"], g, torch),
                    "chosen": draw(pool, completion - 1, g, torch) + [eos],
                    "rejected": draw(pool, completion - 1, g, torch) + [eos],
                }
                for _ in range(sc["batch"])
            ]
        )
    return steps


def as_text(tokenizer, prompt: list[int], completion: list[int]) -> tuple[str, str]:
    """The prompt's text and the completion's: together, the whole sequence's text."""
    decode = functools.partial(tokenizer.decode, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    head, whole = decode(prompt), decode(prompt + completion)
    if not whole.startswith(head):
        raise ValueError(f"{type(tokenizer).__name__}: the decoded prompt does not start the decoded sequence")
    return head, whole[len(head) :]


def pair_records(tokenizer, steps: list[list[dict]]) -> list[dict]:
    """The pairs as TRL's preference records (prompt, chosen and rejected text), step after step."""
    records = []
    for pairs in steps:
        for pair in pairs:
            prompt, chosen = as_text(tokenizer, pair["prompt"], pair["chosen"])
            _, rejected = as_text(tokenizer, pair["prompt"], pair["rejected"])
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def build_trainer(model, tokenizer, records: list[dict], spec: dict) -> tuple:
    """The variant's DPO trainer on the records, its reference the policy with its adapters disabled; and whether
    TRL's "ref" copy of the adapter was removed for that."""
    from datasets import Dataset

    variant, sc = spec["variant"], spec["scenario"]
    options = dict(
        output_dir=str(Path(spec["folder"]).parent / "dpo-trainer"),  # stays empty: train() never runs
        report_to=[],
        beta=sc["beta"],
        loss_type=DPO_LOSS_TYPE,
        max_length=sc["seq"],
        per_device_train_batch_size=sc["batch"],
        learning_rate=LR,
        weight_decay=0.0,
        seed=spec["seed"],
        bf16=spec["cuda"],
        # the model checkpoints already (as each variant ships it); TRL turns it off around the reference's forward
        gradient_checkpointing=variant.startswith("fusetune") or spec.get("peer_checkpointing") != "off",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        dataloader_num_workers=0,
    )
    if variant.startswith("fusetune"):
        from fusetune import FastDPOConfig, FastDPOTrainer

        args, trainer_class = FastDPOConfig(kernels=variant.removeprefix("fusetune_"), **options), FastDPOTrainer
    else:
        from trl import DPOConfig, DPOTrainer  # unsloth: as PatchDPOTrainer left them

        args, trainer_class = DPOConfig(use_liger_kernel=variant == "liger", **options), DPOTrainer
    data = Dataset.from_list(records)
    trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    copied = "ref" in getattr(trainer.model, "peft_config", {})
    if copied:
        trainer.model.delete_adapter("ref")
    if args.use_liger_kernel:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(trainer.model, args.liger_kernel_config)
    return trainer, copied


def checked_batches(trainer, steps: list[list[dict]], torch) -> list[dict]:
    """Each step's batch, from the trainer's collator over its own tokenized pairs, checked to be the pairs' ids
    (the chosen sequences, then the rejected ones) with each completion, and only it, marked."""
    data, batches, first = trainer.train_dataset, [], 0
    for pairs in steps:
        batch = trainer.data_collator([data[i] for i in range(first, first + len(pairs))])
        first += len(pairs)
        want = torch.tensor([pair["prompt"] + pair[side] for side in ("chosen", "rejected") for pair in pairs])
        got = batch.get("input_ids")
        if got is None or got.shape != want.shape or not torch.equal(got, want):
            shape = None if got is None else tuple(got.shape)
            raise ValueError(f"the trainer's batch (input_ids {shape}, keys {sorted(batch)}) is not the pairs' ids")
        completions = batch.get("completion_mask")
        if completions is not None and completions.sum(1).tolist() != [len(pairs[0]["chosen"])] * len(want):
            raise ValueError(f"the trainer marks {completions.sum(1).tolist()} completion tokens per sequence")
        batches.append(batch)
    return batches


class Prepared(NamedTuple):
    """A DPO job's trainer, whether TRL's "ref" copy of the adapter was removed, and each step's batch."""

    trainer: object
    ref_copy_removed: bool
    batches: list


def prepare(model, vocab: int, spec: dict, torch) -> Prepared:
    """The variant's DPO trainer over the scenario's synthetic pairs, and the batches its collator made of them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    steps = synthetic_pairs(spec, tokenizer, vocab, torch)
    trainer, ref_copy_removed = build_trainer(model, tokenizer, pair_records(tokenizer, steps), spec)
    return Prepared(trainer, ref_copy_removed, checked_batches(trainer, steps, torch))


def step_loss(trainer):
    """The loss of a batch: the trainer's compute_loss on its model."""
    return lambda batch: trainer.compute_loss(trainer.model, batch)


def row_record(trainer, ref_copy_removed: bool) -> dict:
    """What a DPO row adds: the trainer's logged metrics per step, which trainer ran, and how."""
    logged = getattr(trainer, "_metrics", {}).get("train", {})
    name = f"{type(trainer).__module__}.{type(trainer).__qualname__}"
    fused = getattr(trainer, "fused_preference", None)
    detail = name + ("" if fused is None else f", fused preference loss {'on' if fused else 'off'}")
    if trainer.args.use_liger_kernel:
        detail += f", Liger's kernels ({trainer.args.liger_kernel_config or 'defaults'})"
    detail += "; reference: the policy with its adapters disabled"
    if ref_copy_removed:
        detail += " (TRL's copy of the adapter removed)"
    return {
        "dpo_metrics": {key: [float(x) for x in logged[key]] for key in KEPT_METRICS if key in logged},
        "trainer": name,
        "fused_preference": fused,
        "mode_detail": detail,
    }
