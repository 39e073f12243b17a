"""What the LoRA patch tests share: PEFT adapters that matter, a count of fused-node calls, loss and gradients."""

import torch

from fusetune import forwards
from fusetune.patching import remove_kernels

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_lora_b(model) -> None:
    """B starts at zero in PEFT: make the adapters matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


def count_fused(monkeypatch, backend: str, op: str = "lora_linear") -> list:
    """Calls of ``backend``'s ``op`` by the forwards patched from now on (one entry per call). Patches an earlier
    test left in place hold the uncounted op, so they are removed first."""
    remove_kernels()
    calls = []
    ops = forwards.OPS[backend]
    original = getattr(ops, op)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setitem(forwards.OPS, backend, forwards.Ops(**{**ops.__dict__, op: counted}))
    return calls


def loss_and_grads(model, inputs):
    model.zero_grad()
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
