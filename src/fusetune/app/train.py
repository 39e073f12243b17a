"""The Hydra app: ``fusetune train ...`` and ``python train.py ...`` run ``main`` on their configs."""

import sys

import hydra

from .config import expand_resume_shorthand, register_configs
from .gpus import register_resolvers
from .hydra_errors import job_started, main_exits_2
from .launcher import register_launcher


def train(cfg) -> float | None:
    """The task: runs one composed config; returns the objective (eval_loss by default), what a sweeper such as
    Optuna optimizes."""
    job_started()  # the config composed: Hydra reports errors from here on, as it always has
    from .cli import run_or_exit

    return run_or_exit(cfg)


def register() -> None:
    """What the configs need before they compose: the schemas, the resolvers and the launcher."""
    register_configs()
    register_resolvers()  # conf/hydra/launcher/local.yaml: ${fusetune.visible_gpus:}, ${fusetune.parallel_jobs:}
    register_launcher()  # its class, hydra_plugins.fusetune_launcher.JoblibLauncher


def main(argv: list[str], config_dir: str) -> int:
    """Compose ``config_dir``'s train.yaml with the overrides and Hydra flags of ``argv``, and run it. A config that
    does not compose exits 2 with one line (hydra_errors); Hydra reads ``sys.argv``, so it is set to ``argv``."""
    register()
    sys.argv[1:] = expand_resume_shorthand(list(argv))  # resume=auto: resume.checkpoint=auto
    task = hydra.main(version_base="1.3", config_path=str(config_dir), config_name="train")(train)
    main_exits_2(task)
    return 0
