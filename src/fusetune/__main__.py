"""``python -m fusetune ...``: the ``fusetune`` command (train, report, chat, presets)."""

import sys

from fusetune_cli import main

sys.exit(main())
