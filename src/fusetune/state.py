"""What fusetune did to a model, in one place: ``FusetuneState`` on the base model (``modules.base_model``).

One attribute (``fusetune_state``) holds it, so that a PEFT wrapper, the trainer, saving and merging all read
the same record. ``state_of`` is for writing (it attaches a state on first use); ``peek`` is for reading and
attaches nothing: a model fusetune never touched reads as an empty state."""

from dataclasses import dataclass, field

import torch

from .modules import base_model

ATTRIBUTE = "fusetune_state"


@dataclass
class FusetuneState:
    backend: str | None = None  # the kernels it was patched with: "triton", "reference", or "none" (unpatched)
    compute_dtype: torch.dtype | None = None  # the dtype FastModel loaded it to compute in
    hub: dict = field(default_factory=dict)  # revision and trust_remote_code it was loaded with (never a token)
    checkpointing: bool | str | None = None  # use_gradient_checkpointing given at load, for get_peft_model
    fp8_base: bool = False  # the LoRA-wrapped projections hold (or go to) e4m3 weights


def state_of(model) -> FusetuneState:
    """The model's state, created empty on first use."""
    base = base_model(model)
    state = base.__dict__.get(ATTRIBUTE)
    if state is None:
        state = FusetuneState()
        base.__dict__[ATTRIBUTE] = state  # a plain attribute: nn.Module's __setattr__ would look for modules
    return state


def peek(model) -> FusetuneState:
    """The model's state, or an empty one (not attached) where fusetune has not touched it."""
    return base_model(model).__dict__.get(ATTRIBUTE) or FusetuneState()
