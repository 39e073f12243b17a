"""run(cfg): one training run from a composed config, leaving a record in cfg.output_dir."""

import copy
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import set_seed

from ..compat.trl import trained_tokens
from ..data import build_splits
from ..data.rules import SYNTHETIC, eval_requested
from ..errors import FusetuneError, Interrupted
from ..evaluate import GenerationEval, score_generations
from ..fast_model import FastModel, enable_fusetune_checkpointing
from ..loading import TOKENIZER_FILES, count_parameters, load_tokenizer, pick_dtype, resolve
from ..offline import require_local_or_hub
from ..patching import remove_kernels
from ..record_files import METRICS, SUMMARY, read_jsonl
from ..state import peek
from ..training.checkpoints import newest_complete, saving, step_of, trainable_weights_finite
from ..training.faults import SignalStop, StopOnSignal
from ..training.preference_trainer import FastDPOConfig, FastDPOTrainer
from ..training.preference_variants import (
    FastKTOConfig,
    FastKTOTrainer,
    FastORPOConfig,
    FastORPOTrainer,
    FastSimPOConfig,
    FastSimPOTrainer,
)
from ..training.trainer import FastSFTConfig, FastSFTTrainer
from . import distributed, run_folder
from . import run_record as record
from .config import checkpointing_mode, class_keys, logging_steps_for, trainer_class, validate
from .export import check_gguf, export_gguf, export_merged
from .loggers import close_logger, logger_callbacks, start_logger, trainer_report_to
from .summary import RunSummary

log = logging.getLogger(__name__)
# the trainer of each preference config class (config.TRAINER_CLASSES); every other config trains with FastSFTTrainer
TRAINERS = {
    FastDPOConfig: FastDPOTrainer,
    FastORPOConfig: FastORPOTrainer,
    FastSimPOConfig: FastSimPOTrainer,
    FastKTOConfig: FastKTOTrainer,
}


def sft_config(
    cfg,
    out: Path,
    dtype: torch.dtype,
    report_to: list[str],
    backend: str,
    max_seq_length: int,
    strategy: dict | None = None,
) -> FastSFTConfig | FastDPOConfig | FastORPOConfig | FastSimPOConfig:
    """The trainer option's config (FastSFTConfig, or config.TRAINER_CLASSES' for dpo, orpo, simpo) from the keys it has
    that differ from their defaults, trainer.extra, and the fields the app fills in from other groups
    (config.SET_BY_THE_APP). ``dtype``, ``backend`` and ``max_seq_length`` are what the model was loaded with
    (``Loaded``): the sequence length is TRL's ``max_length``."""
    t = cfg.trainer
    checkpointing = checkpointing_mode(cfg.model.gradient_checkpointing)
    values = OmegaConf.to_container(t)
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
            max_length=max_seq_length,
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


@dataclass
class Loaded:
    """What the load phase hands on: the model (with adapters or fusetune's checkpointing), its tokenizer and
    the settings it was loaded with."""

    model: torch.nn.Module
    tokenizer: object
    backend: str  # the kernels the model was patched with
    dtype: torch.dtype  # the training precision (fp16 full fine-tuning loads fp32 master weights)
    max_seq_length: int  # model.max_seq_length as loaded: the trainer's max_length
    full_finetune: bool
    parameters: tuple[int, int]  # (all, trainable)


@dataclass
class Session:
    """The trainer and what watches it: the metrics record, the generation eval, the signal stop."""

    trainer: FastSFTTrainer | FastDPOTrainer | FastORPOTrainer | FastSimPOTrainer
    recorder: record.MetricsRecorder
    generation_eval: GenerationEval
    stop: StopOnSignal
    tokens_before: int  # a resumed run's tokens so far


def _train(cfg, out: Path, report_to: list[str], checkpoint: Path | None, stop: StopOnSignal) -> dict:
    """The recipe: data, model, trainer, train, save and export, evaluate, record."""
    started = time.perf_counter()
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)  # small CPU models lose more to thread sync than they gain
    set_seed(cfg.seed)
    splits = _prepare_data(cfg, stop)  # first: a mistake in the data shows before the weights load
    loaded = _load_model(cfg, splits, stop)
    session = _build_trainer(cfg, out, loaded, splits, report_to, checkpoint, stop)
    result, peak = _train_and_check(session, checkpoint, out)
    outputs = _save_and_export(cfg, out, session.trainer, loaded)
    evals, samples = _evaluate(cfg, session, loaded.tokenizer, splits, result.global_step)
    runtime = time.perf_counter() - started
    finished = dict(eval=evals, samples=samples, peak_memory_gib=peak, runtime_s=runtime, **outputs)
    summary = _summarize(cfg, out, loaded, splits, session, result, checkpoint, **finished)
    stop.enter("the record", defer=True)
    if session.trainer.is_world_process_zero():
        summary.write(out / SUMMARY)
        record.write_status(out, "finished", step=result.global_step)
        print(summary.lines(), flush=True)
    return summary.as_dict()


def _prepare_data(cfg, stop: StopOnSignal):
    stop.enter("data preparation")
    tokenizer = load_tokenizer(
        cfg.model.tokenizer or cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
    )
    return build_splits(cfg.data, tokenizer, cfg.seed, assistant_only_loss=cfg.trainer.assistant_only_loss)


def _load_model(cfg, splits, stop: StopOnSignal) -> Loaded:
    """The model as FastModel loads it, patched, with LoRA adapters (or fusetune's checkpointing when fully
    fine-tuned); refused here where the export or the distributed mode cannot take it."""
    m = cfg.model
    dtype = pick_dtype(m.dtype.value)
    full_finetune = m.lora is None
    max_seq_length = m.max_seq_length  # read once: the model and tokenizer record it, the trainer's args take it
    stop.enter("model loading")
    model, tokenizer = FastModel.from_pretrained(
        m.name_or_path,
        max_seq_length=max_seq_length,
        # full fine-tuning in fp16 keeps fp32 master weights; autocast does the fp16 math
        dtype=torch.float32 if full_finetune and dtype == torch.float16 else dtype,
        load_in_4bit=m.load_in_4bit,
        kernels=cfg.kernels.backend.value,
        fp8_base=cfg.kernels.fp8,
        random_init=m.random_init,
        config=m.config,
        tokenizer_name=m.tokenizer,
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
    )
    check_gguf(model, _gguf_type(cfg))
    distributed.check(cfg.distributed.value, torch.cuda.is_available(), m.load_in_4bit)
    if splits.chat_template is not None:
        tokenizer.chat_template = splits.chat_template  # trained with, and saved with the tokenizer
    checkpointing = checkpointing_mode(m.gradient_checkpointing)
    if not full_finetune:
        model = FastModel.get_peft_model(
            model,
            r=m.lora.r,
            lora_alpha=m.lora.alpha,
            lora_dropout=m.lora.dropout,
            target_modules=list(m.lora.target_modules),
            modules_to_save=list(m.lora.modules_to_save) if m.lora.modules_to_save else None,
            use_gradient_checkpointing=checkpointing,
            random_state=cfg.seed,
            memory_budget=m.memory_budget,
        )
    elif checkpointing in ("offload", "smart"):
        described = enable_fusetune_checkpointing(model, checkpointing, m.memory_budget)
        log.info("model.gradient_checkpointing=%s: %s", checkpointing, described)
    backend = peek(model).backend
    return Loaded(model, tokenizer, backend, dtype, max_seq_length, full_finetune, count_parameters(model))


def _build_trainer(cfg, out, loaded: Loaded, splits, report_to, checkpoint, stop: StopOnSignal) -> Session:
    """The trainer over the splits, with the metrics record, the signal stop, the generation eval and the
    logger's callbacks; the logger starts here, once the config, the data and the model have loaded."""
    options = distributed.trainer_options(cfg.distributed.value, loaded.model)
    args = sft_config(cfg, out, loaded.dtype, report_to, loaded.backend, loaded.max_seq_length, options)
    resume_step = step_of(checkpoint) if checkpoint else None
    recorder = record.MetricsRecorder(out / METRICS, resume_step, write=distributed.is_rank_zero())
    stop.enter("data preparation")  # the trainer tokenizes the splits
    trainer_type = TRAINERS.get(type(args), FastSFTTrainer)  # by config.trainer_class
    # the tokenized cache serves the SFT, DPO and KTO trainers; TRL's ORPO and CPO (SimPO) trainers tokenize inside
    # their constructors (fusetune.data.cache), and need no reference model
    extra = {"dataset_cache": splits.cache}
    if trainer_type in (FastORPOTrainer, FastSimPOTrainer):
        extra = {}
        if splits.cache is not None:
            splits.cache.skip(
                f"trainer={cfg.trainer.name} tokenizes its pairs inside TRL's constructor, truncating them"
            )
    if trainer_type in (FastDPOTrainer, FastKTOTrainer) and loaded.full_finetune:
        # LoRA: the reference is the policy with its adapters disabled; full fine-tuning: a frozen copy of the
        # weights as loaded (TRL would load one from model.name_or_path, which a random_init model does not have)
        extra["ref_model"] = copy.deepcopy(loaded.model).eval().requires_grad_(False)
    trainer = trainer_type(
        model=loaded.model,
        args=args,
        train_dataset=splits.train,
        # an eval set asked for in the data config is evaluated at the end, if not during training too
        eval_dataset=splits.eval if cfg.trainer.eval_strategy != "no" or eval_requested(cfg.data) else None,
        processing_class=loaded.tokenizer,
        callbacks=[recorder, stop],
        **extra,
    )
    # the held-out prompts scored each time the trainer evaluates during training (eval_steps)
    generation_eval = GenerationEval(trainer, loaded.tokenizer, splits.generation if _generating(cfg) else [])
    trainer.add_callback(generation_eval)
    start_logger(cfg, out, resuming=checkpoint is not None)
    for callback in logger_callbacks():
        trainer.add_callback(callback)
    return Session(trainer, recorder, generation_eval, stop, recorder.last_train.get("num_tokens", 0))


def _train_and_check(session: Session, checkpoint: Path | None, out: Path):
    """Train; then the CUDA graphs' memory goes back, and a run that stopped on a non-finite value ends here.
    Returns the Trainer's result and the peak memory of training."""
    record.reset_peak_memory()
    result = _train_steps(session.trainer, checkpoint, session.stop)
    step_graphs = getattr(session.trainer, "step_graphs", None)
    if step_graphs is not None:
        step_graphs.release()  # evaluation and generation get the graphs' memory back
    peak = record.peak_memory_gib()
    session.stop.enter("the final save", defer=True)  # a save completes, then the run stops
    _stopped_early(session.trainer, out)
    return result, peak


def _save_and_export(cfg, out: Path, trainer, loaded: Loaded) -> dict:
    """The adapter (or model) and tokenizer, the merged model and the GGUF file, as the config asks; where each
    went, under the summary's names."""
    saved_to = merged_to = gguf_to = None
    if cfg.save_model:  # every rank calls it (FSDP gathers the shards); only rank 0 writes
        saved_to = out / ("model" if loaded.full_finetune else "adapter")
        trainer.save_model(str(saved_to))
        if trainer.is_world_process_zero():
            with saving(saved_to):
                loaded.tokenizer.save_pretrained(saved_to)
    if cfg.export.merged and trainer.is_world_process_zero():  # one process writes it
        merged_to = export_merged(trainer.model, loaded.tokenizer, out, saved_to)
    if _gguf_type(cfg) is not None and trainer.is_world_process_zero():
        gguf_to = export_gguf(trainer.model, loaded.tokenizer, out, _gguf_type(cfg))
    written = {"saved_to": saved_to, "merged_to": merged_to, "gguf_to": gguf_to}
    return {name: str(path) if path else None for name, path in written.items()}


def _evaluate(cfg, session: Session, tokenizer, splits, step: int) -> tuple[dict, list]:
    """The eval split's metrics and the held-out generations' scores (and samples) of the final weights."""
    trainer = session.trainer
    session.stop.enter("the final evaluation")
    evals = {}
    if trainer.eval_dataset is not None:
        evals.update({k: v for k, v in trainer.evaluate().items() if k.startswith("eval_")})
    session.stop.enter("generation")
    generation = splits.generation if _generating(cfg) else []
    # the callback scored these weights already where the last step was an eval step: not twice
    scores = session.generation_eval.scores_at(step) or score_generations(trainer.model, tokenizer, generation)
    if scores is None:
        return evals, []
    return {**evals, **scores.metrics(), "exact_match_n": scores.count}, scores.samples


def _summarize(cfg, out: Path, loaded: Loaded, splits, session: Session, result, checkpoint, **finished) -> RunSummary:
    """The summary of what trained, from the config, the loaded model, the record and the Trainer's result;
    ``finished``: the fields only the end of the run knows (evaluation, outputs, peak memory, runtime)."""
    trainer, recorder = session.trainer, session.recorder
    guard = getattr(trainer, "nonfinite_guard", None)
    skipped = recorder.skipped_before + (guard.skipped if guard is not None else 0)
    final_step, final_loss = recorder.final_loss or (None, None)
    tokens = recorder.last_train.get("num_tokens") or trained_tokens(trainer)
    runtime = result.metrics.get("train_runtime")
    speed = None  # tokens the trainer does not count
    if tokens is not None:  # a resumed run's runtime covers only the steps it trained
        speed = (tokens - session.tokens_before) / runtime if runtime else 0.0
    step_graphs = getattr(trainer, "step_graphs", None)
    d = cfg.data
    return RunSummary(
        model=cfg.model.name_or_path,
        data=d.formatter.value if d.formatter.value in (*SYNTHETIC, "mixture") else (d.path or d.name),
        data_sources=splits.sources,
        mixture=splits.mixture,
        chat_template=d.chat_template,
        data_cache=splits.cache.summary() if splits.cache is not None else None,
        data_length=splits.cache.lengths if splits.cache is not None else None,
        distributed={"mode": cfg.distributed.value, "world_size": distributed.world_size()},
        kernels=loaded.backend,
        fp8_base=cfg.kernels.fp8,
        cuda_graphs=step_graphs.stats() if step_graphs is not None else None,
        trainer=cfg.trainer.name,
        global_step=result.global_step,
        # HF's training_loss counts a skipped step's loss as 0.0
        train_loss=record.whole_run_loss(read_jsonl(recorder.path)) if checkpoint or skipped else result.training_loss,
        resumed_from=str(checkpoint) if checkpoint else None,
        final_loss=final_loss,
        final_loss_step=final_step,
        preference=record.preference_metrics(recorder.last_train),
        skipped_steps=skipped,
        train_tokens=tokens,
        train_tokens_per_second=speed,
        train_runtime_s=runtime,
        seed=cfg.seed,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        dtype=str(loaded.dtype).removeprefix("torch."),
        parameters=loaded.parameters[0],
        trainable_parameters=loaded.parameters[1],
        output_dir=str(out),
        versions=record.versions(),
        **finished,
    )


def _gguf_type(cfg) -> str | None:
    return cfg.export.gguf.value if cfg.export.gguf is not None else None


def _generating(cfg) -> bool:
    """Generation runs on rank 0 alone: a DDP model is whole on every rank (FSDP would need every rank)."""
    return distributed.is_rank_zero() and cfg.distributed.value != "fsdp"


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
