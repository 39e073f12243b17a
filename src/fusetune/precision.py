"""Precision of each part of a LoRA model on a quantized (4-bit or 8-bit) base.

- **Frozen weights that are not quantized** (embeddings, norms, lm_head, biases) stay in the
  compute dtype. PEFT's ``prepare_model_for_kbit_training`` upcasts them to fp32; then the hidden
  states enter every layer in fp32, every projection runs an fp32 GEMM and attention falls back
  to SDPA's math kernel, a step several times slower (bench/NOTES.md has the timings).
- **Hidden states enter every layer in the compute dtype**: where the input embedding trains in
  fp32, its output is cast on the way out.
- **Trainable weights are fp32 master weights**: the LoRA factors (a few MB; the fused LoRA nodes
  cast them to the compute dtype for the products, and write their gradients in fp32) and full
  ``modules_to_save`` copies of embed_tokens / lm_head. TRL casts every trainable parameter of a
  quantized model to bf16 (the QLoRA paper's choice); at embedding_learning_rate 5e-5 most bf16
  updates of an embedding round to nothing, so fusetune keeps fp32. The fused loss head computes
  in the hidden states' dtype with a cast of lm_head, and its gradient reaches the fp32 weight.
- The optimizer states follow the trainable weights (fp32, or 8-bit with ``adamw_8bit``, where the
  trainer keeps embedding states in 32 bits).
"""

import logging

import torch
from torch import nn

from .modules import base_model
from .state import peek

log = logging.getLogger(__name__)


def model_compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in: as loaded by FastModel, else the quantization config's."""
    base = base_model(model)
    recorded = peek(base).compute_dtype
    if recorded is not None:
        return recorded
    quantization = getattr(base.config, "quantization_config", None)
    dtype = getattr(quantization, "bnb_4bit_compute_dtype", None) if quantization is not None else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return dtype or base.dtype


def prepare_quantized(model, dtype: torch.dtype, gradient_checkpointing: bool) -> nn.Module:
    """Freeze the base, keep its unquantized weights in ``dtype``, and set up checkpointing.

    What PEFT's k-bit preparation does, without its upcast of the unquantized weights to fp32.
    """
    for param in model.parameters():
        param.requires_grad = False
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    if gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def fp32_master_weights(model) -> list[str]:
    """Trainable parameters in a lower precision become fp32; returns their names."""
    changed = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            changed.append(name)
    return changed


def _cast_output(dtype: torch.dtype):
    def hook(module, args, output):
        return output.to(dtype) if output.is_floating_point() and output.dtype != dtype else output

    return hook


def hidden_states_in(model, dtype: torch.dtype) -> None:
    """Cast the input embedding's output to ``dtype`` (once per model), so layers compute in it."""
    embedding = base_model(model).get_input_embeddings()
    if getattr(embedding, "_fusetune_cast_to", None) == dtype:
        return
    if getattr(embedding, "_fusetune_cast_hook", None) is not None:
        embedding._fusetune_cast_hook.remove()
    embedding._fusetune_cast_hook = embedding.register_forward_hook(_cast_output(dtype))
    embedding._fusetune_cast_to = dtype
