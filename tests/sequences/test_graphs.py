"""CUDA graphs of padding-free steps: the padding they add changes nothing, and replays match eager steps.

- The bucket shapes, and that a batch padded to its bucket (an extra document of pad tokens, empty
  documents, every row scored by the loss head) gives the same loss, metric sums and LoRA gradients
  as the batch itself, within 1e-5 in fp32.
- Replays against eager steps on the same batches: new buckets, repeated buckets with new data,
  updated weights, accumulation across buckets, FastSFTTrainer's losses with graphs on and off. On
  CUDA with real graphs (bf16, 2e-2); on CPU the same code with ``Reruns`` for graphs (fp32, 1e-5),
  which checks everything but the capture itself.
- The fall-back when a capture fails (CUDA).
"""

import dataclasses
import functools
import logging
import os
import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from fusetune.errors import FusetuneError
from fusetune.loading import load_model
from fusetune.patching import apply_kernels, remove_kernels
from fusetune.sequences import buckets, graphs
from fusetune.sequences.buckets import StaticBatch, bucket_for, serves, wide_bucket_for
from fusetune.sequences.graphs import CudaGraphs, Reruns, StepGraphs
from fusetune.sequences.varlen import MASKED, enable_varlen_attention, varlen_attn
from fusetune.testing import padded_batch
from fusetune.training.trainer import FastSFTConfig, FastSFTTrainer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_varlen = pytest.mark.skipif(varlen_attn is None, reason=f"torch {torch.__version__} has no varlen kernel")
PAD = 0


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def test_bucket_shapes_bound_the_padding():
    rng = random.Random()
    for _ in range(2000):
        tokens = rng.randint(1, 70_000)
        docs = rng.randint(1, min(tokens, 300))
        longest = rng.randint(-(-tokens // docs), tokens)
        b = bucket_for(tokens, docs, longest)
        pad = b.tokens - tokens
        assert b.tokens >= max(tokens, buckets.MIN_TOKENS)
        assert pad < max(buckets.MIN_TOKENS, tokens / buckets.TOKEN_STEPS_PER_OCTAVE), (tokens, b)
        assert b.docs >= docs + buckets.pad_docs(pad) and b.docs & (b.docs - 1) == 0
        assert max(longest, min(pad, buckets.PAD_DOC_TOKENS)) <= b.longest <= b.tokens
        assert bucket_for(b.tokens, docs, longest).tokens == b.tokens  # a bucket's own size needs no padding


def collate(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    docs = [{"input_ids": torch.randint(1, vocab, (n,), generator=g).tolist()} for n in lengths]
    return DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)(docs)


def test_fill_pads_every_element_and_forgets_the_last_batch():
    first, second = collate([9, 30, 4], 50, seed=1), collate([3, 2, 40], 50, seed=2)
    bucket = bucket_for(45, 3, 40)
    assert bucket == bucket_for(43, 3, 30)  # both batches fall into one bucket
    static = StaticBatch(bucket, "cpu", PAD, with_seq_idx=True)
    for tensor in (static.input_ids, static.position_ids, static.labels, static.cu_seq_lens, static.seq_idx):
        tensor.fill_(-7)  # poison: every element must be written by fill
    static.fill(first)
    static.fill(second)
    n, t = 45, bucket.tokens
    assert torch.equal(static.input_ids[0, :n], second["input_ids"][0]) and (static.input_ids[0, n:] == PAD).all()
    assert torch.equal(static.position_ids[0, :n], second["position_ids"][0])
    assert torch.equal(static.position_ids[0, n:], torch.arange(t - n))
    assert torch.equal(static.labels[0, :n], second["labels"][0]) and (static.labels[0, n:] == -100).all()
    assert static.cu_seq_lens.tolist() == [0, 3, 5, 45] + [t] * (bucket.docs + 1 - 4)
    assert torch.equal(static.seq_idx[0, :n], second["seq_idx"][0]) and (static.seq_idx[0, n:] == 3).all()


@pytest.mark.parametrize(
    "wide,shape,ends",
    [  # 2049 tokens in 5 documents; the ends of the documents after them
        (False, (2304, 8, 512, 128), [2177, 2304, 2304]),  # 255 pad tokens: two pad documents of at most 128
        (True, (3072, 16, 1024, 512), [2561, 3072] + [3072] * 9),  # 1023 pad tokens: two of at most 512
    ],
)
def test_long_padding_is_split_into_short_pad_documents(wide, shape, ends):
    lengths = [500, 500, 500, 500, 49]
    n = sum(lengths)
    batch = collate(lengths, 50, seed=3)
    bucket = (wide_bucket_for if wide else bucket_for)(n, len(lengths), 500)
    assert dataclasses.astuple(bucket) == shape
    static = StaticBatch(bucket, "cpu", PAD, with_seq_idx=True)
    for tensor in (static.input_ids, static.position_ids, static.labels, static.cu_seq_lens, static.seq_idx):
        tensor.fill_(-7)
    static.fill(batch)
    t, p = bucket.tokens, bucket.pad_doc
    assert static.cu_seq_lens.tolist() == [0, 500, 1000, 1500, 2000, n, *ends]
    assert torch.equal(static.position_ids[0, n:], torch.arange(t - n) % p)
    assert static.seq_idx[0, n:].tolist() == [5] * p + [6] * (t - n - p)
    assert (static.input_ids[0, n:] == PAD).all() and (static.labels[0, n:] == -100).all()
    assert torch.equal(static.input_ids[0, :n], batch["input_ids"][0])


def lora_model(dtype=torch.float32, device="cpu", backend="reference", seed=0):
    torch.manual_seed(seed)
    model = load_model("fusetune:tiny_llama", dtype, random_init=True).to(device)
    apply_kernels(model, backend)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters (and their gradients) non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def loss_stats_grads(model, inputs, num_items, static_shapes=False):
    """An eager step's outputs, detached (a live autograd graph would make a later capture fail), and grads."""
    out = model(**inputs, use_cache=False, token_stats=True, static_shapes=static_shapes, num_items_in_batch=num_items)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    return dataclasses.replace(out, loss=out.loss.detach()), grads


def loosest_bucket(tokens, docs, longest):
    """The largest wide bucket that still serves the batch (BucketPlan replays there up to LOOSE_PADDING)."""
    bucket = wide_bucket_for(buckets.LOOSE_PADDING * tokens, docs, longest)
    while not serves(bucket, tokens, docs, longest):
        bucket = wide_bucket_for(bucket.tokens // 2, docs, longest)
    return bucket


@pytest.mark.parametrize(
    "backend,lengths,bucket",
    [
        ("reference", [5, 17, 1, 30, 9], None),  # a one-token document; padded to 64 tokens, 8 documents
        ("reference", [16, 48], None),  # exactly a bucket: no pad document, only empty ones
        ("reference", [3, 100, 7, 61], None),
        ("reference", [500, 500, 500, 500, 49], None),  # 255 pad tokens: two pad documents
        ("reference", [500, 500, 500, 500, 49], wide_bucket_for),  # 3072 tokens: a 1023-token pad, 2 documents
        ("reference", [3, 100, 7, 61, 400, 529], loosest_bucket),  # 2048 tokens: pad documents of 512 and 436
        ("triton", [5, 17, 1, 30, 9], None),  # the Triton kernels: on CUDA, else on the interpreter (slow: one case)
    ],
)
def test_padded_batch_gives_the_same_loss_metrics_and_gradients(backend, lengths, bucket):
    on_cuda = backend == "triton" and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    device, tol = ("cuda", 1e-4) if on_cuda else ("cpu", 1e-5)  # fp32 dots run as tf32 on a GPU
    try:
        model = lora_model(backend=backend, device=device)
        assert enable_varlen_attention(model, backend="masked") == MASKED
        vocab = model.config.vocab_size
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(lengths, vocab, sum(lengths)).items()}
        num_items = torch.tensor(float((batch["labels"][:, 1:] != -100).sum() + 3))  # as if accumulating
        want, want_grads = loss_stats_grads(model, batch, num_items)
        shape = sum(lengths), len(lengths), max(lengths)
        bucket = bucket(*shape) if bucket else bucket_for(*shape)
        assert serves(bucket, *shape)
        padded = padded_batch(batch, PAD, bucket)
        assert padded["input_ids"].shape[1] == bucket.tokens >= sum(lengths)
        got, got_grads = loss_stats_grads(model, padded, num_items, static_shapes=True)
    finally:
        remove_kernels()
    assert rel(got.loss, want.loss) <= tol
    assert rel(got.entropy_sum, want.entropy_sum) <= tol
    assert int(got.num_correct) == int(want.num_correct)
    assert torch.is_tensor(got.num_valid) and int(got.num_valid) == want.num_valid
    for g, w in zip(got_grads, want_grads, strict=True):
        assert rel(g, w) <= tol


def trainer_for(tmp_path, tokenizer, **config):
    model = lora_model(device="cuda" if not config.get("use_cpu", True) else "cpu")
    rows = [{"prompt": f"Q{i}: " + "ab" * (i % 7), "completion": " A" + "z" * (i % 5 + 1)} for i in range(24)]
    defaults = dict(per_device_train_batch_size=4, report_to=[], save_strategy="no", max_steps=4, logging_steps=1)
    args = FastSFTConfig(output_dir=str(tmp_path), seed=0, padding_free=True, **{**defaults, **config})
    return FastSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def test_trainer_keeps_graphs_off_without_cuda_and_refuses_to_force_them(tiny_tokenizer, tmp_path, caplog):
    try:
        assert trainer_for(tmp_path, tiny_tokenizer, use_cpu=True).step_graphs is None  # off by default
        with caplog.at_level(logging.INFO, logger="fusetune.training.trainer"):
            trainer = trainer_for(tmp_path, tiny_tokenizer, use_cpu=True, cuda_graphs=None)
        assert trainer.step_graphs is None
        assert "cuda graphs off: no CUDA" in caplog.text
        with pytest.raises(FusetuneError, match="cuda_graphs=True: not possible here: no CUDA"):
            trainer_for(tmp_path, tiny_tokenizer, use_cpu=True, cuda_graphs=True)
    finally:
        remove_kernels()


# ------------------------------------------------------------------ graph replays against eager steps

cuda_only = [pytest.mark.gpu, needs_cuda, needs_varlen]
# (device, recorder, dtype, kernels, relative tolerance); "cpu": the same path, with reruns for replays
WHERE = {
    "cpu": ("cpu", Reruns, torch.float32, "reference", 1e-5),
    "cuda": ("cuda", CudaGraphs, torch.bfloat16, "triton", 2e-2),
}
where = pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=cuda_only)])


def graphed_setup(where):
    device, recorder, dtype, backend, tol = WHERE[where]
    model = lora_model(dtype=dtype, device=device, backend=backend)
    enable_varlen_attention(model, backend="masked" if device == "cpu" else "auto")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, StepGraphs(params, PAD, recorder=recorder(), device=device), tol


def layouts_batches(vocab, device, seed=0):
    """Padding-free batches: two in one bucket, one of exactly a bucket's size, and others."""
    layouts = [[40, 200, 17, 90], [33, 190, 51, 70], [64, 64], [500, 3, 300], [12, 700, 41, 9, 150]]
    assert bucket_for(347, 4, 200) == bucket_for(344, 4, 190) and bucket_for(128, 2, 64).tokens == 128
    out = []
    for i, lengths in enumerate(layouts):
        batch = collate(lengths, vocab, seed=seed + i)
        out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return out


@where
def test_replays_match_eager_steps(where):
    try:
        model, params, step_graphs, tol = graphed_setup(where)
        for round_ in range(2):  # the second round replays every bucket, after the weights changed
            for batch in layouts_batches(model.config.vocab_size, params[0].device, seed=10 * round_):
                num_items = (batch["labels"][:, 1:] != -100).sum()
                want, want_grads = loss_stats_grads(model, batch, num_items)
                got = step_graphs.run(model, batch, num_items)
                assert got is not None, step_graphs.disabled
                got.loss.backward()
                assert rel(got.loss, want.loss) <= tol
                assert rel(got.entropy_sum, want.entropy_sum) <= tol
                assert int(got.num_valid) == want.num_valid
                assert abs(int(got.num_correct) - int(want.num_correct)) <= tol * want.num_valid + (where == "cuda")
                for p, w in zip(params, want_grads, strict=True):
                    assert rel(p.grad, w) <= tol
                    p.grad = None
                # a replayed loss keeps its autograd node, and through it the parameters' AccumulateGrad
                # nodes, made on the default stream: alive at the next capture, they make it fail
                del got
            with torch.no_grad():  # an optimizer step: weights change in place
                for p in params:
                    p.add_(0.01 * torch.randn_like(p))
        step_graphs.release()  # the next replay captures afresh, and still matches
        batch = layouts_batches(model.config.vocab_size, params[0].device)[0]
        want, _ = loss_stats_grads(model, batch, None)
        got = step_graphs.run(model, batch)
        got.loss.backward()
        assert rel(got.loss, want.loss) <= tol
        stats = step_graphs.stats()
        # BucketPlan: wide buckets of 384 tokens (serves 347, 344 and 128), 1024 with longest 512 (serves 803)
        # and 1024 with longest 1024 (912); then 384 again after the release
        real = 2 * (347 + 344 + 128 + 803 + 912)
        real, padded = real + 347, 2 * (384 + 384 + 384 + 1024 + 1024) + 384
        padding = round(1 - real / padded, 4)
        want = {"buckets": 1, "captures": 4, "replays": 11, "loose_replays": 11, "padding": padding, "disabled": None}
        assert stats == {**stats, **want}
    finally:
        remove_kernels()


@where
def test_gradients_accumulate_across_buckets_and_scale_with_the_loss(where):
    try:
        model, params, step_graphs, tol = graphed_setup(where)
        batches = layouts_batches(model.config.vocab_size, params[0].device)[:4]
        num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
        want = [torch.zeros_like(p) for p in params]
        for batch in batches:
            _, grads = loss_stats_grads(model, batch, num_items)
            torch._foreach_add_(want, [0.5 * g for g in grads])
        for batch in batches:  # buckets A, A, B, C: the repeated bucket must not overwrite accumulated grads
            (0.5 * step_graphs.run(model, batch, num_items).loss).backward()
        for p, w in zip(params, want, strict=True):
            assert rel(p.grad, w) <= tol
    finally:
        remove_kernels()


class CountingReruns(Reruns):
    """Reruns that count warm-ups and fail the forward captures numbered in ``fail`` (1: the first)."""

    def __init__(self, fail=()):
        self.fail, self.warm_ups, self.forwards, self.calls = set(fail), 0, 0, 0

    def warm_up(self, fn) -> None:
        self.warm_ups += 1
        fn()

    def capture(self, fn):
        self.calls += 1
        if self.calls % 2:  # forward, backward, forward, ...
            self.forwards += 1
            if self.forwards in self.fail:
                self.calls -= 1  # its backward is never captured
                raise RuntimeError("operation not permitted when stream is capturing")
        return super().capture(fn)


@pytest.mark.parametrize(
    "fail,warm_ups,cold_retries,captures,disabled",
    [
        ((), 1, 0, 3, False),  # three buckets, one warm-up: the later two are captured cold
        ((2,), 2, 1, 3, False),  # the second bucket's cold capture fails: warm-up, then captured
        ((2, 3), 2, 1, 1, True),  # ... and again after the warm-up: graphs off, steps eager
        ((1,), 1, 0, 0, True),  # the first capture (warm) fails: graphs off, no retry
    ],
)
def test_later_buckets_are_captured_cold_and_retried_warm(fail, warm_ups, cold_retries, captures, disabled):
    try:
        model, params, _, tol = graphed_setup("cpu")
        recorder = CountingReruns(fail)
        step_graphs = StepGraphs(params, PAD, recorder=recorder, device="cpu")
        for batch in layouts_batches(model.config.vocab_size, "cpu"):  # buckets of 384, 384, 384, 1024, 1024
            want, _ = loss_stats_grads(model, batch, None)
            got = step_graphs.run(model, batch)
            if got is not None:
                assert rel(got.loss, want.loss) <= tol
                got.loss.backward()
            assert (got is None) == (step_graphs.last_action == "eager")
            del got
    finally:
        remove_kernels()
    stats = step_graphs.stats()
    assert (recorder.warm_ups, stats["cold_retries"], stats["captures"]) == (warm_ups, cold_retries, captures)
    assert (stats["disabled"] is not None) == disabled
    assert stats["replays"] + stats["eager_steps"] == 5


def test_a_backward_after_a_later_forward_is_refused():
    try:
        model, _, step_graphs, _ = graphed_setup("cpu")
        first, second = layouts_batches(model.config.vocab_size, "cpu")[:2]
        stale = step_graphs.run(model, first).loss
        step_graphs.run(model, second)
        with pytest.raises(RuntimeError, match="backward ran after a later forward"):
            stale.backward()
    finally:
        remove_kernels()


def graphed_trainer(tmp_path, tokenizer, where, graphed, **config):
    """A FastSFTTrainer with graphs on or off. On CPU "on" means the same code with Reruns for graphs:
    the trainer makes its StepGraphs at the first step, as on CUDA."""
    device, recorder, *_ = WHERE[where]
    on_cuda = device == "cuda"
    trainer = trainer_for(tmp_path, tokenizer, use_cpu=not on_cuda, cuda_graphs=graphed and on_cuda, **config)
    if graphed and not on_cuda:
        assert trainer.step_graphs_factory is None  # off without CUDA: turned on by hand
        trainer.step_graphs_factory = functools.partial(StepGraphs, recorder=recorder(), device="cpu")
    return trainer


def run_trainer(tmp_path, tokenizer, where, graphed, **config):
    trainer = graphed_trainer(tmp_path, tokenizer, where, graphed, **config)
    trainer.train()
    return trainer


def logged(trainer, key="loss"):
    return [log[key] for log in trainer.state.log_history if key in log]


@where
@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_losses_with_and_without_graphs(tiny_tokenizer, tmp_path, where, checkpointing):
    runs, tol = {}, WHERE[where][4]
    config = dict(gradient_accumulation_steps=2, gradient_checkpointing=checkpointing)
    try:
        for graphed in (False, True):
            runs[graphed] = run_trainer(tmp_path / str(graphed), tiny_tokenizer, where, graphed, **config)
            remove_kernels()
    finally:
        remove_kernels()
    graphs = runs[True].step_graphs
    assert runs[False].step_graphs is None and graphs.disabled is None
    assert graphs.replays == 8 and graphs.captures >= 1
    history = {graphed: [log for log in t.state.log_history if "loss" in log] for graphed, t in runs.items()}
    assert len(history[True]) == 4
    for eager, graph in zip(history[False], history[True], strict=True):
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert abs(graph[key] - eager[key]) <= tol * abs(eager[key]) + tol / 10, (key, eager, graph)
        assert graph["num_tokens"] == eager["num_tokens"]


@where
def test_resume_with_graphs_gives_the_same_losses(tiny_tokenizer, tmp_path, where):
    """Graphs are made at the first step, after the checkpoint is loaded: a resumed run trains the loaded weights."""
    tol = WHERE[where][4]
    config = dict(max_steps=6, save_strategy="steps", save_steps=3)
    try:
        whole = run_trainer(tmp_path / "whole", tiny_tokenizer, where, True, **config)
        remove_kernels()
        resumed = graphed_trainer(tmp_path / "resumed", tiny_tokenizer, where, True, **config)
        resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    finally:
        remove_kernels()
    assert resumed.step_graphs.replays == 3 and resumed.step_graphs.disabled is None
    assert logged(resumed)[-3:] == pytest.approx(logged(whole)[-3:], rel=tol)


@pytest.mark.gpu
@needs_cuda
@needs_varlen
def test_a_failed_capture_falls_back_to_eager_steps(tiny_tokenizer, tmp_path, monkeypatch, caplog):
    """Without static shapes the loss head syncs inside the capture: the capture fails, training goes on."""
    monkeypatch.setattr(graphs, "FORWARD_KEYWORDS", {**graphs.FORWARD_KEYWORDS, "static_shapes": False})
    try:
        trainer = trainer_for(tmp_path, tiny_tokenizer, use_cpu=False, cuda_graphs=True)
        with caplog.at_level(logging.WARNING, logger="fusetune.sequences.graphs"):
            trainer.train()
    finally:
        remove_kernels()
    assert trainer.step_graphs.disabled.startswith("capture failed") and "cuda graphs off" in caplog.text
    losses = logged(trainer)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
