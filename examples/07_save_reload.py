"""Save a LoRA adapter, reload it onto a fresh base, and export a merged 16-bit model.

    python examples/07_save_reload.py [--out outputs/examples/07_save_reload] [--steps 15]

1. Train LoRA (+ trainable embeddings) on the random tiny Llama, whose random base weights are saved
   first: an adapter is only meaningful on top of the exact base it was trained on.
2. model.save_pretrained + tokenizer.save_pretrained write the adapter; peft's PeftModel.from_pretrained
   puts it back on a freshly loaded base, which must give the same logits (tight tolerance in fp32,
   as on a CPU; bf16 tolerance where the model trained in bf16, as on a GPU).
3. FastModel.save_merged folds the adapters into the weights and writes a bf16 model that plain
   transformers loads, with fusetune's kernels removed: its logits match within bf16 tolerance.
"""

import fusetune  # first: points TRL's SFTTrainer/SFTConfig at fusetune's classes  # noqa: F401, I001

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.data.synthetic import synthetic_splits
from fusetune.patching import remove_kernels

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="outputs/examples/07_save_reload")
parser.add_argument("--steps", type=int, default=15)
args = parser.parse_args()

SEED = 0
torch.set_num_threads(1)
set_seed(SEED)
out = Path(args.out)
base_dir, adapter_dir, merged_dir = out / "base", out / "adapter", out / "merged"

# 1. Save the random base, add LoRA, train.
model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=128, random_init=True)
model.save_pretrained(base_dir)
tokenizer.save_pretrained(base_dir)
model = FastModel.get_peft_model(model, r=8, lora_alpha=16, modules_to_save=["embed_tokens", "lm_head"])
train_rows, eval_rows = synthetic_splits(num_train=args.steps * 32, num_eval=8, seed=SEED)
config = FastSFTConfig(
    output_dir=str(out / "trainer"),
    max_steps=args.steps,
    per_device_train_batch_size=32,
    learning_rate=1e-2,
    embedding_learning_rate=1e-3,
    warmup_steps=2,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    seed=SEED,
)
trainer = FastSFTTrainer(
    model=model, args=config, train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer
)
trainer.train()

model.eval()
device, fp32 = model.device, model.dtype == torch.float32  # the trainer may have moved it to a GPU (bf16 there)
texts = [row["prompt"] + row["completion"] for row in eval_rows]
batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
with torch.no_grad():
    trained_logits = model(**batch).logits.float()

# 2. The adapter: save, then reload onto a fresh copy of the base.
model.save_pretrained(adapter_dir)
tokenizer.save_pretrained(adapter_dir)
print("adapter files:", sorted(p.name for p in adapter_dir.iterdir()))
assert (adapter_dir / "adapter_model.safetensors").is_file() and (adapter_dir / "tokenizer.json").is_file()

fresh_base, _ = FastModel.from_pretrained(str(base_dir), max_seq_length=128)
reloaded = PeftModel.from_pretrained(fresh_base.to(device), adapter_dir).eval()
with torch.no_grad():
    reloaded_logits = reloaded(**batch).logits.float()
adapter_diff = (reloaded_logits - trained_logits).abs().max().item()
print(f"adapter reloaded on a fresh base: max |logit diff| = {adapter_diff:.2e}")
tight = 1e-5 if fp32 else 1e-2
torch.testing.assert_close(reloaded_logits, trained_logits, atol=tight, rtol=tight)
with reloaded.disable_adapter(), torch.no_grad():
    base_logits = reloaded(**batch).logits.float()
mask = batch["attention_mask"].bool()
trained_shift = (trained_logits - base_logits)[mask].abs()
print(f"training moved the logits by {trained_shift.mean():.3f} on average from the base's")

# 3. The merged 16-bit model, loaded by plain transformers (fusetune's kernels removed first).
FastModel.save_merged(model, tokenizer, str(merged_dir))
remove_kernels()
merged = AutoModelForCausalLM.from_pretrained(merged_dir).to(device).eval()
merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
assert merged_tokenizer(eval_rows[0]["prompt"]).input_ids == tokenizer(eval_rows[0]["prompt"]).input_ids
print(
    f"merged model: {type(merged).__name__}, dtype {merged.dtype}, "
    f"LoRA modules left: {sum('lora' in name for name, _ in merged.named_modules())}"
)
assert merged.dtype == torch.bfloat16
with torch.no_grad():
    merged_logits = merged(**batch).logits.float()
merged_diff = (merged_logits - trained_logits)[mask]
relative = (merged_diff.norm() / trained_logits[mask].norm()).item()
agree = (merged_logits.argmax(-1) == trained_logits.argmax(-1))[mask].float().mean().item()
print(
    f"merged bf16 vs trained {model.dtype}: relative difference {relative:.2e}, "
    f"mean |logit diff| {merged_diff.abs().mean():.4f}, top-1 agreement {agree:.1%}"
)
# bf16 keeps 8 significant bits: one rounding (the merged weights) against an fp32 model, two against a bf16 one.
assert relative < (1e-2 if fp32 else 3e-2), relative
assert merged_diff.abs().mean() < trained_shift.mean() / 10, "the check would not tell a merged model from the base"
print("ok: the adapter reloads exactly, and the merged bf16 model matches within bf16 tolerance")
