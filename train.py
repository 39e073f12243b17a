"""fusetune's Hydra app: `python train.py [group=option ...] [key=value ...]`."""

import sys

import hydra

from fusetune.app.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> None:
    from fusetune.app.cli import run_or_exit

    run_or_exit(cfg)


if __name__ == "__main__":
    sys.exit(main())
