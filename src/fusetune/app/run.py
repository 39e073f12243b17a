"""run(cfg): one training run from a composed config, leaving a record in cfg.output_dir."""

import copy
import logging
import signal
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import set_seed

from ..checkpoints import newest_complete, saving, step_of, trainable_weights_finite
from ..compat.trl import trained_tokens
from ..data import build_splits
from ..data.rules import SYNTHETIC, eval_requested
from ..errors import FusetuneError, Interrupted
from ..evaluate import GenerationEval, score_generations
from ..fast_model import FastModel, enable_fusetune_checkpointing
from ..faults import SignalStop, StopOnSignal
from ..loading import TOKENIZER_FILES, count_parameters, load_tokenizer, pick_dtype, resolve
from ..offline import require_local_or_hub
from ..patching import remove_kernels
from ..preference_trainer import FastDPOConfig, FastDPOTrainer
from ..record_files import read_jsonl
from ..trainer import FastSFTConfig, FastSFTTrainer
from . import distributed, run_folder
from . import run_record as record
from .config import checkpointing_mode, class_keys, logging_steps_for, trainer_class, validate
from .export import check_gguf, export_gguf, export_merged
from .loggers import close_logger, logger_callbacks, start_logger, trainer_report_to

log = logging.getLogger(__name__)


def sft_config(
    cfg, out: Path, dtype: torch.dtype, report_to: list[str], backend: str, strategy: dict | None = None
) -> FastSFTConfig | FastDPOConfig:
    """The trainer option's config (FastSFTConfig, or FastDPOConfig for trainer=dpo) from the trainer keys it has
    that differ from their defaults, trainer.extra, and the fields the app fills in from other groups
    (config.SET_BY_THE_APP)."""
    t = cfg.trainer
    checkpointing = checkpointing_mode(cfg.model.gradient_checkpointing)
    values = OmegaConf.to_container(t)
    values["learning_rate"] = t.learning_rate if t.learning_rate is not None else cfg.model.learning_rate
    if t.per_device_train_batch_size is None:
        values["per_device_train_batch_size"] = cfg.model.batch_size
    if t.logging_steps is None:
        values["logging_steps"] = logging_steps_for(t.max_steps)
    # Only what differs: a default given again changes nothing, and FastSFTConfig warns about logging_dir if given.
    changed = class_keys(values)
    config_class = trainer_class(t.name)
    if config_class is FastDPOConfig and "loss_type" in changed:  # several DPO losses: "sigmoid,sft"
        changed["loss_type"] = [name.strip() for name in str(changed["loss_type"]).split(",")]
    on_gpu = torch.cuda.is_available()
    try:
        return config_class(
            output_dir=str(out),
            run_name=cfg.run_name,
            seed=cfg.seed,
            data_seed=cfg.seed,
            max_length=cfg.model.max_seq_length,
            kernels=backend,
            bf16=on_gpu and dtype == torch.bfloat16,
            fp16=on_gpu and dtype == torch.float16,
            use_cpu=not on_gpu,
            report_to=report_to,
            gradient_checkpointing=bool(checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
            **changed,
            **(strategy or {}),
            **OmegaConf.to_container(t.extra),
        )
    except (TypeError, ValueError) as error:
        raise FusetuneError(f"trainer: {error}") from None


def run(cfg) -> dict:
    """Train, save, evaluate and record. Returns the summary written to summary.json.

    The run folder's record: status.json from the start ("running"), metrics.jsonl while training, the
    model and summary.json (written last) at the end; "finished", "failed" (app.cli) or "interrupted".
    SIGINT / SIGTERM stop the run within seconds in any phase (during training after a checkpoint of the step in
    flight, during a save once it is written; see faults.StopOnSignal) and raise ``Interrupted``. Rank 0 claims the
    folder (app.run_folder: locked, checked, resumed only under the config it was trained with) and owns it until
    the end.
    """
    out = Path(cfg.output_dir)
    with run_folder.owned(out, cfg) as checkpoint:  # rank 0 owns the folder and keeps the record; all ranks train
        validate(cfg)
        require_local_models(cfg.model)
        return _run(cfg, out, checkpoint)


def require_local_models(m) -> None:
    """A hub name that cannot be loaded offline fails here, in a second, before any work (offline.py)."""
    require_local_or_hub(resolve(m.name_or_path), "model.name_or_path")
    if m.tokenizer:
        require_local_or_hub(resolve(m.tokenizer), "model.tokenizer", TOKENIZER_FILES)
    if m.config:
        require_local_or_hub(resolve(m.config), "model.config")


def _run(cfg, out: Path, checkpoint: Path | None) -> dict:
    lead = distributed.is_rank_zero()  # every rank trains; rank 0 keeps the record
    if lead:
        record.write_status(out, "running", step=step_of(checkpoint) if checkpoint else 0, resumed_from=checkpoint)
    report_to = trainer_report_to(cfg, out)  # W&B starts once the data and the model have loaded
    summary = error = None
    try:
        with StopOnSignal(last_words=_last_words(out, lead)) as stop:
            try:
                summary = _train(cfg, out, report_to, checkpoint, stop)
            except BaseException as raised:
                if stop.received is None:
                    raise
                raise _interrupted(stop, raised, out, lead) from None
        return summary
    except BaseException as raised:  # the logger records how the run ended
        error = raised
        raise
    finally:
        remove_kernels()
        close_logger(cfg, summary, error)


def _train(cfg, out: Path, report_to: list[str], checkpoint: Path | None, stop: StopOnSignal) -> dict:
    started = time.perf_counter()
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)  # small CPU models lose more to thread sync than they gain
    set_seed(cfg.seed)
    m = cfg.model
    dtype = pick_dtype(m.dtype.value)
    full_finetune = m.lora is None
    gguf_type = cfg.export.gguf.value if cfg.export.gguf is not None else None
    hub = {"trust_remote_code": m.trust_remote_code}
    # The data first: a mistake in it shows before the weights load.
    stop.enter("data preparation")
    splits = build_splits(
        cfg.data,
        load_tokenizer(m.tokenizer or m.name_or_path, **hub),
        cfg.seed,
        assistant_only_loss=cfg.trainer.assistant_only_loss,
    )
    # Full fine-tuning in fp16 keeps fp32 master weights; autocast does the fp16 math.
    load_dtype = torch.float32 if full_finetune and dtype == torch.float16 else dtype
    stop.enter("model loading")
    model, tokenizer = FastModel.from_pretrained(
        m.name_or_path,
        max_seq_length=m.max_seq_length,
        dtype=load_dtype,
        load_in_4bit=m.load_in_4bit,
        kernels=cfg.kernels.backend.value,
        fp8_base=cfg.kernels.fp8,
        random_init=m.random_init,
        config=m.config,
        tokenizer_name=m.tokenizer,
        attn_implementation=m.attn_implementation,
        **hub,
    )
    backend = model.fusetune_kernels
    check_gguf(model, gguf_type)
    distributed.check(cfg.distributed.value, torch.cuda.is_available(), m.load_in_4bit)
    if splits.chat_template is not None:
        tokenizer.chat_template = splits.chat_template  # trained with, and saved with the tokenizer
    if not full_finetune:
        model = FastModel.get_peft_model(
            model,
            r=m.lora.r,
            lora_alpha=m.lora.alpha,
            lora_dropout=m.lora.dropout,
            target_modules=list(m.lora.target_modules),
            modules_to_save=list(m.lora.modules_to_save) if m.lora.modules_to_save else None,
            use_gradient_checkpointing=checkpointing_mode(m.gradient_checkpointing),
            random_state=cfg.seed,
            memory_budget=m.memory_budget,
        )
    elif checkpointing_mode(m.gradient_checkpointing) in ("offload", "smart"):
        mode = checkpointing_mode(m.gradient_checkpointing)
        log.info(
            "model.gradient_checkpointing=%s: %s", mode, enable_fusetune_checkpointing(model, mode, m.memory_budget)
        )
    total_params, trainable_params = count_parameters(model)
    args = sft_config(cfg, out, dtype, report_to, backend, distributed.trainer_options(cfg.distributed.value, model))
    resume_step = step_of(checkpoint) if checkpoint else None
    recorder = record.MetricsRecorder(out / "metrics.jsonl", resume_step, write=distributed.is_rank_zero())
    # generation on rank 0 alone: a DDP model is whole on every rank (FSDP would need every rank: none there)
    generating = distributed.is_rank_zero() and cfg.distributed.value != "fsdp"
    stop.enter("data preparation")  # the trainer tokenizes the splits
    trainer_type = FastDPOTrainer if isinstance(args, FastDPOConfig) else FastSFTTrainer  # config.trainer_class
    options = {"dataset_cache": splits.cache}  # the tokenized cache is FastSFTTrainer's (DPO tokenizes its pairs)
    if trainer_type is FastDPOTrainer:
        # LoRA: the reference is the policy with its adapters disabled; full fine-tuning: a frozen copy of the
        # weights as loaded (TRL would load one from model.name_or_path, which a random_init model does not have)
        options = {"ref_model": copy.deepcopy(model).eval().requires_grad_(False)} if full_finetune else {}
    trainer = trainer_type(
        model=model,
        args=args,
        train_dataset=splits.train,
        # an eval set asked for in the data config is evaluated at the end, if not during training too
        eval_dataset=splits.eval if cfg.trainer.eval_strategy != "no" or eval_requested(cfg.data) else None,
        processing_class=tokenizer,
        callbacks=[recorder, stop],
        **options,
    )
    # the held-out prompts scored each time the trainer evaluates during training (eval_steps)
    generation_eval = GenerationEval(trainer, tokenizer, splits.generation if generating else [])
    trainer.add_callback(generation_eval)
    start_logger(cfg, out, resuming=checkpoint is not None)  # the config, the data and the model have loaded
    for callback in logger_callbacks():
        trainer.add_callback(callback)
    record.reset_peak_memory()
    tokens_before = recorder.last_train.get("num_tokens", 0)
    result = _train_steps(trainer, checkpoint, stop)
    step_graphs = getattr(trainer, "step_graphs", None)
    if step_graphs is not None:
        step_graphs.release()  # evaluation and generation get the graphs' memory back
    peak = record.peak_memory_gib()
    stop.enter("the final save", defer=True)  # a save completes, then the run stops
    _stopped_early(trainer, out)

    saved_to = None
    if cfg.save_model:  # every rank calls it (FSDP gathers the shards); only rank 0 writes
        saved_to = out / ("model" if full_finetune else "adapter")
        trainer.save_model(str(saved_to))
        if trainer.is_world_process_zero():
            with saving(saved_to):
                tokenizer.save_pretrained(saved_to)
    merged_to = None
    if cfg.export.merged and trainer.is_world_process_zero():  # one process writes it
        merged_to = export_merged(trainer.model, tokenizer, out, saved_to)
    gguf_to = None
    if gguf_type is not None and trainer.is_world_process_zero():
        gguf_to = export_gguf(trainer.model, tokenizer, out, gguf_type)

    stop.enter("the final evaluation")
    evals = {}
    if trainer.eval_dataset is not None:
        evals.update({k: v for k, v in trainer.evaluate().items() if k.startswith("eval_")})
    stop.enter("generation")
    generation = splits.generation if generating else []
    # the callback scored these weights already where the last step was an eval step: not twice
    scores = generation_eval.scores_at(result.global_step) or score_generations(trainer.model, tokenizer, generation)
    samples = []
    if scores is not None:
        evals.update(scores.metrics())
        evals["exact_match_n"] = scores.count
        samples = scores.samples

    metrics = result.metrics
    guard = getattr(trainer, "nonfinite_guard", None)
    skipped = recorder.skipped_before + (guard.skipped if guard is not None else 0)
    final_step, final_loss = recorder.final_loss or (None, None)
    tokens = recorder.last_train.get("num_tokens") or trained_tokens(trainer)
    session_tokens = tokens - tokens_before  # a resumed run's runtime covers only the steps it trained
    summary = {
        "model": m.name_or_path,
        "data": cfg.data.formatter.value
        if cfg.data.formatter.value in (*SYNTHETIC, "mixture")
        else (cfg.data.path or cfg.data.name),
        "data_sources": splits.sources,
        "mixture": splits.mixture,
        "chat_template": cfg.data.chat_template,
        "data_cache": splits.cache.summary() if splits.cache is not None else None,
        # per split: records, those longer than max_seq_length, and how many data.too_long dropped or truncated
        "data_length": splits.cache.lengths if splits.cache is not None else None,
        "distributed": {"mode": cfg.distributed.value, "world_size": distributed.world_size()},
        "kernels": backend,
        "fp8_base": cfg.kernels.fp8,
        "cuda_graphs": step_graphs.stats() if step_graphs is not None else None,
        "trainer": cfg.trainer.name,
        "global_step": result.global_step,
        # HF's training_loss counts a skipped step's loss as 0.0
        "train_loss": record.whole_run_loss(read_jsonl(recorder.path))
        if checkpoint or skipped
        else result.training_loss,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "final_loss": final_loss,
        "final_loss_step": final_step,
        # trainer=dpo: the last logged reward metrics (rewards/margins, rewards/accuracies, ...)
        "preference": record.preference_metrics(recorder.last_train),
        "skipped_steps": skipped,
        "eval": evals,
        "samples": samples,
        "train_tokens": tokens,
        "train_tokens_per_second": session_tokens / metrics["train_runtime"] if metrics.get("train_runtime") else 0.0,
        "train_runtime_s": metrics.get("train_runtime"),
        "peak_memory_gib": peak,
        "runtime_s": time.perf_counter() - started,
        "seed": cfg.seed,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": total_params,
        "trainable_parameters": trainable_params,
        "saved_to": str(saved_to) if saved_to else None,
        "merged_to": str(merged_to) if merged_to else None,
        "gguf_to": str(gguf_to) if gguf_to else None,
        "output_dir": str(out),
        "versions": record.versions(),
    }
    stop.enter("the record", defer=True)
    if trainer.is_world_process_zero():
        record.write_summary(out / "summary.json", summary)
        record.write_status(out, "finished", step=result.global_step)
        print(record.format_summary(summary), flush=True)
    return summary


def _train_steps(trainer: FastSFTTrainer, checkpoint: Path | None, stop: StopOnSignal):
    """trainer.train(); a signal stops it after a checkpoint of the step in flight. One that stops an evaluation
    between steps saves a checkpoint of the last finished step (its weights are whole) before it is raised."""
    stop.enter("training", defer=True)
    try:
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except SignalStop as stopped:
        folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        if stopped.phase == stop.EVALUATING and trainer.state.global_step > 0 and not folder.exists():
            trainer._save_checkpoint(trainer.model_wrapped, trial=None)  # as the Trainer saves one between steps
            trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
        raise


def _last_words(out: Path, lead: bool):
    """What a second signal, which ends the process at once, writes into the record first."""
    return (lambda why: record.write_status(out, "interrupted", why)) if lead else None


def _interrupted(stop: StopOnSignal, raised: BaseException, out: Path, lead: bool) -> Interrupted:
    """After a signal: the record says so (the signal and the phase), and the one line says where the run stopped
    and whether there is a checkpoint to resume from. ``raised`` is what the stop raised (SignalStop, or a
    third-party error it caused while unwinding)."""
    log.debug("stopped by a signal: %r", raised)
    name, phase = signal.Signals(stop.received).name, stop.stopped_in
    newest = newest_complete(out, verify=False)  # only named here: sizes are enough
    step = stop.step if phase in ("training", stop.EVALUATING) else None
    where = f"at step {step}" if phase == "training" else f"during {phase}" + (f" at step {step}" if step else "")
    if newest is None:
        resume = "there is no checkpoint to resume from"
    elif step_of(newest) == step:
        resume = f"checkpoint saved in {newest}; resume=auto continues"
    else:
        resume = f"the newest checkpoint is {newest}; resume=auto continues from it"
    if lead:
        saved = str(newest) if newest else None
        record.write_status(out, "interrupted", f"{name} {where}", step, signal=name, phase=phase, checkpoint=saved)
    return Interrupted(f"interrupted {where}: {resume}", 128 + stop.received)


def _stopped_early(trainer: FastSFTTrainer, out: Path) -> None:
    """A non-finite value or divergence stopped training (or left non-finite weights): say where the last good
    checkpoint is, and end."""
    step = trainer.state.global_step
    newest = newest_complete(out, verify=False)  # only named here: sizes are enough
    where = (
        f"the last good checkpoint is {newest} (resume=auto continues from it)"
        if newest
        else "there is no checkpoint to resume from"
    )
    guard, marker = getattr(trainer, "nonfinite_guard", None), getattr(trainer, "checkpoint_marker", None)
    why = guard.stopped if guard is not None else None
    if why is None and marker is not None and marker.bad_step is not None:
        why = f"non-finite weights at the save of step {marker.bad_step}"
    if why is None and not _all_ranks_agree(trainable_weights_finite(trainer.model), trainer):
        why = f"non-finite weights at the end of step {step}; they are not saved"
    if why is not None:
        raise FusetuneError(f"training stopped: {why}; {where}")


def _all_ranks_agree(flag: bool, trainer: FastSFTTrainer) -> bool:
    """``flag`` and'ed over the ranks (each may hold a shard of the weights)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=trainer.args.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())
