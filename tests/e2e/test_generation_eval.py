"""Generation evaluation while training: the held-out prompts are scored each time the trainer evaluates, on the
model in place (adapters, checkpointing and kernels kept), logged like every metric; and the token F1."""

import random

import pytest
import torch
from transformers import TrainerCallback

from fusetune.app import run as run_module
from fusetune.app.run import run
from fusetune.evaluate import score_generations, token_f1
from fusetune.modules import base_model
from fusetune.patching import is_applied
from fusetune.report import read_jsonl

GENERATION_KEYS = {"eval_exact_match", "eval_token_f1", "eval_generation_seconds"}


@pytest.mark.parametrize(
    "answer,expected,f1",
    [
        ("a b c", "a b d", 2 / 3),
        ("c b a", "a b c", 1.0),  # order does not count
        ("a a", "a", 2 / 3),  # a token counts as often as in both: precision 1/2, recall 1
        ("a", "a a b", 0.5),  # precision 1, recall 1/3
        ("x y", "a b", 0.0),
        ("A", "a", 0.0),  # compared as they are, as exact match does
        ("", "", 1.0),
        ("", "a", 0.0),
        ("a", "   ", 0.0),
    ],
)
def test_token_f1(answer, expected, f1):
    assert token_f1(answer, expected) == pytest.approx(f1)


def test_token_f1_is_symmetric_and_bounded_on_random_words():
    rng = random.Random()
    words = "the cat sat on a mat 1 2 3".split()
    for _ in range(50):
        a, b = (" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(2))
        assert 0.0 <= token_f1(a, b) <= 1.0 and token_f1(a, b) == pytest.approx(token_f1(b, a))
        assert token_f1(a, a) == 1.0


def checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


class Probe(TrainerCallback):
    """What the model looks like at the end of every step, and in each evaluation after GenerationEval's turn."""

    def __init__(self):
        self.steps, self.adapters, self.evaluations = {}, {}, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        self.steps[state.global_step] = {
            "training": model.training,
            "use_cache": base_model(model).config.use_cache,
            "checkpointing": checkpointing(model),
            "kernels": is_applied(model),
            "adapters_train": bool(lora) and all(p.requires_grad for p in lora),
        }
        self.adapters[state.global_step] = torch.cat([p.detach().flatten() for p in lora]).clone()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append((state.global_step, dict(metrics)))


def test_generation_is_scored_at_every_eval_step_on_the_model_in_place(compose_cfg, tmp_path, monkeypatch):
    probe = Probe()
    callbacks = run_module.logger_callbacks
    monkeypatch.setattr(run_module, "logger_callbacks", lambda: [*callbacks(), probe])
    overrides = [
        "model=tiny_llama_lora",
        "model.gradient_checkpointing=true",
        "trainer.max_steps=4",
        "trainer.eval_strategy=steps",
        "trainer.eval_steps=2",
        "trainer.logging_steps=1",
        "data.num_train=64",
        "data.num_eval=8",
        "data.num_generate=3",
        "logger=none",
        "save_model=false",
    ]
    summary = run(compose_cfg(overrides, output_dir=tmp_path))

    lines = read_jsonl(tmp_path / "metrics.jsonl")
    scored = [m for m in lines if GENERATION_KEYS & set(m)]
    assert [m["step"] for m in scored] == [2, 4] and all(m["split"] == "eval" for m in scored)
    for m in scored:
        assert set(m) >= GENERATION_KEYS
        assert 0.0 <= m["eval_exact_match"] <= 1.0 and 0.0 <= m["eval_token_f1"] <= 1.0
        assert m["eval_generation_seconds"] > 0
    # the train lines keep their own metrics: none went into the generation's line, none came from it
    train = [m for m in lines if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert all("mean_token_accuracy" in m and not GENERATION_KEYS & set(m) for m in train)
    assert all(not {"entropy", "mean_token_accuracy", "eval_mean_token_accuracy"} & set(m) for m in scored)
    # the Trainer's own metrics got them too (metric_for_best_model can name them)
    assert [step for step, metrics in probe.evaluations if GENERATION_KEYS <= set(metrics)] == [2, 4]

    # step 3 trained after the generation of step 2 as step 1 did before it: training mode, no KV cache, the
    # checkpointing, the kernels, and the adapters, which that step moved
    assert probe.steps[3] == probe.steps[1]
    assert probe.steps[3] == {
        "training": True,
        "use_cache": False,
        "checkpointing": True,
        "kernels": True,
        "adapters_train": True,
    }
    assert not torch.equal(probe.adapters[2], probe.adapters[3])

    # the final evaluation's block: the last step's scores (those weights were scored there), not generated again
    last = scored[-1]
    assert summary["eval"]["exact_match"] == last["eval_exact_match"]
    assert summary["eval"]["token_f1"] == last["eval_token_f1"] and summary["eval"]["exact_match_n"] == 3


def test_scoring_leaves_a_training_model_as_it_was():
    from fusetune.fast_model import FastModel

    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", dtype=torch.float32, random_init=True)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=True, random_state=random.randrange(99))
    model.train()
    base_model(model).config.use_cache = False
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    side = tokenizer.padding_side
    pairs = [(f"{a} + {b} =", str(a + b)) for a, b in ((random.randrange(50), random.randrange(50)) for _ in range(3))]

    scores = score_generations(model, tokenizer, pairs, max_new_tokens=4)

    assert scores.count == 3 and 0.0 <= scores.exact_match <= 1.0 and scores.seconds > 0
    assert len(scores.samples) == 3 and tokenizer.padding_side == side
    assert model.training and base_model(model).config.use_cache is False
    assert checkpointing(model) and is_applied(model)
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys() and any("lora_" in n for n in after)
    assert all(torch.equal(before[n], after[n]) for n in after)
