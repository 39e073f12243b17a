"""Bucket shapes for padding-free batches: the fixed shapes that CUDA graphs replay (``fusetune.graphs``).

A graph replays fixed shapes, so each batch is padded up to a bucket (``bucket_for``):

- tokens: up to a multiple of 1/16 of the next power of two (less than 12.5% padding, at least
  ``MIN_TOKENS``). The pad tokens form documents of their own, with their own positions and no labels,
  so no real token attends to them and they add nothing to the loss or the metrics. Each pad document
  is at most ``PAD_DOC_TOKENS`` long, so their attention costs next to nothing (one pad document of 2k
  tokens would cost as much attention as 14 real documents of 544);
- documents: the cumulative lengths are padded with empty documents, up to a power of two;
- the longest document: up to a power of two (it sizes the attention kernel's grid only).

``StaticBatch`` holds a bucket's input buffers and pads each batch into them on the device, without a
host sync. Pure shape arithmetic and tensor copies: no capture here, and all of it runs on the CPU.
"""

from dataclasses import dataclass

import torch

from .forwards import IGNORE_INDEX

TOKEN_STEPS_PER_OCTAVE = 8  # bucket spacing: padding stays under 1/8 of the tokens
MIN_TOKENS = 128
MIN_DOCS = 8
PAD_DOC_TOKENS = 128  # the longest pad document
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


def pad_docs(pad: int) -> int:
    """How many documents ``pad`` pad tokens form."""
    return -(-pad // PAD_DOC_TOKENS)


def bucket_for(tokens: int, docs: int, longest: int) -> Bucket:
    """The padded shape for a padding-free row of ``tokens`` tokens in ``docs`` documents."""
    step = max(MIN_TOKENS // TOKEN_STEPS_PER_OCTAVE, next_pow2(tokens) // (2 * TOKEN_STEPS_PER_OCTAVE))
    padded = max(MIN_TOKENS, -(-tokens // step) * step)
    pad = padded - tokens
    return Bucket(
        tokens=padded,
        docs=max(MIN_DOCS, next_pow2(docs + pad_docs(pad))),
        longest=min(padded, next_pow2(max(longest, min(pad, PAD_DOC_TOKENS), 1))),
    )


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
        self.pad_positions = torch.arange(t, dtype=torch.long, device=device) % PAD_DOC_TOKENS
        self.pad_doc_index = torch.arange(t, dtype=torch.int32, device=device) // PAD_DOC_TOKENS
        self.pad_doc_ends = torch.arange(1, d + 1, dtype=torch.int32, device=device) * PAD_DOC_TOKENS

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
        tail = self.cu_seq_lens[docs + 1 :]  # pad documents end every PAD_DOC_TOKENS, then empty ones at t
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


def padded_batch(batch: dict, pad_token_id: int) -> dict:
    """``batch`` padded to its bucket, as new tensors: what the graphs see (for tests and checks).

    Run the model on it with ``static_shapes=True``, as the graphs do."""
    cu = batch["cu_seq_lens_q"]
    bucket = bucket_for(batch["input_ids"].shape[1], cu.numel() - 1, int(cu.diff().max()))
    static = StaticBatch(bucket, batch["input_ids"].device, pad_token_id, batch.get("seq_idx") is not None)
    static.fill(batch)
    return static.model_inputs()
