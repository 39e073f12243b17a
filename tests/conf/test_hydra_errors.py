"""A config that does not compose is a user mistake: exit code 2 and one line, `fusetune: error: ...`."""

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, HydraException

from fusetune.app import hydra_errors
from fusetune.app.config import check_composed
from fusetune.app.hydra_errors import FULL_ERROR, hydra_error_line, job_started, main_exits_2
from fusetune.errors import FusetuneError

from ..conftest import CONF, ROOT

MOVED = {
    "learning_rate": "model.learning_rate moved to trainer.learning_rate (a model preset sets it there too, as "
    "conf/model/tiny_llama.yaml does)",
    "batch_size": "model.batch_size moved to trainer.per_device_train_batch_size (a model preset sets it there too, "
    "as conf/model/tiny_llama.yaml does)",
}


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "trainer.lerning_rate=1",
            "Could not override 'trainer.lerning_rate': Key 'lerning_rate' not in 'TrainerConfig' "
            "(did you mean learning_rate?)",
        ),
        (
            "trainer.max_steps=abc",
            "Error merging override trainer.max_steps=abc: Value 'abc' of type 'str' could not be converted to Integer",
        ),
        ("+model.lora.rr=3", hydra_errors.NULL_PARENT),  # tiny_llama trains fully: model.lora is null
    ],
)
def test_cli_config_mistake_exits_2_with_one_line(tmp_path, override, message):
    """The real app, before anything loads: no run folder is made."""
    proc = subprocess.run(
        [sys.executable, "train.py", override, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1] == f"fusetune: error: {message}", proc.stderr[-2000:]
    assert sum(line.startswith("fusetune: error:") for line in lines) == 1
    assert "Traceback" not in proc.stderr and FULL_ERROR not in proc.stderr
    assert not (tmp_path / "run").exists()


def composition_error(overrides) -> HydraException:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(HydraException) as raised:
            compose("train", overrides=overrides)
    return raised.value


@pytest.mark.parametrize(
    "override,line",
    [
        (
            "model.max_seq_lenght=64",
            "Could not override 'model.max_seq_lenght': Key 'max_seq_lenght' not in 'ModelConfig' "
            "(did you mean max_seq_length?)",
        ),
        ("data.xyz=1", "Could not override 'data.xyz': Key 'xyz' not in 'DataConfig'"),
        (
            "kernels.backend=cuda",
            "Error merging override kernels.backend=cuda: "
            "Invalid value 'cuda', expected one of [auto, triton, reference]",
        ),
        (
            "export.gguf=q4_k_m",
            "Error merging override export.gguf=q4_k_m: Invalid value 'q4_k_m', expected one of [f16, q8_0]",
        ),
        (
            "trainer=nonexistent",
            "In 'train': Could not find 'trainer/nonexistent' "
            "(options: dpo, embedding_lr, kto, orpo, packing, padding_free, sft, simpo)",
        ),
        ("trainer.max_steps=[", "trainer.max_steps=[: no viable alternative at input '['"),
    ],
)
def test_hydra_error_line(override, line):
    assert hydra_error_line(composition_error([override])) == line


@pytest.mark.parametrize("key,value,base", [("learning_rate", 1e-3, "llama3_1b"), ("batch_size", 2, "llama3_8b")])
def test_a_moved_key_is_named_with_its_new_place(tmp_path, key, value, base):
    """Overridden, or set by a model preset of the user's (written as model presets were before, on a shipped preset
    in the model package or, llama3_8b, the global one), with or without +."""
    assert hydra_error_line(composition_error([f"model.{key}={value}"])) == MOVED[key]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text(f"defaults:\n  - {base}\n  - _self_\n{key}: {value}\n")
    assert hydra_error_line(composition_error([f"hydra.searchpath=[file://{tmp_path}]", "model=mine"])) == MOVED[key]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"+model.{key}={value}"])
    with pytest.raises(FusetuneError) as refused:
        check_composed(cfg)
    assert str(refused.value) == MOVED[key]


def fails_to_compose():
    raise ConfigCompositionException("Could not override 'x'.\nTo append to your config use +x=1")


def test_main_exits_2_and_gives_the_variable_back(monkeypatch, capsys):
    monkeypatch.delenv(FULL_ERROR, raising=False)
    seen = []

    def main():
        seen.append(os.environ.get(FULL_ERROR))  # Hydra raises instead of printing while it composes
        fails_to_compose()

    with pytest.raises(SystemExit) as exited:
        main_exits_2(main)
    assert exited.value.code == 2 and seen == ["1"]
    assert capsys.readouterr().err == "fusetune: error: Could not override 'x'\n"
    assert FULL_ERROR not in os.environ


def test_errors_in_the_run_are_hydras_again(monkeypatch):
    """Once the task starts, Hydra reports errors its own way (here, under the test, it would print and exit 1)."""
    monkeypatch.delenv(FULL_ERROR, raising=False)
    seen = []

    def main():
        job_started()
        seen.append(os.environ.get(FULL_ERROR))
        fails_to_compose()  # a HydraException inside the run is not a config mistake

    with pytest.raises(ConfigCompositionException):
        main_exits_2(main)
    assert seen == [None] and FULL_ERROR not in os.environ
    assert main_exits_2(lambda: 7) == 7 and not hydra_errors._state["job_started"]


def test_a_users_hydra_full_error_is_left_alone(monkeypatch):
    monkeypatch.setenv(FULL_ERROR, "1")
    with pytest.raises(ConfigCompositionException):
        main_exits_2(fails_to_compose)
    assert os.environ[FULL_ERROR] == "1"
