"""Hydra's own errors as the app's: a config that does not compose ends with exit code 2 and one line.

A misspelled key, a wrong type, a missing group option or an override that does not parse is a user mistake
like any other, so it ends as they do: ``fusetune: error: ...`` on stderr and exit code 2, instead of Hydra's
five lines and exit code 1.

Hydra prints these errors itself and exits, unless ``HYDRA_FULL_ERROR=1``: then it raises them. ``main_exits_2``
sets that while Hydra parses and composes, and turns Hydra's compact errors (the ones it would print without a
traceback) into the one line. ``job_started``, the task function's first call, takes the variable back, so an
error inside the run is reported by Hydra exactly as before. A user who sets ``HYDRA_FULL_ERROR=1`` gets Hydra's
full stack traces, as Hydra documents. In a multirun the variable stays set, so that an optimizing sweeper's own
end (Optuna with no finished trial, or more failed trials than ``max_failure_rate`` allows) comes back here: the
ablation report, then one line, and exit code 1.
"""

import dataclasses
import os
import sys
from collections.abc import Callable
from difflib import get_close_matches

from hydra.errors import CompactHydraException, InstantiationException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ..errors import FusetuneError, first_line
from .config import moved_key_line

FULL_ERROR = "HYDRA_FULL_ERROR"
_state = {"set_here": False, "job_started": False, "multirun": False}


def hydra_error_line(error: CompactHydraException) -> str:
    """What Hydra could not do and OmegaConf's reason, without the key dump: one line. A key that moved
    (config.MOVED_KEYS), overridden or set by a preset, is named with its new place alone."""
    reason = error.__cause__ or error.__context__  # a preset's key: Hydra raises while handling OmegaConf's error
    if isinstance(reason, ConfigAttributeError | ConfigKeyError) and (moved := moved_key_line(str(reason.full_key))):
        return moved
    line = first_line(error).rstrip(".")
    if isinstance(error, OverrideParseException):
        line = f"{error.override}: {line}"
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        line += f": {first_line(cause)}"
        if isinstance(cause, ConfigAttributeError | ConfigKeyError) and dataclasses.is_dataclass(cause.object_type):
            keys = [f.name for f in dataclasses.fields(cause.object_type)]  # a key not in a schema: the nearest
            line += "".join(f" (did you mean {near}?)" for near in get_close_matches(str(cause.key), keys, n=1))
    if isinstance(error, MissingConfigException) and error.options:
        options = [o for o in error.options if not o.endswith("_schema")]  # register_configs' typed bases
        line += f" (options: {', '.join(options)})"
    return line


def job_started() -> None:
    """The config composed and the run begins: Hydra reports what goes wrong from here, as it always has."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    _state["job_started"] = True
    _state["multirun"] = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if _state["set_here"] and not _state["multirun"]:  # a sweeper's own end comes back here (study_ended)
        os.environ.pop(FULL_ERROR, None)
        _state["set_here"] = False


NULL_PARENT = (
    "an override adds a key under a node that is null (such as +model.lora.r=8 while model.lora is null, a full "
    "fine-tune): give the node first (+model/lora=default), then its keys"
)


def study_ended(error: Exception) -> str | None:
    """The one line for how an optimizing sweeper (Optuna) ends a study that it cannot finish, or None."""
    from .cli import exception_line
    from .objective import TrialFailed

    if isinstance(error, ValueError) and "No trials are completed" in str(error):
        return "no trial of the study finished: every one failed (the report above lists why)"
    if isinstance(error, TrialFailed | FusetuneError):  # a batch of trials failed more than max_failure_rate allows
        why = str(error) if isinstance(error, FusetuneError) else exception_line(error)
        return f"the study stopped: more trials failed than hydra.sweeper.max_failure_rate allows ({why})"
    return None


def main_exits_2(main: Callable[[], object]) -> object:
    """Call a ``@hydra.main`` function; a config that does not compose exits 2 with one line on stderr, and a run
    stopped by a signal (exit 128 + the signal) ends the process without the interpreter's teardown."""
    _state["job_started"] = False
    _state["multirun"] = bool({"-m", "--multirun"} & set(sys.argv[1:]))  # jobs may run in other processes
    if FULL_ERROR in os.environ:  # the user's own choice
        return main()
    os.environ[FULL_ERROR] = "1"
    _state["set_here"] = True
    try:
        return main()
    except CompactHydraException as error:
        if isinstance(error, InstantiationException) or (_state["job_started"] and not _state["multirun"]):
            raise  # not a config mistake
        if _state["job_started"]:  # the config of a later job of the multirun
            from .callbacks import end_multirun

            end_multirun()
        print(f"fusetune: error: {hydra_error_line(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except AssertionError as error:  # OmegaConf asserts when an override adds a key under a null node
        if _state["job_started"] or "Unexpected type for root: NoneType" not in str(error):
            raise
        print(f"fusetune: error: {NULL_PARENT}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as error:  # a multirun's sweeper ended it: the report, then one line
        line = study_ended(error) if _state["multirun"] else None
        if line is None:
            raise
        from .callbacks import end_multirun

        end_multirun()
        print(f"fusetune: error: {line}", file=sys.stderr, flush=True)
        sys.exit(1)
    except SystemExit as exiting:
        if isinstance(exiting.code, int) and exiting.code > 128:  # a signal stopped the run, its record written
            from .cli import exit_now

            exit_now(exiting.code)
        raise
    finally:
        if _state["set_here"]:
            os.environ.pop(FULL_ERROR, None)
            _state["set_here"] = False
