"""The profiled model, built as FastModel builds it, and the documents it trains on."""

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from fusetune import FastModel
from fusetune.patching import apply_kernels, remove_kernels
from fusetune.sequences import varlen

from . import BACKENDS, TINY, Setup


def make_documents(n: int, docs: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[dict]]:
    """``n`` steps of ``docs`` tokenized documents each, with new random lengths every step."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n):
        lengths = torch.randint(min_len, max_len + 1, (docs,), generator=g).tolist()
        steps.append([{"input_ids": torch.randint(0, vocab, (n_tok,), generator=g).tolist()} for n_tok in lengths])
    return steps


def make_batches(steps: list[list[dict]]) -> list[dict]:
    """Padding-free batches from TRL's own collator (position_ids, cu_seq_lens, max_length)."""
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return [collate(examples) for examples in steps]


def build(setup: Setup, backend: str, device: torch.device, dtype: torch.dtype):
    """(model with LoRA, tokenizer, attention implementation) for ``backend``.

    ``FastModel.from_pretrained`` and ``FastModel.get_peft_model`` build it, so the step profiled is the
    one fusetune trains: its kernels, its LoRA targets, and its own checkpointing for
    ``setup.gradient_checkpointing``. Two switches FastModel does not offer are set after loading:
    ``kernels="none"`` (the model's own modules) and PEFT's own LoRA forward (``varlen_peft_lora``).
    The tokenizer is the tiny Llama's for every model: the documents are token ids already, and it
    gives the trainer its pad and eos tokens.
    """
    attention, fused_lora, _ = BACKENDS[backend]
    torch.manual_seed(setup.seed)  # the same random weights for every backend
    with device:  # initialise the random weights where they will live
        model, tokenizer = FastModel.from_pretrained(
            setup.model,
            max_seq_length=setup.max_len,
            dtype=dtype,
            kernels="reference" if setup.kernels == "none" else setup.kernels,
            random_init=True,
            tokenizer_name=TINY,
            attn_implementation=backend if attention is None else None,
        )
    if setup.kernels == "none" or not fused_lora:
        remove_kernels()
        apply_kernels(model, setup.kernels, lora=fused_lora)
    model = FastModel.get_peft_model(
        model,
        r=setup.lora_r,
        lora_alpha=2 * setup.lora_r,
        lora_dropout=0.0,
        use_gradient_checkpointing=setup.gradient_checkpointing,
        random_state=setup.seed,
    )
    attn = backend if attention is None else varlen.enable_varlen_attention(model, attention)
    model.train()
    return model, tokenizer, attn


def adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Unpatch, and hand the GPU's cached blocks back, so that the next build starts as this one did."""
    remove_kernels()
    if device.type == "cuda":
        torch.cuda.empty_cache()
