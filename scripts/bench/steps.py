"""Inside a job subprocess: the seeded batches every variant trains on, the optimizer, and the timed loop
(forward with labels, backward, optimizer step, zero_grad), with fusetune's CUDA graphs where its trainer
uses them."""

import contextlib
import time

from .scenarios import LR


def make_batches(spec: dict, torch, vocab: int) -> tuple[list[dict], list[list[int]], str]:
    """The same seeded batches in every variant. Returns (batches on the CPU, document lengths, mode)."""
    lengths = spec["lengths"]  # the parent's scenarios.document_lengths
    mode = spec["mode"]
    batches = []
    for step, docs in enumerate(lengths):
        g = torch.Generator().manual_seed(spec["seed"] * 1000 + step)
        ids = [torch.randint(0, vocab, (length,), generator=g) for length in docs]
        if mode == "fixed":
            input_ids = torch.stack(ids)
            batches.append({"input_ids": input_ids, "labels": input_ids.clone()})
        elif mode == "padded":
            width = max(docs)
            input_ids = torch.zeros(len(docs), width, dtype=torch.long)
            attention_mask = torch.zeros(len(docs), width, dtype=torch.long)
            labels = torch.full((len(docs), width), -100, dtype=torch.long)
            for row, t in enumerate(ids):
                input_ids[row, : len(t)], attention_mask[row, : len(t)], labels[row, : len(t)] = t, 1, t
            batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
        else:  # padding_free: what TRL's DataCollatorForLanguageModeling(padding_free=True) gives
            input_ids = torch.cat(ids)[None]
            position_ids = torch.cat([torch.arange(length) for length in docs])[None]
            labels = input_ids.clone()
            labels[position_ids == 0] = -100  # a document's first token is not predicted from the one before
            cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
            if spec["variant"] == "unsloth":  # what Unsloth's own padding-free collator adds
                batch = {"packed_seq_lengths": torch.tensor(docs, dtype=torch.int32)}
            else:
                batch = {
                    "cu_seq_lens_q": cu,
                    "cu_seq_lens_k": cu,
                    "max_length_q": max(docs),
                    "max_length_k": max(docs),
                    "seq_idx": torch.repeat_interleave(torch.arange(len(docs), dtype=torch.int32), torch.tensor(docs))[
                        None
                    ],
                }
            batches.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids, **batch})
    return batches, lengths, mode


def make_optimizer(name: str, params, torch, cuda: bool):
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=LR, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=cuda)


def timed_steps(model, optimizer, batches, warmup, torch, cuda, autocast, step_graphs=None, step_loss=None):
    """Run every batch; return every step's time (ms, consecutive CUDA-event intervals from the first step's
    start; peak memory is reset before step ``warmup``), all losses, and each step's path: "eager", or with
    ``step_graphs`` (fusetune.sequences.graphs.StepGraphs, as FastSFTTrainer runs padding-free steps) "capture" or
    "replay" where the graphs took the batch. ``step_loss``: the loss of a batch under the same autocast (a
    trainer's compute_loss, in the DPO scenarios) in place of the model's forward with labels."""
    device = "cuda" if cuda else "cpu"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and autocast) else contextlib.nullcontext()
    marks, losses, paths = [], [], []

    def mark():
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
        else:
            marks.append(time.perf_counter())

    def forward(**inputs):  # autocast inside the forward, as accelerate wraps it: graphs refuse one around them
        with amp:
            return model(**inputs)

    mark()
    for i, batch in enumerate(batches):
        if i == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        batch = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
        out = step_graphs.run(forward, batch) if step_graphs is not None else None
        paths.append(step_graphs.last_action if out is not None else "eager")
        if step_loss is not None:
            with amp:
                loss = step_loss(batch)
        else:
            out = out if out is not None else forward(**batch, use_cache=False)
            loss = out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
        del out, loss  # a live autograd graph would make the next capture fail
        mark()
    if cuda:
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)]
    else:
        times = [1e3 * (b - a) for a, b in zip(marks, marks[1:], strict=False)]
    return times, [float(x) for x in torch.stack(losses).cpu().tolist()], paths


def step_graphs_for(model, spec: dict):
    """fusetune's CUDA graphs for its padding-free rows, as FastSFTTrainer makes them (on the CPU: the same
    padded path with reruns for replays); None for other rows and variants, or with --fusetune-graphs off."""
    if not (spec["variant"].startswith("fusetune") and spec["mode"] == "padding_free" and spec.get("fusetune_graphs")):
        return None
    from fusetune.sequences.graphs import Reruns, StepGraphs

    params = [p for p in model.parameters() if p.requires_grad]
    device = "cuda" if spec["cuda"] else "cpu"
    return StepGraphs(params, pad_token_id=0, recorder=None if spec["cuda"] else Reruns(), device=device)


def warmup_record(times: list[float], paths: list[str], warmup: int, step_graphs) -> dict:
    """What a run's warm-up cost (the fields that check the capture plan against its cost model): every
    step's time and path, the steps at each path, and the graphs' counts."""
    counts = {path: paths[warmup:].count(path) for path in ("eager", "capture", "replay")}
    return {
        "warmup_step_ms": times[:warmup],
        "step_paths": paths,
        "measured_paths": counts,
        "graphs": step_graphs.stats() if step_graphs is not None else None,
    }


def profile_steps(model, optimizer, batches, torch, autocast, step_loss=None) -> None:
    """Two more steps under torch.profiler; the CUDA kernels by total time go to this subprocess's log."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # eager: graphs hide kernels
        timed_steps(model, optimizer, batches, 0, torch, True, autocast, step_loss=step_loss)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    print(f"== profile: {len(batches)} steps, kernels by self CUDA time\n{table}", flush=True)
