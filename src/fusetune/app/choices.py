"""Names the installed libraries accept, checked when the config composes: a misspelled optimizer, scheduler,
strategy or attention implementation is refused before anything loads, with the nearest name."""

from difflib import get_close_matches


def _trainer_choices() -> dict[str, list[str]]:
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
    from transformers.training_args import OptimizerNames

    intervals = [s.value for s in IntervalStrategy]
    return {
        "optim": [o.value for o in OptimizerNames],
        "lr_scheduler_type": [s.value for s in SchedulerType],
        "eval_strategy": intervals,
        "logging_strategy": intervals,
        "save_strategy": [s.value for s in SaveStrategy],
    }


def attention_names() -> list[str]:
    """The attention implementations transformers dispatches to by name (a hub kernel "org/repo" also works)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def _attention_accepted(name: str) -> bool:
    from transformers.integrations.hub_kernels import is_kernel

    return name.removeprefix("paged|") in attention_names() or is_kernel(name)


def not_one_of(key: str, value: str, names: list[str]) -> str:
    """The nearest name where one is close, else all of them."""
    near = get_close_matches(value, names, n=1)
    if near:
        return f"{key}: '{value}' is not a name the installed transformers accepts (did you mean {near[0]}?)"
    return f"{key}: '{value}' is not one of {', '.join(names)}"


def choice_problems(cfg) -> list[str]:
    """One line for each trainer or model value that the installed transformers does not accept."""
    problems = []
    for key, names in _trainer_choices().items():
        value = cfg.trainer.get(key)
        if value is not None and str(value) not in names:
            problems.append(not_one_of(f"trainer.{key}", str(value), names))
    attention = cfg.model.attn_implementation
    if attention is not None and not _attention_accepted(str(attention)):
        problems.append(not_one_of("model.attn_implementation", str(attention), attention_names()))
    return problems
