"""Faults during training: a non-finite loss or gradient, and a stop asked by a signal.

``NonFiniteGuard`` (``FastSFTConfig.nan_policy``):

- ``"stop"`` (the default) reads nothing extra on the host: a step's loss stays on the device. At each
  log it checks the logged loss and gradient norm, and ``checkpoints.MarkComplete`` checks the weights at
  each save; the first non-finite value stops training, naming the step, and no later checkpoint is
  kept, so the last good one is the newest. ``stopped`` says why.
- ``"skip"``: before each optimizer step it checks the gradients (one host read a step) and, when any
  is not finite, drops them all, so that step changes no weight and no optimizer state; ``skipped``
  counts them, and the trainer logs the count as ``skipped_steps``.

``StopOnSignal`` turns SIGINT and SIGTERM into "save a checkpoint after this step, then stop": the
handler only sets a flag, and the step in flight finishes. A second signal ends the process at once.
"""

import logging
import math
import signal
import threading

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)
NAN_POLICIES = ("stop", "skip")


def _finite(value) -> bool:
    return value is None or math.isfinite(float(value))


class NonFiniteGuard(TrainerCallback):
    def __init__(self, policy: str = "stop"):
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy: expected one of {', '.join(NAN_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.skipped = 0
        self.stopped: str | None = None  # why training stopped, where it did

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = [k for k in ("loss", "grad_norm") if logs and k in logs and not _finite(logs[k])]
        if bad and self.policy == "stop" and self.stopped is None:
            self.stopped = f"non-finite {' and '.join(bad)} at step {state.global_step}"
            log.error("%s: training stops; the newest checkpoint before it is the last good one", self.stopped)
            control.should_training_stop = True
            control.should_save = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.policy != "skip" or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            for p in model.parameters():
                p.grad = None  # the optimizer steps over parameters without a gradient
            self.skipped += 1
            log.warning("step %d: non-finite gradients, skipped (%d so far)", state.global_step + 1, self.skipped)


class StopOnSignal(TrainerCallback):
    """Between steps, after SIGINT or SIGTERM: save a checkpoint, then stop. Use as a context manager."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.received is not None:  # the second one: do not wait for the step
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        log.warning("%s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    @property
    def exit_code(self) -> int:
        return 128 + self.received if self.received is not None else 0
