"""scripts/step_profiler on CPU (the embedded tiny Llama): the model it profiles is built as FastModel builds
it, with fusetune's own checkpointing; every backend and trainer variant it offers for CPU runs to the end,
writes its report, and gives the same losses on the same batches; scripts/profile_step.py is the command line
over it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from fusetune.patching import active_backends, remove_kernels
from fusetune_kernels.offloaded_checkpoint import LayerCheckpoint

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from step_profiler import Setup  # noqa: E402
from step_profiler.model import build  # noqa: E402
from step_profiler.report import profile_steps, write_report  # noqa: E402


@pytest.mark.parametrize(
    "backend, kernels, checkpointing",
    [("varlen", "reference", True), ("varlen_peft_lora", "reference", "offload"), ("sdpa", "none", False)],
)
def test_the_profiled_model_is_built_as_fast_model_builds_it(backend, kernels, checkpointing):
    setup = Setup(tiny=True, kernels=kernels, gradient_checkpointing=checkpointing)
    try:
        model, tokenizer, attn = build(setup, backend, torch.device("cpu"), torch.float32)
        layers = model.get_base_model().model.layers
        if checkpointing:  # fusetune's own, not transformers' checkpoint function
            assert all(isinstance(layer._gradient_checkpointing_func, LayerCheckpoint) for layer in layers)
        else:
            assert not any(layer.gradient_checkpointing for layer in layers)
        assert active_backends() == ({} if kernels == "none" else {"llama": kernels})
        fused_lora = hasattr(LoraLinear.forward, "__wrapped__")  # fusetune's node wraps PEFT's forward
        assert fused_lora == (backend != "varlen_peft_lora" and kernels != "none")
        assert model.get_base_model().config._attn_implementation == attn
        assert attn == ("sdpa" if backend == "sdpa" else "fusetune_masked")
        trained = [name for name, p in model.named_parameters() if p.requires_grad]
        assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
        assert len(tokenizer) <= model.config.vocab_size
    finally:
        remove_kernels()


@pytest.mark.slow
def test_profile_step_smoke_on_cpu(tmp_path):
    setup = Setup(tiny=True, steps=2, warmup=1, kernels="reference")
    report = profile_steps(setup, ["varlen", "varlen_graphs"], ["fused", "fused_async"])
    write_report(report, tmp_path)
    report = json.loads((tmp_path / "profile.json").read_text())
    assert set(report["backends"]) == {"varlen", "varlen_graphs"}
    graphed = report["backends"]["varlen_graphs"]
    # 2 timed and profiled passes of 3 steps; a CUDA host replays its first captured step once more
    expected = {6, 7} if torch.cuda.is_available() else {6}
    assert graphed["graphs"]["replays"] in expected and graphed["graphs"]["disabled"] is None
    eager_losses = [s["loss"] for s in report["backends"]["varlen"]["steps"]]
    graph_losses = [s["loss"] for s in graphed["steps"]]
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)  # a CUDA graph may reduce in another order
    assert all(report["trainer"][v]["summary"]["step_ms"] > 0 for v in ("fused", "fused_async"))
    assert "varlen_graphs" in (tmp_path / "profile.md").read_text()


@pytest.mark.slow
def test_the_script_is_a_command_line_over_the_module(tmp_path):
    cmd = [sys.executable, str(SCRIPTS / "profile_step.py"), "--out", str(tmp_path), "--backends", "varlen,nonsense"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown backends ['nonsense']" in proc.stderr, proc.stderr[-2000:]
