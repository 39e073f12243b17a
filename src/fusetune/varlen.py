"""Variable-length attention for packed and padding-free batches.

A packed row holds several documents one after another, with ``position_ids`` restarting at
each; TRL's padding-free collator also passes ``cu_seq_lens_q/k`` (cumulative document
lengths, int32) and ``max_length_q/k``. A token must attend only to earlier tokens of its own
document. ``enable_varlen_attention(model)`` registers two implementations with transformers'
``AttentionInterface`` and sets one on the model:

- ``fusetune_varlen``: on CUDA, PyTorch's own flash kernel for variable-length batches
  (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10; no flash-attn package). It takes
  ``cu_seq_lens`` as given, or derives them once per forward from ``position_ids``, so a step
  builds no mask and no per-shape plan. Where the kernel cannot serve a call (CPU tensors,
  fp32 outside autocast, logit softcapping, attention dropout, head_dim > 256) the call takes
  the masked path, and says why once.
- ``fusetune_masked``: a per-document causal (and sliding-window) block-diagonal boolean
  mask, built once per forward from ``position_ids`` or ``cu_seq_lens`` and reused by every
  layer and by the gradient-checkpointing recompute, through SDPA (or explicit math when the
  model caps its attention logits, as Gemma 2 does).

Batches with a padding mask, and decoding with a KV cache, are not variable-length: they go
through transformers' own SDPA path with transformers' 4D mask, so evaluation and
``generate()`` keep working on a model set to either implementation.
"""

import inspect
import logging
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import FusetuneError

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

log = logging.getLogger(__name__)
VARLEN = "fusetune_varlen"
MASKED = "fusetune_masked"
BACKENDS = ("auto", "varlen", "masked")
KERNEL_DEVICES = ("cuda",)  # where the varlen kernel runs (tests stand a CPU fake in for it)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_FLASH_HEAD_DIM = 256
# The varlen API changed across torch releases: 2.10 takes is_causal and no scale; 2.11 takes
# scale and window_size; 2.12 adds enable_gqa (before it, key/value heads are repeated here).
_VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else frozenset()
# The masked path on CUDA keeps SDPA off cuDNN attention, which builds a plan for every new shape.
_MASKED_CUDA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

# How many attention calls took each path since the last reset: for tests and profiles.
calls: Counter = Counter()


def varlen_kernel_available() -> bool:
    """True where the CUDA variable-length kernel can run: torch has it and a GPU is present."""
    return varlen_attn is not None and torch.cuda.is_available()


class _BatchCache:
    """What one batch's document layout yields (boundaries, masks), reused by every layer.

    Keyed by the identity of the tensor that describes the layout (``cu_seq_lens_q`` or
    ``position_ids``: the model hands the same object to each layer, and checkpointing hands it
    again to the recompute). A weak reference drops the entries when that tensor dies, so no
    mask outlives its batch.
    """

    def __init__(self):
        self._ref = None
        self._version = None
        self._values = {}

    def get(self, source: torch.Tensor, key: tuple, build):
        version = _version_of(source)
        if self._ref is None or self._ref() is not source or version != self._version:
            self._values = {}
            self._ref = weakref.ref(source, self._forget)
            self._version = version
        if key not in self._values:
            self._values[key] = build()
        return self._values[key]

    def _forget(self, ref) -> None:
        if ref is self._ref:
            self._ref, self._values = None, {}


def _version_of(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be changed in place)
        return None


_cache = _BatchCache()


def forget_batches() -> None:
    """Drop what was cached for the last batch (so a CUDA graph capture builds its own masks)."""
    global _cache
    _cache = _BatchCache()


# ---------------------------------------------------------------------------------- documents


def _layout_source(kwargs: dict) -> torch.Tensor | None:
    """The tensor that says where documents begin: TRL's cu_seq_lens, else position_ids."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and cu.ndim == 1:
        return cu
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.ndim == 2:
        return position_ids
    return None


def _starts(position_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """bool [batch, length]: where a document begins (row start, or a position that does not continue)."""
    pos = position_ids.expand(batch, length)
    starts = torch.ones(batch, length, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    return starts


def _boundaries(source: torch.Tensor, kwargs: dict, batch: int, length: int, device) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 on ``device`` over the flattened batch, longest document)."""
    if source.ndim == 1:  # cu_seq_lens from the collator: no host round trip when max_length_q came too
        cu = source.to(device=device, dtype=torch.int32)
        longest = kwargs.get("max_length_q")
        return cu, int(longest) if longest is not None else int(cu.diff().max())
    starts = _starts(source.cpu(), batch, length).reshape(-1)  # one small device-to-host copy per forward
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([batch * length])]).to(torch.int32)
    return cu.to(device, non_blocking=True), int(cu.diff().max())


def _document_ids(source: torch.Tensor, batch: int, length: int, device) -> torch.Tensor:
    """int [batch, length]: which document each token belongs to (computed on ``device``, no sync)."""
    if source.ndim == 1:
        tokens = torch.arange(batch * length, device=device, dtype=torch.int32)
        cu = source.to(device=device, dtype=torch.int32)
        return torch.searchsorted(cu[1:].contiguous(), tokens, right=True).view(batch, length)
    return _starts(source.to(device), batch, length).cumsum(-1)


def _one_document_per_row(source: torch.Tensor, batch: int, length: int) -> bool:
    """Whether each row is a single document (then no mask is needed). Only asked on CPU, where it is free."""
    if source.is_cuda or source.ndim != 2:
        return False
    return _cache.get(source, ("single", batch, length), lambda: not bool(_starts(source, batch, length)[:, 1:].any()))


def _document_mask(doc: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool [batch, 1, s, s]: same document, causal, and within the sliding window if any."""
    s = doc.shape[-1]
    idx = torch.arange(s, device=doc.device)
    distance = idx[:, None] - idx[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    return ((doc[:, :, None] == doc[:, None, :]) & allowed)[:, None]


# ---------------------------------------------------------------------------------- kernels


def _repeat_heads(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    """Key/value heads repeated so that query head h reads key/value head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


def _kernel_dtype(query, key, value) -> torch.dtype | None:
    """The dtype the kernel would compute in: autocast's (as SDPA would), else the inputs' common one.

    Under autocast with fp32 weights, RoPE promotes q and k to fp32 while v stays in bf16.
    """
    device = query.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype if query.dtype == key.dtype == value.dtype else None


def _varlen(query, key, value, cu: torch.Tensor, longest: int, scaling: float | None, window: int | None, dtype):
    """[b, h, s, d] tensors through the flash varlen kernel; returns [b, s, h, d]."""
    b, hq, s, d = query.shape
    hk = key.shape[1]
    q = query.transpose(1, 2).reshape(b * s, hq, d).to(dtype)
    k = key.transpose(1, 2).reshape(b * s, hk, d).to(dtype)
    v = value.transpose(1, 2).reshape(b * s, hk, d).to(dtype)
    options = {}
    if hk != hq:
        if "enable_gqa" in _VARLEN_PARAMS:
            options["enable_gqa"] = True
        else:
            k, v = _repeat_heads(k, hq // hk, 1), _repeat_heads(v, hq // hk, 1)
    if "scale" in _VARLEN_PARAMS:
        options["scale"] = scaling
    elif scaling is not None and scaling != d**-0.5:
        q = q * (scaling * d**0.5)
    if "window_size" in _VARLEN_PARAMS:
        options["window_size"] = (window - 1 if window is not None else -1, 0)
    else:
        options["is_causal"] = True
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **options)
    return out.view(b, s, hq, d)


def _masked(query, key, value, mask, scaling, dropout, softcap, training: bool):
    """[b, h, q, d] attention under a boolean (or additive) mask; returns [b, q, h, d]."""
    n_rep = query.shape[1] // key.shape[1]
    if softcap is not None:  # explicit math: SDPA has no logit softcapping
        key, value = _repeat_heads(key, n_rep, 1), _repeat_heads(value, n_rep, 1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        elif mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = F.dropout(probs, p=dropout, training=training)
        return torch.matmul(probs, value).transpose(1, 2).contiguous()
    if query.is_cuda:  # masked GQA would drop SDPA to its math kernel on CUDA: repeat instead
        key, value = _repeat_heads(key, n_rep, 1), _repeat_heads(value, n_rep, 1)
        with sdpa_kernel(_MASKED_CUDA_BACKENDS):
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=n_rep > 1
        )
    return out.transpose(1, 2).contiguous()


def _varlen_refusal(query, key, dtype, dropout: float, softcap, window, longest: int) -> str | None:
    """Why the flash varlen kernel cannot serve this call, or None if it can."""
    if varlen_attn is None:
        return "this torch has no torch.nn.attention.varlen"
    if query.device.type not in KERNEL_DEVICES:
        return "the tensors are not on CUDA"
    if dtype not in FLASH_DTYPES:
        return f"the flash kernel needs fp16/bf16 (or autocast to them), not {dtype or 'mixed dtypes'}"
    if softcap is not None:
        return "the flash varlen kernel has no attention logit softcapping"
    if dropout > 0.0:
        return "the flash varlen kernel has no attention dropout"
    if query.shape[-1] > MAX_FLASH_HEAD_DIM or query.shape[-1] != key.shape[-1]:
        return f"head_dim {query.shape[-1]} is not supported by the flash kernel"
    if window is not None and "window_size" not in _VARLEN_PARAMS and window < longest:
        return "this torch's varlen kernel has no sliding window"
    return None


_refusals_logged: set[str] = set()


def _log_refusal(reason: str) -> None:
    if reason not in _refusals_logged:
        _refusals_logged.add(reason)
        log.warning("fusetune_varlen: %s; these calls use the masked path instead", reason)


# ---------------------------------------------------------------------------------- interface


def _attention(module, query, key, value, attention_mask, *, use_varlen, scaling=None, dropout=0.0, **kwargs):
    softcap = kwargs.get("softcap") or None  # 0 means none, as in flash-attn
    window = kwargs.get("sliding_window")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    b, _, s, _ = query.shape
    source = _layout_source(kwargs)
    variable_length = attention_mask is None and key.shape[2] == s and causal and source is not None
    if not variable_length:
        # A padded batch (transformers' 4D mask), decoding with a cache, bidirectional attention,
        # or no document layout at all: transformers' SDPA semantics.
        if softcap is None:
            calls["sdpa"] += 1
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        calls["masked"] += 1
        mask = attention_mask
        if mask is None and causal and s > 1:  # causal, aligned to the last key (a cache holds the first ones)
            offset = key.shape[2] - s
            mask = torch.ones(s, key.shape[2], dtype=torch.bool, device=query.device).tril(offset)
        return _masked(query, key, value, mask, scaling, dropout, softcap, module.training), None

    device = query.device
    if use_varlen and device.type in KERNEL_DEVICES:
        cu, longest = _cache.get(source, ("cu", b, s, device), lambda: _boundaries(source, kwargs, b, s, device))
        dtype = _kernel_dtype(query, key, value)
        reason = _varlen_refusal(query, key, dtype, dropout, softcap, window, longest)
        if reason is None:
            calls["varlen"] += 1
            return _varlen(query, key, value, cu, longest, scaling, window, dtype), None
        _log_refusal(reason)

    calls["masked"] += 1
    if softcap is None and window is None and _one_document_per_row(source, b, s):
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None

    def build():
        return _document_mask(_document_ids(source, b, s, device), window)

    mask = _cache.get(source, ("mask", b, s, window, device), build)
    return _masked(query, key, value, mask, scaling, dropout, softcap, module.training), None


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``fusetune_varlen``: the CUDA varlen kernel where it applies, else the masked path."""
    return _attention(
        module, query, key, value, attention_mask, use_varlen=True, scaling=scaling, dropout=dropout, **kwargs
    )


def masked_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``fusetune_masked``: a per-document causal mask through SDPA, on any device."""
    return _attention(
        module, query, key, value, attention_mask, use_varlen=False, scaling=scaling, dropout=dropout, **kwargs
    )


def varlen_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The model-level mask for our implementations.

    Without a padding mask there is nothing to build here: the attention call reads the document
    layout from ``position_ids`` / ``cu_seq_lens``. With one (padded batches, ``generate()``),
    transformers' SDPA mask, which also covers packing and sliding windows.
    """
    if attention_mask is None:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def register() -> None:
    """Register both implementations and their mask function with transformers (idempotent)."""
    for name, forward in ((VARLEN, varlen_attention_forward), (MASKED, masked_attention_forward)):
        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, varlen_mask)


def enable_varlen_attention(model, backend: str = "auto") -> str:
    """Set variable-length attention on ``model`` (a transformers model, or PEFT-wrapped); returns its name.

    ``auto``: ``fusetune_varlen`` where the CUDA varlen kernel exists, else ``fusetune_masked``.
    """
    if backend not in BACKENDS:
        raise FusetuneError(f"attention: unknown varlen backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "varlen" and varlen_attn is None:
        raise FusetuneError(f"attention: torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)")
    register()
    if backend == "auto":
        backend = "varlen" if varlen_kernel_available() else "masked"
    name = VARLEN if backend == "varlen" else MASKED
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "set_attn_implementation"):
        raise FusetuneError(f"attention: {type(base).__name__} is not a transformers model")
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise FusetuneError(f"attention: {type(base).__name__} cannot switch its attention implementation")
    if name == VARLEN:
        log.info("attention=%s: CUDA varlen kernel (torch.nn.attention.varlen), masked SDPA where it cannot", name)
    else:
        log.info("attention=%s: per-document causal mask through SDPA (%s)", name, _why_masked())
    softcap = getattr(base.config.get_text_config(), "attn_logit_softcapping", None)
    if softcap is not None:
        log.warning(
            "attention=%s: %s caps attention logits (%s), which the varlen kernel and SDPA cannot do; "
            "its attention runs as explicit masked math (memory grows with the square of the row length)",
            name,
            base.config.model_type,
            softcap,
        )
    return name


def _why_masked() -> str:
    if varlen_attn is None:
        return f"torch {torch.__version__} has no varlen kernel"
    if not torch.cuda.is_available():
        return "no CUDA"
    return "chosen"


def reset_calls() -> None:
    calls.clear()
