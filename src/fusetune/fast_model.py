"""FastModel: load a causal LM with fusetune's kernels, add LoRA, save a merged 16-bit model or a GGUF file.

model, tokenizer = FastModel.from_pretrained("path-or-hub-id", max_seq_length=2048, load_in_4bit=True)
model = FastModel.get_peft_model(model, r=16, modules_to_save=["embed_tokens", "lm_head"])
FastModel.save_merged(model, tokenizer, "out/merged")
FastModel.save_gguf(model, tokenizer, "out/model-q8_0.gguf", "q8_0")

The models returned also carry Unsloth's ``save_pretrained_merged``, ``push_to_hub_merged`` and
``save_pretrained_gguf`` (``fusetune.saving``).
"""

import logging
import warnings

import torch

from fusetune_kernels.offloaded_checkpoint import enable_checkpointing

from . import fp8_base as fp8
from . import limits, loading, merging
from .errors import FusetuneError
from .families import is_experts, routed_experts
from .gguf_export import save_gguf
from .modules import EMBEDDINGS, EXPERT_PARAMETERS, PROJECTIONS, base_model, is_quantized
from .patching import apply_kernels, choose_backend
from .saving import add_saving_methods
from .state import peek, state_of
from .training.smart_checkpointing import enable_smart_checkpointing

log = logging.getLogger(__name__)
OFFLOADED = ("unsloth", "offload")  # checkpointing whose saved layer inputs wait in pinned CPU memory
CHECKPOINTING = (True, False, *OFFLOADED, "smart")


def check_memory_budget(memory_budget, mode, where: str) -> None:
    """A budget is a positive number, and only smart checkpointing reads it."""
    if memory_budget is None:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget > 0:
        raise FusetuneError(
            f"{where}: expected GiB (> 1) or a fraction of the device's memory (0 to 1], got {memory_budget!r}"
        )
    if mode != "smart":
        raise FusetuneError(f"{where} is read only by smart checkpointing; gradient checkpointing is {mode!r}")


def enable_fusetune_checkpointing(model, mode: bool | str, memory_budget: float | None = None) -> str:
    """fusetune's checkpointing in ``mode`` (True: plain; "unsloth" / "offload"; "smart" within
    ``memory_budget``, GiB or a fraction of the device); returns what it did, in words."""
    if mode == "smart":
        return enable_smart_checkpointing(model, memory_budget)
    return enable_checkpointing(model, offload=mode in OFFLOADED)


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return loading.pick_dtype("auto")
    if isinstance(dtype, str):
        if dtype not in loading.DTYPES and dtype != "auto":
            raise FusetuneError(f"dtype: expected one of auto, {', '.join(loading.DTYPES)}, got '{dtype}'")
        return loading.pick_dtype(dtype)
    return dtype


def _refuse_ids_beyond_embeddings(tokenizer, tokenizer_name: str, model_config, model_name: str) -> None:
    """A token id past the embedding's last row fails deep inside the first forward: one line here instead."""
    rows = getattr(model_config.get_text_config(), "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        raise FusetuneError(
            f"tokenizer {tokenizer_name} has {len(tokenizer)} ids but model {model_name} embeds {rows} "
            "(vocab_size): use the model's own tokenizer, or resize the embeddings (model.resize_token_embeddings) "
            "and train them (modules_to_save=[embed_tokens, lm_head])"
        )


def _refuse_unsupported(unused: dict, loftq_config) -> None:
    """Unsloth's arguments that fusetune ignores are named in a warning; LoftQ is refused."""
    for name in unused:
        warnings.warn(f"FastModel.get_peft_model: '{name}' is not supported and is ignored", stacklevel=3)
    if loftq_config:
        raise FusetuneError("loftq_config is not supported: LoftQ needs the unquantized base weights")


def _lora_targets(model, target_modules, target_parameters) -> tuple[list[str], list[str]]:
    """The module names (default: every projection present) and 3-D parameters (default: the experts fusetune's
    kernel computes) that get adapters; a warning where embeddings would get LoRA factors."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = list(target_modules) if target_modules else [p for p in PROJECTIONS if p in present]
    if target_parameters is None:
        target_parameters = patched_expert_parameters(model)
    lora_on_embeddings = sorted(set(targets) & set(EMBEDDINGS))
    if lora_on_embeddings:
        warnings.warn(
            f"target_modules has {lora_on_embeddings}: they get LoRA factors, which train at learning_rate; "
            "embedding_learning_rate applies only to full embedding weights listed in modules_to_save",
            stacklevel=3,
        )
    return targets, target_parameters


class FastModel:
    """Load, add LoRA, save. Unsloth's FastLanguageModel argument names are accepted as they are."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int = 2048,
        dtype=None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        kernels: str = "auto",
        *,
        random_init: bool = False,
        config: str | None = None,
        tokenizer_name: str | None = None,
        attn_implementation: str | None = None,
        device_map=None,
        token: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        full_finetuning: bool = False,
        load_in_16bit: bool = False,
        fix_tokenizer: bool = True,
        rope_scaling=None,
        fast_inference: bool = False,
        use_gradient_checkpointing: bool | str | None = None,
        fp8_base: bool = False,
    ):
        """(model, tokenizer). ``dtype`` None: bf16 where supported, fp16 on older GPUs, fp32 on CPU.

        ``token``, ``revision`` and ``trust_remote_code`` go to the hub loaders (remote code stays off
        unless asked for). ``full_finetuning`` and ``load_in_16bit`` load unquantized weights; every
        weight then trains unless ``get_peft_model`` adds adapters. ``fix_tokenizer`` is always on: a
        tokenizer without a pad token gets its eos token. ``use_gradient_checkpointing`` becomes the
        default of ``get_peft_model``. ``fp8_base``: the frozen base projections that ``get_peft_model`` wraps
        run as scaled FP8 GEMMs (``fusetune.fp8_base``); refused on the CPU and on GPUs without FP8 tensor cores.
        """
        quantized = load_in_4bit or load_in_8bit
        if (full_finetuning or load_in_16bit) and quantized:
            raise FusetuneError("full_finetuning / load_in_16bit cannot be combined with load_in_4bit or load_in_8bit")
        if rope_scaling is not None:
            raise FusetuneError("rope_scaling is not supported: set the model config's rope_parameters instead")
        if fast_inference:
            raise FusetuneError("fast_inference (vLLM) is not supported; generate with model.generate()")
        dtype = _dtype(dtype)
        if fp8_base:
            fp8.refuse_without_fp8(dtype, kernels, full_finetuning or load_in_8bit)
        hub = {"token": token, "revision": revision, "trust_remote_code": trust_remote_code}
        limits.refuse({"max_seq_length": max_seq_length}, limits.MODEL)
        model_config = loading.load_config(config or model_name, **hub)
        if quantized and routed_experts(model_config) > 1:
            raise FusetuneError(
                f"load_in_4bit/load_in_8bit: {model_config.model_type} holds its {routed_experts(model_config)} "
                "routed experts as 3-D weights, which bitsandbytes leaves unquantized (4-bit experts are not "
                "implemented); load it in bf16 (load_in_4bit=False) for LoRA on the experts"
            )
        backend = choose_backend(kernels, model_config, dtype=dtype)  # an unsupported family fails before the weights
        tokenizer = loading.load_tokenizer(tokenizer_name or model_name, **hub)
        _refuse_ids_beyond_embeddings(tokenizer, tokenizer_name or model_name, model_config, config or model_name)
        tokenizer.model_max_length = max_seq_length
        if quantized and device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}
        model = loading.load_model(
            model_name,
            dtype,
            config=config,
            random_init=random_init,
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            attn_implementation=attn_implementation,
            device_map=device_map,
            **hub,
        )
        if not quantized and device_map is None and torch.cuda.is_available():
            model = model.to("cuda")
        apply_kernels(model, backend)  # records the backend in the model's FusetuneState
        model.max_seq_length = max_seq_length
        state = state_of(model)
        state.compute_dtype = dtype
        state.hub = {"revision": revision, "trust_remote_code": trust_remote_code}  # no token kept
        state.checkpointing = use_gradient_checkpointing
        state.fp8_base = fp8_base  # get_peft_model turns the wrapped projections to FP8
        return add_saving_methods(model), tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        modules_to_save: list[str] | None = None,
        use_gradient_checkpointing: bool | str | None = None,
        random_state: int = 3407,
        *,
        target_parameters: list[str] | None = None,
        bias: str = "none",
        use_rslora: bool = False,
        init_lora_weights=True,
        layers_to_transform: list[int] | int | None = None,
        layers_pattern: str | None = None,
        loftq_config: dict | None = None,
        max_seq_length: int | None = None,
        memory_budget: float | None = None,
        **unused,
    ):
        """LoRA adapters on ``target_modules`` (default: every attention and MLP projection present) and on
        ``target_parameters`` (PEFT's LoRA on 3-D parameters; default: the ``gate_up_proj`` and ``down_proj``
        of routed experts that fusetune's expert kernel computes, so their adapters ride in its grouped GEMMs;
        ``[]``: none). The routers stay frozen.

        ``use_gradient_checkpointing``: True (non-reentrant), False, "unsloth" / "offload" (every layer's
        input offloaded to pinned CPU memory), or "smart" (as many layers as ``memory_budget`` allows keep
        their activations, the rest offloaded; the budget in GiB, or a fraction of the device's memory;
        None: what is free); None takes what ``from_pretrained`` was given, else True. ``bias``,
        ``use_rslora``, ``init_lora_weights``, ``layers_to_transform`` and ``layers_pattern`` are PEFT's
        LoraConfig fields.
        """
        limits.refuse({"r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout}, limits.LORA)
        _refuse_unsupported(unused, loftq_config)
        if use_gradient_checkpointing is None:
            asked = peek(model).checkpointing
            use_gradient_checkpointing = True if asked is None else asked
        targets, target_parameters = _lora_targets(model, target_modules, target_parameters)
        if use_gradient_checkpointing not in CHECKPOINTING:
            raise FusetuneError(
                f"use_gradient_checkpointing: expected True, False, 'unsloth', 'offload' or 'smart', "
                f"got {use_gradient_checkpointing!r}"
            )
        check_memory_budget(memory_budget, use_gradient_checkpointing, "memory_budget")
        checkpointing = bool(use_gradient_checkpointing)
        if checkpointing and not is_quantized(model):  # the quantized path does this while preparing the model
            model.enable_input_require_grads()  # checkpointing itself is enabled once, after the adapters
        torch.manual_seed(random_state)
        peft_model = loading.add_lora(
            model,
            r=r,
            alpha=lora_alpha,
            dropout=lora_dropout,
            target_modules=targets,
            modules_to_save=modules_to_save,
            gradient_checkpointing=checkpointing,
            bias=bias,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
            target_parameters=list(target_parameters) or None,
        )
        peft_model.max_seq_length = max_seq_length or getattr(model, "max_seq_length", None)
        if peek(peft_model).fp8_base:
            log.info(fp8.hold_fp8(peft_model))
        if checkpointing:  # fusetune's own: offloaded or not, with the recompute marked (see enable_checkpointing)
            log.info(
                "use_gradient_checkpointing=%r: %s",
                use_gradient_checkpointing,
                enable_fusetune_checkpointing(peft_model, use_gradient_checkpointing, memory_budget),
            )
        return add_saving_methods(peft_model)

    @staticmethod
    def for_inference(model):
        """Evaluation mode with the KV cache on, for ``generate()``."""
        model.eval()
        base_model(model).config.use_cache = True
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing: bool = True):
        """Back to training mode after ``for_inference``."""
        model.train()
        base_model(model).config.use_cache = not use_gradient_checkpointing
        return model

    save_merged = staticmethod(merging.save_merged)  # the adapters merged into 16-bit weights (see there)

    @staticmethod
    def save_gguf(model, tokenizer, path: str, quantization_method: str = "q8_0", token: str | None = None) -> str:
        """One GGUF file at ``path`` that llama.cpp runs: ``quantization_method`` "f16" or "q8_0", the LoRA adapters
        merged in (on a copy, as ``save_merged``), the tokenizer and its chat template included. Families: llama,
        mistral, qwen2 (``fusetune.gguf_export``)."""
        return str(save_gguf(model, tokenizer, path, quantization_method, token=token))


def patched_expert_parameters(model) -> list[str]:
    """The dotted names of the ``EXPERT_PARAMETERS`` of routed experts whose forward is fusetune's kernel."""
    names = []
    for name, module in model.named_modules():
        if is_experts(module) and getattr(type(module).forward, "_fusetune", False):
            names += [f"{name}.{param}" for param in EXPERT_PARAMETERS if param in module._parameters]
    return names
