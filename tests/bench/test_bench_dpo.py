"""The DPO scenarios of scripts/bench.py (D1, D8) on the CPU: D1 on the tiny Llama through TRL's DPOTrainer (hf)
and FastDPOTrainer (fusetune_reference), its rows and their losses; and the GPU scenarios' pairs through TRL's
tokenization with the word-level Llama 3 tokenizer of their model folders.

The jobs run in this process, their specs and results through JSON as a job subprocess reads and writes them:
a subprocess per job would import torch, transformers and TRL three times over (tests/bench/test_bench.py runs
the subprocesses themselves)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from bench import cli, folders, preference, runner, scenarios, shapes, worker  # noqa: E402


class InProcess(runner.Runner):
    """The runner with every job run here, in order: the spec and the result pass through JSON."""

    def call(self, mode, spec, name, variant=None, timeout=None):
        spec = json.loads(json.dumps(spec))
        result = folders.prepare(spec) if mode == "prepare" else {"versions": {}, **worker.run_worker(spec)}
        return {**json.loads(json.dumps(result)), "wall_s": 0.0, "log": None}


@pytest.fixture
def unpatched():
    from fusetune.patching import remove_kernels

    remove_kernels()  # hf runs the model's own modules; fusetune_reference patches them, for the process
    yield
    remove_kernels()


def test_tiny_dpo_rows_and_equal_losses(tmp_path, monkeypatch, unpatched):
    monkeypatch.setattr(cli, "Runner", InProcess)
    args = cli.parse_args(
        ["--tiny", "--scenarios", "D1", "--variants", "hf liger fusetune_reference", "--warmup", "0", "--steps", "2"]
        + ["--out", str(tmp_path / "out"), "--scratch", str(tmp_path / "scratch")]
    )
    jsonl = cli.orchestrate(args)
    rows = {r["variant"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert rows["liger"]["status"] == "skipped"  # not installed, or its Triton kernels without CUDA
    assert "liger_kernel is not installed" in rows["liger"]["reason"] or "CUDA" in rows["liger"]["reason"]
    hf, ours = rows["hf"], rows["fusetune_reference"]
    step_flops = shapes.dpo_flops(shapes.arch_config("tiny"), [64] * 8)
    assert step_flops == 1.5 * shapes.useful_flops(shapes.arch_config("tiny"), [64] * 8)
    for row in (hf, ours):
        assert row["status"] == "ok", row.get("reason")
        assert row["mode"] == "dpo" and row["batch"] == 4 and row["seq"] == 64 and row["dpo"]["prompt_tokens"] == 16
        assert row["tokens_per_step"] == 4 * 2 * 64 and row["tok_s"] > 0 and len(row["losses"]) == 2
        assert row["useful_tflops"] * 1e12 * row["step_ms"] / 1e3 == pytest.approx(step_flops)
        assert row["loss_first"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the policy is its reference
        assert row["mode_detail"].endswith(
            "reference: the policy with its adapters disabled (TRL's copy of the adapter removed)"
        )
        logps = row["dpo_metrics"]
        assert len(logps["logps/chosen"]) == 2 and logps["logps/chosen"][0] != logps["logps/rejected"][0]
        assert logps["rewards/margins"][0] == 0.0 and abs(logps["rewards/margins"][1]) > 1e-5  # one update
    assert hf["trainer"] == "trl.trainer.dpo_trainer.DPOTrainer" and hf["fused_preference"] is None
    assert ours["trainer"] == "fusetune.training.preference_trainer.FastDPOTrainer" and ours["fused_preference"] is True
    assert ours["trainable_params"] == hf["trainable_params"]
    # the same pairs, model and update: the same log-probs and losses (the report's target: 3 decimals at step 1)
    assert round(ours["loss_first"], 3) == round(hf["loss_first"], 3)
    assert ours["losses"] == pytest.approx(hf["losses"], rel=1e-5)
    for key, values in hf["dpo_metrics"].items():
        assert ours["dpo_metrics"][key] == pytest.approx(values, rel=1e-4, abs=1e-6), key
    md = jsonl.with_suffix(".md").read_text()
    assert "## D1: tiny fp32, DPO: 4 pairs x 2 x 64" in md and "| fusetune_reference | ok |" in md
    assert "- fusetune_reference: fusetune.training.preference_trainer.FastDPOTrainer, fused preference loss on;" in md


def test_the_gpu_scenarios_pairs_come_back_from_trls_tokenization(tmp_path):
    """D1 and D8 load folders with a word-level tokenizer of Llama 3's 128,256 ids: their pairs, given to TRL's
    DPOTrainer as text, come back from its tokenization and collator as the same ids at full length; a batch that
    is not the pairs' ids is refused."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fusetune.loading import resolve

    cfg = shapes.arch_config("llama3_8b")
    folders.write_llama3_tokenizer(tmp_path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    sc = scenarios.SCENARIOS["D8"]
    spec = {"scenario": sc, "lengths": [[2048] * 8], "seed": 3, "variant": "hf", "folder": str(tmp_path), "cuda": False}
    steps = preference.synthetic_pairs(spec, tokenizer, cfg["vocab_size"], torch)
    (pairs,) = steps
    assert len(pairs) == 4 and all(
        len(p["prompt"]) == 512 and len(p["chosen"]) == len(p["rejected"]) == 1536 for p in pairs
    )
    assert all(p["chosen"] != p["rejected"] and p["chosen"][-1] == tokenizer.eos_token_id for p in pairs)
    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve("fusetune:tiny_llama")))  # no forward
    policy = get_peft_model(policy, LoraConfig(r=4, target_modules=["q_proj"]))
    trainer, ref_copy_removed = preference.build_trainer(
        policy, tokenizer, preference.pair_records(tokenizer, steps), spec
    )
    assert ref_copy_removed and list(trainer.model.peft_config) == ["default"]
    (batch,) = preference.checked_batches(trainer, steps, torch)
    assert batch["input_ids"].shape == (8, 2048) and batch["attention_mask"].all()
    pairs[1]["rejected"][7] += 1  # what the trainer made is no longer these ids
    with pytest.raises(
        ValueError, match=r"^the trainer's batch \(input_ids \(8, 2048\), keys .*\) is not the pairs' ids$"
    ):
        preference.checked_batches(trainer, steps, torch)


def test_gpu_bench_names_the_dpo_scenarios():
    """scripts/gpu_bench.sh passes SCENARIOS="D1 D8" as one space-separated --scenarios value."""
    args = cli.parse_args(["--scenarios", "D1 D8", "--variants", "hf liger unsloth fusetune_triton"])
    assert args.scenarios == ["D1", "D8"] and {"D1", "D8"} <= set(scenarios.SCENARIOS)
    assert scenarios.SCENARIOS["D8"]["arch"] == "llama3_8b" and scenarios.SCENARIOS["D1"]["arch"] == "llama3_1b"
