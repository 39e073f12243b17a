"""Offline first: whether the Hugging Face hub can be reached is decided once per process, and a hub name that
cannot be loaded without it fails at once, in one line that says how to point at a local folder.

The verdict: offline where HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is true; online where it is set and false;
otherwise one request to the hub's endpoint (HF_ENDPOINT, through the environment's proxies) that gets any
answer within ``PROBE_S``. ``import fusetune`` takes it, before anything else asks the hub (bitsandbytes fetches a
CPU kernel at import, and waits on a network that does not answer), and it is kept for the process. An offline
verdict turns huggingface_hub's offline mode on, and sets HF_HUB_OFFLINE for the processes this one starts, so
that nothing later waits on the hub's retries.
"""

import functools
import logging
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

from .errors import FusetuneError

log = logging.getLogger(__name__)
PROBE_S = 1.0
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # a hub id: name or owner/name


def _setting() -> bool | None:
    value = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return True if value in TRUE else False if value in FALSE else None


def _answers(url: str, within: float) -> bool:
    """Whether ``url`` answers at all (any HTTP status) within ``within`` seconds, name resolution included."""
    answered = []

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=within).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # a status code is an answer
        except (OSError, ValueError):
            pass

    probe = threading.Thread(target=ask, daemon=True)
    probe.start()
    probe.join(within)
    return bool(answered)


def hub_offline() -> bool:
    """True where the hub is not to be asked or does not answer (see the module's docstring); kept for the process."""
    return _verdict()[0]


@functools.cache
def _verdict() -> tuple[bool, str]:
    """(offline, why)."""
    from huggingface_hub import constants

    setting = _setting()
    if setting is not None:
        return setting, "HF_HUB_OFFLINE is set"
    if _answers(constants.ENDPOINT, PROBE_S):
        return False, ""
    log.info("the Hugging Face hub (%s) did not answer within %g s: offline for this run", constants.ENDPOINT, PROBE_S)
    os.environ["HF_HUB_OFFLINE"] = "1"  # for the processes this one starts
    constants.HF_HUB_OFFLINE = True
    return True, f"no answer from {constants.ENDPOINT} within {PROBE_S:g} s"


def _cached(repo_id: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in files)


def require_local_or_hub(name: str, key: str, files: tuple[str, ...] = ("config.json",)) -> None:
    """Raise the one line where ``name`` (the value of config key ``key``) is no local folder, only a hub id, the
    hub cannot be reached and none of ``files`` of that repository is in the local hub cache."""
    if Path(name).expanduser().exists() or not REPO_ID.match(name) or not hub_offline() or _cached(name, files):
        return
    why = _verdict()[1]
    raise FusetuneError(
        f"{key}: '{name}' is not a local folder, and the hub is unreachable ({why}) and its cache does not hold it: "
        f"download it where there is a network (hf download {name} --local-dir DIR), then {key}=DIR"
    )
