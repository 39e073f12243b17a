"""The objective a sweeper optimizes: one number from the run's summary.

``run_or_exit`` returns the summary value that ``objective`` names (``eval_loss`` by default), and Hydra hands it
to the sweeper: Optuna (``hydra/sweeper=optuna``) minimizes or maximizes it, as its ``direction`` says. A name is
a key of summary.json (``train_loss``, ``train_tokens_per_second``, or a dotted path such as
``eval.exact_match``) or a key of its ``eval`` block (``eval_loss``, ``exact_match``).

A failed job. Under a sweeper that optimizes (any but Hydra's basic one) the job raises. hydra-optuna-sweeper then
tells Optuna that the trial failed (TrialState.FAIL, which the samplers leave out) and logs ``Failed experiment:``
with the error; its ``max_failure_rate`` (per batch of ``n_jobs`` trials) decides whether the study goes on or
stops with that error. The other answers are worse with hydra-optuna-sweeper 1.3: None is a failed trial too, but
logged as "Return value must be float-castable", and the study goes on whatever max_failure_rate says; NaN stops
the whole sweep (Optuna refuses it, and then the plugin's second tell fails); inf is a completed trial with a
made-up value, the best one under ``direction: maximize``. A grid sweep (the basic sweeper) ignores return values:
there a failed job returns, and the sweep goes on to its other jobs, as before.
"""

import math

from omegaconf import OmegaConf

from ..data.rules import eval_requested
from ..errors import FusetuneError

DEFAULT = "eval_loss"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class TrialFailed(Exception):
    """A job of an optimizing sweep failed: its one line (the traceback is in the job's log). Picklable, so it gets
    back from joblib and submitit workers whatever the original exception was."""


def optimizing() -> bool:
    """Whether this job belongs to a multirun whose sweeper optimizes the returned objective (not the grid)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra = HydraConfig.get()
    return hydra.mode == RunMode.MULTIRUN and OmegaConf.select(hydra, "sweeper._target_") != BASIC_SWEEPER


def name_of(cfg) -> str:
    """The top-level key ``objective``, else eval_loss."""
    return str(cfg.get("objective") or DEFAULT)


def check(cfg) -> None:
    """Before training: an objective that evaluation computes needs evaluation on."""
    name = name_of(cfg)
    evaluated = cfg.trainer.eval_strategy != "no" or eval_requested(cfg.data)  # at the end, at least
    if name.removeprefix("eval.").startswith("eval_") and not evaluated:
        raise FusetuneError(
            f"objective {name} needs evaluation: set trainer.eval_strategy=steps (or epoch); the synthetic data "
            "has an eval split, other data needs data.eval_path, data.eval_split or data.eval_fraction"
        )


def lookup(summary: dict, name: str):
    """``name`` in a summary: a dotted path from its top, else a key of its eval block; None where there is none."""
    value = summary
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None and "." not in name:
        value = (summary.get("eval") or {}).get(name)
    return value


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def value_of(summary: dict, name: str, required: bool) -> float | None:
    """The objective as a float. Missing or not finite: None, or (``required``) a FusetuneError that says why."""
    value = lookup(summary, name)
    if _number(value) and math.isfinite(value):
        return float(value)
    if not required:
        return None
    if _number(value):
        raise FusetuneError(f"objective {name} is {value}: this run gives the sweeper no value")
    numbers = [k for k, v in summary.items() if _number(v)] + [k for k, v in (summary.get("eval") or {}).items()]
    raise FusetuneError(f"objective {name}: not in this run's summary (it has: {', '.join(numbers)})")
