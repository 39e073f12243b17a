"""`python -m fusetune.chat` on real run folders: the answers are plain transformers' greedy answers.

One short full fine-tuning of the embedded tiny Llama is shared by the module (in-process, about 5 s). It trains
on the embedded tasks as chat turns (data=chat): the default's data=synthetic trains on plain prompts, so through
the chat template that model answers nothing useful, often nothing. Three subprocesses, started at once, prove the
command line (about 6 s of CPU each, mostly imports): `--prompt`, the interactive loop fed through stdin, and an
error. Everything else runs in-process through `main()` or the library functions.
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusetune import chat
from fusetune.app.run import run
from fusetune.data.synthetic import synthetic_splits

from ..conftest import CONF, ROOT

FAST = ["logger=none", "data.num_train=256", "data.num_eval=8", "data.num_generate=0"]
NEW = 16  # --max-new-tokens everywhere here


def train(out: Path, *overrides: str) -> Path:
    """run() in-process, with the composed config saved where `python train.py` has Hydra save it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, *overrides])
    cfg.output_dir = str(out)
    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    run(cfg)
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """Full fine-tuning (the default) of the random-init tiny Llama on chat turns: it saves model/."""
    out = tmp_path_factory.mktemp("full")
    rows, _ = synthetic_splits(num_train=256, num_eval=0, seed=0)
    turns = [{"messages": [user(row["prompt"]), {"role": "assistant", "content": row["completion"]}]} for row in rows]
    (out / "chat.jsonl").write_text("".join(json.dumps(turn) + "\n" for turn in turns))
    return train(
        out,
        "data=chat",
        f"data.path={out / 'chat.jsonl'}",
        "trainer.max_steps=30",
        "trainer.per_device_train_batch_size=32",
    )


@pytest.fixture(scope="module")
def saved(full_run):
    model = AutoModelForCausalLM.from_pretrained(full_run / "model").eval()
    return model, AutoTokenizer.from_pretrained(full_run / "model")


# Answers are compared with greedy() of plain transformers on the CPU in fp32: the chat runs there too, on any host
# (on a GPU, auto would pick bf16 on CUDA, whose greedy answers may differ from fp32's)
ON_CPU = ["--device", "cpu"]


def greedy(model, tokenizer, messages: list[dict] | None = None, text: str | None = None) -> str:
    """Plain transformers: render, generate greedily, decode the new tokens."""
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=messages is None)  # the template writes BOS
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def cli(full_run, lora_random_init_run) -> dict[str, subprocess.CompletedProcess]:
    """`python -m fusetune.chat` three times, all started at once (about 6 s of CPU each, mostly imports)."""
    runs = {  # name: (arguments, stdin)
        "prompt": ([full_run, "--prompt", "add 2 3="], ""),
        "interactive": ([full_run], "hello\nadd 2 3=\n/reset\nadd 1 1=\n"),  # then EOF
        "error": ([lora_random_init_run, "--prompt", "hi"], ""),
    }
    # Without WANDB_MODE: under WANDB_MODE=offline, importing transformers' Trainer prints a line on stdout.
    env = {name: value for name, value in os.environ.items() if name != "WANDB_MODE"} | {"OMP_NUM_THREADS": "1"}
    procs = {}
    try:
        for name, (args, _) in runs.items():
            command = [sys.executable, "-m", "fusetune.chat", "--max-new-tokens", str(NEW), *ON_CPU, *map(str, args)]
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
            procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, text=True, **pipes)
        done = {}
        for name, proc in procs.items():  # the others import meanwhile; stdin is read only once the model is loaded
            stdout, stderr = proc.communicate(runs[name][1], timeout=120)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        return done
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def call_main(*args, stdin: str = ""):
    out, notes = io.StringIO(), io.StringIO()
    device = [] if "--device" in args else ON_CPU
    code = chat.main(["--max-new-tokens", str(NEW), *device, *map(str, args)], io.StringIO(stdin), out, notes)
    return code, out.getvalue(), notes.getvalue()


def test_prompt_streams_the_greedy_answer(cli, saved):
    expected = greedy(*saved, [user("add 2 3=")])
    proc = cli["prompt"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected.strip() and proc.stdout == expected + "\n"
    assert "Traceback" not in proc.stderr
    assert "note:" not in proc.stderr  # no hint towards --raw: this run trained on chat turns


def test_interactive_keeps_the_conversation_until_reset(cli, saved):
    first = greedy(*saved, [user("hello")])
    second = greedy(*saved, [user("hello"), {"role": "assistant", "content": first}, user("add 2 3=")])
    after_reset = greedy(*saved, [user("add 1 1=")])
    proc = cli["interactive"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"{first}\n{second}\n{after_reset}\n"
    assert "(conversation cleared)" in proc.stderr and "(model, float32, cpu)" in proc.stderr


def test_exit_ends_the_loop_and_raw_mode_sends_the_text_as_typed(full_run, saved):
    code, out, _ = call_main(full_run, "--raw", stdin="add 2 3=\n/exit\nadd 1 1=\n")
    assert code == 0 and out == greedy(*saved, text="add 2 3=") + "\n"


def test_sampling_with_a_system_message(full_run):
    code, out, notes = call_main(full_run, "--prompt", "add 2 3=", "--temperature", "1.5", "--system", "add")
    assert code == 0 and out.endswith("\n") and notes == "", notes


def test_answers_stream_piece_by_piece(full_run, saved):
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    loaded = chat.load(full_run, device="cpu")
    session = chat.Chat(loaded.model, loaded.tokenizer, max_new_tokens=NEW)
    out = Recorder()
    answer = session.reply("add 2 3=", out)
    assert answer == greedy(*saved, [user("add 2 3=")]) and out.getvalue() == answer
    assert len(answer) >= 2 and [w for w in writes if w] == list(answer)  # one write per character, as generated


def test_same_answers_with_fusetune_kernels_applied(full_run):
    from fusetune.patching import apply_kernels, is_applied, remove_kernels

    loaded = chat.load(full_run)
    session = chat.Chat(loaded.model, loaded.tokenizer, max_new_tokens=NEW)
    plain = [session.reply(text, io.StringIO()) for text in ("hello", "add 2 3=")]
    try:
        assert apply_kernels(loaded.model, "reference") == "reference" and is_applied(loaded.model)
        session.reset()
        patched = [session.reply(text, io.StringIO()) for text in ("hello", "add 2 3=")]
    finally:
        remove_kernels()
    assert patched == plain


def test_adapter_on_its_base_then_merged_preferred(full_run, tmp_path):
    from peft import LoraConfig, get_peft_model

    from fusetune import FastModel

    base = AutoModelForCausalLM.from_pretrained(full_run / "model")  # a base with weights on disk
    tokenizer = AutoTokenizer.from_pretrained(full_run / "model")
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")

    loaded = chat.load(tmp_path, device="cpu")
    assert loaded.kind == "adapter" and loaded.base == str(full_run / "model")
    session = chat.Chat(loaded.model, loaded.tokenizer, max_new_tokens=NEW)
    assert session.reply("add 2 3=", io.StringIO()) == greedy(peft_model, tokenizer, [user("add 2 3=")])

    FastModel.save_merged(peft_model, tokenizer, str(tmp_path / "merged"))
    assert chat.locate(tmp_path) == ("merged", tmp_path / "merged")
    code, out, notes = call_main(tmp_path, "--prompt", "add 2 3=")
    assert code == 0 and out.endswith("\n"), notes


def test_a_long_conversation_drops_its_oldest_exchanges(full_run):
    loaded = chat.load(full_run)
    session = chat.Chat(loaded.model, loaded.tokenizer, max_new_tokens=NEW, notes=io.StringIO())
    long_turn = "sort 1 2 3 " * 12  # 132 characters, one token each
    for _ in range(4):
        session.reply(long_turn, io.StringIO())
    ids, room = session.prompt_ids(long_turn)
    assert len(ids) + room <= loaded.model.config.max_position_embeddings == 512
    assert "dropped the oldest exchange" in session.notes.getvalue() and len(session.history) < 8


@pytest.fixture(scope="module")
def lora_random_init_run(tmp_path_factory) -> Path:
    """model=tiny_llama_lora: LoRA on the random-init tiny Llama, whose base weights are never saved."""
    return train(tmp_path_factory.mktemp("lora"), "model=tiny_llama_lora", "trainer.max_steps=1")


def bad_folders(tmp: Path, full_run: Path) -> dict[str, Path]:
    """Folders with something missing, by name."""
    (tmp / "empty").mkdir()
    (tmp / "a_file").write_text("x")
    (tmp / "config_only").mkdir()
    shutil.copy(full_run / "model" / "config.json", tmp / "config_only")
    (tmp / "run_merged_empty" / "merged").mkdir(parents=True)
    shutil.copytree(full_run / "model", tmp / "no_template")
    (tmp / "no_template" / "chat_template.jinja").unlink()
    (tmp / "bare_adapter").mkdir()  # an adapter on the shipped config, with no run record beside it
    (tmp / "bare_adapter" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "base_model_name_or_path": "fusetune:tiny_llama"}'
    )
    shutil.copytree(full_run / "model", tmp / "truncated" / "model")
    weights = tmp / "truncated" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp / "lost_base").mkdir()  # an adapter whose base is gone
    (tmp / "lost_base" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tmp / "deleted_base")})
    )
    return {path.name: path for path in tmp.iterdir()}


# (case, args after the folder, part of the one error line); "{x}" names a folder of bad_folders
BAD = [
    ("missing", ["{tmp}/nope", "--prompt", "hi"], "{tmp}/nope: no such folder"),
    ("file", ["{a_file}", "--prompt", "hi"], "is a file, not a folder"),
    ("empty", ["{empty}", "--prompt", "hi"], "holds no model or adapter (looked for merged/, adapter/, model/"),
    ("config-only", ["{config_only}", "--prompt", "hi"], "holds a model config.json but no weights"),
    ("merged-empty", ["{run_merged_empty}", "--prompt", "hi"], "merged: holds no model weights"),
    (
        "lora-random-init",
        ["{lora}", "--prompt", "hi"],
        "fusetune:tiny_llama built with random_init, whose base weights",
    ),
    ("adapter-base-no-weights", ["{bare_adapter}", "--prompt", "hi"], "has a config but no weights"),
    ("adapter-base-gone", ["{lost_base}", "--prompt", "hi"], "no tokenizer here, nor from the base model"),
    ("truncated-weights", ["{truncated}", "--prompt", "hi"], "the weights do not load: Error while deserializing"),
    ("no-chat-template", ["{no_template}", "--prompt", "hi"], "the tokenizer has no chat template; pass --raw"),
    ("system-with-raw", ["{full}", "--raw", "--system", "be brief", "--prompt", "hi"], "--system needs the chat"),
    ("empty-prompt", ["{full}", "--prompt", " "], "--prompt is empty"),
    ("max-new-tokens", ["{full}", "--prompt", "hi", "--max-new-tokens", "0"], "invalid positive integer value"),
    ("temperature", ["{full}", "--prompt", "hi", "--temperature", "-1"], "invalid temperature"),
    ("bad-device", ["{full}", "--prompt", "hi", "--device", "toaster"], "'toaster' is not a device"),
    ("prompt-too-long", ["{full}", "--prompt", "x" * 600], "the model takes at most 512 positions"),
]


@pytest.mark.parametrize("case,args,message", BAD, ids=[row[0] for row in BAD])
def test_bad_input_exits_2_with_one_line(full_run, lora_random_init_run, tmp_path, case, args, message):
    names = bad_folders(tmp_path, full_run) | {"full": full_run, "lora": lora_random_init_run, "tmp": tmp_path}
    args = [arg.format(**names) for arg in args]
    code, out, notes = call_main(*args)
    assert code == 2 and out == ""
    lines = [line for line in notes.splitlines() if not line.startswith("note: ")]  # the hint towards --raw
    assert len(lines) == 1 and lines[0].startswith("fusetune: error: "), notes
    assert message.format(**names) in lines[0], notes


def test_cuda_asked_for_without_cuda(full_run):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    code, _, notes = call_main(full_run, "--prompt", "hi", "--device", "cuda")
    assert code == 2 and notes == "fusetune: error: --device cuda: CUDA is not available here\n"


def test_the_command_line_exits_2_with_one_error_line(cli):
    proc = cli["error"]
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fusetune: error:")]
    assert len(errors) == 1 and "cannot be reloaded" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_on_plain_prompts_gets_a_hint_towards_raw(full_run, tmp_path):
    assert chat.trained_on_plain_prompts(chat.open_folder(full_run).run_config) is None  # data=chat
    shutil.copytree(full_run, tmp_path / "run")
    config = tmp_path / "run" / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("formatter: chat", "formatter: synthetic"))
    code, _, notes = call_main(tmp_path / "run", "--prompt", "add 2 3=")
    assert code == 0 and "note: this run trained on plain prompts (data=synthetic)" in notes, notes


def test_no_template_folder_still_answers_with_raw(full_run, saved, tmp_path):
    folders = bad_folders(tmp_path, full_run)
    code, out, notes = call_main(folders["no_template"], "--raw", "--prompt", "add 2 3=")
    assert code == 0 and out == greedy(*saved, text="add 2 3=") + "\n", notes
