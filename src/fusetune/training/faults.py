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

``StopOnSignal`` stops a run on SIGINT or SIGTERM, by phase. Where the work in flight must finish to leave
something consistent (the training steps, a save) the handler only records the signal: the step finishes and a
checkpoint is saved, or the save completes, and then the run stops. Everywhere else it raises ``SignalStop`` at
once. A second signal ends the process at once.
"""

import logging
import math
import os
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


class SignalStop(KeyboardInterrupt):
    """Raised by ``StopOnSignal``: which signal came, and in which phase. A KeyboardInterrupt, so ``except
    Exception`` cannot swallow it and third-party clean-ups written for Ctrl-C run."""

    def __init__(self, signum: int, phase: str):
        super().__init__(f"{signal.Signals(signum).name} during {phase}")
        self.signum, self.phase = signum, phase


class StopOnSignal(TrainerCallback):
    """SIGINT and SIGTERM, by phase; a context manager, and a trainer callback for the training phase.

    ``enter(phase)`` names what runs next. In a phase entered with ``defer=True`` the handler only records the
    signal: the trainer saves a checkpoint at the end of the step in flight and stops (an evaluation between steps
    stops at its next batch, raising ``SignalStop``), and the next ``enter`` raises ``SignalStop`` naming the phase
    the signal came in. In any other phase the handler raises ``SignalStop`` at once. A second signal calls
    ``last_words(why)`` and ends the process at once, by that signal.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    EVALUATING = "evaluation"  # between training steps

    def __init__(self, last_words=None, signals: tuple = SIGNALS):
        self.received: int | None = None
        self.phase, self.deferred = "start", False
        self.stopped_in: str | None = None  # the phase the first signal came in
        self.step = 0  # the last training step finished
        self.last_words = last_words
        self.signals = signals
        self._previous: dict = {}
        self._pid = os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def enter(self, phase: str, defer: bool = False) -> None:
        """From here on ``phase`` runs; a signal recorded in a deferred phase before it is raised now."""
        if self.received is not None:
            raise SignalStop(self.received, self.stopped_in)
        self.phase, self.deferred = phase, defer

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked worker (datasets' num_proc): it stops as on Ctrl-C, its parent decides
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if self.received is not None:  # the second one: end now
            signal.signal(signum, signal.SIG_DFL)
            if self.last_words is not None:
                self.last_words(f"{name} twice during {self.stopped_in}: stopped at once")
            signal.raise_signal(signum)
            return
        self.received, self.stopped_in = signum, self.phase
        if not self.deferred:
            raise SignalStop(signum, self.phase)
        log.warning("%s during %s: stopping after the step or save in flight", name, self.phase)

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        if self.received is not None:
            control.should_save = True
            control.should_evaluate = False
            control.should_training_stop = True

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.received is not None and self.deferred:  # an evaluation between training steps
            self.stopped_in = self.EVALUATING
            raise SignalStop(self.received, self.EVALUATING)

    @property
    def exit_code(self) -> int:
        return 128 + self.received if self.received is not None else 0
