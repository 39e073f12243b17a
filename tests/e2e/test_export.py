"""export.merged=true: a LoRA run leaves <run>/merged/, which plain transformers loads and which answers as the trained
adapter model does (to bf16 rounding); a full fine-tune leaves its whole model there, in 16 bits."""

import json
import logging
import os
import subprocess
import sys

import gguf
import torch
from transformers import AutoModelForCausalLM

from fusetune import FastModel
from fusetune.app.run import run

from ..conftest import ROOT

FAST = ["data.num_train=256", "data.num_eval=16", "data.num_generate=0", "logger=none", "export.merged=true"]
PROMPT = "12+34=46 reverse abc"

# A process without fusetune: the merged folder alone must be enough for transformers.
PLAIN_LOAD = """
import sys, torch, transformers
folder, prompt, out = sys.argv[1:]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")  # as saved
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
ids = tokenizer(prompt, return_tensors="pt").input_ids
dtype = str(model.dtype)
with torch.no_grad():
    logits = model.float()(ids).logits
assert not [m for m in sys.modules if m.startswith("fusetune")]
torch.save({"dtype": dtype, "ids": ids, "logits": logits}, out)
"""


def test_lora_run_exports_a_merged_model_that_plain_transformers_loads(compose_cfg, tmp_path, monkeypatch):
    trained = {}
    save_merged = FastModel.save_merged

    def keep_the_trained_model(model, tokenizer, save_directory, **kwargs):
        trained["model"] = model
        return save_merged(model, tokenizer, save_directory, **kwargs)

    monkeypatch.setattr(FastModel, "save_merged", staticmethod(keep_the_trained_model))
    out = tmp_path / "run"
    summary = run(compose_cfg(["model=tiny_llama_lora", "trainer.max_steps=4", *FAST], output_dir=out))

    merged = out / "merged"
    assert summary["merged_to"] == str(merged) == json.loads((out / "summary.json").read_text())["merged_to"]
    assert (out / "adapter" / "adapter_config.json").is_file()  # next to the adapter
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()

    loaded = tmp_path / "plain.pt"
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(merged), PROMPT, str(loaded)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(loaded)
    assert plain["dtype"] == "torch.bfloat16"  # 16-bit weights (bf16 on CPU)

    model = trained["model"].eval()  # the trained PeftModel: fp32 on a CPU, where the trainer left it on a GPU
    ids = plain["ids"].to(model.device)
    with torch.no_grad():
        live = model(input_ids=ids).logits.float().cpu()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float().cpu()
    scale = live.abs().max().item()
    merge_error = (plain["logits"] - live).abs().max().item()
    adapter_effect = (base - live).abs().max().item()
    assert merge_error <= 0.02 * scale, (merge_error, scale)  # bf16 weights: ~3 significant digits
    assert adapter_effect > 10 * merge_error, (adapter_effect, merge_error)  # the merge carries what training did


def test_full_finetune_exports_its_whole_model_in_16_bits_and_a_gguf_file(compose_cfg, tmp_path, caplog):
    """Never silently ignored: merged/ holds the fully fine-tuned model, as it holds a merged adapter, and one log
    line says there was nothing to merge. export.gguf=q8_0 writes the GGUF file beside it, from the same weights."""
    caplog.set_level(logging.INFO, logger="fusetune")
    summary = run(
        compose_cfg(["trainer.max_steps=1", "save_model=false", "export.gguf=q8_0", *FAST], output_dir=tmp_path)
    )
    merged = tmp_path / "merged"
    assert summary["merged_to"] == str(merged) and not (tmp_path / "model").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype="auto")
    assert reloaded.dtype == torch.bfloat16  # 16-bit weights (bf16 on CPU), like a merge
    assert (merged / "tokenizer.json").is_file() and not (merged / "adapter_config.json").exists()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("export.")]
    assert said[0] == (
        "export.merged: a full fine-tune has no adapters to merge: the model is already whole (save_model=false); "
        f"{merged} holds a 16-bit copy"
    )

    path = tmp_path / "gguf" / "model-q8_0.gguf"
    assert summary["gguf_to"] == str(path) and said[1].startswith(f"export.gguf: {path} (q8_0, ")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama" and len(reader.tensors) == 2 + 4 * 9 + 1
    down = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    got = torch.from_numpy(gguf.quants.dequantize(down.data, down.tensor_type).copy())
    want = reloaded.model.layers[3].mlp.down_proj.weight.float()  # trained in fp32, both rounded from it
    assert (got - want).abs().max() <= want.abs().max() / 100
