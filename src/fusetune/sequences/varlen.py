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
- ``fusetune_masked``: the documents of the batch regrouped as padded batches of whole
  documents, [documents, longest, heads, head_dim], and run through causal SDPA (or explicit
  math when the model caps its attention logits, as Gemma 2 does; a sliding window adds a small
  [longest, longest] mask), then put back in place. Its cost follows the sum of the squared
  document lengths, as the same documents unpacked would, not the square of the row length.
  Documents of very different lengths go into separate groups (``_group_lengths``). The layout
  is built once per forward from ``position_ids`` or ``cu_seq_lens`` and reused by every layer
  and by the gradient-checkpointing recompute. Inside a CUDA graph capture, where the layout
  cannot be read on the host, the path falls back to a block-diagonal mask over the whole row.

Batches with a padding mask, and decoding with a KV cache, are not variable-length: they go
through transformers' own SDPA path with transformers' 4D mask, so evaluation and
``generate()`` keep working on a model set to either implementation.
"""

import inspect
import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import FusetuneError
from ..modules import base_model

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

log = logging.getLogger(__name__)
VARLEN = "fusetune_varlen"
MASKED = "fusetune_masked"
ATTENTION_PATHS = ("auto", "varlen", "masked")
KERNEL_DEVICES = ("cuda",)  # where the varlen kernel runs (tests stand a CPU fake in for it)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_FLASH_HEAD_DIM = 256
# The varlen API changed across torch releases: 2.10 takes is_causal and no scale; 2.11 takes
# scale and window_size; 2.12 adds enable_gqa (before it, key/value heads are repeated here).
_VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else frozenset()
# The masked path on CUDA keeps SDPA off cuDNN attention, which builds a plan for every new shape.
_MASKED_CUDA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
# What one more attention call costs, in score elements (query x key pairs): the masked path puts
# documents of different lengths in one padded group when the padding costs less than a call. Sized
# for the CPU, where the masked path is the main one; on a GPU it is a fallback (bench/NOTES.md).
CALL_COST = 64 * 64

# How many attention calls took each path since the last reset: for tests and profiles.
calls: Counter = Counter()


def varlen_kernel_available(device: torch.device | str | None = None) -> bool:
    """True where the CUDA variable-length kernel can run: torch has it, a GPU is present, and
    ``device`` (where training runs, if known) is a GPU."""
    on_gpu = device is None or torch.device(device).type in KERNEL_DEVICES
    return varlen_attn is not None and torch.cuda.is_available() and on_gpu


_LAYOUTS_ATTR = "_fusetune_layouts"  # the attribute of a layout tensor that holds its _Layouts


class _Layouts:
    """What one batch's document layout yields (boundaries, masks), reused by every layer.

    It rides on the tensor that describes the layout (``cu_seq_lens_q`` or ``position_ids``), as an
    attribute: the model hands that same object to each layer, and checkpointing hands it again to the
    recompute, so they all share one; it dies with the tensor, so no mask outlives its batch; and an
    in-place change of the tensor (its version counter) empties it.
    """

    def __init__(self, version: int | None):
        self.version = version
        self.values = {}


def _cached(source: torch.Tensor, key: tuple, build):
    """``build()``, once per layout of ``source`` and ``key``."""
    version = _version_of(source)
    layouts = getattr(source, _LAYOUTS_ATTR, None)
    if layouts is None or layouts.version != version:
        layouts = _Layouts(version)
        setattr(source, _LAYOUTS_ATTR, layouts)
    if key not in layouts.values:
        layouts.values[key] = build()
    return layouts.values[key]


def _version_of(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be changed in place)
        return None


def forget_layouts(*sources: torch.Tensor) -> None:
    """Drop what was cached for these layout tensors: the next forward builds it again (so that a CUDA
    graph capture builds its masks inside the graph, not reusing an eager warm-up's)."""
    for source in sources:
        if hasattr(source, _LAYOUTS_ATTR):
            delattr(source, _LAYOUTS_ATTR)


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
    return _cached(source, ("single", batch, length), lambda: not bool(_starts(source, batch, length)[:, 1:].any()))


def _causal_mask(length: int, window: int | None, device) -> torch.Tensor:
    """bool [length, length]: causal, and within the sliding window if any."""
    idx = torch.arange(length, device=device)
    distance = idx[:, None] - idx[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    return allowed


def _block_diagonal_mask(doc: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool [batch, 1, s, s]: same document, causal, and within the sliding window if any.

    Quadratic in the row length: only for CUDA graph captures, where the document layout cannot be read.
    """
    allowed = _causal_mask(doc.shape[-1], window, doc.device)
    return ((doc[:, :, None] == doc[:, None, :]) & allowed)[:, None]


@dataclass(frozen=True)
class _Documents:
    """A batch's documents as padded groups of whole documents, and the way back.

    The padded slots are the groups one after another, each [documents, longest] row-major.
    ``gather[i]`` is the token (of the flattened batch) that slot ``i`` holds. A document is
    padded on the right with copies of its last token: under a causal mask no real query sees a
    later key, and the pad queries' outputs are never read, so the copies add nothing to the
    outputs or to the gradients (their share of the backward is exactly zero).
    ``scatter[t]`` is the slot that holds token ``t``.
    """

    gather: torch.Tensor  # int64 [sum of documents x longest over the groups]
    scatter: torch.Tensor  # int64 [batch * length]
    groups: tuple[tuple[int, int], ...]  # (documents, longest) of each group


def _group_lengths(lengths: list[int]) -> list[tuple[int, int]]:
    """(shortest, longest) length ranges whose documents share a padded group.

    Minimises the sum over groups of ``documents x longest**2 + CALL_COST``: the score elements
    SDPA is given, and a charge per call. Over the distinct lengths in order, the best grouping
    is found exactly by dynamic programming. A group whose shortest length ``l`` has
    ``longest**2 - l**2 > CALL_COST`` is never best (its documents of length ``l`` on their own
    would save more than a call costs), so each step looks back only that far: for documents
    longer than ``sqrt(CALL_COST)``, a few lengths. The result costs no more than groups by powers
    of two would: at most ``4 x sum(l**2)`` score elements, plus ``CALL_COST`` per octave of lengths.
    """
    counts = Counter(lengths)
    distinct = sorted(counts)
    before = [0]  # documents shorter than distinct[j]
    for n in distinct:
        before.append(before[-1] + counts[n])
    best = [0] + [None] * len(distinct)  # best[j]: the cost of grouping the first j distinct lengths
    first = [0] * (len(distinct) + 1)  # where the last group of that grouping begins
    for j, top in enumerate(distinct, 1):
        square, i = top * top, j - 1
        while i >= 0 and square - distinct[i] ** 2 <= CALL_COST:
            cost = best[i] + (before[j] - before[i]) * square + CALL_COST
            if best[j] is None or cost < best[j]:
                best[j], first[j] = cost, i
            i -= 1
    ranges, j = [], len(distinct)
    while j > 0:
        ranges.append((distinct[first[j]], distinct[j - 1]))
        j = first[j]
    return ranges[::-1]


def _document_starts(source: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """int64 [documents], on the host: where each document begins in the flattened batch.

    A row boundary always begins a document; tokens past the last boundary of ``cu_seq_lens``
    form one more (as in ``_document_ids``).
    """
    if source.ndim == 1:
        cu = source.cpu().long()
        starts = torch.zeros(batch * length, dtype=torch.bool)
        starts[cu[cu < batch * length]] = True
        starts[::length] = True
    else:
        starts = _starts(source.cpu(), batch, length).reshape(-1)  # one small device-to-host copy per forward
    return starts.nonzero().flatten()


def _document_mask(source: torch.Tensor, batch: int, length: int, device) -> _Documents:
    """The batch's documents as padded groups (``_Documents``): what the masked path uses instead
    of a block-diagonal mask over the row. Built on the host once per batch."""
    starts = _document_starts(source, batch, length)
    lengths = torch.diff(starts, append=torch.tensor([batch * length]))
    scatter = torch.empty(batch * length, dtype=torch.long)
    gather, groups, offset = [], [], 0
    for shortest, longest in _group_lengths(lengths.tolist()):
        chosen = (lengths >= shortest) & (lengths <= longest)
        begin, size = starts[chosen], lengths[chosen]
        column = torch.arange(longest)
        index = begin[:, None] + torch.minimum(column, size[:, None] - 1)  # [documents, longest]
        real = column < size[:, None]
        slots = torch.arange(offset, offset + index.numel()).view_as(index)
        scatter[index[real]] = slots[real]
        gather.append(index.flatten())
        groups.append((index.shape[0], longest))
        offset += index.numel()
    gather = torch.cat(gather) if len(gather) > 1 else gather[0]
    return _Documents(gather.to(device, non_blocking=True), scatter.to(device, non_blocking=True), tuple(groups))


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


def _masked(query, key, value, mask, scaling, dropout, softcap, training: bool, causal: bool = False):
    """[b, h, q, d] attention under a boolean (or additive) mask, or causal; returns [b, q, h, d]."""
    n_rep = query.shape[1] // key.shape[1]
    if softcap is not None:  # explicit math: SDPA has no logit softcapping
        if causal and mask is None:
            mask = _causal_mask(query.shape[2], None, query.device)
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
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal
            )
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=n_rep > 1
        )
    return out.transpose(1, 2).contiguous()


def _grouped(query, key, value, docs: _Documents, mask_for, scaling, dropout, softcap, training: bool):
    """[b, h, s, d] packed tensors, attended document by document in padded groups; returns [b, s, h, d].

    Each group is one causal attention call over [documents, heads, longest, head_dim];
    ``mask_for(longest)`` gives the group's mask where causality alone is not enough (a sliding
    window shorter than the group, or the explicit math of softcapping), else None.
    """
    b, hq, s, _ = query.shape

    def slots(x):  # [b, h, s, d] -> [slots, h, d]; the transpose is free when x came from [b, s, h, d]
        return x.transpose(1, 2).reshape(b * s, x.shape[1], x.shape[3]).index_select(0, docs.gather)

    sizes = [count * longest for count, longest in docs.groups]
    # split, not slices: the backward of a slice writes a zero tensor the size of the whole input
    parts = zip(*(slots(x).split(sizes) for x in (query, key, value)), strict=True)
    outs = []
    for (count, longest), group in zip(docs.groups, parts, strict=True):
        gq, gk, gv = (x.view(count, longest, x.shape[1], x.shape[2]).transpose(1, 2) for x in group)
        mask = mask_for(longest)
        out = _masked(gq, gk, gv, mask, scaling, dropout, softcap, training, causal=mask is None)
        outs.append(out.view(count * longest, hq, out.shape[-1]))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.index_select(0, docs.scatter).view(b, s, hq, out.shape[-1])


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
        cu, longest = _cached(source, ("cu", b, s, device), lambda: _boundaries(source, kwargs, b, s, device))
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

    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # A graph replays later batches: their layout must be computed inside it, not read on the host.
        def build():
            return _block_diagonal_mask(_document_ids(source, b, s, device), window)

        mask = _cached(source, ("mask", b, s, window, device), build)
        return _masked(query, key, value, mask, scaling, dropout, softcap, module.training), None

    docs = _cached(source, ("documents", b, s, device), lambda: _document_mask(source, b, s, device))

    def mask_for(longest: int) -> torch.Tensor | None:
        if softcap is None and (window is None or window >= longest):
            return None  # causal SDPA, no mask
        return _cached(source, ("causal", longest, window, device), lambda: _causal_mask(longest, window, device))

    return _grouped(query, key, value, docs, mask_for, scaling, dropout, softcap, module.training), None


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``fusetune_varlen``: the CUDA varlen kernel where it applies, else the masked path."""
    return _attention(
        module, query, key, value, attention_mask, use_varlen=True, scaling=scaling, dropout=dropout, **kwargs
    )


def masked_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``fusetune_masked``: each document attended on its own (padded groups through SDPA), on any device."""
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


def enable_varlen_attention(model, backend: str = "auto", device: torch.device | str | None = None) -> str:
    """Set variable-length attention on ``model`` (a transformers model, or PEFT-wrapped); returns its name.

    ``auto``: ``fusetune_varlen`` where the CUDA varlen kernel exists and ``device`` (where training
    runs; None: wherever CUDA is) is a GPU, else ``fusetune_masked``.
    """
    if backend not in ATTENTION_PATHS:
        choices = ", ".join(ATTENTION_PATHS)
        raise FusetuneError(f"attention: unknown varlen backend '{backend}'; choose one of {choices}")
    if backend == "varlen" and varlen_attn is None:
        raise FusetuneError(f"attention: torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)")
    register()
    if backend == "auto":
        backend = "varlen" if varlen_kernel_available(device) else "masked"
    name = VARLEN if backend == "varlen" else MASKED
    base = base_model(model)
    if not hasattr(base, "set_attn_implementation"):
        raise FusetuneError(f"attention: {type(base).__name__} is not a transformers model")
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise FusetuneError(f"attention: {type(base).__name__} cannot switch its attention implementation")
    if name == VARLEN:
        log.info("attention=%s: CUDA varlen kernel (torch.nn.attention.varlen), masked SDPA where it cannot", name)
    else:
        log.info("attention=%s: documents in padded groups through causal SDPA (%s)", name, _why_masked(device))
    softcap = getattr(base.config.get_text_config(), "attn_logit_softcapping", None)
    if softcap is not None:
        log.warning(
            "attention=%s: %s caps attention logits (%s), which the varlen kernel and SDPA cannot do; "
            "its attention runs as explicit masked math (memory grows with the square of the longest document)",
            name,
            base.config.model_type,
            softcap,
        )
    return name


def _why_masked(device) -> str:
    if varlen_attn is None:
        return f"torch {torch.__version__} has no varlen kernel"
    if not torch.cuda.is_available():
        return "no CUDA"
    if not varlen_kernel_available(device):
        return f"training runs on {device}"
    return "chosen"
