"""What a causal LM is made of, as the library names it: one copy of each rule.

- ``PROJECTIONS``: the attention and MLP projections LoRA targets by default.
- ``EXPERT_PARAMETERS``: the 3-D parameters of routed experts LoRA targets by default where fusetune's
  expert kernel computes them (``target_parameters``; the router stays frozen).
- ``EMBEDDINGS``: the input and output embeddings (trained in full through ``modules_to_save``).
- ``base_model(m)``: the transformers model under a PEFT wrapper (or ``m`` itself).
- ``is_quantized(m)``: loaded in 4 or 8 bits by bitsandbytes.
"""

from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
EMBEDDINGS = ("embed_tokens", "lm_head")


def base_model(model) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_quantized(model) -> bool:
    base = base_model(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))
