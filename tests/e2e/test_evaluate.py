"""score_generations generates from the same token ids that TRL trained on, with BOS where TRL puts one."""

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from fusetune.evaluate import score_generations
from fusetune.loading import load_model, load_tokenizer


@pytest.fixture
def bos_tokenizer():
    """The tiny tokenizer, made to add BOS the way Llama 3's does."""
    tokenizer = load_tokenizer("fusetune:tiny_llama")
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    assert tokenizer("ab")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


def generation_inputs(model, tokenizer, pairs) -> list[list[int]]:
    """The unpadded prompt ids that score_generations hands to generate()."""
    seen = []
    generate = model.generate

    def recording(**kwargs):
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"], strict=True):
            seen.append(ids[mask.bool()].tolist())
        return generate(**kwargs)

    model.generate = recording
    score_generations(model, tokenizer, pairs, max_new_tokens=2)
    return seen


def test_plain_and_chat_prompts_get_trls_token_ids(bos_tokenizer):
    torch.manual_seed(0)
    model = load_model("fusetune:tiny_llama", torch.float32, random_init=True)
    plain = [("2+2=", "4"), ("capital of France:", "Paris")]
    # TRL tokenizes a plain prompt with the tokenizer's special tokens: BOS first.
    assert generation_inputs(model, bos_tokenizer, plain) == [bos_tokenizer(p)["input_ids"] for p, _ in plain]
    messages = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "2+2?"}]]
    chat = [(bos_tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True), "x") for m in messages]
    # A chat prompt carries the template's BOS: exactly one, as in apply_chat_template(tokenize=True).
    expected = [bos_tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True) for m in messages]
    expected = [list(e["input_ids"]) if hasattr(e, "keys") else list(e) for e in expected]
    assert generation_inputs(model, bos_tokenizer, chat) == expected
    assert all(ids.count(bos_tokenizer.bos_token_id) == 1 for ids in expected)
