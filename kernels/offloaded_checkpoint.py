"""Offloaded activation checkpointing: each layer's saved input lives in pinned CPU memory, not on the GPU.

Under plain checkpointing every decoder layer keeps its input [batch, seq, hidden] from the forward to the
backward, the memory that dominates at long sequences. Here that input is copied to the host on a side stream
during the forward and prefetched back one layer ahead in the backward, so the GPU holds two such buffers
instead of one per layer. It is torch's own non-reentrant checkpoint with a saved-tensor hook pair around it,
so gradients equal plain checkpointing's and DDP sees one ordinary backward. ``LayerCheckpoint`` marks each
layer's recompute (``recomputing()``), so a layer can skip an output the recompute never reads. Without CUDA
it is plain checkpointing. The design, its memory traffic and its limits: kernels/README.md.
"""

import functools
import inspect
import logging
import threading
import weakref

import torch
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

# CPU tensors take the offload path, "offloaded" to a separate CPU copy synchronously (tests switch it with
# fusetune.testing.set_cpu_simulation).
_simulate_on_cpu = False
_streams: dict[torch.device, "torch.cuda.Stream"] = {}
_chain = threading.local()  # .last: weakref to the entry packed most recently in this thread
_recompute = threading.local()  # .layer: the layer whose forward is being re-run for backward
# Counts of offloads (D2H), fetches (unpacks) and prefetches issued, for tests and benchmarks.
stats = {"offloaded": 0, "fetched": 0, "prefetched": 0}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)
    return stream


def offloads_on(device: torch.device) -> bool:
    """Whether ``enable_checkpointing(..., offload=True)`` offloads for a model on ``device``."""
    return device.type == "cuda" or (_simulate_on_cpu and device.type == "cpu")


def _offloadable(tensor: torch.Tensor) -> bool:
    if tensor.is_cuda:  # not while a CUDA graph is captured: host copies and stream bookkeeping do not replay
        return not torch.cuda.is_current_stream_capturing()
    return _simulate_on_cpu and tensor.device.type == "cpu"


class _Offloaded:
    """One layer input held on the host, fetched back to its device for the recompute."""

    __slots__ = ("host", "device", "stream", "staged", "previous", "source", "version", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.source, self.version = weakref.ref(tensor), tensor._version  # the version counter is shared
        tensor = tensor.detach()
        self.device = tensor.device
        self.staged = None  # (device tensor, copy-in event or None) once fetched ahead of time
        last = getattr(_chain, "last", None)
        self.previous = last  # the entry packed just before this one: the layer below, in a model
        _chain.last = weakref.ref(self)
        if tensor.is_cuda:
            self.stream = _side_stream(tensor.device)
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # h_i is written
            with torch.cuda.stream(self.stream):
                self.host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
                self.host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # its block is not reused before the copy is done
        else:  # CPU simulation: same bookkeeping, synchronous copies
            self.stream = None
            self.host = tensor.clone(memory_format=torch.contiguous_format)
        stats["offloaded"] += 1

    def prefetch(self) -> None:
        """Queue the copy back to the device (once); the compute stream does not wait for it yet."""
        if self.staged is not None:
            return
        if self.stream is None:
            self.staged = (self.host.clone(), None)
            return
        with torch.cuda.stream(self.stream):
            # Queued on the side stream after this input's own D2H, so it reads a complete host copy.
            device_copy = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            device_copy.copy_(self.host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.staged = (device_copy, event)

    def fetch(self) -> torch.Tensor:
        """The input back on its device, ready on the current stream; then prefetch the layer below."""
        source = self.source()
        if source is not None and source._version != self.version:
            raise RuntimeError(
                "offloaded_checkpoint: a layer's input was modified in place after its forward; "
                "the recompute would see different values"
            )
        self.prefetch()
        device_copy, event = self.staged
        self.staged = None  # the recompute owns it now; a second backward fetches again
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            device_copy.record_stream(compute)  # allocated on the side stream, used on this one
        stats["fetched"] += 1
        previous = self.previous() if self.previous is not None else None
        if previous is not None and previous.device == self.device and previous.staged is None:
            previous.prefetch()
            stats["prefetched"] += 1
        return device_copy


def _identity(tensor: torch.Tensor) -> tuple:
    """What tells a saved tensor is the layer input (the hooks see it as another Python object)."""
    return tensor.device, tensor.dtype, tensor.shape, tensor.stride(), tensor.data_ptr()


def _unpack(packed):
    return packed.fetch() if isinstance(packed, _Offloaded) else packed


def _non_reentrant(kwargs: dict) -> dict:
    if kwargs.pop("use_reentrant", False):
        raise ValueError("offloaded_checkpoint is non-reentrant; use_reentrant=True is not supported")
    return kwargs


def offloaded_checkpoint(function, *args, **kwargs):
    """``checkpoint(function, *args, use_reentrant=False, **kwargs)``, with the first positional tensor
    argument held in pinned host memory between the forward and the recompute (CUDA tensors only;
    anything else runs as plain non-reentrant checkpointing)."""
    kwargs = _non_reentrant(kwargs)
    target = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if target is None or not torch.is_grad_enabled() or not _offloadable(target):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)

    # Autograd keeps the hooks as long as the graph: they must not hold the input, or it stays on the GPU.
    key = _identity(target)
    del target

    def pack(tensor):
        return _Offloaded(tensor) if _identity(tensor) == key else tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def checkpoint_reference(function, *args, **kwargs):
    """The twin: torch's plain non-reentrant checkpoint, the input saved on its device."""
    return checkpoint(function, *args, use_reentrant=False, **_non_reentrant(kwargs))


def recomputing():
    """The layer whose checkpointed forward this thread is re-running for backward, else None."""
    return getattr(_recompute, "layer", None)


class LayerCheckpoint:
    """One layer's checkpointing function (what transformers calls as ``_gradient_checkpointing_func``).

    ``mode`` says what the layer keeps for its backward, and may change between calls:
    "offload" (``offloaded_checkpoint``), "recompute" (``checkpoint_reference``), or "keep" (no
    checkpointing: the forward runs as it is and saves all it needs). The layer's re-run for backward is
    marked by ``recomputing()``. ``observer``, where set, is called as ``observer(self, function, args,
    kwargs)`` before each call, so a planner can read the batch and set the modes of the layers."""

    MODES = ("offload", "recompute", "keep")

    def __init__(self, layer, offload: bool, keywords: dict):
        self.layer, self.keywords = layer, keywords
        self.mode = "offload" if offload else "recompute"
        self.observer = None

    @property
    def offload(self) -> bool:
        return self.mode == "offload"

    def __call__(self, function, *args, **kwargs):
        if self.observer is not None:
            self.observer(self, function, args, kwargs)
        if self.mode == "keep":
            return function(*args, **kwargs)
        checkpoint_fn = offloaded_checkpoint if self.mode == "offload" else checkpoint_reference
        calls = 0

        def run(*inner_args, **inner_kwargs):
            nonlocal calls
            calls += 1
            if calls == 1:  # the forward itself
                return function(*inner_args, **inner_kwargs)
            previous, _recompute.layer = recomputing(), self.layer
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                _recompute.layer = previous

        return checkpoint_fn(run, *args, **{**self.keywords, **kwargs})


# --- installing it on a Hugging Face model ---------------------------------------------------------


def _pretrained_root(model):
    """The transformers model inside ``model`` (itself, or the base model of a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "gradient_checkpointing_enable"):
        raise TypeError(f"{type(base).__name__} is not a transformers model with gradient checkpointing")
    return base


def _enable_checkpointing(base) -> None:
    """The model's own enable, non-reentrant (transformers 5.24 renamed it; 5.17 has only the old name)."""
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def _checkpointed_layers(root) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in root.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def _install(root, gradient_checkpointing_func) -> None:
    """Give every module that transformers gave a checkpointing function its own ``LayerCheckpoint``,
    keeping the keyword arguments it was given (preserve_rng_state, context_fn, ...)."""
    keywords = {}
    if isinstance(gradient_checkpointing_func, functools.partial):
        keywords = dict(gradient_checkpointing_func.keywords)
    if keywords.pop("use_reentrant", False):
        log.info("fusetune's checkpointing is non-reentrant: use_reentrant=True is replaced")
    for module in root.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = LayerCheckpoint(module, root._fusetune_offload, keywords)
    planner = getattr(root, "_fusetune_planner", None)
    if planner is not None:  # it sets the modes per batch from now on (fusetune.training.smart_checkpointing)
        planner.bind([m._gradient_checkpointing_func for m in _checkpointed_layers(root)])


def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, *args, **kwargs):
    """Bound on a model instance over transformers' own: whoever enables checkpointing later (the
    Trainer, PEFT's preparation, TRL's generation helpers) still gets fusetune's function."""
    type(self)._set_gradient_checkpointing(self, enable, gradient_checkpointing_func, *args, **kwargs)
    if enable:
        _install(self, gradient_checkpointing_func)


def _make_sticky(base) -> bool:
    """Bind the wrapper on every transformers model in ``base``; False where that is not possible."""
    wrapped = True
    for module in base.modules():
        setter = getattr(type(module), "_set_gradient_checkpointing", None)
        current = getattr(module, "_set_gradient_checkpointing", None)
        if setter is None or getattr(current, "__func__", None) is _set_gradient_checkpointing:
            continue
        if "value" in inspect.signature(setter).parameters:  # pre-4.35 remote code: leave it alone
            wrapped = False
            continue
        # A bound method (not a closure over the model), so a deepcopy of the model binds to the copy.
        module._set_gradient_checkpointing = _set_gradient_checkpointing.__get__(module)
    return wrapped


def _model_device(model) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def enable_checkpointing(model, offload: bool = True, planner=None) -> str:
    """Turn on fusetune's activation checkpointing for a transformers causal LM or a PEFT model wrapping one.

    Calls the model's own checkpointing enable (non-reentrant; it also makes the input embeddings
    require grad, as transformers does) and gives every checkpointed layer a ``LayerCheckpoint``:
    offloaded (``offload=True``, on CUDA) or plain; later enables by the Trainer keep it. Returns what
    it did, in words. Off CUDA, ``offload=True`` falls back to plain checkpointing and logs why.

    ``planner``: an object with ``bind(checkpoints)``, given the layers' ``LayerCheckpoint`` objects in
    order each time they are installed; it may then change their modes per batch
    (``fusetune.training.smart_checkpointing``). The mode set here is what the planner falls back to.
    """
    base = _pretrained_root(model)
    device = _model_device(base)
    why = None
    if offload and not offloads_on(device):
        why = "CUDA is not available" if not torch.cuda.is_available() else f"the model is on {device.type}"
        offload = False
    for module in base.modules():  # every transformers model inside (a composite model has several)
        if hasattr(type(module), "_set_gradient_checkpointing"):
            module._fusetune_offload = offload
    base._fusetune_planner = planner
    sticky = _make_sticky(base)
    _enable_checkpointing(base)
    if not sticky:  # the old-format setter did not call ours
        _install(base, None)
    layers = len(_checkpointed_layers(base))
    if offload:
        where = "a CPU copy (simulation)" if device.type == "cpu" else "pinned CPU memory on a side stream"
        description = (
            f"offloaded checkpointing on {layers} layers: each layer's input goes to {where} "
            "and is prefetched one layer ahead in the backward"
        )
    else:
        description = f"plain non-reentrant checkpointing on {layers} layers" + (f" ({why})" if why else "")
    if planner is not None:
        description = f"{planner.describe()}; layers not kept: {description}"
    log.info(description)
    return description
