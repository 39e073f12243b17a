"""scripts/bench.py (the peer benchmark) on CPU: ``--tiny`` runs the embedded tiny Llama through the hf
and fusetune_reference variants, each in its own subprocess, and reports the peers it cannot run as
skipped; its tables render; the S5 probe schedule and the FLOP count hold on their own."""

import importlib.util
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from bench import cli, folders, max_context, report, scenarios, shapes, steps, variants  # noqa: E402
from fusetune.loading import ASSETS  # noqa: E402

ARCHS = ASSETS / "archs"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out, scratch = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("scratch")
    cmd = [sys.executable, str(SCRIPTS / "bench.py"), "--tiny", "--out", str(out), "--scratch", str(scratch)]
    cmd += ["--variants", "hf,fusetune_reference,liger,unsloth", "--scenarios", "S1,S4", "--warmup", "1"]
    cmd += ["--steps", "2", "--timeout", "240"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (jsonl,) = out.glob("*-cpu-peers.jsonl")
    rows = {(r["scenario"], r["variant"]): r for r in map(json.loads, jsonl.read_text().splitlines())}
    return jsonl, rows, done.stdout


@pytest.mark.slow
def test_tiny_rows_and_same_first_loss(tiny_run):
    jsonl, rows, _ = tiny_run
    assert set(rows) == {(s, v) for s in ("S1", "S4") for v in ("hf", "fusetune_reference", "liger", "unsloth")}
    for scenario in ("S1", "S4"):
        hf, ours = rows[scenario, "hf"], rows[scenario, "fusetune_reference"]
        for row in (hf, ours):
            assert row["status"] == "ok", row.get("reason")
            assert all(math.isfinite(x) for x in row["losses"]) and len(row["losses"]) == 3
            assert row["step_ms"] > 0 and row["tok_s"] > 0 and row["tokens_per_step"] > 0
            assert row["gpu"] == "cpu" and row["versions"]["torch"] and row["date"]
        # the same model on the same batch: the same first-step loss, to fp32 rounding (LoRA B starts at zero)
        assert ours["loss_first"] == pytest.approx(hf["loss_first"], rel=1e-5)
        assert ours["losses"] == pytest.approx(hf["losses"], rel=1e-4)
    assert rows["S1", "hf"]["tokens_per_step"] == 2 * 64
    assert rows["S4", "hf"]["mode"] == rows["S4", "fusetune_reference"]["mode"] == "padding_free"
    assert rows["S4", "fusetune_reference"]["attn_implementation"] == "fusetune_masked"
    graphed = rows["S4", "fusetune_reference"]  # the trainer's graphed path, with reruns on the CPU
    assert len(graphed["step_paths"]) == 3 and graphed["step_paths"][0] == "capture"
    assert graphed["graphs"]["replays"] == 3 and graphed["graphs"]["captures"] >= 1
    assert len(graphed["warmup_step_ms"]) == 1 and graphed["median_over_whole"] > 0
    assert "CUDA graphs: " in graphed["mode_detail"] and rows["S4", "hf"]["step_paths"] == ["eager"] * 3
    for scenario in ("S1", "S4"):
        liger = rows[scenario, "liger"]  # not installed, or Triton without CUDA
        assert liger["status"] == "skipped" and ("not installed" in liger["reason"] or "CUDA" in liger["reason"])
        unsloth = rows[scenario, "unsloth"]
        if importlib.util.find_spec("unsloth") is None:
            assert unsloth["status"] == "skipped" and "not installed" in unsloth["reason"]
        else:  # Unsloth has a CPU fallback: then it trains the same model to the same losses
            assert unsloth["status"] == "ok" and unsloth["losses"] == pytest.approx(hf["losses"], rel=1e-4)


@pytest.mark.slow
def test_tiny_tables(tiny_run, tmp_path):
    jsonl, _, stdout = tiny_run
    md = jsonl.with_suffix(".md").read_text()
    assert "## S1" in md and "## S4" in md and "speed x best peer" in md
    assert "| hf | ok |" in md and "| fusetune_reference | ok |" in md and "| unsloth | skipped |" in md
    assert "| hf | ok |" in stdout  # the table is printed last
    table = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--readme-table", str(jsonl.parent)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| scenario | hf | liger | unsloth | fusetune |" in table and "| S4: " in table
    merged = cli.main(["--render", str(jsonl), str(jsonl), "--out", str(tmp_path)])
    assert len(merged.read_text().splitlines()) == 8  # duplicates collapse to the last row of each pair
    assert merged.name == jsonl.name and "| hf | ok |" in merged.with_suffix(".md").read_text()


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    """The new families' scenarios, their architectures shrunk (S9, 4-bit, skipped on the CPU; S10 MoE)."""
    out, scratch = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("scratch")
    cmd = [sys.executable, str(SCRIPTS / "bench.py"), "--tiny", "--out", str(out), "--scratch", str(scratch)]
    cmd += ["--variants", "hf,fusetune_reference", "--scenarios", "S6,S7,S8,S9,S10", "--timeout", "240"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (jsonl,) = out.glob("*-cpu-peers.jsonl")
    return {(r["scenario"], r["variant"]): r for r in map(json.loads, jsonl.read_text().splitlines())}


FAMILIES = {"S6": ("qwen3_5_2b", "q_proj"), "S7": ("gemma3_4b", "q_proj"), "S8": ("phi4_mini", "qkv_proj"),
            "S10": ("qwen3_moe_30b_a3b", "q_proj")}  # fmt: skip


@pytest.mark.slow
def test_tiny_new_families(family_run):
    rows = family_run
    # liger's per-family skip: test_liger_without_a_patch_for_the_family_is_a_skip
    assert set(rows) == {(s, v) for s in ("S6", "S7", "S8", "S9", "S10") for v in ("hf", "fusetune_reference")}
    for variant in ("hf", "fusetune_reference"):
        assert rows["S9", variant]["status"] == "skipped" and rows["S9", variant]["reason"] == "4-bit needs CUDA"
    for scenario, (arch, first_target) in FAMILIES.items():
        hf, ours = (rows[scenario, v] for v in ("hf", "fusetune_reference"))
        assert hf["status"] == "ok", hf.get("reason")
        assert hf["model"] == arch and hf["lora"]["targets"][0] == first_target and hf["tokens_per_step"] == 2 * 64
        assert all(math.isfinite(x) for x in hf["losses"]) and len(hf["losses"]) == 3
        assert hf["matmul_params"] == shapes.matmul_params(shapes.arch_config(arch, shrink=True))
        assert ours["status"] == "ok", ours.get("reason")  # the same model and batches: the same losses
        assert ours["losses"] == pytest.approx(hf["losses"], rel=1e-4)
        assert ours["self_check_s"] >= 0
    moe = rows["S10", "hf"]  # attention modules, and the experts' 3-D parameters as target_parameters
    assert moe["lora"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and moe["lora"]["experts"]
    assert not rows["S8", "hf"]["lora"]["experts"]
    assert moe["trainable_params"] == rows["S10", "fusetune_reference"]["trainable_params"]


@pytest.mark.parametrize("arch", sorted(p.name for p in ARCHS.iterdir()))
def test_matmul_params_are_the_models_linear_weights(arch):
    """N counts exactly the weights of the model's nn.Linear modules (lm_head included, even when tied), at the
    real shape: attention with Qwen3.5's output gate, its gated delta-net projections, Phi-3's fused ones; and
    of routed experts, the top k a token goes through."""
    import torch

    from fusetune import loading

    with torch.device("meta"):
        model = loading.load_model("unused", torch.bfloat16, config=f"fusetune:archs/{arch}", random_init=True)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = shapes.arch_config(arch)
    for module in model.modules():  # routed experts (3-D weights): the top k that a token goes through; routers
        experts = getattr(module, "gate_up_proj", None)
        if isinstance(experts, torch.Tensor) and experts.dim() == 3:
            routed = experts.numel() + module.down_proj.numel()
            linear += routed * config["num_experts_per_tok"] // experts.shape[0]
        elif type(module).__name__.endswith("Router") and not isinstance(module, torch.nn.Linear):
            linear += module.weight.numel()
    assert shapes.matmul_params(config) == linear


def test_attention_flops_follow_sliding_windows():
    for length, window in [(10, None), (10, 4), (10, 10), (3, 8), (2048, 1024)]:
        brute = sum(min(i + 1, window or length) for i in range(length))
        assert shapes.attended(length, window) == brute
    cfg = shapes.arch_config("gemma3_4b")  # 34 layers: every sixth global, the others a 1024-token window
    assert shapes.layer_kinds(cfg).count("full_attention") == 5
    heads_dim = 12 * cfg["num_attention_heads"] * cfg["head_dim"]
    attention = heads_dim * (5 * shapes.attended(2048, None) + 29 * shapes.attended(2048, 1024))
    assert shapes.useful_flops(cfg, [2048]) == 4 * shapes.matmul_params(cfg) * 2048 + attention
    qwen = shapes.arch_config("qwen3_5_2b")  # only the full-attention layers (one in four) attend
    per_layer = 12 * qwen["num_attention_heads"] * qwen["head_dim"] * shapes.attended(2048, None)
    assert shapes.useful_flops(qwen, [2048]) == 4 * shapes.matmul_params(qwen) * 2048 + 6 * per_layer


def test_liger_without_a_patch_for_the_family_is_a_skip(monkeypatch):
    """liger: the family's own patch through _apply_liger_kernel_to_instance; none for the family: Unsupported."""
    import types

    applied = []
    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"phi3": None}
    patch._apply_liger_kernel_to_instance = lambda model, **kwargs: applied.append((model.config.model_type, kwargs))
    package = types.ModuleType("liger_kernel")
    package.__version__ = "9.9.9"
    for name, module in [("liger_kernel", package), ("liger_kernel.transformers", types.ModuleType("x"))]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patch)

    def model(model_type):
        return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))

    variants.apply_liger(model("phi3"))
    assert applied == [("phi3", {"cross_entropy": False, "fused_linear_cross_entropy": True})]
    with pytest.raises(variants.Unsupported, match="^liger-kernel 9.9.9 has no patch for model type 'olmo9'$"):
        variants.apply_liger(model("olmo9"))


def test_self_check_seconds_read_from_fusetune(monkeypatch):
    from fusetune import self_check

    monkeypatch.setitem(self_check._seconds, "total", 0.25)
    assert variants.self_check_seconds() == 0.25
    md = report.render([{"scenario": "S8", "variant": "fusetune_triton", "status": "ok", "self_check_s": 0.25}])
    assert "- fusetune_triton: load-time self-check of its patched ops 0.25 s (of - s loading)" in md


def test_word_tokenizer_has_the_config_s_vocabulary_and_ids(tmp_path):
    from transformers import AutoTokenizer

    cfg = shapes.arch_config("gemma3_4b")
    folders.write_word_tokenizer(tmp_path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == cfg["vocab_size"] == 262208
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)
    assert tokenizer.convert_tokens_to_ids("t262207") == 262207
    phi = shapes.arch_config("phi4_mini")  # bos, eos and pad: one id, one token
    folders.write_word_tokenizer(tmp_path / "phi", phi)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "phi")
    assert len(tokenizer) == phi["vocab_size"] and tokenizer.eos_token == tokenizer.bos_token == "<bos>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 199999


@pytest.mark.parametrize(
    "paths,warmup,counts",
    [
        (["capture", "replay", "capture", "replay", "eager"], 2, {"eager": 1, "capture": 1, "replay": 1}),
        (["eager"] * 3, 1, {"eager": 2, "capture": 0, "replay": 0}),
        (["capture", "replay"], 0, {"eager": 0, "capture": 1, "replay": 1}),
    ],
)
def test_warmup_record_counts_the_measured_steps_paths(paths, warmup, counts):
    times = [float(i) for i in range(len(paths))]
    record = steps.warmup_record(times, paths, warmup, None)
    assert record == {"warmup_step_ms": times[:warmup], "step_paths": paths, "measured_paths": counts, "graphs": None}


def test_flops_convention():
    cfg = shapes.arch_config("llama3_1b")
    assert shapes.matmul_params(cfg) == pytest.approx(1.236e9, rel=1e-3)  # lm_head in, embeddings out
    per_token = shapes.useful_flops(cfg, [2048]) / 2048
    attention = 6 * 16 * 32 * 64 * 2049
    assert per_token == pytest.approx(4 * shapes.matmul_params(cfg) + attention)


def test_s5_probe_schedule():
    """Probes from 8k: a line through two fits predicts the limit; then bisection to 10%."""

    def run(peak, total=141.0, top=262144):
        ok = bad = None
        fits, seen, length = [], [], 8192
        while length is not None and len(seen) < 8:
            fitted = peak(length) <= total
            seen.append(length)
            if fitted:
                ok = length
                fits.append((length, peak(length)))
            else:
                bad = length
            length = max_context.next_probe(ok, bad, fits, 0.95 * total, top, 4096, 0.1)
        return ok, bad, seen

    ok, bad, seen = run(lambda n: 10 + n / 1000)  # linear: fits up to 131,000 tokens
    assert ok <= 131000 < bad and bad - ok <= 0.1 * ok and len(seen) <= 5
    assert run(lambda n: 10 + n / 4000)[:2] == (262144, None)  # everything fits: stops at the top
    ok, bad, _ = run(lambda n: 10 + n / 50)  # even 8k is tight
    assert ok is None or ok < bad


def test_s5_together_probes_the_variants_at_once(monkeypatch, tmp_path):
    """--s5-together: each variant bisects in its own thread, so their probes overlap (the barrier would
    time out if they ran one after the other), and each row says whom it shared the GPU with."""
    args = cli.parse_args(
        ["--scenarios", "S5", "--variants", "unsloth fusetune_triton", "--s5-together", "--s5-memory-gib", "24"]
        + ["--s5-min", "32768", "--s5-probes", "4"]
    )
    limits = {"unsloth": 70000, "fusetune_triton": 90000}
    met = threading.Barrier(2, timeout=20)

    class FakeRunner:
        def call(self, mode, spec, name, variant=None, timeout=None):
            seq = spec["scenario"]["seq"]
            if seq == args.s5_min:
                met.wait()
            peak = 2 + 22.8 * seq / limits[variant]
            if seq > limits[variant]:
                return {"status": "failed", "oom": True, "peak_gib": None, "wall_s": 1.0}
            return {"status": "ok", "peak_gib": peak, "step_ms": seq / 10, "wall_s": 1.0}

    monkeypatch.setattr(max_context, "availability", lambda *a: None)
    gpu = {"cuda": True, "total_gib": 139.0}
    futures = max_context.start_together(FakeRunner(), "S5", scenarios.SCENARIOS["S5"], tmp_path, "nf4", gpu, args)
    rows = {v: f.result(timeout=60) for v, f in futures.items()}
    for variant, row in rows.items():
        assert row["status"] == "ok" and row["concurrent_with"] == [v for v in limits if v != variant]
        assert row["max_context"] <= limits[variant] < row["first_failure"], row["probes"]
    assert rows["fusetune_triton"]["max_context"] > rows["unsloth"]["max_context"]
    md = report.render([{"scenario": "S5", "variant": v, **row} for v, row in rows.items()])
    assert "fusetune_triton, unsloth: probed at once on one GPU (`--s5-together`), each process capped at 24 GiB" in md


def test_s5_together_needs_a_memory_cap(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--scenarios", "S5", "--s5-together"])
    assert "--s5-together needs --s5-memory-gib" in capsys.readouterr().err


def test_tables_of_gpu_rows(tmp_path):
    """The GPU-only row shapes (S5 probes, the adamw_8bit retiming, failures) render, with ratios to the best peer."""
    rows = []
    for variant, tok_s, peak, context in [("hf", 1000, 40.0, 40960), ("unsloth", 1800, 25.0, 163840)]:
        common = {"variant": variant, "status": "ok", "reason": None, "model": "llama3_8b", "quant": "nf4"}
        rows.append(
            {**common, "scenario": "S3", "batch": 4, "seq": 2048, "tok_s": tok_s, "step_ms": 8192e3 / tok_s}
            | {"peak_gib": peak, "loss_first": 11.9, "loss_last": 11.8, "alt_optim": {"status": "ok", "tok_s": 990}}
        )
        probes = [{"seq": 8192, "status": "ok"}, {"seq": context + 8192, "status": "oom"}]
        rows.append({**common, "scenario": "S5", "max_context": context, "first_failure": context + 8192})
        rows[-1]["memory_cap_gib"] = 24.0
        rows[-1].update(peak_gib=130.0, probes=probes)
    rows.append({**rows[0], "variant": "fusetune_triton", "tok_s": 2000, "peak_gib": 20.0})
    rows.append({"scenario": "S5", "variant": "fusetune_triton", "status": "failed", "reason": "probe at 8192: boom"})
    path = tmp_path / "2026-01-01-h200-peers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = report.render(report.read_rows([path]))
    assert "| fusetune_triton | ok |  | 2,000 (adamw_8bit: 990) | 1.11x |" in md and "| 0.80x |" in md  # unsloth best
    assert "(adamw_8bit: 990)" in md and "| unsloth | ok | 163,840 | 1.00x | 172,032 |" in md
    assert "- fusetune_triton: failed: probe at 8192: boom" in md
    assert "## S5: llama3_8b QLoRA NF4, longest batch-1 context that trains a step in 24 GiB" in md
    table = report.readme_table(tmp_path)
    assert "| S3: llama3_8b QLoRA NF4, 4 x 2048 |" in table and "1.11x, 0.80x" in table


def test_the_readme_performance_table_is_the_generated_one():
    """The README's table comes from the newest committed peers file, through --readme-table."""
    generated = report.readme_table(SCRIPTS.parent / "bench" / "results").strip()
    assert generated and generated in (SCRIPTS.parent / "README.md").read_text()


def test_the_benchmark_targets_the_library_s_projections():
    """LoRA's targets are the library's PROJECTIONS (attention ones beside routed experts), a family's own names
    where its projections have others."""
    from fusetune.modules import PROJECTIONS

    assert shapes.lora_targets(shapes.arch_config("llama3_1b")) == list(PROJECTIONS)
    assert shapes.lora_targets(shapes.arch_config("qwen3_moe_30b_a3b")) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert shapes.lora_targets(shapes.arch_config("phi4_mini")) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_a_job_subprocess_imports_nothing_of_fusetune_before_its_variant():
    """What bench.py imports to run a job (before the variant's own imports) holds no fusetune, transformers or
    torch: Unsloth imports first in its job, and the peers' jobs never see fusetune's patches. The parent reads
    the library's rules with the GPUs hidden, and gives its jobs back the ones it was given."""
    heavy = "sorted(m for m in sys.modules if m.split('.')[0] in ('fusetune', 'transformers', 'torch', 'trl'))"
    code = (
        f"import os, sys; sys.path.insert(0, {str(SCRIPTS)!r}); import bench.__main__, bench.worker, bench.folders; "
        f"print({heavy}); os.environ['CUDA_VISIBLE_DEVICES'] = '3'; from bench import shapes; "
        "print(shapes.library().modules.PROJECTIONS[0], os.environ['CUDA_VISIBLE_DEVICES'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()  # between them, what importing fusetune prints
    assert lines[0] == "[]" and lines[-1] == "q_proj 3"
