"""fusetune's Hydra app: `python train.py [group=option ...] [key=value ...]` (installed: `fusetune train ...`)."""

import sys
from pathlib import Path

from fusetune_cli import train

if __name__ == "__main__":
    sys.exit(train(sys.argv[1:], config_dir=str(Path(__file__).resolve().parent / "conf"), prog="python train.py"))
