"""Greedy generation on held-out prompts, scored by exact match and token F1; after training and while it runs.

``score_generations`` uses the model in place (no copy; LoRA adapters stay): evaluation mode and the KV cache on
for ``generate()``, then both back as they were, so training (and its gradient checkpointing, which only acts in
training mode) goes on unchanged. ``GenerationEval`` calls it every time the Trainer evaluates during training
and logs the scores through the Trainer, so that every logger and metrics.jsonl get them.
"""

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from .modules import base_model

log = logging.getLogger(__name__)


def token_f1(answer: str, expected: str) -> float:
    """SQuAD-style F1 of the whitespace tokens of ``answer`` against ``expected``: each shared token counts as
    often as it occurs in both (a bag of tokens, order ignored); precision over the answer's tokens, recall over the
    expected ones. Tokens are compared as they are (case and punctuation count, as in exact match). Both empty: 1.0;
    one empty: 0.0."""
    got, want = answer.split(), expected.split()
    if not got or not want:
        return float(got == want)
    shared = sum((Counter(got) & Counter(want)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(got), shared / len(want)
    return 2 * precision * recall / (precision + recall)


@dataclass
class GenerationScores:
    exact_match: float  # the fraction of prompts whose greedy answer, stripped, equals the expected one
    token_f1: float | None  # the mean token F1 over the prompts with a reference answer (one with a token); else None
    count: int  # prompts answered
    seconds: float  # wall time of the generation and scoring
    samples: list[dict] = field(default_factory=list)  # the first few prompts, expected and given answers

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The scores as logged numbers: exact_match, token_f1 (where defined), generation_seconds."""
        values = {"exact_match": self.exact_match, "token_f1": self.token_f1, "generation_seconds": self.seconds}
        return {f"{prefix}{k}": v for k, v in values.items() if v is not None}


@torch.no_grad()
def score_generations(
    model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32, max_new_tokens: int = 32
) -> GenerationScores | None:
    """Greedy answers to ``pairs`` (prompt, expected answer), scored; None for no pairs. The model's training mode
    and its config's ``use_cache`` are restored afterwards."""
    if not pairs:
        return None
    started = time.perf_counter()
    log.info("exact match: generating greedy answers to %d held-out prompts", len(pairs))
    config = base_model(model).config
    was_training, side = model.training, tokenizer.padding_side
    had_cache, cache = hasattr(config, "use_cache"), getattr(config, "use_cache", None)
    model.eval()
    config.use_cache = True  # training turns it off; generation wants its KV cache
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    correct, f1s, samples = 0, [], []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            prompts = [p for p, _ in chunk]
            batch = tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=_adds_specials(tokenizer, prompts)
            )
            batch = batch.to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for (prompt, expected), answer in zip(chunk, answers, strict=True):
                correct += answer.strip() == expected.strip()
                if expected.split():
                    f1s.append(token_f1(answer, expected))
                if len(samples) < 5:
                    samples.append({"prompt": prompt, "expected": expected, "answer": answer.strip()})
    finally:
        tokenizer.padding_side = side
        if had_cache:
            config.use_cache = cache
        else:
            del config.use_cache
        model.train(was_training)
    seconds = time.perf_counter() - started  # the answers were decoded on the host: the device has finished
    f1 = sum(f1s) / len(f1s) if f1s else None
    return GenerationScores(correct / len(pairs), f1, len(pairs), seconds, samples)


def _adds_specials(tokenizer, prompts: list[str]) -> bool:
    """Whether to add the tokenizer's special tokens to these prompts, as TRL did in training.

    TRL tokenizes a plain prompt with the tokenizer's special tokens, so Llama 3 gets its BOS. A prompt
    rendered by a chat template starts with the template's own BOS text, and adding another would
    double it.
    """
    bos = tokenizer.bos_token
    return not (bos and all(p.startswith(bos) for p in prompts))


class GenerationEval(TrainerCallback):
    """Scores the held-out generation prompts each time the Trainer evaluates during training (eval_steps) and
    logs ``eval_exact_match``, ``eval_token_f1`` and ``eval_generation_seconds`` through ``trainer.log``: HF calls
    ``on_evaluate`` after it has logged the eval loss, so values only added to its metrics would reach no logger.
    They are added to those metrics too, so ``metric_for_best_model=eval_exact_match`` can pick a checkpoint.
    An evaluation after training (run()'s final one) is not this callback's: ``last`` keeps the scores of the last
    step scored, which that final evaluation reuses when no step has trained since.

    Nothing is generated where ``pairs`` is empty (data.num_generate=0, or a rank other than 0)."""

    PREFIX = "eval_"

    def __init__(self, trainer, tokenizer, pairs: list[tuple[str, str]]):
        self.trainer, self.tokenizer, self.pairs = trainer, tokenizer, pairs
        self.training = False
        self.last: tuple[int, GenerationScores] | None = None  # (step, scores)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self.training or not self.pairs:
            return
        model = model if model is not None else self.trainer.model
        was_training = model.training
        scores = score_generations(model, self.tokenizer, self.pairs)
        self.last = (state.global_step, scores)
        values = scores.metrics(self.PREFIX)
        if metrics is not None:
            metrics.update(values)
        model.eval()  # TRL's log reads the mode: the train metrics gathered since the last log stay for their line
        try:
            self.trainer.log(dict(values))
        finally:
            model.train(was_training)

    def scores_at(self, step: int) -> GenerationScores | None:
        """The scores taken at ``step``, if this callback took them there."""
        return self.last[1] if self.last is not None and self.last[0] == step else None
