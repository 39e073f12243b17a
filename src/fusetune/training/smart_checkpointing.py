"""Smart activation checkpointing: as many decoder layers as a memory budget allows keep their activations
(no recompute); the rest are checkpointed, their inputs offloaded to pinned CPU memory (or kept on the
device where offloading is not possible) and recomputed in the backward.

The plan rests on a model of a training step's peak allocation, for ``T`` tokens and ``k`` kept layers::

    peak(k, T) = start + T * (base + k * extra)

- ``start``: what is allocated when the first layer is called (weights, optimizer state, gradients);
  read at every step.
- ``base``: the per-token peak above ``start`` of a step, kept layers aside. Read after each backward
  from CUDA's peak statistic (never reset here, so each reading is an upper bound: the peak since the
  last reset may be older than this step); the least reading so far is used. Until the first step has
  been measured, every layer is checkpointed: the first step is the all-offload plan.
- ``extra``: what keeping one layer adds per token. Measured on each new batch shape by running the
  first layer once more, eagerly, with saved-tensor hooks counting the unique storages it saves for
  backward (the parameters excluded), less what a checkpointed layer holds on the device (its input,
  when it is not offloaded). Every layer is taken to save what the first one saves.

The plan is the largest ``k`` with ``peak(k, T) <= budget - margin`` (the margin covers the caching
allocator's fragmentation and the per-token model's error; ``MARGIN``). The first ``k`` layers are kept.
It is re-planned on every step from that step's tokens (rounded up to 1/8 of an octave, so that
padding-free batches do not change the plan at every step), so a longer batch keeps fewer layers.
Where even the all-checkpointed step is predicted past the budget, it says so once and trains with
every layer checkpointed, which is the seeds' ``"unsloth"`` plan: it never plans worse than that.

Each plan change is logged in one line, e.g. "smart checkpointing: 19 of 32 layers kept, 13
offloaded, budget 22.0 GiB (predicted peak 20.3 GiB at 16,384 tokens a step)".

Gradients are those of full checkpointing: a kept layer runs the same forward once instead of twice.
While a CUDA graph is being captured nothing is measured and the plan for the batch's tokens is used
as it stands (the graph replays it).
"""

import logging
import math
from dataclasses import dataclass

import torch

from fusetune_kernels.offloaded_checkpoint import enable_checkpointing, offloads_on

log = logging.getLogger(__name__)

GIB = 1 << 30
MARGIN = (0.08, 1 * GIB)  # planned peak at most budget * (1 - 0.08), and at least 1 GiB under it
TOKEN_STEPS_PER_OCTAVE = 8


def rounded_tokens(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of 1/8 of the power of two below it."""
    if tokens <= TOKEN_STEPS_PER_OCTAVE:
        return max(tokens, 1)
    step = (1 << (tokens.bit_length() - 1)) // TOKEN_STEPS_PER_OCTAVE
    return -(-tokens // step) * step


def usable(budget: int, margin: tuple[float, int] = MARGIN) -> int:
    """The peak a plan may reach under ``budget`` bytes: less a fraction of it, and at least a number of
    bytes (at most half the budget)."""
    fraction, least = margin
    return budget - max(int(budget * fraction), min(least, budget // 2))


def kept_layers(layers: int, tokens: int, start: int, base: float, extra: float, limit: int) -> int:
    """The most layers (0 to ``layers``) that may keep their activations with
    ``start + tokens * (base + kept * extra) <= limit``."""
    room = limit - start - tokens * base
    if room < 0:
        return 0
    if extra <= 0:
        return layers
    return min(layers, int(room // (tokens * extra)))


def resolve_budget(memory_budget: float | None, device: torch.device) -> int:
    """Bytes: ``memory_budget`` in GiB (> 1) or as a fraction of the device's memory (<= 1); None: what
    this process may use of the device (its memory fraction), less what other processes hold."""
    total = torch.cuda.get_device_properties(device).total_memory
    if memory_budget is not None:
        if not memory_budget > 0:
            raise ValueError(
                f"memory_budget: expected GiB (> 1) or a fraction of the device (0 to 1], got {memory_budget}"
            )
        return int(memory_budget * total) if memory_budget <= 1 else int(memory_budget * GIB)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(total * fraction, free + torch.cuda.memory_reserved(device)))


class SavedBytes:
    """Saved-tensor hooks that count the bytes of the unique storages saved for backward (parameters
    excluded), while they are alive: ``allocated()`` now, ``peak()`` the most so far."""

    def __init__(self, model: torch.nn.Module):
        self.excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [holders, bytes]
        self.bytes = self.most = 0
        self._hooks = None

    def allocated(self) -> int:
        return self.bytes

    def peak(self) -> int:
        return self.most

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or tensor.device.type == "meta":
            return tensor
        entry = self.live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.most = max(self.most, self.bytes)
        entry[0] += 1
        return _Held(tensor, key, self)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[key]

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Held:
    __slots__ = ("tensor", "key", "counter")

    def __init__(self, tensor, key, counter):
        self.tensor, self.key, self.counter = tensor, key, counter

    def __del__(self):
        self.counter._release(self.key)


def _unpack(packed):
    return packed.tensor if isinstance(packed, _Held) else packed


class DeviceMemory:
    """The CUDA caching allocator's statistics for one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


@dataclass
class Plan:
    kept: int
    layers: int
    tokens: int
    predicted: int | None  # bytes; None before the first step is measured
    budget: int
    rest: str  # "offloaded" or "recomputed"

    def line(self) -> str:
        parts = [f"{self.kept} of {self.layers} layers kept"]
        if self.kept < self.layers:
            parts.append(f"{self.layers - self.kept} {self.rest}")
        text = f"smart checkpointing: {', '.join(parts)}, budget {self.budget / GIB:.1f} GiB"
        if self.predicted is None:
            return text + f" (first step at {self.tokens:,} tokens: measuring)"
        return text + f" (predicted peak {self.predicted / GIB:.1f} GiB at {self.tokens:,} tokens a step)"


class SmartCheckpointing:
    """The planner: bound to a model's ``LayerCheckpoint`` objects, it sets their modes before each
    training forward (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, budget: int, memory, offload: bool, margin=MARGIN):
        self.model, self.budget, self.memory, self.margin = model, budget, memory, margin
        self.fallback = "offload" if offload else "recompute"
        self.checkpoints: list = []
        self.base: float | None = None  # bytes per token
        self.extra: dict[tuple, float] = {}  # bytes per token per kept layer, by batch shape
        self.plan: Plan | None = None
        self.warned = False
        self._step = None  # (start, tokens, kept, extra) of the step whose backward is pending

    def describe(self) -> str:
        rest = "offloaded" if self.fallback == "offload" else "recomputed"
        return f"smart checkpointing within {self.budget / GIB:.1f} GiB (layers kept, or {rest})"

    def bind(self, checkpoints: list) -> None:
        for checkpoint in self.checkpoints:
            checkpoint.observer = None
        self.checkpoints = list(checkpoints)
        if self.checkpoints:
            self.checkpoints[0].observer = self._before_first_layer

    # --- per step -----------------------------------------------------------------------------

    def _before_first_layer(self, checkpoint, function, args, kwargs) -> None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
            return
        hidden = args[0]
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        tokens = hidden.shape[:-1].numel()
        shape = tuple(hidden.shape)
        if shape not in self.extra and not capturing:
            self.extra[shape] = self._measure_extra(function, args, kwargs, hidden)
        extra = self.extra.get(shape, max(self.extra.values(), default=math.inf))
        start = self.memory.allocated()
        self._apply(self._plan(start, rounded_tokens(tokens), extra))
        if not capturing:
            self._step = (start, tokens, self.plan.kept, extra)
            self._after_backward_hook(hidden)

    def _measure_extra(self, function, args, kwargs, hidden) -> float:
        """Bytes per token that keeping one layer adds: what the first layer saves for backward, run once
        more on this batch, less the input a checkpointed layer holds on the device."""
        devices = [hidden.device] if hidden.is_cuda else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"), torch.enable_grad():
            with SavedBytes(self.model) as saved:
                output = function(*args, **kwargs)
            del output
        tokens = hidden.shape[:-1].numel()
        held = 0 if self.fallback == "offload" else hidden.element_size() * hidden.shape[-1]
        return max(saved.peak() / tokens - held, 0.0)

    def _after_backward_hook(self, hidden: torch.Tensor) -> None:
        """Read the peak once the whole backward has run (a hook on the first layer's input gradient,
        or failing that its output's, queues a callback for the end of the backward)."""
        if not hidden.requires_grad:
            return  # nothing to hook: the plan keeps the base it has

        def hook(grad):
            torch.autograd.Variable._execution_engine.queue_callback(self._observe)

        hidden.register_hook(hook)

    def _observe(self) -> None:
        if self._step is None:
            return
        start, tokens, kept, extra = self._step
        self._step = None
        base = (self.memory.peak() - start) / tokens - kept * extra
        if self.base is None or base < self.base:
            self.base = max(base, 0.0)

    def _plan(self, start: int, tokens: int, extra: float) -> Plan:
        layers = len(self.checkpoints)
        rest = "offloaded" if self.fallback == "offload" else "recomputed"
        if self.base is None:
            return Plan(0, layers, tokens, None, self.budget, rest)
        limit = usable(self.budget, self.margin)
        kept = kept_layers(layers, tokens, start, self.base, extra, limit) if math.isfinite(extra) else 0
        predicted = int(start + tokens * (self.base + (kept * extra if kept else 0.0)))
        if predicted > limit and not self.warned:
            self.warned = True
            log.warning(
                "smart checkpointing: with every layer checkpointed a step of %s tokens is predicted to peak at "
                "%.1f GiB, over the %.1f GiB the budget of %.1f GiB leaves; training on with every layer checkpointed",
                f"{tokens:,}",
                predicted / GIB,
                limit / GIB,
                self.budget / GIB,
            )
        return Plan(kept, layers, tokens, predicted, self.budget, rest)

    def _apply(self, plan: Plan) -> None:
        for index, checkpoint in enumerate(self.checkpoints):
            checkpoint.mode = "keep" if index < plan.kept else self.fallback
        if self.plan is None or (plan.kept, plan.predicted is None) != (self.plan.kept, self.plan.predicted is None):
            log.info(plan.line())
        self.plan = plan


def enable_smart_checkpointing(model, memory_budget: float | None = None, memory=None, margin=MARGIN) -> str:
    """Smart checkpointing on a transformers causal LM or a PEFT model wrapping one, within ``memory_budget``
    (GiB, or a fraction of the device's memory; None: what is free for this process). Returns what it
    did, in words. ``memory``: what reads the allocation (``allocated()``, ``peak()``); CUDA's by default.
    ``margin``: (fraction, bytes) of the budget left unplanned (``usable``).
    Without CUDA (and no ``memory`` given) it falls back to plain checkpointing and says why."""
    device = next(iter(model.parameters())).device
    if memory is None:
        if device.type != "cuda":  # the description says why
            return f"smart checkpointing needs a CUDA device to measure memory; {enable_checkpointing(model)}"
        memory = DeviceMemory(device)
        budget = resolve_budget(memory_budget, device)
    else:
        budget = int(memory_budget * GIB) if memory_budget is not None else None
        if budget is None:
            raise ValueError("enable_smart_checkpointing: a memory_budget is needed with a memory reader")
    planner = SmartCheckpointing(model, budget, memory, offloads_on(device), margin)
    return enable_checkpointing(model, offload=True, planner=planner)
