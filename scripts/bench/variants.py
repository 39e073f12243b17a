"""How each variant builds its model, inside its job subprocess: ``hf`` (transformers + PEFT as TRL's
SFTTrainer sets them up), ``liger`` (the same, Liger's patch first), ``unsloth`` (FastLanguageModel) and
``fusetune_*`` (FastModel). Only the fusetune builder imports fusetune: a peer's process never does."""

import importlib.metadata
import inspect

from .scenarios import FUSETUNE_CHECKPOINTING, LORA


def expert_parameters(model, names) -> list[str]:
    """The dotted names of every routed-experts module's 3-D parameters called ``names`` (the library's
    EXPERT_PARAMETERS, in the spec): PEFT's target_parameters."""
    return [
        f"{name}.{param}"
        for name, module in model.named_modules()
        for param in names
        if getattr(module._parameters.get(param), "ndim", 0) == 3
    ]


def bnb_config(torch, dtype):
    """QLoRA's 4-bit base: NF4 with double quantization, computing in ``dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def build_hf(spec: dict, torch, dtype, liger: bool = False):
    """transformers + PEFT set up as TRL's SFTTrainer does it (Liger's patch first, for ``liger``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if spec["cuda"]:
        kwargs["device_map"] = {"": 0}
    quantized = spec["scenario"].get("quant") == "nf4"
    if quantized and spec["source"] == "bf16":
        kwargs["quantization_config"] = bnb_config(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], **kwargs)
    if liger:
        apply_liger(model)
    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=spec["targets"],
        target_parameters=expert_parameters(model, spec["expert_parameters"]) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if spec.get("peer_checkpointing") != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if quantized:  # TRL keeps QLoRA adapters in bf16
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model


class Unsupported(Exception):
    """A peer that has nothing for this model: its row is skipped, with this reason."""


def apply_liger(model) -> None:
    """Liger Kernel's patch for the model's family, with its own defaults and fused linear cross-entropy."""
    import liger_kernel
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        version = getattr(liger_kernel, "__version__", None) or importlib.metadata.version("liger-kernel")
        raise Unsupported(f"liger-kernel {version} has no patch for model type '{model_type}'")
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=True)


def self_check_seconds() -> float | None:
    """Seconds fusetune spent checking its patched ops at load (the worker loads one model)."""
    from fusetune import patching

    return patching.check_seconds()


def build_unsloth(spec: dict, torch, dtype):
    """Unsloth's FastLanguageModel with its own offloaded checkpointing ("unsloth")."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=spec["folder"],
        max_seq_length=spec["max_seq_length"],
        dtype=dtype,
        load_in_4bit=spec["scenario"].get("quant") == "nf4",
        full_finetuning=False,
    )
    names = spec["expert_parameters"]
    experts = {"target_parameters": expert_parameters(model, names)} if spec["routed_experts"] else {}
    if experts and "target_parameters" not in inspect.signature(FastLanguageModel.get_peft_model).parameters:
        raise Unsupported("Unsloth's get_peft_model takes no target_parameters (LoRA on the routed experts)")
    return FastLanguageModel.get_peft_model(
        model,
        **experts,
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=spec["targets"],
        bias="none",
        use_gradient_checkpointing=False if spec.get("peer_checkpointing") == "off" else "unsloth",
        random_state=spec["seed"],
    )


def build_fusetune(spec: dict, torch, dtype):
    """fusetune's FastModel with the variant's kernels (reference or triton), varlen attention where padding-free."""
    from fusetune import FastModel

    kernels = spec["variant"].removeprefix("fusetune_")
    model, _ = FastModel.from_pretrained(
        spec["folder"],
        max_seq_length=spec["max_seq_length"],
        dtype=dtype,
        load_in_4bit=spec["scenario"].get("quant") == "nf4",
        kernels=kernels,
        device_map={"": 0} if spec["cuda"] else None,
        fp8_base=spec.get("fusetune_fp8", False),
    )
    model = FastModel.get_peft_model(
        model,
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=spec["targets"],
        target_parameters=expert_parameters(model, spec["expert_parameters"]),  # as the peers: every expert module
        use_gradient_checkpointing=FUSETUNE_CHECKPOINTING[spec.get("fusetune_checkpointing", "offload")],
        random_state=spec["seed"],
        memory_budget=spec.get("memory_cap_gib") if spec.get("fusetune_checkpointing") == "smart" else None,
    )
    if spec["mode"] == "padding_free":
        from fusetune.sequences.varlen import enable_varlen_attention

        enable_varlen_attention(model)
    return model
