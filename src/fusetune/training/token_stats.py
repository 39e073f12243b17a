"""TRL's per-step metrics without a host sync per step: the sums wait on the device until the trainer logs.

TRL's own compute_loss reads entropy, token accuracy and token counts on the host every micro-batch,
which stalls the CPU at the end of each forward until the GPU catches up. ``TokenStats`` keeps each
micro-batch's sums (from the fused loss head's ``TokenStatsOutput``) on the device, and ``flush``
moves them all into TRL's metric lists at once: one host read, and one all-reduce across processes.
"""

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..compat.trl import add_trained_tokens, metric_lists, tensor_parallel_size, trained_tokens

FLUSH_EVERY = 256  # micro-batches of pending metrics before they are read anyway (when logging is rare)


@dataclass
class StepStats:
    """One micro-batch's metric sums, left on the device until the trainer logs."""

    entropy_sum: torch.Tensor
    num_correct: torch.Tensor
    num_valid: int | torch.Tensor
    num_tokens: int | torch.Tensor  # 0 in eval
    aux_loss: torch.Tensor | None = None  # the router's load-balancing loss (MoE models that return it)


def batch_tokens(inputs: dict) -> int | torch.Tensor:
    """The batch's tokens as TRL counts them for ``num_tokens``: the attention mask's sum (a device
    tensor, not read here), else the padding-free row's length."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    if "position_ids" in inputs:
        return inputs["position_ids"].size(1)
    raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")


def _number(value) -> float:
    """A count known on the host, or 0 where it is still a device tensor (filled in on the device)."""
    return 0.0 if isinstance(value, torch.Tensor) else float(value)


class TokenStats:
    """Pending ``StepStats`` per mode ("train", "eval"), and the one read that turns them into TRL's metrics."""

    def __init__(self, flush_every: int = FLUSH_EVERY):
        self.flush_every = flush_every
        self.pending: dict[str, list[StepStats]] = defaultdict(list)

    def add(self, trainer, mode: str, stats: StepStats) -> None:
        """Keep ``stats`` on the device; past ``flush_every`` pending micro-batches, flush them all."""
        pending = self.pending[mode]
        pending.append(stats)
        if len(pending) >= self.flush_every:
            self.flush(trainer)

    def flush(self, trainer) -> None:
        """Move the pending sums into the trainer's TRL metric lists: one host read (and one all-reduce)."""
        for mode, pending in self.pending.items():
            if not pending:
                continue
            device = pending[0].entropy_sum.device
            table = torch.tensor(
                [[0.0, 0.0, _number(p.num_valid), _number(p.num_tokens), 0.0] for p in pending],
                dtype=torch.float64,
                device=device,
            )
            table[:, 0] = torch.stack([p.entropy_sum for p in pending])
            has_aux = all(p.aux_loss is not None for p in pending)
            if has_aux:
                table[:, 4] = torch.stack([p.aux_loss.detach().double() for p in pending])
            table[:, 1] = torch.stack([p.num_correct for p in pending])
            for column, field_name in ((2, "num_valid"), (3, "num_tokens")):
                # still on the device: graphed steps' label counts, padded batches' attention_mask sums
                on_device = [i for i, p in enumerate(pending) if isinstance(getattr(p, field_name), torch.Tensor)]
                if on_device:
                    table[on_device, column] = torch.stack(
                        [getattr(pending[i], field_name) for i in on_device]
                    ).double()
            pending.clear()
            metrics = metric_lists(trainer, mode)
            tp_size = tensor_parallel_size(trainer)
            processes = trainer.accelerator.num_processes
            reduced = trainer.accelerator.reduce(table, reduction="sum").tolist()
            for entropy_sum, correct, n_valid, tokens, aux in reduced:
                if has_aux:  # as TRL logs it: the mean over processes, per micro-batch
                    metrics["aux_loss"].append(aux / processes)
                metrics["entropy"].append(entropy_sum / n_valid if n_valid > 0 else 0.0)
                metrics["mean_token_accuracy"].append(correct / n_valid if n_valid > 0 else 0.0)
                add_trained_tokens(trainer, int(tokens) // tp_size)
            metrics["num_tokens"] = [trained_tokens(trainer)]
