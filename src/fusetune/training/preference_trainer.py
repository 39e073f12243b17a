"""FastDPOConfig and FastDPOTrainer: TRL's DPO classes with fusetune's kernels and its fused preference loss.

- the kernels backend (``kernels``: auto | triton | reference) is applied to the policy, as FastSFTTrainer does
  (the family's classes are patched, so a reference model of the same family runs them too);
- precision from the hardware where neither bf16 nor fp16 is set (TRL's DPOConfig says bf16 everywhere), and
  fp32 on a host without CUDA, with one warning (``trainer.settle_precision``);
- ``compute_loss`` takes the policy's chosen/rejected log-probs from the final hidden states and the LM head
  through ``fusetune_kernels.preference`` (chunked, never the ``[tokens, vocab]`` logits; the reference twin
  on ``kernels=reference``), and the reference's the same way: the same batch run under no_grad with the LoRA
  adapters disabled (TRL's "ref" adapter where it made one), or through ``ref_model``; with
  ``precompute_ref_log_probs`` they are TRL's precomputed ones. Gradients reach the policy only.

The hidden states come from the model's own forward (``output_hidden_states``, with ``logits_to_keep`` an empty
index so its head projects nothing): the call goes through every wrapper (accelerate, DDP, PEFT), as TRL's does.

``fused_loss``: None (the default) uses the fused loss wherever ``fused_preference_blocker`` finds nothing against
it, else TRL's own compute_loss, with the reason logged once; False: TRL's always; True: an error where it cannot.
TRL's loss types that the fused loss computes: sigmoid, hinge, ipo, robust, each alone (``loss_weights`` scales
it); the others (and ``f_divergence_type``, ``ld_alpha``, ``use_weighting``, a router aux loss, vision models,
prompt-learning PEFT) train on TRL's path. On the fused path the logged metrics are TRL's rewards/chosen,
rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected and num_tokens; TRL's
entropy, logits/chosen, logits/rejected and mean_token_accuracy need per-token statistics the preference kernel
does not compute, and are not logged there. A PEFT adapter on lm_head is refused by TRL itself (one line).

IPO divides by the completion tokens that carry a label after the shift; TRL counts the completion mask before
it. They differ only for a completion that starts at position 0 (an empty prompt).
"""

import logging
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from fusetune_kernels.preference import fused_linear_preference_loss, fused_linear_preference_loss_reference

from ..compat.trl import PreparePairsHook, add_trained_tokens, metric_lists, tensor_parallel_size, trained_tokens
from ..data.cache import PairsCacheHook
from ..errors import FusetuneError
from ..forwards import IGNORE_INDEX, head_dtype, logit_scale
from ..patching import apply_kernels, is_applied
from ..state import peek
from .guards import GuardedTrainer
from .trainer import FastSFTConfig, SettledPrecision, as_fast_config

log = logging.getLogger(__name__)
# TRL's DPO loss types that fusetune_kernels.preference computes as TRL does.
FUSED_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
# Batch keys that are not model inputs (TRL's DataCollatorForPreference adds them).
NOT_MODEL_INPUTS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def field_like(config_cls, name: str):
    """A new dataclass field with the default and help of ``config_cls``'s field ``name``."""
    original = config_cls.__dataclass_fields__[name]
    return field(default=original.default, metadata=original.metadata)


@dataclass
class FastDPOConfig(SettledPrecision, DPOConfig):
    kernels: str = field_like(FastSFTConfig, "kernels")
    fused_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Take the policy's and reference's log-probs from fusetune's fused preference loss. None: wherever "
            "it computes TRL's loss (loss_type sigmoid, hinge, ipo or robust alone; a patched model), else TRL's "
            "own compute_loss, with the reason logged; False: always TRL's; True: an error where it does not apply."
        },
    )


def fused_preference_blocker(trainer) -> str | None:
    """Why compute_loss cannot take TRL's DPO loss from fusetune's fused preference loss here, or None."""
    args, model = trainer.args, trainer.model
    backend = peek(model).backend
    if backend not in ("triton", "reference"):
        return "the model has no kernels backend (kernels=auto on a family fusetune does not patch)"
    if len(trainer.loss_types) != 1 or trainer.loss_types[0] not in FUSED_LOSS_TYPES:
        return f"loss_type={args.loss_type} (the fused preference loss computes one of {', '.join(FUSED_LOSS_TYPES)})"
    if trainer.f_divergence_type != "reverse_kl":
        return f"f_divergence_type={trainer.f_divergence_type!r}"
    if trainer.ld_alpha is not None:
        return "ld_alpha is set"
    if trainer.use_weighting:
        return "use_weighting is on"
    if trainer.aux_loss_enabled:
        return "the router's load-balancing loss is on"
    if getattr(trainer, "_is_vision_dataset", False):
        return "a vision dataset"
    if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
        return "prompt-learning PEFT (virtual tokens)"
    if getattr(getattr(trainer.accelerator, "parallelism_config", None), "sp_enabled", False):
        return "sequence parallelism is on"
    return None


def final_hidden_states(model, model_inputs: dict) -> torch.Tensor:
    """The final (normed) hidden states [B, T, H] of the model's own forward, its head projecting no position."""
    no_position = torch.empty(0, dtype=torch.long, device=model_inputs["input_ids"].device)
    out = model(**model_inputs, use_cache=False, output_hidden_states=True, logits_to_keep=no_position)
    return out.hidden_states[-1]


def shifted_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Position t's label is token t + 1 where it is a completion token, else ignored (the last position too)."""
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def build_with_kernels(trainer, model, args, build) -> None:
    """For a preference trainer's ``__init__``: the kernels backend applied to ``model`` before ``build()`` (TRL's
    __init__), and to the model TRL loaded where ``model`` was a name; then the run's guards (``guard_run``)."""
    on_cuda = torch.cuda.is_available() and not args.use_cpu
    if not isinstance(model, str) and not is_applied(model):  # by FastModel or the user: left as it is
        apply_kernels(model, args.kernels, on_cuda=on_cuda)
    build()
    if not is_applied(trainer.model):
        apply_kernels(trainer.model, args.kernels, on_cuda=on_cuda)
    trainer.guard_run()


class FastDPOTrainer(PairsCacheHook, PreparePairsHook, GuardedTrainer, DPOTrainer):
    """TRL's DPOTrainer with fusetune's kernels and the fused preference loss (see the module docstring);
    ``dataset_cache=`` (``Splits.cache``) takes its tokenized pairs from fusetune's cache (``data.cache``)."""

    def __init__(self, model, ref_model=None, args=None, *pos, **kwargs):
        args = as_fast_config(args, FastDPOConfig)
        build = lambda: super(FastDPOTrainer, self).__init__(model, ref_model, args, *pos, **kwargs)  # noqa: E731
        build_with_kernels(self, model, args, build)
        self.fused_preference = False
        if args.fused_loss is not False:
            reason = fused_preference_blocker(self)
            if reason is not None and args.fused_loss:
                raise FusetuneError(f"fused_loss=True: not possible here: {reason}")
            if reason is not None:
                log.info("fused preference loss off, TRL's compute_loss instead: %s", reason)
            self.fused_preference = reason is None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.fused_preference:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        model_inputs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
        labels = shifted_labels(inputs["input_ids"], inputs["completion_mask"])
        hidden = final_hidden_states(model, model_inputs)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        if self.precompute_ref_logps:
            reference = {
                "ref_chosen_logps": inputs["ref_chosen_logps"],
                "ref_rejected_logps": inputs["ref_rejected_logps"],
            }
        else:
            reference = self._reference_hidden(model_inputs)
        hidden, weight, bias = self._in_head_dtype(hidden, head.weight, head.bias)
        loss, metrics = self._preference_op()(
            hidden,
            weight,
            labels.to(weight.device),
            bias,
            loss_type=self.loss_types[0],
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            ignore_index=IGNORE_INDEX,
            softcap=getattr(self.model.config.get_text_config(), "final_logit_softcapping", None),
            logit_scale=logit_scale(self.model.config),
            **reference,
        )
        self._log_metrics(mode, metrics, inputs)
        return loss * self.loss_weights[0]

    def _preference_op(self):
        backend = peek(self.model).backend
        return fused_linear_preference_loss if backend == "triton" else fused_linear_preference_loss_reference

    @staticmethod
    def _in_head_dtype(hidden, weight, bias=None):
        """(hidden, weight, bias) as the fused loss head casts them (``forwards.head_dtype``)."""
        dtype = head_dtype(hidden, weight)
        return hidden.to(weight.device, dtype), weight.to(dtype), None if bias is None else bias.to(dtype)

    def _reference_hidden(self, model_inputs: dict) -> dict:
        """The reference's final hidden states of the batch and its head weight, without gradients: the policy
        with its adapters disabled (or TRL's "ref" adapter active), or ``ref_model``."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:  # TRL keeps no reference model only for PEFT (or precomputed log-probs)
                policy = self.accelerator.unwrap_model(self.model)
                with use_adapter(policy, adapter_name="ref" if "ref" in policy.peft_config else None):
                    hidden = final_hidden_states(self.model, model_inputs)
                    weight = policy.get_output_embeddings().weight
            else:
                hidden = final_hidden_states(self.ref_model, model_inputs)
                weight = self.accelerator.unwrap_model(self.ref_model).get_output_embeddings().weight
        hidden, weight, _ = self._in_head_dtype(hidden, weight)
        return {"ref_hidden": hidden, "ref_weight": weight}

    def _log_metrics(self, mode: str, metrics: dict, inputs: dict) -> None:
        """TRL's reward and log-prob metrics (means over the batch, averaged across processes) and num_tokens."""
        lists = metric_lists(self, mode)
        for name, value in metrics.items():
            lists[name].append(self.accelerator.gather_for_metrics(value.reshape(1)).mean().item())
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            add_trained_tokens(self, tokens // tensor_parallel_size(self))
        lists["num_tokens"] = [trained_tokens(self)]
