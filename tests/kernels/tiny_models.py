"""Tiny random models of each supported family, for patching and convergence tests."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Small but awkward: hidden and intermediate sizes that are not powers of two, GQA, odd vocab.
COMMON = dict(
    hidden_size=96,
    intermediate_size=136,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=301,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
EXTRA = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "gemma": {"hidden_activation": "gelu_pytorch_tanh"},
    "gemma2": {
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "query_pre_attn_scalar": 16,
        "sliding_window": 64,
    },
}
FAMILIES = list(EXTRA)


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    config = AutoConfig.for_model(family, **{**COMMON, **EXTRA[family], **overrides})
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # norms start at 1 (0 for Gemma): perturb them so their gradients matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(vocab: int, rows: int = 2, length: int = 13, packed: bool = False, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = input_ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    out = {"input_ids": input_ids, "labels": labels}
    if packed:  # positions restart at each document
        out["position_ids"] = torch.cat([torch.arange(5), torch.arange(length - 5)]).repeat(rows, 1)
    return out
