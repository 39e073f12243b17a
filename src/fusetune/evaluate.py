"""Greedy generation on held-out prompts, scored by exact match."""

import logging

import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32, max_new_tokens: int = 32):
    """Fraction of prompts whose greedy answer, stripped, equals the expected one; plus a few samples."""
    if not pairs:
        return None, []
    log.info("exact match: generating greedy answers to %d held-out prompts", len(pairs))
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    correct, samples = 0, []
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
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for (prompt, expected), answer in zip(chunk, answers, strict=True):
                correct += answer.strip() == expected.strip()
                if len(samples) < 5:
                    samples.append({"prompt": prompt, "expected": expected, "answer": answer.strip()})
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / len(pairs), samples


def _adds_specials(tokenizer, prompts: list[str]) -> bool:
    """Whether to add the tokenizer's special tokens to these prompts, as TRL did in training.

    TRL tokenizes a plain prompt with the tokenizer's special tokens, so Llama 3 gets its BOS. A prompt
    rendered by a chat template starts with the template's own BOS text, and adding another would
    double it.
    """
    bos = tokenizer.bos_token
    return not (bos and all(p.startswith(bos) for p in prompts))
