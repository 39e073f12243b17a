"""Load a tokenizer and a causal LM (hub, local folder, or random init), and add LoRA."""

import json
import logging
import pickle
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from . import precision
from .errors import FusetuneError, first_line
from .modules import is_quantized
from .offline import require_local_or_hub

log = logging.getLogger(__name__)
ASSETS = Path(__file__).parent / "assets"
PREFIX = "fusetune:"
TOKENIZER_FILES = ("tokenizer_config.json", "config.json")  # one of them is cached where the tokenizer is
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth")  # torch.save files: loaded with weights_only, never run
# A model's weights in any format a folder may hold them: shards, their index (model.safetensors.index.json,
# pytorch_model.bin.index.json), a GGUF export beside them.
WEIGHT_FILES = ("*.safetensors", *PICKLED_WEIGHTS, "*.index.json", "*.gguf")


def resolve(name_or_path: str) -> str:
    """``fusetune:NAME`` names a folder shipped in the package; anything else is a hub id or a path."""
    if name_or_path.startswith(PREFIX):
        folder = ASSETS / name_or_path[len(PREFIX) :]
        if not (folder / "config.json").is_file():
            shipped = sorted(str(p.parent.relative_to(ASSETS)) for p in ASSETS.rglob("config.json"))
            raise FusetuneError(f"model: no shipped model '{name_or_path}'; shipped: {', '.join(shipped)}")
        return str(folder)
    return name_or_path


def pick_dtype(name: str) -> torch.dtype:
    """``auto``: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _hub_error(what: str, name: str, error: Exception) -> FusetuneError:
    line = first_line(error)
    if "trust_remote_code=True" in str(error):  # transformers refused to run the repository's own code
        return _needs_code(name, "auto_map")
    folder = Path(resolve(name)).expanduser()
    if folder.is_dir():
        return FusetuneError(f"{what}: the folder {folder} holds no loadable model or tokenizer: {line}")
    return FusetuneError(f"{what}: cannot load '{name}' (not a local folder, and not reachable on the hub): {line}")


def _needs_code(name: str, where: str) -> FusetuneError:
    return FusetuneError(
        f"model {name} needs its own Python code ({where}); trust_remote_code=true (fusetune.chat: "
        "--trust-remote-code) runs it, only for code you trust"
    )


def refuse_remote_code(name_or_path: str, trust_remote_code: bool) -> None:
    """Without ``trust_remote_code``, one line for a local folder whose config.json names a model type transformers
    does not know: with ``auto_map`` (its own Python classes) or without. Reads JSON only; runs nothing.

    Anything else (a hub repository, a tokenizer's own code) transformers checks itself: it refuses, never asks,
    since False is passed on, and ``_hub_error`` makes that the same line."""
    config = Path(resolve(name_or_path)).expanduser() / "config.json"
    if trust_remote_code or not config.is_file():
        return
    try:
        content = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # transformers names what is wrong with it
    if not isinstance(content, dict) or content.get("model_type") in CONFIG_MAPPING:
        return
    model_type = content.get("model_type")
    if content.get("auto_map"):
        raise _needs_code(name_or_path, "auto_map in config.json")
    if model_type is not None:
        raise FusetuneError(
            f"model {name_or_path}: config.json has model_type '{model_type}', which this transformers does not "
            "know, and no auto_map: a newer transformers may know it"
        )


def _hub(options: dict) -> dict:
    """The hub options that were set; ``trust_remote_code`` always, as a bool (None would let transformers ask)."""
    hub = {k: v for k, v in options.items() if v is not None}
    hub["trust_remote_code"] = hub.get("trust_remote_code") is True
    return hub


def load_config(name_or_path: str, **hub):
    """The config of the causal LM that ``load_model`` builds (architecture, model_type), without its weights:
    for a checkpoint that wraps a language model with other towers, the language model's (``text_part``)."""
    return text_part(_whole_config(name_or_path, "model.config", _hub(hub)))[0]


def _whole_config(name_or_path: str, what: str, hub: dict):
    require_local_or_hub(resolve(name_or_path), what)
    refuse_remote_code(name_or_path, hub["trust_remote_code"])
    try:
        return AutoConfig.from_pretrained(resolve(name_or_path), **hub)
    except (OSError, ValueError) as error:
        raise _hub_error(what, name_or_path, error) from None


# Where a multimodal checkpoint keeps its language model's weights: transformers 5 saves model.language_model.*,
# checkpoints written by transformers 4 hold language_model.model.* and language_model.lm_head.*.
TEXT_WEIGHTS = {
    r"^model\.language_model\.": "model.",
    r"^language_model\.model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
}


def text_part(config):
    """(config, key_mapping): the config of the text-only causal LM in ``config``, and the renaming that loads its
    weights from the whole checkpoint (None where transformers renames them itself, or nothing changes).

    A composite config (Gemma 3 4B and up, Qwen3.5) holds its language model's in ``text_config``; where that
    type has its own causal-LM class, fusetune trains it alone, without the vision tower the wrapper would add
    (and LoRA adapters in it). A plain config comes back as it is."""
    text = getattr(config, "text_config", None)
    if text is None or text is config or type(text) not in AutoModelForCausalLM._model_mapping:
        return config, None
    wrapper = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if wrapper is not None and getattr(wrapper, "config_class", None) is type(text):
        return text, None  # transformers builds the text model itself, and renames its weights (Qwen3.5)
    return text, TEXT_WEIGHTS


def load_tokenizer(name_or_path: str, **hub):
    """The tokenizer, with a pad token (its eos token where it has none). ``hub``: token, revision, ..."""
    path = resolve(name_or_path)
    require_local_or_hub(path, "model.tokenizer", TOKENIZER_FILES)
    hub = _hub(hub)
    refuse_remote_code(name_or_path, hub["trust_remote_code"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    except (OSError, ValueError) as error:
        raise _hub_error("model.tokenizer", name_or_path, error) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    dtype: torch.dtype,
    *,
    config: str | None = None,
    random_init: bool = False,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    attn_implementation: str | None = None,
    device_map=None,
    **hub,
):
    """A causal LM in ``dtype``. ``random_init`` builds it from ``config`` (or the model's) without weights.

    ``hub``: token, revision, trust_remote_code (off unless True), passed to transformers' loaders. A weights
    file that torch's ``weights_only`` unpickler refuses (it holds pickled code) is one line, never run.
    """
    hub = _hub(hub)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if random_init:
        model_config = load_config(config or name_or_path, **hub)
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype, **kwargs)
    text, key_mapping = text_part(_whole_config(name_or_path, "model.name_or_path", hub))
    if key_mapping:  # the language model alone, out of a multimodal checkpoint
        kwargs.update(config=text, key_mapping=key_mapping)
    if load_in_4bit or load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    refuse_remote_code(name_or_path, hub["trust_remote_code"])
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolve(name_or_path), dtype=dtype, device_map=device_map, **kwargs, **hub
        )
    except (OSError, ValueError) as error:
        raise _hub_error("model.name_or_path", name_or_path, error) from None
    except pickle.UnpicklingError:
        raise FusetuneError(
            f"model {name_or_path}: {_pickled_weights(name_or_path)} holds pickled code besides tensors, which is "
            "not run (torch weights_only); use a safetensors copy from a source you trust"
        ) from None


def _pickled_weights(name_or_path: str) -> str:
    """The pickled weight file(s) of a local folder, named for the one-line error."""
    folder = Path(resolve(name_or_path)).expanduser()
    files = sorted(p for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern)) if folder.is_dir() else []
    if len(files) == 1:
        return f"the weights file {files[0]}"
    return f"a weights file ({', '.join(p.name for p in files)})" if files else "a pickled weights file"


def add_lora(
    model, *, r, alpha, dropout, target_modules, modules_to_save=None, gradient_checkpointing=False, **options
):
    """Wrap ``model`` in PEFT LoRA adapters (preparing a quantized model first).

    ``options``: further LoraConfig fields (bias, use_rslora, init_lora_weights, layers_to_transform, ...).
    """
    from peft import LoraConfig, get_peft_model

    if is_quantized(model):
        model = precision.prepare_quantized(model, precision.model_compute_dtype(model), gradient_checkpointing)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(target_modules) - present)
    if missing:
        raise FusetuneError(f"model.lora.target_modules: {missing} not found in {type(model).__name__}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type="CAUSAL_LM",
        **{k: v for k, v in options.items() if v is not None},
    )
    return get_peft_model(model, config)


def count_parameters(model) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
