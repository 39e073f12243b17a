"""fusetune's Hydra app: `python train.py [group=option ...] [key=value ...]`."""

import sys

import hydra

from fusetune.app.config import register_configs
from fusetune.app.hydra_errors import job_started, main_exits_2

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> None:
    job_started()  # the config composed: Hydra reports errors from here on, as it always has
    from fusetune.app.cli import run_or_exit

    run_or_exit(cfg)


if __name__ == "__main__":
    sys.exit(main_exits_2(main))  # a config that does not compose: exit code 2 and one line, like any user mistake
