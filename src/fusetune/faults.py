"""Faults during training: a non-finite loss or gradient, and a stop asked by a signal.

``NonFiniteGuard`` (``FastSFTConfig.nan_policy``):

- ``"stop"`` (the default) reads nothing extra on the host: a step's loss stays on the device. At each
  log it checks the logged loss and gradient norm, and ``checkpoints.MarkComplete`` checks the weights at
  each save; the first non-finite value stops training, naming the step, and no later checkpoint is
  kept, so the last good one is the newest. ``stopped`` says why.
- ``"skip"``: before each optimizer step it checks the gradients (one host read a step) and, when any
  is not finite, drops them all, so that step changes no weight and no optimizer state; ``skipped_at``
  lists them, and the trainer logs the count as ``skipped_steps`` and a loss of None (null) for a log
  window of skipped steps only. A run that skips ``max_skipped_in_a_row`` steps in a row, or more than
  ``max_skipped_fraction`` of its steps once ``FRACTION_AFTER_STEPS`` have run, has diverged: training
  stops without saving that step, and ``stopped`` says why, naming the steps.

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
FRACTION_AFTER_STEPS = 10  # the share of skipped steps is judged once this many have run


def _finite(value) -> bool:
    return value is None or math.isfinite(float(value))


class NonFiniteGuard(TrainerCallback):
    def __init__(self, policy: str = "stop", max_skipped_fraction: float = 0.1, max_skipped_in_a_row: int = 3):
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy: expected one of {', '.join(NAN_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.max_fraction, self.max_in_a_row = max_skipped_fraction, max_skipped_in_a_row
        self.skipped_at: list[int] = []  # the steps skipped in this session
        self.first_step = 0  # the step this session started from (a resumed run's checkpoint)
        self.logged_through = 0  # the last step whose loss the trainer has logged
        self.stopped: str | None = None  # why training stopped, where it did

    @property
    def skipped(self) -> int:
        return len(self.skipped_at)

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = self.logged_through = state.global_step

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
            step = state.global_step + 1
            self.skipped_at.append(step)
            log.warning("step %d: non-finite gradients, skipped (%d so far)", step, self.skipped)

    def on_step_end(self, args, state, control, **kwargs):
        if self.policy != "skip" or not self.skipped_at:
            return
        if self.stopped is None and (why := self._diverged(state.global_step)):
            self.stopped = why
            log.error("%s: training stops", why)
        if self.stopped is not None:
            control.should_training_stop = True
            control.should_save = False  # a diverged step is no checkpoint to resume from

    def _diverged(self, step: int) -> str | None:
        """Why the skipped steps up to ``step`` mean the run has diverged, or None."""
        in_a_row = 0
        while in_a_row < len(self.skipped_at) and self.skipped_at[-in_a_row - 1] == step - in_a_row:
            in_a_row += 1
        steps = step - self.first_step
        if in_a_row >= self.max_in_a_row:
            why = f"{in_a_row} steps in a row (max_skipped_in_a_row={self.max_in_a_row})"
        elif steps >= FRACTION_AFTER_STEPS and self.skipped > self.max_fraction * steps:
            why = f"{self.skipped} of {steps} steps (over max_skipped_fraction={self.max_fraction:g})"
        else:
            return None
        shown = ", ".join(map(str, self.skipped_at[-8:]))
        return f"diverged: non-finite gradients skipped {why}, at steps {shown}"


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
