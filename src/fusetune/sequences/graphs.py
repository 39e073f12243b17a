"""CUDA graphs for padding-free training steps: forward and backward replayed, not re-launched.

A padding-free LoRA step of a 1B model launches about 2,000 kernels. Eager PyTorch spends tens of
microseconds of host time on each (HF's modules, PEFT, autograd, Triton's launcher), so a step of a
few thousand tokens leaves the GPU waiting for the CPU. Captured as two CUDA graphs, forward and
backward, the whole step costs the host two graph launches and a few small copies.

A graph replays fixed shapes, so each batch is padded up to a bucket (``fusetune.sequences.buckets``: the
shapes, the static input buffers a batch is padded into, and ``BucketPlan``: which captured bucket a
batch replays, and when a new one is captured, so that a short run is not spent capturing).

Each bucket gets a forward graph and a backward graph, all in one memory pool: a step replays one
bucket's forward and then its backward before any other graph runs, so the buckets share their
activation memory. The first capture follows an eager warm-up step on the capture stream (kernels
compile, workspaces are made); later buckets are captured cold, which costs the host one traced step,
not two. A cold capture that fails (a kernel compiling for a new shape inside it, say) is retried once
after a warm-up. The backward graph writes the gradients into one set of buffers shared by every
bucket, and hands autograd fresh copies multiplied by the loss's incoming gradient. Gradient
accumulation, HF's division by the accumulation steps, and fp16 loss scaling work as in eager mode.
The loss is divided inside the graph by a denominator that is copied in before each replay
(``num_items_in_batch``, or the batch's own label count).

Inside the graphs the fused loss head scores every row, pad rows included (the forward is called
with ``static_shapes=True``, ``FORWARD_KEYWORDS``), since finding the labelled rows needs a host
sync. With prompts that are not trained on, that is extra lm_head work in proportion to the prompt
tokens. The attention layout cached on the static batch by the eager warm-up is dropped before each
capture (``varlen.forget_layouts``), so the graph computes its own. At capture time no autograd graph
through the trained parameters may be alive (a loss kept with its graph, say): the captured backward
would have to wait on the stream that graph ran on, and the capture fails. A failed capture turns
graphs off, with the reason logged, and training goes on eagerly.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from fusetune_kernels.cross_entropy import loss_denominator

from ..errors import first_line
from ..forwards import IGNORE_INDEX, TokenStatsOutput
from . import varlen
from .buckets import MAX_BUCKETS, BucketPlan, StaticBatch, batch_blocker, bucket_for

log = logging.getLogger(__name__)
WARMUP_STEPS = 1  # eager runs on the capture stream before the first capture (compiles kernels, makes workspaces)
# How the graphs call the model, besides the static batch and the loss denominator: the loss and metric
# sums (TokenStatsOutput), every row scored by the loss head (no host sync to find the labelled ones).
FORWARD_KEYWORDS = {"use_cache": False, "token_stats": True, "static_shapes": True}


class CudaGraphs:
    """Captures closures as CUDA graphs: on one side stream, all in one memory pool."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    def warm_up(self, fn) -> None:
        """Run ``fn`` eagerly on the capture stream: kernels compile, workspaces are made."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            fn()
        torch.cuda.current_stream().wait_stream(self.stream)

    def capture(self, fn) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data loader's pin-memory thread may allocate while we capture
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            fn()
        return graph

    def recover(self) -> None:
        """After a failed capture CUDA's random generator still counts offsets for a graph, and every
        random op outside one raises; one empty, successful capture resets it."""
        torch.cuda.synchronize()
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=self.stream):
            pass


class Reruns:
    """Stands in for CUDA graphs where there are none (tests on CPU, or telling a graph bug from a
    padding bug): a "replay" runs the closure again, eagerly."""

    @dataclass
    class Rerun:
        replay: object

    def warm_up(self, fn) -> None:
        fn()

    def capture(self, fn) -> "Reruns.Rerun":
        return Reruns.Rerun(fn)

    def recover(self) -> None:
        pass


@dataclass
class _Captured:
    static: StaticBatch
    forward: object  # .replay(): the model's forward on the static batch
    backward: object  # .replay(): its gradients into StepGraphs.grad_buffers
    state: dict  # "outputs": the forward's TokenStatsOutput (in a CUDA graph: fixed tensors)


class _Replay(torch.autograd.Function):
    """The forward graph as one autograd node whose backward replays the backward graph."""

    @staticmethod
    def forward(ctx, graphs, captured, *params):
        captured.forward.replay()
        ctx.graphs, ctx.captured, ctx.token = graphs, captured, object()
        graphs.pending = ctx.token  # this forward's activations are the ones in the pool now
        return captured.state["outputs"].loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        graphs, captured = ctx.graphs, ctx.captured
        if graphs.pending is not ctx.token:
            raise RuntimeError(
                "fusetune cuda graphs: a step's backward ran after a later forward; "
                "each graphed forward must be followed by its own backward"
            )
        graphs.pending = None
        captured.backward.replay()
        fresh = iter(torch._foreach_mul(graphs.grad_buffers, grad_loss))
        return None, None, *(next(fresh) if used else None for used in graphs.used)


class StepGraphs:
    """Graphed forward + backward of a model on padding-free batches, one pair of graphs per bucket.

    ``run(model, batch, num_items_in_batch)`` returns the forward's ``TokenStatsOutput`` (the loss
    attached to autograd, and the metric sums), or None when the batch must run eagerly.
    ``recorder``: ``CudaGraphs()`` (the default), or ``Reruns()`` to run the same padded path eagerly.
    """

    def __init__(self, params: list[torch.nn.Parameter], pad_token_id: int, recorder=None, device="cuda"):
        self.params = list(params)
        self.pad_token_id = pad_token_id
        self.recorder = recorder if recorder is not None else CudaGraphs()
        self.device = torch.device(device)
        self.graphs: dict[tuple, _Captured] = {}  # (bucket, with seq_idx) -> its graphs
        self.plan = BucketPlan()
        self.denominator = torch.ones((), dtype=torch.float32, device=self.device)
        self.one = torch.ones((), dtype=torch.float32, device=self.device)
        self.used: list[bool] | None = None  # which params get a gradient
        self.grad_buffers: list[torch.Tensor] = []
        self.pending: object | None = None  # the forward whose backward may run next
        self.disabled: str | None = None  # why graphs stopped being used, once they did
        self.captures = 0
        self.replays = 0
        self.loose_replays = 0  # replays in a bucket larger than the batch's own
        self.eager_steps = 0  # batches run eagerly (a batch that cannot be padded, or no bucket left)
        self.last_action: str | None = None  # the latest batch's: "capture", "replay" or "eager"
        self.capture_seconds = 0.0
        self.stream_warm = False  # whether the capture stream ran a step eagerly (later buckets capture cold)
        self.cold_retries = 0  # cold captures that failed, and succeeded after a warm-up
        self.tokens = 0  # real tokens replayed
        self.padded_tokens = 0  # the same rows, padded to their buckets
        self._said: set[str] = set()

    def run(self, model, batch: dict, num_items_in_batch=None):
        self.last_action = "eager"  # unless a bucket takes the batch below
        if self.disabled is not None:
            self.eager_steps += 1
            return None
        reason = batch_blocker(batch, self.device.type)
        if reason is None and batch.get("max_length_q") is None:
            reason = "it has no max_length_q (reading the longest document would sync)"
        if reason is not None:
            self._say(f"this batch runs eagerly: {reason}")
            self.eager_steps += 1
            return None
        tokens, docs = batch["input_ids"].shape[1], batch["cu_seq_lens_q"].numel() - 1
        longest, kind = int(batch["max_length_q"]), batch.get("seq_idx") is not None
        choice = self.plan.choose(tokens, docs, longest, kind)
        if choice.action == "eager":
            self._say(f"batches that no captured bucket serves run eagerly: {MAX_BUCKETS} buckets are captured already")
            self.eager_steps += 1
            return None
        key = (choice.bucket, kind)
        captured = self.graphs.get(key)
        static = (
            StaticBatch(choice.bucket, self.device, self.pad_token_id, kind) if captured is None else captured.static
        )
        static.fill(batch)
        self._set_denominator(batch, num_items_in_batch)
        if captured is None:
            captured = self._capture(model, static)
            if captured is None:
                self.eager_steps += 1
                return None
            self.graphs[key] = captured
            self.plan.captured(*key)
        self.last_action = choice.action
        self.replays += 1
        self.loose_replays += choice.bucket != bucket_for(tokens, docs, longest)
        self.tokens += tokens
        self.padded_tokens += choice.bucket.tokens
        loss = _Replay.apply(self, captured, *self.params)
        out = captured.state["outputs"]
        sums = torch.stack([out.entropy_sum.float(), out.num_correct.float(), out.num_valid.float()])
        return TokenStatsOutput(loss=loss, entropy_sum=sums[0], num_correct=sums[1], num_valid=sums[2])

    def _set_denominator(self, batch: dict, num_items_in_batch) -> None:
        """What the eager loss head divides by: ``num_items_in_batch``, else this batch's labelled tokens."""
        value = loss_denominator(batch["labels"][:, 1:], IGNORE_INDEX, "mean", num_items_in_batch)
        if torch.is_tensor(value):
            self.denominator.copy_(value)
        else:
            self.denominator.fill_(value)

    def _capture(self, model, static: StaticBatch) -> _Captured | None:
        inputs = {**static.model_inputs(), **FORWARD_KEYWORDS, "num_items_in_batch": self.denominator}
        layout = (static.cu_seq_lens, static.position_ids)  # the tensors attention caches its masks on
        state = {}

        def warm_up():
            varlen.forget_layouts(*layout)
            loss = model(**inputs).loss
            self._make_grad_buffers(torch.autograd.grad(loss, self.params, allow_unused=True))

        def forward():
            # The attention masks are built inside the graph, not reused from the warm-up.
            varlen.forget_layouts(*layout)
            # here, not around capture(): Reruns run it again later, inside _Replay.forward (no grad)
            with torch.enable_grad():
                state["outputs"] = model(**inputs)

        def backward():
            out = state["outputs"]
            grads = torch.autograd.grad(out.loss, self.params, grad_outputs=self.one, allow_unused=True)
            torch._foreach_copy_(self.grad_buffers, [g for g in grads if g is not None])
            # Keep no autograd graph: its AccumulateGrad nodes would pin every later backward to this stream.
            state["outputs"] = dataclasses.replace(out, loss=out.loss.detach())

        if torch.is_autocast_enabled(self.device.type):
            self.disabled = "an autocast region encloses the step (its cast cache would go stale in a graph)"
            log.warning("cuda graphs off: %s; training eagerly from here", self.disabled)
            return None
        start = time.perf_counter()

        def record(warm: bool) -> _Captured:
            for _ in range(WARMUP_STEPS if warm else 0):
                self.recorder.warm_up(warm_up)
            self.stream_warm = True
            return _Captured(static, self.recorder.capture(forward), self.recorder.capture(backward), state)

        try:
            if not self.stream_warm:
                captured = record(warm=True)
            else:  # cold: the stream and the kernels are warm from the first bucket; a new shape may still fail
                try:
                    captured = record(warm=False)
                except Exception:  # noqa: BLE001 - then warm up for this shape and capture again
                    self.recorder.recover()
                    self.cold_retries += 1
                    captured = record(warm=True)
        except Exception as error:  # noqa: BLE001 - any capture failure means: train eagerly
            self.recorder.recover()
            self.disabled = (
                f"capture failed ({first_line(error, with_type=True)}; "
                "usual causes: a host sync in the step, or an earlier step's autograd graph still alive)"
            )
            log.warning("cuda graphs off: %s; training eagerly from here", self.disabled)
            return None
        self.captures += 1
        self.capture_seconds += time.perf_counter() - start
        log.info(
            "cuda graphs: captured bucket of %d tokens, %d documents, longest %d (%d buckets, %.1f s)",
            static.bucket.tokens,
            static.bucket.docs,
            static.bucket.longest,
            self.captures,
            self.capture_seconds,
        )
        return captured

    def release(self) -> None:
        """Free the graphs and their memory pool (the counts stay); a later step captures afresh."""
        self.graphs.clear()
        self.plan.forget()
        self.pending = None
        self.recorder = type(self.recorder)()  # a new pool: the old one goes with its graphs
        self.stream_warm = False

    def _make_grad_buffers(self, grads) -> None:
        used = [g is not None for g in grads]
        if self.used is None:
            self.used = used
            self.grad_buffers = [torch.empty_like(g) for g in grads if g is not None]
        elif used != self.used:
            raise RuntimeError("the set of parameters that get gradients changed between buckets")

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.info("cuda graphs: %s", message)

    def stats(self) -> dict:
        return {
            "buckets": len(self.graphs),
            "captures": self.captures,
            "replays": self.replays,
            "loose_replays": self.loose_replays,
            "eager_steps": self.eager_steps,
            "capture_seconds": round(self.capture_seconds, 3),
            "cold_retries": self.cold_retries,
            "padding": round(1 - self.tokens / self.padded_tokens, 4) if self.padded_tokens else 0.0,
            "disabled": self.disabled,
        }
