"""BucketPlan, as pure logic: which batches capture, which replay (and in which bucket), which run eagerly.

- Shape sequences with the exact decision and bucket at each step: a smaller batch replays a wider
  bucket; a batch under 1/LOOSE_PADDING of every bucket, with a longer document or more documents than
  it holds, or larger than all, captures a wide bucket of its own; kinds never share; a batch's own
  bucket is captured once its padding elsewhere reached ``waste_to_capture`` times its size; past
  ``max_buckets`` a batch that nothing serves runs eagerly; ``forget`` starts over.
- Invariants on length distributions (S4's, the profiler's, long rows, many short documents): a
  batch's own and wide buckets serve it, every bucket replayed serves its batch (padding at most
  LOOSE_PADDING times its tokens, and LOOSE_PAD_TOKENS or a tight bucket's 1/8) and is captured
  first, at most max_buckets are captured.
- S4 itself (bench.py's own lengths): few captures, most before the timed steps; over a long run the
  padding falls back towards the tight buckets'.
"""

import random
import sys
from dataclasses import astuple
from pathlib import Path

import pytest

from fusetune.sequences import buckets
from fusetune.sequences.buckets import BucketPlan, bucket_for, serves, wide_bucket_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench import scenarios  # noqa: E402  (S4's own document lengths)

FORGET = "forget"
W = (6144, 16, 2048, 512)  # the wide bucket of a 4600-token batch of 8 documents, the longest 1500
BIG = (4600, 8, 1500)
OWN_4100 = (4608, 16, 1024, 128)  # bucket_for(4100, 8, 1000)

# name: (plan keywords, batches (tokens, docs, longest[, kind]) or FORGET, [(action, bucket as a tuple or None)])
CASES = {
    "a repeated batch replays its wide bucket": ({}, [BIG] * 3, [("capture", W), ("replay", W), ("replay", W)]),
    "a smaller batch replays the wider bucket": ({}, [BIG, (2100, 8, 900)], [("capture", W), ("replay", W)]),
    "a batch under a third of it captures its own": (
        {},
        [BIG, (2000, 8, 900), (1900, 8, 900), (2100, 8, 900)],
        [("capture", W), ("capture", (2048, 16, 1024, 512)), ("replay", (2048, 16, 1024, 512)), ("replay", W)],
    ),
    "a document longer than its longest": (
        {},
        [BIG, (5000, 8, 3000)],
        [("capture", W), ("capture", (6144, 16, 4096, 512))],
    ),
    "more documents than it holds": ({}, [BIG, (4000, 12, 500)], [("capture", W), ("capture", (4096, 32, 1024, 512))]),
    "a larger batch, then the smallest that serves": (
        {},
        [BIG, (6200, 8, 1500), BIG, (6200, 8, 1500)],
        [("capture", W), ("capture", (8192, 32, 2048, 512)), ("replay", W), ("replay", (8192, 32, 2048, 512))],
    ),
    "kinds never share a bucket": (
        {},
        [(*BIG, True), (*BIG, False), (*BIG, True)],
        [("capture", W), ("capture", W), ("replay", W)],
    ),
    "its own bucket once the padding paid for a capture": (
        {"waste_to_capture": 1},  # 1536 padded tokens a replay, against 4608
        [BIG] + [(4100, 8, 1000)] * 4,
        [("capture", W), ("replay", W), ("replay", W), ("capture", OWN_4100), ("replay", OWN_4100)],
    ),
    "by default it waits for more padding": ({}, [BIG] + [(4100, 8, 1000)] * 5, [("capture", W)] + [("replay", W)] * 5),
    "past max_buckets: eager, or the bucket that serves": (
        {"max_buckets": 1, "waste_to_capture": 1},
        [BIG, (1000, 8, 300)] + [(4100, 8, 1000)] * 4,
        [("capture", W), ("eager", None)] + [("replay", W)] * 4,
    ),
    "a long row: its tight bucket": ({}, [(40000, 2, 30000)], [("capture", (40960, 16, 32768, 128))]),
    "long rows: at most LOOSE_PAD_TOKENS of padding": (
        {},
        [(30000, 2, 20000), (25000, 2, 20000), (24000, 2, 20000)],
        [
            ("capture", (32768, 32, 32768, 512)),
            ("replay", (32768, 32, 32768, 512)),
            ("capture", (24576, 32, 24576, 512)),
        ],
    ),
    "forget: captured again": ({}, [BIG, FORGET, BIG], [("capture", W), ("capture", W)]),
    "tiny batches: the smallest bucket": (
        {},
        [(5, 1, 5), (60, 2, 40), (129, 2, 100)],
        [("capture", (128, 8, 128, 512)), ("replay", (128, 8, 128, 512)), ("capture", (192, 8, 128, 512))],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_plan_decisions(name):
    keywords, batches, want = CASES[name]
    plan, got = BucketPlan(**keywords), []
    for batch in batches:
        if batch == FORGET:
            plan.forget()
            continue
        tokens, docs, longest, *kind = batch
        choice = plan.choose(tokens, docs, longest, *kind)
        if choice.action == "capture":
            plan.captured(choice.bucket, *kind)
        got.append((choice.action, astuple(choice.bucket) if choice.bucket else None))
    assert got == want
    assert len(plan.buckets) <= plan.max_buckets


def s4(seed: int, steps: int) -> list[tuple[int, int, int]]:
    return [(sum(d), len(d), max(d)) for d in scenarios.document_lengths(scenarios.SCENARIOS["S4"], seed, steps)]


def uniform_docs(seed: int, steps: int, docs=8, low=64, high=1024) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        lengths = [rng.randint(low, high) for _ in range(docs)]
        out.append((sum(lengths), docs, max(lengths)))
    return out


def packed_rows(seed: int, steps: int) -> list[tuple[int, int, int]]:
    """Rows of many short documents, their count varying (packing)."""
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 200))]
        out.append((sum(lengths), len(lengths), max(lengths)))
    return out


DISTRIBUTIONS = {
    "S4": s4,
    "profiler: 8 documents of 64-1024": uniform_docs,
    "long rows: 2 documents of 4k-32k": lambda seed, steps: uniform_docs(seed, steps, 2, 4096, 32768),
    "very long rows: 4 documents of 8k-64k": lambda seed, steps: uniform_docs(seed, steps, 4, 8192, 65536),
    "packed rows of 1-200 documents": packed_rows,
}


@pytest.mark.parametrize("name", DISTRIBUTIONS)
@pytest.mark.parametrize("max_buckets", [buckets.MAX_BUCKETS, 3])
def test_every_replay_serves_its_batch(name, max_buckets):
    plan, captures = BucketPlan(max_buckets=max_buckets, waste_to_capture=2), 0
    for tokens, docs, longest in DISTRIBUTIONS[name](seed=1, steps=400):
        assert serves(bucket_for(tokens, docs, longest), tokens, docs, longest)
        assert serves(wide_bucket_for(tokens, docs, longest), tokens, docs, longest)
        choice = plan.choose(tokens, docs, longest)
        if choice.action == "eager":
            assert len(plan.buckets) == max_buckets
            assert not any(serves(b, tokens, docs, longest) for b, _ in plan.buckets)
            continue
        b = choice.bucket
        assert serves(b, tokens, docs, longest)
        assert b.tokens <= max(buckets.MIN_TOKENS, buckets.LOOSE_PADDING * tokens) and b.tokens % 16 == 0
        assert b.tokens - tokens <= max(buckets.MIN_TOKENS, buckets.LOOSE_PAD_TOKENS, tokens // 8)
        assert b.docs >= docs + buckets.pad_docs(b.tokens - tokens, b.pad_doc) and b.docs & (b.docs - 1) == 0
        if choice.action == "replay":
            assert (b, None) in plan.buckets
        else:
            assert (b, None) not in plan.buckets
            plan.captured(b)
            captures += 1
    assert captures == len(plan.buckets) <= max_buckets


def plan_run(lengths, kind=True):
    """Over a run: the steps that capture, and per step (real tokens, replayed bucket's, tight bucket's)."""
    plan, captures, tokens = BucketPlan(), [], []
    for step, (n, docs, longest) in enumerate(lengths):
        choice = plan.choose(n, docs, longest, kind)
        if choice.action == "capture":
            plan.captured(choice.bucket, kind)
            captures.append(step)
        tokens.append((n, choice.bucket.tokens, bucket_for(n, docs, longest).tokens))
    return captures, tokens


def padding(tokens, column=1) -> float:
    return 1 - sum(t[0] for t in tokens) / sum(t[column] for t in tokens)


@pytest.mark.parametrize("seed", range(8))
def test_s4_captures_a_few_buckets_mostly_before_the_timed_steps(seed):
    warmup, timed = scenarios.SCENARIOS["S4"]["warmup"], scenarios.SCENARIOS["S4"]["steps"]
    lengths = s4(seed, warmup + timed)
    captures, tokens = plan_run(lengths)
    assert captures[0] == 0 and len(captures) <= 5
    assert sum(step >= warmup for step in captures) <= 2
    assert padding(tokens) <= 0.45
    # what capturing every new tight bucket at first sight cost: many more captures, most of them timed
    first_seen = {}
    for step, shape in enumerate(lengths):
        first_seen.setdefault(bucket_for(*shape), step)
    assert len(first_seen) >= 10 and sum(step >= warmup for step in first_seen.values()) >= 6


def test_a_long_s4_run_ends_with_tight_buckets():
    captures, tokens = plan_run(s4(0, 3000))
    assert len(captures) <= buckets.MAX_BUCKETS
    last = tokens[2500:]
    assert padding(last) <= padding(last, column=2) + 0.02  # within 2 points of the tight buckets' padding
    assert padding(tokens[:30]) > 0.2  # where the first steps replay wide buckets
