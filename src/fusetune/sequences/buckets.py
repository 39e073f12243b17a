"""Bucket shapes for padding-free batches: the fixed shapes that CUDA graphs replay (``fusetune.sequences.graphs``),
and which bucket each batch replays (``BucketPlan``).

A graph replays fixed shapes, so each batch is padded up to a bucket:

- tokens: up to a multiple of 1/16 of the next power of two (``bucket_for``: less than 12.5% padding, at
  least ``MIN_TOKENS``). The pad tokens form documents of their own, with their own positions and no
  labels, so no real token attends to them and they add nothing to the loss or the metrics. Each pad
  document is at most ``PAD_DOC_TOKENS`` long, so their attention costs next to nothing (one pad
  document of 2k tokens would cost as much attention as 14 real documents of 544);
- documents: the cumulative lengths are padded with empty documents, up to a power of two;
- the longest document: up to a power of two (it sizes the attention kernel's grid only).

Which bucket a batch replays (``BucketPlan.choose``), so that a short run is not spent capturing. The
costs it weighs, in replays of the batch's own bucket (R; a graphed step is GPU-bound, so a replay
costs about its bucket's tokens): an eager step, host-bound, about 3 R; a capture, which traces the
step on the host once (twice for the first bucket, with its warm-up), about 3-10 R; a replay padded
to k times the batch's tokens, about k R.

1. its own bucket (``bucket_for``), once captured: replayed;
2. else the smallest captured bucket that serves it (``serves``: at most ``LOOSE_PADDING`` times its
   tokens, no worse than an eager step, and at most ``LOOSE_PAD_TOKENS`` more: a larger step is
   GPU-bound, and its padding costs what its graph saves; enough documents; a long enough longest
   document): replayed there. Once such replays have padded the batch's own bucket by
   ``WASTE_TO_CAPTURE`` times its tokens, in all, its own bucket is captured (rent, then buy: a long
   run wastes about one capture's cost per shape before its tight bucket is captured);
3. else a wide bucket is captured (``wide_bucket_for``: two sizes an octave, and documents and
   longest document for batches down to 1/``LOOSE_PADDING`` of its tokens, their padding in pad
   documents of up to ``WIDE_PAD_DOC_TOKENS``; a large batch gets its tight bucket instead);
4. past ``MAX_BUCKETS`` captured buckets, a batch that none serves runs eagerly.

A run of n steps then costs about sum(R x padding) + captures x (C + one W): S4 (8 lognormal documents
a step, 30 steps) meets about 14 of ``bucket_for``'s buckets and captured each at first sight (6-12 of
them in its 24 timed steps); the plan captures 2-4 wide buckets, most in the first steps, and replays
with about 26% padding (bench/NOTES.md has the prediction).

``StaticBatch`` holds a bucket's input buffers and pads each batch into them on the device, without a
host sync. Pure shape arithmetic and tensor copies: no capture here, and all of it runs on the CPU.
"""

from dataclasses import dataclass

import torch

from ..forwards import IGNORE_INDEX

TOKEN_STEPS_PER_OCTAVE = 8  # bucket spacing: padding stays under 1/8 of the tokens
WIDE_STEPS_PER_OCTAVE = 2  # a wide bucket's spacing: its own batch's padding stays under 1/3 of the tokens
LOOSE_PADDING = 3  # a captured bucket serves batches of down to 1/LOOSE_PADDING of its tokens ...
LOOSE_PAD_TOKENS = 8192  # ... with this many pad tokens at most (past that, tight buckets' padding only)
WASTE_TO_CAPTURE = 8  # a batch's own bucket is captured once its padding elsewhere reached this many of it
MAX_BUCKETS = 64  # buckets captured at most
MIN_TOKENS = 128
MIN_DOCS = 8
PAD_DOC_TOKENS = 128  # the longest pad document
WIDE_PAD_DOC_TOKENS = 512  # ... in a wide bucket, whose padding may be most of it: fewer, longer pad documents
BATCH_KEYS = frozenset(
    {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}
)
REQUIRED_KEYS = ("input_ids", "labels", "position_ids", "cu_seq_lens_q")


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class Bucket:
    tokens: int  # row length after padding
    docs: int  # documents after padding (the pad documents and empty ones included)
    longest: int  # the attention kernel's max_seqlen
    pad_doc: int = PAD_DOC_TOKENS  # the longest pad document


def pad_docs(pad: int, pad_doc: int = PAD_DOC_TOKENS) -> int:
    """How many documents ``pad`` pad tokens form."""
    return -(-pad // pad_doc)


def round_up(tokens: int, steps_per_octave: int) -> int:
    """``tokens`` up to a multiple of 1/(2 x steps_per_octave) of its next power of two (at least MIN_TOKENS)."""
    step = max(MIN_TOKENS // steps_per_octave, next_pow2(tokens) // (2 * steps_per_octave))
    return max(MIN_TOKENS, -(-tokens // step) * step)


def bucket_for(tokens: int, docs: int, longest: int) -> Bucket:
    """The padded shape for a padding-free row of ``tokens`` tokens in ``docs`` documents."""
    padded = round_up(tokens, TOKEN_STEPS_PER_OCTAVE)
    pad = padded - tokens
    return Bucket(
        tokens=padded,
        docs=max(MIN_DOCS, next_pow2(docs + pad_docs(pad))),
        longest=min(padded, next_pow2(max(longest, min(pad, PAD_DOC_TOKENS), 1))),
    )


def max_pad(tokens: int) -> int:
    """The most pad tokens a batch is replayed with: up to LOOSE_PADDING times its tokens, at most
    LOOSE_PAD_TOKENS more (a tight bucket's padding, under 1/8 of its tokens, always)."""
    loose = min((LOOSE_PADDING - 1) * tokens, LOOSE_PAD_TOKENS)
    return max(MIN_TOKENS - tokens, tokens // TOKEN_STEPS_PER_OCTAVE, loose)


def wide_bucket_for(tokens: int, docs: int, longest: int) -> Bucket:
    """A bucket for this batch that also serves smaller ones, down to 1/LOOSE_PADDING of its tokens (at
    most LOOSE_PAD_TOKENS fewer): tokens on the wide grid, documents for that much padding (in pad
    documents of up to WIDE_PAD_DOC_TOKENS), the longest document at least a quarter of the tokens. Where
    the wide grid would pad the batch itself by more than ``max_pad``, its tight bucket."""
    padded = round_up(tokens, WIDE_STEPS_PER_OCTAVE)
    if padded - tokens > max_pad(tokens):
        return bucket_for(tokens, docs, longest)
    most_pad = max(padded - tokens, min(padded - padded // LOOSE_PADDING, LOOSE_PAD_TOKENS))
    return Bucket(
        tokens=padded,
        docs=max(MIN_DOCS, next_pow2(docs + pad_docs(most_pad, WIDE_PAD_DOC_TOKENS))),
        longest=min(padded, next_pow2(max(longest, padded // 4, min(most_pad, WIDE_PAD_DOC_TOKENS), 1))),
        pad_doc=WIDE_PAD_DOC_TOKENS,
    )


def serves(bucket: Bucket, tokens: int, docs: int, longest: int) -> bool:
    """Whether a batch fits ``bucket`` with its padding bounded (``max_pad``)."""
    pad = bucket.tokens - tokens
    return (
        0 <= pad <= max_pad(tokens)
        and docs + pad_docs(pad, bucket.pad_doc) <= bucket.docs
        and max(longest, min(pad, bucket.pad_doc)) <= bucket.longest
    )


@dataclass(frozen=True)
class Choice:
    action: str  # "replay" (a captured bucket), "capture" (then replay it) or "eager" (no bucket)
    bucket: Bucket | None


class BucketPlan:
    """Which bucket each batch replays, and which buckets are captured (the rules: the module docstring).

    Buckets are captured per ``kind`` (any hashable: graphs of one kind take inputs another lacks);
    ``captured(bucket, kind)`` records a capture that succeeded. Pure logic: nothing is captured here."""

    def __init__(self, max_buckets: int = MAX_BUCKETS, waste_to_capture: float = WASTE_TO_CAPTURE):
        self.max_buckets = max_buckets
        self.waste_to_capture = waste_to_capture
        self.buckets: set[tuple[Bucket, object]] = set()
        self.waste: dict[tuple[Bucket, object], int] = {}  # own bucket -> pad tokens replayed beyond it

    def choose(self, tokens: int, docs: int, longest: int, kind=None) -> Choice:
        own = bucket_for(tokens, docs, longest)
        if (own, kind) in self.buckets:
            return Choice("replay", own)
        room = len(self.buckets) < self.max_buckets
        fitting = [b for b, k in self.buckets if k == kind and serves(b, tokens, docs, longest)]
        if fitting:
            best = min(fitting, key=lambda b: (b.tokens, b.docs, b.longest))
            waste = self.waste[own, kind] = self.waste.get((own, kind), 0) + best.tokens - own.tokens
            if room and waste >= self.waste_to_capture * own.tokens:
                return Choice("capture", own)
            return Choice("replay", best)
        return Choice("capture", wide_bucket_for(tokens, docs, longest)) if room else Choice("eager", None)

    def captured(self, bucket: Bucket, kind=None) -> None:
        self.buckets.add((bucket, kind))

    def forget(self) -> None:
        """The captured buckets are gone (their graphs were freed); the padding counts stay."""
        self.buckets.clear()


def batch_blocker(batch: dict, device_type: str = "cuda") -> str | None:
    """Why this batch cannot be padded to a bucket (and replayed by a graph), or None."""
    extra = sorted(set(batch) - BATCH_KEYS)
    if extra:
        return f"the batch has inputs a padding-free graph does not take: {', '.join(extra)}"
    missing = [k for k in REQUIRED_KEYS if batch.get(k) is None]
    if missing:
        return f"the batch is not padding-free (no {', '.join(missing)})"
    if batch["input_ids"].shape[0] != 1 or batch["cu_seq_lens_q"].ndim != 1:
        return "the batch is not one padding-free row"
    if any(batch[k].device.type != device_type for k in REQUIRED_KEYS):
        return f"the batch is not on {device_type}"
    return None


class StaticBatch:
    """A bucket's input buffers, which its graphs read; ``fill`` pads a batch into them."""

    def __init__(self, bucket: Bucket, device, pad_token_id: int, with_seq_idx: bool):
        t, d = bucket.tokens, bucket.docs
        self.bucket = bucket
        self.pad_token_id = pad_token_id
        self.input_ids = torch.full((1, t), pad_token_id, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(1, t, dtype=torch.long, device=device)
        self.labels = torch.full((1, t), IGNORE_INDEX, dtype=torch.long, device=device)
        self.cu_seq_lens = torch.full((d + 1,), t, dtype=torch.int32, device=device)
        self.seq_idx = torch.zeros(1, t, dtype=torch.int32, device=device) if with_seq_idx else None
        # for the pad tokens after the batch's n: positions, document numbers, document ends (less n)
        self.pad_positions = torch.arange(t, dtype=torch.long, device=device) % bucket.pad_doc
        self.pad_doc_index = torch.arange(t, dtype=torch.int32, device=device) // bucket.pad_doc
        self.pad_doc_ends = torch.arange(1, d + 1, dtype=torch.int32, device=device) * bucket.pad_doc

    def fill(self, batch: dict) -> None:
        """Copy ``batch`` in, then the pad documents and the empty ones (all on the device, no sync)."""
        n = batch["input_ids"].shape[1]
        docs = batch["cu_seq_lens_q"].numel() - 1
        t = self.bucket.tokens
        self.input_ids[:, :n].copy_(batch["input_ids"])
        self.input_ids[:, n:].fill_(self.pad_token_id)
        self.position_ids[:, :n].copy_(batch["position_ids"])
        self.position_ids[0, n:].copy_(self.pad_positions[: t - n])
        self.labels[:, :n].copy_(batch["labels"])
        self.labels[:, n:].fill_(IGNORE_INDEX)
        self.cu_seq_lens[: docs + 1].copy_(batch["cu_seq_lens_q"])
        tail = self.cu_seq_lens[docs + 1 :]  # pad documents end every bucket.pad_doc, then empty ones at t
        tail.copy_(self.pad_doc_ends[: tail.numel()]).add_(n).clamp_(max=t)
        if self.seq_idx is not None:
            self.seq_idx[:, :n].copy_(batch["seq_idx"])
            self.seq_idx[0, n:].copy_(self.pad_doc_index[: t - n]).add_(docs)

    def model_inputs(self) -> dict:
        inputs = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "labels": self.labels,
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "max_length_q": self.bucket.longest,
            "max_length_k": self.bucket.longest,
        }
        if self.seq_idx is not None:
            inputs["seq_idx"] = self.seq_idx
        return inputs
