"""The start says nothing a user cannot act on: bitsandbytes' optional hub-kernel lines are dropped, today's and
a reworded future one from anywhere in the same packages, and every other message of those packages still shows."""

import logging
import os
import subprocess
import sys
from logging import ERROR, INFO, WARNING

import pytest

from fusetune.noise import APP_ONLY, KNOWN, DropNoise, drop_known_noise

from .conftest import ROOT

TRUST = "Skipping publisher trust check for '{}' because Hugging Face Hub is in offline mode."

CASES = [
    # (logger, level, message, shown)
    # seen: bitsandbytes 0.50.2 on a CPU with AVX512-BF16, and kernels 0.19.1 offline
    ("bitsandbytes.backends.cpu.ops", WARNING, "Failed to load CPU gemm_4bit_forward from kernels-community: x", False),
    ("kernels._internals.hf_hub", WARNING, TRUST.format("kernels-community/quantization-bitsandbytes"), False),
    # invented: the same kind of line, reworded, at another level, from a module the packages do not have yet
    ("bitsandbytes.backends.cpu.ops", WARNING, "Could not fetch gemm_4bit_backward (kernels-community, v2)", False),
    ("bitsandbytes.backends.xpu.kernels", INFO, "Loading 'kernels-community/quantization-bitsandbytes' ...", False),
    ("kernels._internals.resolver", WARNING, "No cached variant of 'kernels-community/x'", False),
    ("kernels", WARNING, TRUST.format("kernels-community/quantization-bitsandbytes-v2"), False),
    # still shown: errors, other messages, other publishers, other packages
    ("bitsandbytes.backends.cpu.ops", ERROR, "Failed to load CPU gemm_4bit_forward from kernels-community: x", True),
    ("bitsandbytes.cextension", WARNING, "a real warning", True),
    ("bitsandbytes", WARNING, "a real warning at the top", True),
    ("kernels._internals.hf_hub", WARNING, TRUST.format("someone-else/their-kernel"), True),
    ("accelerate.utils.kernels", WARNING, "Failed to load kernels-community/flash-attn", True),
]


class Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name,level,message,shown", CASES)
def test_only_the_hub_kernel_lines_are_dropped(name, level, message, shown):
    """What reaches the root logger's handlers (pytest's own capture also attaches to the packages' loggers)."""
    drop_known_noise()
    drop_known_noise()
    logger, root, kept = logging.getLogger(name), logging.getLogger(), Kept()
    level_before = logger.level
    logger.setLevel(logging.INFO)  # whatever the app set (it quiets bitsandbytes)
    root.addHandler(kept)
    try:
        logger.log(level, message)
    finally:
        root.removeHandler(kept)
        logger.setLevel(level_before)
    assert kept.messages == ([message] if shown else [])


@pytest.mark.parametrize("rule", KNOWN + APP_ONLY, ids=lambda rule: rule.package)
def test_each_rule_is_installed_once_and_names_the_versions_it_was_seen_with(rule):
    drop_known_noise((rule,))
    drop_known_noise((rule,))
    logger = logging.getLogger(rule.package)
    assert sum(isinstance(h, DropNoise) for h in logger.handlers) == 1 and not logger.propagate
    assert any(ch.isdigit() for ch in rule.seen) and rule.marker in rule.seen


def test_importing_fusetune_then_bitsandbytes_prints_nothing_but_what_is_logged():
    """No kernel-loading line and no traceback at start (offline, where both packages speak of the hub kernel), with
    no logging set up at all: a real warning still reaches stderr, a new module's hub-kernel line does not."""
    code = (
        "import fusetune, bitsandbytes, logging;"
        "logging.getLogger('kernels._internals.new').warning(\"Cannot verify 'kernels-community/x' offline\");"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('real')"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "real\n", done.stderr[-2000:]


@pytest.mark.parametrize("app", [True, False], ids=["app", "library"])
def test_the_app_drops_the_tokenizers_too_long_line_that_data_too_long_reports(app):
    """The tokenizer's "will result in indexing errors" for a record over model.max_seq_length is false under the
    app (data.too_long drops or cuts it, and says so): the app drops that line and keeps the tokenizer's others;
    the library leaves it."""
    code = (
        "import logging\n"
        "from fusetune.noise import quiet_third_party\n"
        f"if {app}: quiet_third_party()\n"
        "from fusetune.loading import load_tokenizer\n"
        "tokenizer = load_tokenizer('fusetune:tiny_llama')\n"
        "tokenizer.model_max_length = 4\n"
        "tokenizer('word ' * 20)\n"
        "logging.getLogger('transformers.tokenization_utils_base').warning('another tokenizer warning')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "another tokenizer warning" in done.stderr, done.stderr[-2000:]
    assert ("Token indices sequence length is longer" in done.stderr) is not app, done.stderr[-2000:]
