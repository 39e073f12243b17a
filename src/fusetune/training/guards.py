"""What every fusetune trainer adds to TRL's, SFT and preference alike (put ``GuardedTrainer`` before TRL's
class among the bases, and call ``guard_run`` at the end of ``__init__``):

- each checkpoint is marked whole once written (``checkpoints.MarkComplete``), so that ``resume=auto`` can
  trust it, and a save that fails on a full disk leaves no half-written folder (``checkpoints.saving``);
- a non-finite loss, gradient or checkpoint stops the run, naming the step (``faults.NonFiniteGuard``);
- TRL's count of trained tokens continues from the checkpoint on a resumed run (``ResumeTokenCount``).
"""

from ..compat.trl import ResumeTokenCount
from .checkpoints import MarkComplete, saving
from .faults import NonFiniteGuard


class GuardedTrainer:
    def guard_run(self, nan_policy: str = "stop", max_skipped_fraction: float = 0.1, max_skipped_in_a_row: int = 3):
        self.checkpoint_marker = MarkComplete()
        self.nonfinite_guard = NonFiniteGuard(nan_policy, max_skipped_fraction, max_skipped_in_a_row)
        self.add_callback(self.checkpoint_marker)
        self.add_callback(self.nonfinite_guard)
        self.add_callback(ResumeTokenCount(self))

    def _save_checkpoint(self, model, trial):
        with saving(f"{self.args.output_dir}/checkpoint-{self.state.global_step}", remove_partial=True):
            super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if _internal_call:  # within _save_checkpoint, which says it
            return super().save_model(output_dir, _internal_call)
        with saving(output_dir or self.args.output_dir):
            super().save_model(output_dir, _internal_call)
