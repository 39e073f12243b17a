"""No secret is written to disk: a token, API key or password in the config (hydra.* included) is refused.

Hydra writes the composed config, its own node and the overrides into .hydra/. ``config.secrets_in`` names every
key that would carry a secret there; run_folder.GuardRunFolder refuses the run with one line before Hydra writes
anything. The table composes in-process (with Hydra's node); two real runs prove nothing reaches the disk.
"""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from fusetune.app.config import refuse_secrets, secrets_in
from fusetune.errors import FusetuneError

from ..conftest import CONF, ROOT

SECRET = "hf_not_a_real_token_0123456789"

CASES = [
    # (overrides, the keys named)
    ((), []),
    ((f"trainer.hub_token={SECRET}",), ["trainer.hub_token"]),
    ((f"+trainer.extra.push_to_hub_token={SECRET}",), ["trainer.extra.push_to_hub_token"]),
    ((f"+hydra.job.env_set.HF_TOKEN={SECRET}",), ["hydra.job.env_set.HF_TOKEN"]),
    ((f"++hydra.job.env_set.WANDB_API_KEY={SECRET}",), ["hydra.job.env_set.WANDB_API_KEY"]),
    ((f"+hydra.job.env_set.GITHUB_TOKEN={SECRET}",), ["hydra.job.env_set.GITHUB_TOKEN"]),
    ((f"+hydra.job.env_set.OPENAI_API_KEY={SECRET}",), ["hydra.job.env_set.OPENAI_API_KEY"]),
    ((f"+hydra.job.env_set.DB_PASSWORD_FILE={SECRET}",), ["hydra.job.env_set.DB_PASSWORD_FILE"]),
    ((f"+hydra.job.env_set.AWS_SECRET_ACCESS_KEY={SECRET}",), ["hydra.job.env_set.AWS_SECRET_ACCESS_KEY"]),
    ((f"+hydra.job.env_set.hf_token={SECRET}",), ["hydra.job.env_set.hf_token"]),  # names are case-blind
    ((f"+hydra.launcher.api_key={SECRET}",), ["hydra.launcher.api_key"]),  # any hydra.* key, as elsewhere
    ((f"+hydra.job.env_set.HF_TOKEN={SECRET}", f"trainer.hub_token={SECRET}"),
     ["trainer.hub_token", "hydra.job.env_set.HF_TOKEN"]),
    # not secrets: settings whose names only look alike, and special tokens
    (("+hydra.job.env_set.TOKENIZERS_PARALLELISM=false",), []),
    (("+hydra.job.env_set.WANDB_MODE=offline", "+hydra.job.env_set.HF_HUB_OFFLINE=1"), []),
    (("+hydra.job.env_set.MAX_TOKENS=5",), []),
    (("+trainer.extra.pad_token=x",), []),
    (("+trainer.extra.eos_token=x",), []),
    (("trainer.hub_token=null",), []),
]  # fmt: skip


@pytest.mark.parametrize("overrides,named", CASES, ids=[" ".join(o) or "defaults" for o, _ in CASES])
def test_secret_keys_are_named(overrides, named):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    found = secrets_in(cfg)
    assert sorted(found) == sorted(named)
    if named:
        with pytest.raises(FusetuneError) as refused:
            refuse_secrets(cfg)
        assert str(refused.value).startswith(f"{', '.join(found)}: secrets are not read from the config")
        assert SECRET not in str(refused.value)


@pytest.mark.parametrize(
    "override,named",
    [
        ("trainer.hub_token=x", ["trainer.hub_token"]),
        ("trainer.hub_token=a,b", ["trainer.hub_token"]),  # swept: the start of a multirun sees only this
        ("++hydra.job.env_set.HF_TOKEN=x", ["hydra.job.env_set.HF_TOKEN"]),
        ("~trainer.hub_token", []),  # removes a key: gives nothing
        ("trainer.hub_token=null", []),
        ("+hydra.job.env_set.TOKENIZERS_PARALLELISM=true", []),
    ],
)
def test_overrides_that_give_a_secret(override, named):
    """A swept value never reaches the composed config of a multirun's start, but hydra.overrides lists it."""
    assert secrets_in({"hydra": {"overrides": {"task": [override], "hydra": []}}}) == named


@pytest.mark.parametrize(
    "mode,override",
    [
        ("run", f"+hydra.job.env_set.HF_TOKEN={SECRET}"),
        ("multirun", f"+hydra.job.env_set.HF_TOKEN={SECRET}"),  # refused before the sweep folder is made
    ],
)
def test_nothing_is_written(mode, override, tmp_path):
    """The real app: exit 2, one line naming the key, and the secret in no file under the folder."""
    folder = tmp_path / "out"
    where = [f"hydra.run.dir={folder}"] if mode == "run" else ["seed=1,2", f"hydra.sweep.dir={folder}"]
    command = [sys.executable, "train.py", *(["-m"] if mode == "multirun" else []), "logger=none", override, *where]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert lines[-1].startswith("fusetune: error: hydra.job.env_set.HF_TOKEN: secrets are not read"), done.stderr[
        -3000:
    ]
    assert "Traceback" not in done.stderr and SECRET not in done.stderr + done.stdout
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(SECRET in p.read_text(errors="ignore") for p in written), written
    assert not folder.exists()
