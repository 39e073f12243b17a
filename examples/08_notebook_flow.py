"""An Unsloth notebook's flow, on fusetune: chat template, responses only, train, save merged and GGUF, reload,
generate.

    python examples/08_notebook_flow.py [--out outputs/examples/08_notebook_flow] [--steps 30]

Written the way Unsloth's notebooks are, with their names imported from ``fusetune.compat.unsloth``:
1. ``FastLanguageModel.from_pretrained`` + ``get_peft_model`` (the embedded tiny Llama, random weights, with
   Llama 3's turn tokens added), ``get_chat_template(tokenizer, "llama-3.1")``.
2. ShareGPT data (``{"from": "human" | "gpt", "value"}`` turns) through ``standardize_sharegpt``, rendered with
   the template into a ``text`` column.
3. ``SFTTrainer`` (TRL's name: importing fusetune points it at fusetune's trainer), then
   ``train_on_responses_only``: only the assistant's answers (and their ``<|eot_id|>``) keep labels.
4. ``for_inference`` and streamed generation (``TextStreamer``): the streamed text is the greedy answer.
5. ``model.save_pretrained_merged(..., save_method="merged_16bit")``, reloaded by plain transformers: its logits
   match within bf16 tolerance; ``model.save_pretrained_gguf(..., quantization_method="q8_0")``, read back with
   the ``gguf`` package: every weight within q8_0's error of the merged model's.
"""

from fusetune.compat.unsloth import (  # first: points TRL's SFTTrainer/SFTConfig at fusetune's classes  # noqa: I001
    FastLanguageModel,
    get_chat_template,
    is_bfloat16_supported,
    standardize_sharegpt,
    train_on_responses_only,
)

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TextStreamer, set_seed
from trl import SFTConfig, SFTTrainer

from fusetune.data.synthetic import synthetic_splits

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="outputs/examples/08_notebook_flow")
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()

SEED = 0
torch.set_num_threads(1)
set_seed(SEED)
out = Path(args.out)
USER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"

# 1. The model, LoRA, and the chat template (the tiny tokenizer gets Llama 3's turn tokens first).
model, tokenizer = FastLanguageModel.from_pretrained("fusetune:tiny_llama", max_seq_length=128, random_init=True)
tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
model.resize_token_embeddings(len(tokenizer))
model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")

# 2. ShareGPT conversations, standardized to role/content, rendered by the template.
train_rows, eval_rows = synthetic_splits(num_train=args.steps * 16, num_eval=4, seed=SEED)
sharegpt = Dataset.from_list(
    [
        {"conversations": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["completion"]}]}
        for r in train_rows
    ]  # fmt: skip
)
dataset = standardize_sharegpt(sharegpt)
dataset = dataset.map(
    lambda batch: {"text": [tokenizer.apply_chat_template(c, tokenize=False) for c in batch["conversations"]]},
    batched=True,
)
print("a rendered example:", repr(dataset[0]["text"][-120:]))

# 3. Train on the answers only.
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        output_dir=str(out / "trainer"),
        dataset_text_field="text",
        max_length=128,
        per_device_train_batch_size=16,
        max_steps=args.steps,
        learning_rate=5e-3,
        warmup_steps=2,
        logging_steps=1,
        save_strategy="no",
        bf16=is_bfloat16_supported(),
        report_to=[],
        seed=SEED,
    ),
)
trainer = train_on_responses_only(trainer, instruction_part=USER, response_part=ASSISTANT)
row = trainer.train_dataset[0]
kept = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
answer = tokenizer.encode(train_rows[0]["completion"] + "<|eot_id|>", add_special_tokens=False)
print("labels kept on the first record:", repr(tokenizer.decode(kept)))
assert kept == answer, (kept, answer)  # the answer and its end of turn, nothing of the prompt
trainer.train()
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
assert sum(losses[-5:]) / 5 < losses[0] * 0.85, losses

# 4. Inference, streamed.
FastLanguageModel.for_inference(model)
messages = [{"role": "user", "content": eval_rows[0]["prompt"]}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
prompt = prompt.to(model.device)
greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print("streamed answer: ", end="")
streamed = model.generate(
    **prompt, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **greedy
)
plain = model.generate(**prompt, **greedy)
assert torch.equal(streamed, plain), (streamed, plain)

# 5. Save merged 16-bit weights and a q8_0 GGUF file; reload both.
merged_dir, gguf_dir = out / "merged", out / "gguf"
model.save_pretrained_merged(str(merged_dir), tokenizer, save_method="merged_16bit")
model.save_pretrained_gguf(str(gguf_dir), tokenizer, quantization_method="q8_0")
batch = tokenizer([r["prompt"] + r["completion"] for r in eval_rows], return_tensors="pt", padding=True)
batch = batch.to(model.device)
with torch.no_grad():
    trained = model(**batch).logits.float()
merged = AutoModelForCausalLM.from_pretrained(merged_dir).to(model.device).eval()
with torch.no_grad():
    reloaded = merged(**batch).logits.float()
mask = batch["attention_mask"].bool()
relative = ((reloaded - trained)[mask].norm() / trained[mask].norm()).item()
print(f"merged model reloaded by transformers: relative logit difference {relative:.2e}")
assert relative < 3e-2, relative
again = merged.generate(**prompt, **greedy)[0, prompt["input_ids"].shape[1] :]
print("the reloaded model answers:", repr(tokenizer.decode(again, skip_special_tokens=True)))
assert len(again) > 0

import gguf  # noqa: E402  (only this step needs it)

(gguf_file,) = gguf_dir.glob("*.gguf")
reader = gguf.GGUFReader(gguf_file)
tensors = {t.name: t for t in reader.tensors}
merged_weights = merged.state_dict()
embed = gguf.quants.dequantize(tensors["token_embd.weight"].data, tensors["token_embd.weight"].tensor_type)
expected = merged_weights["model.embed_tokens.weight"].float().numpy()
scale = abs(expected).max()
error = abs(embed.reshape(expected.shape) - expected).max()
print(f"GGUF {gguf_file.name}: {len(tensors)} tensors; token_embd max error {error:.2e} (weights up to {scale:.2f})")
assert error <= scale / 127 + 1e-6, (error, scale)
assert len(tensors) == 2 + 9 * merged.config.num_hidden_layers + (not merged.config.tie_word_embeddings), len(tensors)
print("ok: answers only trained, the stream is the greedy answer, the merged model and the GGUF file reload")
