"""Chat with a trained model: ``python -m fusetune.chat RUN_DIR [--prompt TEXT]``.

RUN_DIR is a run folder of the Hydra app, or a folder that holds a model or a PEFT adapter. In a
run folder the first of these is loaded: ``merged/`` (written by ``FastModel.save_merged``), ``adapter/``
(LoRA, put back on the base model named in its adapter_config.json), ``model/`` (full fine-tuning).
A LoRA adapter trained on a ``random_init`` base (such as ``model=tiny_llama_lora``) cannot be
reloaded: the base weights were never saved. Full fine-tuning, the default, saves ``model/``.

Turns are rendered by the tokenizer's chat template, each render bounded in time (a template that loops ends
the chat with one line, as one that loads other templates does); ``--raw`` sends the text as typed instead,
for models trained on plain prompts (the embedded default's synthetic data). Answers stream to
stdout as they are generated; everything else goes to stderr. Without ``--prompt`` it reads
turns from stdin until EOF or ``/exit``, keeping the conversation; ``/reset`` clears it; Ctrl-C
there stops the answer being generated. Bad input ends with exit code 2 and one line:
``fusetune: error: ...``; SIGTERM, and SIGINT outside an answer of the conversation, end it within
seconds with one line and exit code 128 + the signal (143, 130).

An adapter goes on its base in 16 bits, also after QLoRA (as ``FastModel.save_merged`` does). As a library::

    loaded = load("outputs/runs/2026-12-02_06-16-14")     # .model (eval mode), .tokenizer, .kind, .folder
    Chat(loaded.model, loaded.tokenizer, system="Be brief.").reply("add 2 3=")   # streams to stdout, returns it

fusetune's kernels need not be applied; generation gives the same answers either way.
"""

import argparse
import pickle
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import TextStreamer

from . import loading
from .data.rules import SYNTHETIC
from .data.templates import check_template, render_within
from .errors import FusetuneError, first_line
from .evaluate import _adds_specials
from .noise import quiet_third_party
from .training.faults import SignalStop, StopOnSignal

RUN_SUBFOLDERS = ("merged", "adapter", "model")  # in order of preference
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PLAIN_FORMATTERS = (*SYNTHETIC, "completion", "text")  # data formatters that train on plain text, not turns
COMMANDS = "/reset clears the conversation, /exit or Ctrl-D ends"


@dataclass
class Loaded:
    model: object
    tokenizer: object
    folder: Path  # the folder the weights came from
    kind: str  # "merged", "adapter" or "model"
    base: str | None = None  # the base model of an adapter
    run_config: dict = field(default_factory=dict)  # the run's .hydra/config.yaml, when there is one
    trust_remote_code: bool = False  # run the model folder's own Python code (--trust-remote-code)

    def describe(self) -> str:
        what = {"merged": "merged model", "model": "model"}.get(self.kind, f"adapter on {self.base}")
        dtype = str(self.model.dtype).removeprefix("torch.")
        return f"{self.folder} ({what}, {dtype}, {self.model.device})"


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in loading.WEIGHT_FILES)


def _folder_kind(folder: Path) -> str | None:
    """The kind of what the folder holds: "adapter", "model", or None for neither."""
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file() and _has_weights(folder):
        return "model"
    return None


def _run_config(folder: Path) -> dict:
    """The composed config of the run that wrote ``folder`` (the run folder itself or one of its subfolders)."""
    import yaml

    for candidate in (folder, folder.parent):
        path = candidate / ".hydra" / "config.yaml"
        if path.is_file():
            try:
                config = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                return {}
            return config if isinstance(config, dict) else {}
    return {}


def locate(path: str | Path) -> tuple[str, Path]:
    """(kind, folder) of what to load from ``path``: a run folder or a model or adapter folder."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FusetuneError(f"{path}: no such folder")
    if not root.is_dir():
        raise FusetuneError(f"{path}: is a file, not a folder")
    for name in RUN_SUBFOLDERS:
        sub = root / name
        if sub.is_dir():
            kind = _folder_kind(sub)
            if kind is None:
                raise FusetuneError(f"{sub}: holds no model weights or adapter_config.json (an interrupted save?)")
            return ("merged" if name == "merged" and kind == "model" else kind), sub
    kind = _folder_kind(root)
    if kind is not None:
        return kind, root
    if (root / "config.json").is_file():
        raise FusetuneError(f"{path}: holds a model config.json but no weights (a random_init model?)")
    checkpoints = sorted(p.name for p in root.glob("checkpoint-*") if p.is_dir())
    hint = f"; it has {', '.join(checkpoints)}: pass one of them" if checkpoints else ""
    raise FusetuneError(
        f"{path}: holds no model or adapter (looked for {'/, '.join(RUN_SUBFOLDERS)}/, "
        f"adapter_config.json, config.json with weights){hint}"
    )


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise FusetuneError(f"--device: '{name}' is not a device (cpu, cuda, cuda:1, mps, auto)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise FusetuneError(f"--device {name}: CUDA is not available here")
        if device.index is not None and device.index >= count:
            raise FusetuneError(f"--device {name}: there are {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FusetuneError(f"--device {name}: MPS is not available here")
    return device


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # fp32 on CPU; bf16 where the GPU supports it, else fp16
        return torch.float32 if device.type == "cpu" else loading.pick_dtype("auto")
    return loading.DTYPES[name]


def _load_tokenizer(folder: Path, fallback: str | None = None, trust_remote_code: bool = False):
    if any((folder / name).is_file() for name in TOKENIZER_FILES) or fallback is None:
        return loading.load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    try:  # an adapter saved without its tokenizer: the base's
        return loading.load_tokenizer(fallback, trust_remote_code=trust_remote_code)
    except FusetuneError as error:
        raise FusetuneError(f"{folder}: no tokenizer here, nor from the base model: {error}") from None


def _adapter_base(folder: Path, run_config: dict) -> str:
    """The base model an adapter goes on, or a one-line error where it cannot be rebuilt."""
    import json

    try:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise FusetuneError(f"{folder}/adapter_config.json: cannot read it: {error}") from None
    model = run_config.get("model") or {}
    if model.get("random_init"):
        raise FusetuneError(
            f"{folder}: a LoRA adapter on {model.get('name_or_path')} built with random_init, whose base weights "
            "were never saved, so it cannot be reloaded; train without LoRA (the run saves model/), or save the "
            "base and train LoRA on it (examples/07_save_reload.py)"
        )
    if not base:
        raise FusetuneError(f"{folder}/adapter_config.json: names no base_model_name_or_path")
    local = Path(loading.resolve(base)).expanduser()
    if (local / "config.json").is_file() and not _has_weights(local):
        raise FusetuneError(
            f"{folder}: its base model {base} has a config but no weights (built with random_init?), "
            "so the adapter cannot be reloaded; save the base weights and train LoRA on them"
        )
    return base


def open_folder(path: str | Path, trust_remote_code: bool = False) -> Loaded:
    """What ``path`` holds (see ``locate``), with its tokenizer; the weights are loaded by ``load_weights``.
    A model that needs its own Python code is refused with one line unless ``trust_remote_code``."""
    kind, folder = locate(path)
    run_config = _run_config(folder)
    base = _adapter_base(folder, run_config) if kind == "adapter" else None
    tokenizer = _load_tokenizer(folder, base, trust_remote_code)
    return Loaded(None, tokenizer, folder, kind, base, run_config, trust_remote_code)


# What a damaged or mismatched weight file raises (loading.load_model turns OSError and ValueError into one line)
BROKEN_WEIGHTS = (SafetensorError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError)


def load_weights(loaded: Loaded, device: str = "auto", dtype: str = "auto") -> Loaded:
    """Load the model with plain transformers and PEFT, in eval mode, for generation."""
    torch_device = _pick_device(device)
    torch_dtype = _pick_dtype(dtype, torch_device)
    weights = loaded.base if loaded.kind == "adapter" else str(loaded.folder)
    try:
        model = loading.load_model(weights, torch_dtype, trust_remote_code=loaded.trust_remote_code)
    except FusetuneError as error:
        where = "the adapter's base model: " if loaded.kind == "adapter" else ""
        raise FusetuneError(f"{loaded.folder}: {where}{error}") from None
    except BROKEN_WEIGHTS as error:
        raise FusetuneError(f"{weights}: the weights do not load: {first_line(error)}") from None
    if loaded.kind == "adapter":
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(loaded.folder))
        except (OSError, ValueError, *BROKEN_WEIGHTS) as error:
            raise FusetuneError(
                f"{loaded.folder}: the adapter does not load on {loaded.base}: {first_line(error)}"
            ) from None
    loaded.model = model.to(torch_device).eval()
    return loaded


def load(path: str | Path, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> Loaded:
    """The model and tokenizer that ``path`` holds, ready to generate."""
    return load_weights(open_folder(path, trust_remote_code), device, dtype)


def trained_on_plain_prompts(run_config: dict) -> str | None:
    """The data formatter, when the run trained on plain text rather than chat-template turns."""
    data = run_config.get("data") or {}
    formatter = data.get("formatter")
    if formatter in PLAIN_FORMATTERS or (formatter and data.get("use_chat_template") is False):
        return formatter
    return None


class _Printer(TextStreamer):
    """Streams the answer only (not the prompt) to ``out``."""

    def __init__(self, tokenizer, out):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        self.out.flush()


class Chat:
    """A conversation with a loaded model: ``reply(text)`` streams and returns one answer."""

    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        raw: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        notes=None,
    ):
        if raw and system:
            raise FusetuneError("--system needs the chat template; it cannot be used with --raw")
        if not raw and not getattr(tokenizer, "chat_template", None):
            raise FusetuneError(
                "the tokenizer has no chat template; pass --raw to generate from the prompt text as typed"
            )
        self.model, self.tokenizer, self.system, self.raw = model, tokenizer, system, raw
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.notes = notes or sys.stderr  # where history trimming is reported
        self.history: list[dict] = []  # user and assistant turns, without the system message
        if not raw:
            check_template(tokenizer.chat_template, "the chat template")
            self._render([{"role": "user", "content": "hi"}])  # a template that refuses the system role fails now

    def reset(self) -> None:
        self.history = []

    def _render(self, turns: list[dict]) -> str:
        from jinja2 import TemplateError

        messages = ([{"role": "system", "content": self.system}] if self.system else []) + turns
        try:
            return render_within(
                lambda: self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                "the conversation",
            )
        except TemplateError as error:
            raise FusetuneError(f"the chat template refused the conversation: {error}") from None

    def _encode(self, text: str) -> list[int]:
        # As TRL tokenized in training: a rendered conversation as it is (the template writes any BOS), a plain
        # prompt with the tokenizer's special tokens.
        specials = self.raw and _adds_specials(self.tokenizer, [text])
        return self.tokenizer(text, add_special_tokens=specials).input_ids

    def prompt_ids(self, text: str) -> tuple[list[int], int]:
        """The prompt's token ids with ``text`` as the next user turn, and how many new tokens fit after it.

        The oldest exchanges are dropped while the prompt and ``max_new_tokens`` overflow the model's positions.
        """
        limit = getattr(self.model.config, "max_position_embeddings", None) if self.model is not None else None
        turns = [*self.history, {"role": "user", "content": text}]
        while True:
            ids = self._encode(text if self.raw else self._render(turns))
            if limit is None or len(ids) + self.max_new_tokens <= limit or len(turns) <= 1:
                break
            turns = turns[2:]
            self.notes.write(f"(dropped the oldest exchange to fit the model's {limit} positions)\n")
        if limit is not None and len(ids) >= limit:
            raise FusetuneError(f"the prompt is {len(ids)} tokens; the model takes at most {limit} positions")
        if self.history and len(turns) < len(self.history) + 1:
            self.history = turns[:-1]
        return ids, self.max_new_tokens if limit is None else min(self.max_new_tokens, limit - len(ids))

    @torch.no_grad()
    def reply(self, text: str, out=None) -> str:
        """Generate the answer to ``text``, streaming it to ``out`` (default stdout); returns it."""
        out = out or sys.stdout
        ids, room = self.prompt_ids(text)
        device = next(self.model.parameters()).device
        eos = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        eos |= set(configured) if isinstance(configured, list) else {configured}
        sampling = (
            {"do_sample": True, "temperature": self.temperature}
            if self.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        output = self.model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=room,
            eos_token_id=sorted(e for e in eos if e is not None),
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=_Printer(self.tokenizer, out),
            **sampling,
        )
        answer = self.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
        if not self.raw:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other fusetune error (main prints it)
        raise FusetuneError(message)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_positive_int.__name__ = "positive integer"


def _temperature(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


_temperature.__name__ = "temperature (a number >= 0)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m fusetune.chat",
        description="Chat with a trained model. RUN_DIR: a run folder (its merged/, else adapter/ on its base model, "
        "else model/), or a folder that holds a model or a PEFT adapter. Answers stream to stdout.",
        epilog="Without --prompt, one turn per line from stdin until EOF or /exit; /reset clears the conversation.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, or a folder holding a model or an adapter")
    parser.add_argument("--prompt", metavar="TEXT", help="answer this one prompt, then exit")
    parser.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    parser.add_argument("--max-new-tokens", metavar="N", type=_positive_int, default=256, help="default: 256")
    parser.add_argument("--temperature", metavar="T", type=_temperature, default=0.0, help="0 (default): greedy")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda:1")
    parser.add_argument("--dtype", default="auto", choices=["auto", *loading.DTYPES], help="auto: fp32 on CPU")
    parser.add_argument("--raw", action="store_true", help="no chat template and no history: the text as typed")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run the model folder's own Python code (auto_map)"
    )
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty")
    return args


def _interact(chat: Chat, stdin, out, notes) -> None:
    tty = stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            line = input(">>> ") if tty else stdin.readline()
        except EOFError:
            line = ""
        if not line:  # EOF
            if tty:
                out.write("\n")
            return
        text = line.rstrip("\r\n")
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            chat.reset()
            notes.write("(conversation cleared)\n")
            continue
        if not text.strip():
            continue
        try:
            chat.reply(text, out)
        except FusetuneError as error:  # this turn only (a prompt too long): the conversation goes on
            notes.write(f"fusetune: error: {error}\n")
            continue
        except SignalStop:  # SIGTERM ends the conversation
            raise
        except KeyboardInterrupt:  # Ctrl-C stops this answer; it is not kept in the history
            out.write("\n")
            notes.write("(interrupted)\n")
            continue
        out.write("\n")
        out.flush()


def main(argv=None, stdin=None, out=None, notes=None) -> int:
    """The command line; returns the exit code. Answers go to ``out``, everything else to ``notes``."""
    stdin, out, notes = stdin or sys.stdin, out or sys.stdout, notes or sys.stderr
    try:
        with StopOnSignal(signals=(signal.SIGTERM,)):  # SIGINT stays Python's KeyboardInterrupt
            return _main(argv, stdin, out, notes)
    except KeyboardInterrupt as stopped:
        signum = getattr(stopped, "signum", signal.SIGINT)
        out.write("\n")
        out.flush()
        notes.write(f"fusetune: interrupted by {signal.Signals(signum).name}\n")
        return 128 + signum


def _main(argv, stdin, out, notes) -> int:
    try:
        args = parse_args(argv)
        loaded = open_folder(args.run_dir, args.trust_remote_code)
        Chat(None, loaded.tokenizer, args.system, args.raw)  # the chat template is checked before the weights load
        load_weights(loaded, args.device, args.dtype)
        chat = Chat(loaded.model, loaded.tokenizer, args.system, args.raw, args.max_new_tokens, args.temperature, notes)
        plain = trained_on_plain_prompts(loaded.run_config)
        if plain and not args.raw:
            notes.write(
                f"note: this run trained on plain prompts (data={plain}), not chat turns; "
                "--raw sends your text as typed\n"
            )
        if args.prompt is not None:
            chat.reply(args.prompt, out)
            out.write("\n")
            out.flush()
            return 0
        notes.write(f"fusetune chat: {loaded.describe()}; {COMMANDS}\n")
        _interact(chat, stdin, out, notes)
        return 0
    except FusetuneError as error:
        notes.write(f"fusetune: error: {error}\n")
        return 2


if __name__ == "__main__":
    quiet_third_party(answers_only=True)
    sys.exit(main())
