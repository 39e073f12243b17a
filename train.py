"""fusetune's Hydra app: `python train.py [group=option ...] [key=value ...]`."""

import sys

import hydra

from fusetune.app.config import expand_resume_shorthand, register_configs
from fusetune.app.gpus import register_resolvers
from fusetune.app.hydra_errors import job_started, main_exits_2
from fusetune.app.launcher import register_launcher

register_configs()
register_resolvers()  # conf/hydra/launcher/local.yaml: ${fusetune.visible_gpus:}, ${fusetune.parallel_jobs:}
register_launcher()  # its class, hydra_plugins.fusetune_launcher.JoblibLauncher


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> float | None:
    job_started()  # the config composed: Hydra reports errors from here on, as it always has
    from fusetune.app.cli import run_or_exit

    return run_or_exit(cfg)  # the objective (eval_loss by default): what a sweeper such as Optuna optimizes


if __name__ == "__main__":
    sys.argv[1:] = expand_resume_shorthand(sys.argv[1:])  # resume=auto: resume.checkpoint=auto
    sys.exit(main_exits_2(main))  # a config that does not compose: exit code 2 and one line, like any user mistake
