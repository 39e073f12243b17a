"""bitsandbytes' hub-kernel warning is dropped by its text; its other messages still show."""

import logging
import subprocess
import sys

from fusetune.noise import KNOWN, DropKnownLines, drop_known_noise

from .conftest import ROOT


def test_only_the_known_line_is_dropped(caplog):
    drop_known_noise()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("a real bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes warning"]
    assert sum(isinstance(f, DropKnownLines) for f in logger.filters) == 1  # installed once
    assert set(KNOWN) == {"bitsandbytes.backends.cpu.ops"}


def test_importing_fusetune_then_bitsandbytes_prints_no_hub_kernel_warning():
    code = "import fusetune, bitsandbytes, logging; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('real')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels-community" not in done.stderr and "real" in done.stderr
