"""Offline first: a hub name that cannot be loaded without the network fails in about a second, with one line that
says how to point at a local folder, before any work and before any W&B run. The network is made unreachable by
the tests themselves (the hub's endpoint pointed at a local port that refuses, or one that never answers)."""

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from huggingface_hub import constants

from fusetune import offline
from fusetune.errors import FusetuneError

from ..conftest import ROOT, needs_wandb
from .app_runs import exit_and_stderr

HUB_NAME = "someone/no-such-model-here"


def refusal(key: str, name: str, why: str) -> str:
    return (
        f"{key}: '{name}' is not a local folder, and the hub is unreachable ({why}) and its cache does not hold it: "
        f"download it where there is a network (hf download {name} --local-dir DIR), then {key}=DIR"
    )


@contextmanager
def endpoint(kind: str):
    """A local URL that refuses connections, accepts and never answers, or answers 404."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if kind == "refuses":
        server.close()  # nothing listens there now
        yield f"http://127.0.0.1:{port}"
        return
    if kind == "silent":
        server.listen(8)  # the kernel accepts; nobody ever reads or answers
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()
        return
    server.close()

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    http = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{http.server_port}"
    finally:
        http.shutdown()


@pytest.fixture
def fresh_verdict(monkeypatch):
    """A process that has not decided yet, with HF_HUB_OFFLINE unset; what the verdict changes is put back."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    offline._verdict.cache_clear()
    yield monkeypatch
    offline._verdict.cache_clear()


@pytest.mark.parametrize(
    "kind,answers,within_s", [("refuses", False, 0.5), ("silent", False, 1.5), ("answers-404", True, 0.5)]
)
def test_the_probe_counts_any_answer_and_waits_at_most_a_second(kind, answers, within_s):
    with endpoint(kind) as url:
        started = time.monotonic()
        assert offline._answers(url, offline.PROBE_S) is answers
        assert time.monotonic() - started < within_s


@pytest.mark.parametrize(
    "setting,hub,offline_expected,probes",
    [
        ("1", "answers-404", True, 0),  # HF_HUB_OFFLINE=1: never asked
        ("0", "refuses", False, 0),  # HF_HUB_OFFLINE=0: the user says online; never asked
        (None, "refuses", True, 1),
        (None, "silent", True, 1),
        (None, "answers-404", False, 1),
    ],
)
def test_the_verdict_is_taken_once_and_offline_turns_the_hub_offline(
    fresh_verdict, setting, hub, offline_expected, probes
):
    monkeypatch = fresh_verdict
    if setting is not None:
        monkeypatch.setenv("HF_HUB_OFFLINE", setting)
    asked = []
    answers = offline._answers
    monkeypatch.setattr(offline, "_answers", lambda url, within: asked.append(url) or answers(url, within))
    with endpoint(hub) as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        assert [offline.hub_offline() for _ in range(3)] == [offline_expected] * 3
    assert len(asked) == probes  # once per process
    if setting is None:  # the probe's verdict holds for huggingface_hub, and for the processes started later
        assert constants.is_offline_mode() is offline_expected
        assert os.environ.get("HF_HUB_OFFLINE") == ("1" if offline_expected else None)


def cache_holding(tmp_path, repo_id: str, filename: str):
    """A hub cache in which ``repo_id`` has ``filename`` at main."""
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_text("{}")
    return tmp_path / "hub"


@pytest.mark.parametrize(
    "name,cached,raises",
    [
        (HUB_NAME, None, True),
        ("no-owner-model", None, True),
        (HUB_NAME, "config.json", False),  # in the hub cache: transformers loads it offline
        (HUB_NAME, "README.md", True),  # something of it is cached, not its config
        ("LOCAL", None, False),  # an existing folder is never a hub name
        ("./not/here", None, False),  # a path, not a hub name: transformers says it is missing
        ("~/not-here/model", None, False),
    ],
)
def test_only_a_hub_name_that_is_not_cached_is_refused_offline(monkeypatch, tmp_path, name, cached, raises):
    monkeypatch.setattr(offline, "hub_offline", lambda: True)
    monkeypatch.setattr(offline, "_verdict", lambda: (True, "HF_HUB_OFFLINE is set"))
    cache = cache_holding(tmp_path, HUB_NAME, cached) if cached else tmp_path / "empty"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    name = str(tmp_path) if name == "LOCAL" else name
    if not raises:
        offline.require_local_or_hub(name, "model.name_or_path")
        return
    with pytest.raises(FusetuneError) as error:
        offline.require_local_or_hub(name, "model.name_or_path")
    assert str(error.value) == refusal("model.name_or_path", name, "HF_HUB_OFFLINE is set")


@pytest.mark.parametrize(
    "override,key",
    [
        (f"model.name_or_path={HUB_NAME}", "model.name_or_path"),
        (f"model.tokenizer={HUB_NAME}", "model.tokenizer"),
        (f"model.config={HUB_NAME}", "model.config"),
    ],
)
@pytest.mark.parametrize("hub", ["refuses", "silent"])
def test_the_app_fails_a_hub_name_in_a_second_with_one_line(
    fresh_verdict, compose_cfg, capsys, tmp_path, override, key, hub
):
    with endpoint(hub) as url:
        fresh_verdict.setattr(constants, "ENDPOINT", url)
        started = time.monotonic()
        code, stderr = exit_and_stderr(["logger=none", override], tmp_path / "run", False, compose_cfg, capsys)
        took = time.monotonic() - started
    assert code == 2 and took < 5, (code, took)
    assert stderr.splitlines() == ["fusetune: error: " + refusal(key, HUB_NAME, f"no answer from {url} within 1 s")]


@needs_wandb
def test_train_py_offline_says_one_line_and_starts_no_wandb_run(tmp_path):
    """The app as a user runs it, with W&B chosen and an API key set, the hub's endpoint silent: one line, no
    retries, no W&B run."""
    with endpoint("silent") as url:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE")}
        env.update(HF_ENDPOINT=url, WANDB_BASE_URL=url, WANDB_API_KEY="fusetune-test-key-0123456789abcdef0123456789")
        run_dir = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "train.py", f"model.name_or_path={HUB_NAME}", "logger=wandb", f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert proc.returncode == 2, proc.stderr[-3000:]
    why = f"no answer from {url} within 1 s"
    assert proc.stderr.splitlines() == ["fusetune: error: " + refusal("model.name_or_path", HUB_NAME, why)]
    assert not (run_dir / "wandb").exists()
