"""bitsandbytes' hub-kernel lines are dropped by their text; every other message of those loggers still shows."""

import logging
import os
import subprocess
import sys

import pytest

from fusetune.noise import KNOWN, DropKnownLines, drop_known_noise

from .conftest import ROOT


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_only_the_known_lines_are_dropped(name, caplog):
    drop_known_noise()
    drop_known_noise()
    logger = logging.getLogger(name)
    with caplog.at_level(logging.WARNING, logger=name):
        for prefix in KNOWN[name]:
            logger.warning("%s: and whatever follows it", prefix)
        logger.warning("a real warning")
        logger.warning("Skipping publisher trust check for 'someone-else/their-kernel'")
    assert [r.getMessage() for r in caplog.records] == [
        "a real warning",
        "Skipping publisher trust check for 'someone-else/their-kernel'",
    ]
    assert sum(isinstance(f, DropKnownLines) for f in logger.filters) == 1  # installed once


def test_importing_fusetune_then_bitsandbytes_prints_no_hub_kernel_lines():
    """Online and offline: the kernels package speaks of its publisher check only offline."""
    code = "import fusetune, bitsandbytes, logging; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('real')"
    for offline in ("0", "1"):
        env = {**os.environ, "HF_HUB_OFFLINE": offline}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "kernels-community" not in done.stderr and "real" in done.stderr, (offline, done.stderr[-2000:])
