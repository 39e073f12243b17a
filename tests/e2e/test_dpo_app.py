"""trainer=dpo on data=preference, end to end on the tiny default, and its mistakes refused in one line."""

import json
import random

import pytest
import torch

from fusetune import report
from fusetune.app import resume_check
from fusetune.app.config import validate
from fusetune.app.run import run, sft_config
from fusetune.data.synthetic import preference_pairs, synthetic_splits
from fusetune.errors import FusetuneError
from fusetune.report import read_jsonl
from fusetune.training.preference_trainer import FastDPOConfig

from .app_runs import error_line, exit_and_stderr
from .test_report import make_job, summary

DPO = ("trainer=dpo", "data=preference", "logger=none")


def write_pairs(path, count: int, seed: int, bad: dict | None = None):
    """Synthetic tasks as preference pairs: the right answer chosen, a wrong one (a random slice of it with a
    random suffix) rejected. ``bad``: {line number: record} written in place of those lines."""
    rng = random.Random(seed)
    rows, _ = synthetic_splits(count, 0, seed)
    lines = []
    for n, row in enumerate(rows, 1):
        wrong = row["completion"][: rng.randint(0, 2)] + rng.choice("xyz0123456789")
        record = {"prompt": row["prompt"], "chosen": row["completion"], "rejected": wrong}
        lines.append(json.dumps((bad or {}).get(n, record)))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dpo_run_records_reward_metrics(compose_cfg, tmp_path, capsys):
    """In-process (as tests/e2e/test_run.py does): the overrides are the command line's, beta and loss_type too."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 40, seed=random.randrange(1000))
    run_dir = tmp_path / "run"
    overrides = [
        *DPO,
        f"data.path={pairs}",
        "data.eval_fraction=0.2",
        "trainer.beta=0.2",
        "trainer.loss_type=ipo",
        "trainer.max_steps=3",
        "trainer.logging_steps=1",
        "trainer.per_device_train_batch_size=8",
        "save_model=false",
    ]
    summary = run(compose_cfg(overrides, output_dir=run_dir))
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert summary["trainer"] == "dpo" and summary["global_step"] == 3
    train = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        assert all(isinstance(m[key], float) for m in train), key
    assert summary["preference"]["rewards/margins"] == train[-1]["rewards/margins"]
    assert summary["final_loss"] == train[-1]["loss"]
    assert {"eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"} <= set(summary["eval"])
    assert "rewards/margins" in capsys.readouterr().out


def test_dpo_on_the_embedded_preference_set(compose_cfg, tmp_path):
    seed = random.randrange(1000)
    overrides = ["trainer=dpo", "data=synthetic_preference", "logger=none", f"seed={seed}", "save_model=false"]
    overrides += [
        "data.num_train=16",
        "data.num_eval=8",
        "trainer.max_steps=2",
        "trainer.per_device_train_batch_size=8",
    ]
    summary = run(compose_cfg(overrides, output_dir=tmp_path))
    assert summary["data"] == "synthetic_preference" and summary["global_step"] == 2
    assert summary["preference"]["rewards/accuracies"] is not None  # its eval split only with eval_strategy, as SFT
    rows, _ = synthetic_splits(50, 0, seed)
    pairs = preference_pairs(rows, seed)
    assert [p["chosen"] for p in pairs] == [r["completion"] for r in rows]
    for p in pairs:  # one digit or letter changed
        assert len(p["rejected"]) == len(p["chosen"])
        assert sum(a != b for a, b in zip(p["rejected"], p["chosen"], strict=True)) == 1


def test_the_dpo_keys_reach_fastdpoconfig(compose_cfg, tmp_path):
    beta = round(random.uniform(0.05, 0.5), 3)
    cfg = compose_cfg(
        [*DPO, f"data.path={tmp_path / 'x.jsonl'}", f"trainer.beta={beta}", "trainer.loss_type='ipo,sft'"]
    )
    cfg.trainer.label_smoothing = 0.0
    args = sft_config(cfg, tmp_path, __import__("torch").float32, [], "reference", cfg.model.max_seq_length)
    assert type(args) is FastDPOConfig
    assert args.beta == beta and args.loss_type == ["ipo", "sft"] and args.max_length == cfg.model.max_seq_length
    assert args.learning_rate == cfg.trainer.learning_rate == 3e-3  # model=tiny_llama sets it


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("trainer=dpo", "logger=none"), "fusetune: error: trainer=dpo trains on chosen/rejected pairs, but data="),
        (("data=preference", "data.path=p.jsonl", "logger=none"), "fusetune: error: data=preference gives chosen/"),
        ((*DPO, "data.path=p.jsonl", "+trainer.betta=0.2"), "(did you mean beta?)"),
        ((*DPO, "data.path=p.jsonl", "trainer.loss_type=ipoo"), "'ipoo' is not a DPO loss type of the installed TRL"),
        ((*DPO, "data.path=p.jsonl", "trainer.packing=true"), "trainer.packing applies to the SFT trainers"),
        (
            ("logger=none", "trainer.beta=0.3"),
            "fusetune: error: trainer.beta applies to trainer=dpo or orpo or simpo or kto, not to",
        ),
    ],
    ids=["dpo-on-sft-data", "sft-on-pairs", "typo", "loss-type", "sft-key", "dpo-key-on-sft"],
)
def test_mistakes_with_dpo_are_one_line(overrides, message, compose_cfg, tmp_path, capsys):
    code, stderr = exit_and_stderr(list(overrides), tmp_path / "run", False, compose_cfg, capsys)
    assert code == 2 and message in error_line(stderr)


def test_bad_preference_records_are_named_in_one_line(compose_cfg, tmp_path, capsys):
    bad = {
        2: {"prompt": "add 1 2=", "chosen": "3"},
        4: {"prompt": [{"role": "user", "content": "hi"}], "chosen": "3", "rejected": "4"},
        5: {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "robot", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
    }
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8, seed=random.randrange(1000), bad=bad)
    code, stderr = exit_and_stderr([*DPO, f"data.path={pairs}"], tmp_path / "run", False, compose_cfg, capsys)
    line = error_line(stderr)
    assert code == 2 and "3 bad records" in line, line
    assert "line 2: 'rejected' is missing or null" in line
    assert "line 4: give prompt, chosen, rejected all as strings or all as conversations" in line
    assert "line 5: 'chosen' message 1 has role 'robot'" in line


def test_a_good_preference_set_passes_validation(compose_cfg, tmp_path):
    validate(compose_cfg([*DPO, f"data.path={tmp_path / 'p.jsonl'}"]))  # the file is read later, by the run


def test_the_report_shows_reward_columns_only_for_preference_runs(tmp_path):
    margin, accuracy = random.uniform(0.1, 2.0), random.choice([0.25, 0.5, 0.75])
    preference = {"rewards/margins": margin + 1, "rewards/accuracies": accuracy}
    evaluated = {"eval_rewards/margins": margin, "eval_rewards/accuracies": accuracy}
    make_job(tmp_path / "dpo", "0", 0, ["trainer.beta=0.1"], summary(1.0, preference=preference))
    make_job(tmp_path / "dpo", "1", 1, ["trainer.beta=0.3"], summary(1.0, preference=preference, eval=evaluated))
    rows = report.build_report(tmp_path / "dpo").rows
    assert [r["reward margin"] for r in rows] == [margin + 1, margin]  # held-out where evaluated, else train's
    assert [r["reward acc"] for r in rows] == [accuracy, accuracy]
    header = report.jobs_table(rows).splitlines()[0]
    assert "| exact_match | reward margin | reward acc | tok/s |" in header
    make_job(tmp_path / "sft", "0", 0, ["trainer=sft"], summary(1.0))
    assert "reward" not in report.jobs_table(report.build_report(tmp_path / "sft").rows)


def test_the_dpo_keys_are_described_in_the_help(compose_cfg):
    from fusetune.app.config import TrainerConfig
    from fusetune.app.help import descriptions

    about = descriptions(TrainerConfig)
    assert about["beta"] and about["label_smoothing"] and "loss" in about["loss_type"].lower()
    assert about["nan_policy"].startswith("A non-finite loss")


def test_a_config_saved_before_the_dpo_keys_resumes_an_sft_run(compose_cfg):
    """An SFT checkpoint's config from before the schema had the DPO keys: they reach no SFT trainer."""
    new = resume_check.run_config(compose_cfg(["logger=none"]), 1)
    saved = {**new, "trainer": {k: v for k, v in new["trainer"].items() if k not in ("beta", "label_smoothing")}}
    assert resume_check.check(saved, new, [], "checkpoint-2") is None
    moved = {**new, "trainer": {**new["trainer"], "beta": 0.3}}  # set away from its default: refused by validate
    assert "trainer.beta changed (absent) -> 0.3" in resume_check.check(saved, moved, ["trainer"], "checkpoint-2")
    dpo = {**new, "trainer": {**new["trainer"], "name": "dpo"}}
    saved_dpo = {**saved, "trainer": {**saved["trainer"], "name": "dpo"}}
    with pytest.raises(
        FusetuneError, match=r"trainer.label_smoothing changed \(absent\) -> 0; trainer.beta changed \(absent\) -> 0.1 "
    ):
        resume_check.check(saved_dpo, dpo, [], "checkpoint-2")  # a DPO run reads them


@pytest.mark.parametrize(
    ("variant", "options"), [("orpo", ["trainer.beta=0.2"]), ("simpo", ["trainer.simpo_gamma=1.0"])]
)
def test_orpo_and_simpo_runs_record_reward_metrics(variant, options, compose_cfg, tmp_path):
    """trainer=orpo and trainer=simpo: TRL's own trainers on fusetune's kernels, their keys typed, the rewards
    recorded as trainer=dpo's are; the config class is the variant's, with the options given."""
    from fusetune.training.preference_variants import FastORPOConfig, FastSimPOConfig

    pairs = write_pairs(tmp_path / "pairs.jsonl", 24, seed=random.randrange(1000))
    run_dir = tmp_path / "run"
    overrides = [
        f"trainer={variant}", "data=preference", "logger=none", f"data.path={pairs}", *options,
        "trainer.max_steps=2", "trainer.logging_steps=1", "trainer.per_device_train_batch_size=8", "save_model=false",
    ]  # fmt: skip
    cfg = compose_cfg(overrides, output_dir=run_dir)
    args = sft_config(cfg, tmp_path / "args", torch.float32, [], "reference", cfg.model.max_seq_length)
    assert type(args) is {"orpo": FastORPOConfig, "simpo": FastSimPOConfig}[variant]
    assert (args.beta, getattr(args, "simpo_gamma", None)) == ((0.2, None) if variant == "orpo" else (2.0, 1.0))
    summary = run(cfg)
    assert summary["trainer"] == variant and summary["global_step"] == 2
    train = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2] and all(isinstance(m["loss"], float) for m in train)
    assert summary["preference"]["rewards/accuracies"] == train[-1]["rewards/accuracies"]
    # TRL's ORPO and CPO trainers count no tokens; fusetune's count what the model reads, as for DPO
    assert summary["train_tokens"] == train[-1]["num_tokens"] > 0 and summary["train_tokens_per_second"] > 0
    # they tokenize inside TRL's constructors: the tokenized cache is skipped, saying why
    assert summary["data_cache"]["skipped"].startswith(f"trainer={variant} tokenizes its pairs inside TRL's")
    assert summary["data_cache"]["entries"] == []


def test_kto_run_on_labelled_answers_and_its_data_mistakes(compose_cfg, tmp_path, capsys):
    """trainer=kto on a file of labelled answers (the reference: the adapters disabled); a label that is not a
    boolean is refused in one line naming the record, and pairs given to KTO are refused naming data=kto."""
    rows, _ = synthetic_splits(12, 0, seed=random.randrange(1000))
    answers = tmp_path / "answers.jsonl"
    lines = [json.dumps({"prompt": r["prompt"], "completion": r["completion"], "label": i % 2 == 0}) for i, r in
             enumerate(rows)]  # fmt: skip
    answers.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    overrides = [
        "trainer=kto", "data=kto", "logger=none", f"data.path={answers}", "trainer.max_steps=2",
        "trainer.logging_steps=1", "trainer.per_device_train_batch_size=4", "save_model=false",
    ]  # fmt: skip
    summary = run(compose_cfg(overrides, output_dir=run_dir))
    assert summary["trainer"] == "kto" and summary["global_step"] == 2
    train = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2] and all(isinstance(m["kl"], float) for m in train)

    lines[4] = json.dumps({"prompt": "p", "completion": "c", "label": "yes"})
    answers.write_text("\n".join(lines) + "\n")
    code, stderr = exit_and_stderr(overrides, tmp_path / "bad", False, compose_cfg, capsys)
    assert code == 2 and "'label' must be true or false (is the answer desirable?), got a string" in stderr
    assert "line 5" in stderr and "Traceback" not in stderr

    pairs = write_pairs(tmp_path / "pairs.jsonl", 8, seed=1)
    code, stderr = exit_and_stderr(
        ["trainer=kto", "data=preference", f"data.path={pairs}", "logger=none"], tmp_path / "pairs", False, compose_cfg,
        capsys,
    )  # fmt: skip
    assert code == 2 and error_line(stderr) == (
        "fusetune: error: trainer=kto trains on labelled answers, but data=preference gives chosen/rejected pairs: "
        "use data=kto (prompt/completion/label records) or data=synthetic_kto (the embedded set)"
    )
