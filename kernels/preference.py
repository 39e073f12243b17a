"""Fused linear preference losses (DPO family, SimPO, ORPO, KTO) from hidden states, without [N, V] logits.

A preference loss needs one number per sequence: the summed log-probability of its label tokens,

    logp(s) = sum over t in s with y_t != ignore_index of  log softmax(h_t W^T + b)[y_t]
            = - sum_t cross_entropy_t

so ``sequence_logps`` is fused_linear_cross_entropy with reduction="none" (the chunked lm_head matmul
and the Triton row kernel, one piece of code for that logic), negated and summed per sequence. Nothing
here launches a kernel of its own. The per-sequence losses are then plain torch on a few numbers
(``preference_loss``), as TRL defines them (installed TRL 1.16: DPOTrainer, the experimental
CPOTrainer for SimPO, ORPOTrainer, KTOTrainer):

    DPO, delta = (pc - rc) - (pr - rr)      (policy/ref, chosen/rejected, summed log-probs)
      sigmoid   -logsigmoid(beta delta)
      hinge     relu(1 - beta delta)
      ipo       ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 beta))^2     (nc, nr: label tokens, at least 1)
      robust    (-(1 - eps) logsigmoid(beta delta) + eps logsigmoid(-beta delta)) / (1 - 2 eps)
    reference-free, on per-token averages ac = pc / nc, ar = pr / nr:
      simpo     m = ac - ar - gamma / beta;  -(1 - eps) logsigmoid(beta m) - eps logsigmoid(-beta m)
      orpo      nll - beta logsigmoid(log_odds),  log_odds = (ac - ar) - (log(1 - e^ac) - log(1 - e^ar))
    unpaired, with kl = mean(policy_kl - ref_kl) (detached, at least 0) over mismatched pairs:
      kto       desirable 1 - sigmoid(beta (lc - kl)), undesirable 1 - sigmoid(beta (kl - lr)), weighted

each averaged over the batch. nll (ORPO always, any loss with ``nll_weight``, TRL's cpo_alpha) is the
token-mean cross-entropy over the chosen rows' label tokens. TRL's ORPOTrainer counts the prompt tokens
in that NLL too: give ``nll_labels`` (the chosen rows' labels with the prompt kept) to
fused_linear_preference_loss, which then runs one pass over the union of the two label sets, or ``chosen_nll``
to preference_loss. A sequence with no label token has logp 0 and count 0; ipo clamps its count to 1 as TRL
does, and simpo and orpo, which average, refuse it (ValueError) instead of dividing 0 by 0.

Batch layout: chosen sequences first, then rejected (TRL concatenates the two halves the same way);
``num_chosen`` moves the split, for KTO's unpaired desirable/undesirable rows. Labels are already shifted,
as for fused_linear_cross_entropy: position t carries the token that position t predicts (HF's
``labels[..., 1:]`` padded with ignore_index), so prompt and padding tokens are ignore_index. Padded batches
are hidden [S, T, H] with labels [S, T]; packed ones are hidden [..., N, H] with labels [..., N] and
``cu_seqlens`` [S + 1] (the offsets of flash-attention's varlen API; each sequence's last position has
ignore_index, since it predicts the next sequence's first token).

The reference model: its log-probs come precomputed (``ref_chosen_logps``/``ref_rejected_logps``, e.g. by
``sequence_logps`` over the dataset once), or from ``ref_hidden``, the backbone's hidden states of the same
batch run under torch.no_grad with the LoRA adapters disabled; the same chunked pass then turns them into
log-probs, without gradients. So a LoRA policy needs no second model copy: the reference is the base model
with its adapters off. The head of the reference is ``ref_weight`` (default: ``weight``, which is right for a
frozen lm_head; a trained one, e.g. in modules_to_save, keeps its original for ``ref_weight``), and the
reference gets no head adapter (``lora_in``/``lora_b`` apply to the policy only). Gradients reach the
policy only: hidden, weight (if it requires grad), bias, lora_in, lora_b.

Memory, N tokens of which n are label tokens (of ``labels``, or with ``nll_labels`` of the union), H hidden,
V vocab, e bytes per element (2 in bf16): beyond what fused_linear_cross_entropy holds during the call (its
chunk buffer, see there), the graph saves for backward
    frozen head (LoRA):  dhidden of the label tokens, made in forward: n*H*e, and their int64 index: n*8
    trained head:        the gathered hidden of the label tokens n*H*e (none if every token is a label
                         token), their labels and index n*16 and logsumexp n*4; backward recomputes the logits
i.e. H*e + 8 (frozen) or H*e + 20 bytes per label token (8 KiB for H = 4096 in bf16), plus for a packed batch
12 bytes per token (the segment sum's int64 index and fp32 values) and with ``nll_labels`` 2 (two bool masks),
against V*4 bytes per token for the fp32 log_softmax that the materialised reference saves (513 KB for
V = 128256). The reference pass (``ref_hidden``) runs without grad and saves nothing. Per-sequence values are
[S] floats.
"""

import torch
import torch.nn.functional as F

from fusetune_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo", "orpo", "kto")
# No reference model: the rewards are the policy's own (averaged) log-probs.
REFERENCE_FREE = ("simpo", "orpo")
# Losses on per-token averages of the log-probs, which need every sequence to have a label token.
AVERAGED = ("simpo", "orpo")


# ---------------------------------------------------------------------------- per-sequence log-probs


def _sequence_ids(hidden, labels, cu_seqlens):
    """(number of sequences, flat sequence id of every token, None for a padded [S, T] batch)."""
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(
                f"need hidden [S, T, H] (padded) or cu_seqlens for a packed batch, got {tuple(hidden.shape)}"
            )
        return labels.shape[0], None
    n_tokens = labels.numel()
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"cu_seqlens must be integer offsets [S + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.to(device=labels.device, dtype=torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != n_tokens or bool((cu[1:] < cu[:-1]).any()):  # one host sync
        raise ValueError(f"cu_seqlens must rise from 0 to the {n_tokens} tokens, got {cu_seqlens.tolist()}")
    positions = torch.arange(n_tokens, device=labels.device)
    return cu.numel() - 1, torch.searchsorted(cu[1:], positions, right=True)


def _per_sequence(per_token, labels, seq_ids, n_seq, ignore_index):
    """Sums of per_token (fp32) and label-token counts (int64) per sequence: row sums of a padded batch
    (autograd keeps nothing), segment sums of a packed one (index_add keeps its index and the values)."""
    kept = labels != ignore_index
    if seq_ids is None:
        return per_token.sum(-1), kept.sum(-1)
    flat = per_token.reshape(-1)
    sums = torch.zeros(n_seq, dtype=flat.dtype, device=flat.device).index_add(0, seq_ids, flat)
    counts = torch.zeros(n_seq, dtype=torch.int64, device=flat.device).index_add_(0, seq_ids, kept.reshape(-1).long())
    return sums, counts


def _token_logps(hidden, weight, labels, bias, ignore_index, softcap, logit_scale, chunk_size, lora_in, lora_b):
    """Log-probs of the label tokens (fp32, 0 where ignored) by fused_linear_cross_entropy's chunks."""
    per_token_loss = fused_linear_cross_entropy(
        hidden,
        weight,
        labels,
        bias,
        ignore_index,
        "none",
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        lora_in=lora_in,
        lora_b=lora_b,
    )
    return -per_token_loss


def _token_logps_reference(
    hidden, weight, labels, bias, ignore_index, softcap, logit_scale, chunk_size, lora_in, lora_b
):
    """The same from fused_linear_cross_entropy's reference twin: the logits materialised, then fp32 (float64
    stays float64)."""
    per_token_loss = fused_linear_cross_entropy_reference(
        hidden,
        weight,
        labels,
        bias,
        ignore_index,
        "none",
        softcap=softcap,
        logit_scale=logit_scale,
        lora_in=lora_in,
        lora_b=lora_b,
    )
    return -per_token_loss


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    lora_in: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
):
    """Summed log-probabilities of the (shifted) label tokens per sequence, and their counts.

    hidden [S, T, H] with labels [S, T], or packed hidden [..., N, H] with labels [..., N] and
    ``cu_seqlens`` [S + 1]. Returns (logps fp32 [S], counts int64 [S]), logps differentiable w.r.t. whatever
    fused_linear_cross_entropy differentiates (hidden, weight, bias, lora_in, lora_b), without [N, V] logits.
    """
    n_seq, seq_ids = _sequence_ids(hidden, labels, cu_seqlens)
    token_logps = _token_logps(
        hidden, weight, labels, bias, ignore_index, softcap, logit_scale, chunk_size, lora_in, lora_b
    )
    return _per_sequence(token_logps, labels, seq_ids, n_seq, ignore_index)


def sequence_logps_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    lora_in: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
):
    """``sequence_logps`` from materialised fp32 logits: log_softmax, gather, sum per sequence.
    ``chunk_size`` is ignored."""
    n_seq, seq_ids = _sequence_ids(hidden, labels, cu_seqlens)
    token_logps = _token_logps_reference(
        hidden, weight, labels, bias, ignore_index, softcap, logit_scale, chunk_size, lora_in, lora_b
    )
    return _per_sequence(token_logps, labels, seq_ids, n_seq, ignore_index)


# ---------------------------------------------------------------------------- the losses


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (log1p far from 0, expm1 near it)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _averages(logps, counts, which, loss_type):
    if counts is None:
        raise ValueError(f"loss_type={loss_type!r} averages per token: pass {which}_counts")
    if bool((counts == 0).any()):  # one host sync
        raise ValueError(f"loss_type={loss_type!r}: a {which} sequence has no label token, its average log-prob is 0/0")
    return logps / counts


def _check_loss_inputs(loss_type, beta, label_smoothing, logps, refs, kl_logps):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    chosen, rejected = logps
    if chosen.dim() != 1 or rejected.dim() != 1:
        raise ValueError(f"need per-sequence log-probs [B], got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if loss_type != "kto" and chosen.shape != rejected.shape:
        raise ValueError(f"{loss_type} pairs chosen with rejected: got {chosen.numel()} and {rejected.numel()}")
    if loss_type in REFERENCE_FREE:
        if any(r is not None for r in refs):
            raise ValueError(f"{loss_type} is reference-free: pass no reference log-probs")
    elif any(r is None for r in refs):
        raise ValueError(f"{loss_type} needs ref_chosen_logps and ref_rejected_logps (or ref_hidden)")
    elif refs[0].shape != chosen.shape or refs[1].shape != rejected.shape:
        raise ValueError("reference log-probs must have the policy's shapes")
    if loss_type == "kto" and any(k is None for k in kl_logps):
        raise ValueError("kto needs policy_kl_logps and ref_kl_logps (log-probs of mismatched prompt/completion pairs)")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    *,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    nll_weight: float | None = None,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
):
    """The preference loss of TRL's trainers over per-sequence summed log-probs; see the module docstring.

    ``*_counts``: label tokens per sequence (``sequence_logps``' second output), needed by ipo, simpo, orpo and
    the NLL term. ``nll_weight``: weight of the chosen NLL (default 1 for orpo, else 0). kto takes desirable
    rows as chosen and undesirable as rejected (any counts), and ``policy_kl_logps``/``ref_kl_logps``.
    Returns (loss, metrics): metrics as TRL logs them, detached 0-dim tensors (no host sync): rewards/chosen,
    rewards/rejected, rewards/margins, rewards/accuracies (paired losses), logps/chosen, logps/rejected (the
    values the loss used: sums, or averages for simpo/orpo), plus nll_loss, log_odds_ratio/log_odds_chosen
    (orpo) and kl (kto).
    """
    refs = (ref_chosen_logps, ref_rejected_logps)
    _check_loss_inputs(
        loss_type,
        beta,
        label_smoothing,
        (policy_chosen_logps, policy_rejected_logps),
        refs,
        (policy_kl_logps, ref_kl_logps),
    )
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    eps = label_smoothing
    metrics = {}
    if loss_type in AVERAGED:
        chosen = _averages(chosen, chosen_counts, "chosen", loss_type)
        rejected = _averages(rejected, rejected_counts, "rejected", loss_type)
        chosen_scores, rejected_scores = chosen, rejected
    else:
        chosen_scores = chosen - ref_chosen_logps.detach()
        rejected_scores = rejected - ref_rejected_logps.detach()

    if loss_type in ("sigmoid", "hinge", "robust"):
        z = beta * (chosen_scores - rejected_scores)
        if loss_type == "sigmoid":
            per_seq = -F.logsigmoid(z)
        elif loss_type == "hinge":
            per_seq = torch.relu(1 - z)
        else:
            per_seq = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        if chosen_counts is None or rejected_counts is None:
            raise ValueError("ipo averages per token: pass chosen_counts and rejected_counts")
        margin = chosen_scores / chosen_counts.clamp(min=1) - rejected_scores / rejected_counts.clamp(min=1)
        per_seq = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        z = beta * (chosen - rejected - simpo_gamma / beta)
        per_seq = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "orpo":
        chosen, rejected, per_seq = _orpo(chosen, rejected, beta, metrics)
    else:  # kto
        kl = (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)
        per_seq = torch.cat(
            [
                desirable_weight * (1 - torch.sigmoid(beta * (chosen_scores - kl))),
                undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected_scores))),
            ]
        )
        metrics["kl"] = kl

    loss = per_seq.mean()
    if nll_weight is None:
        nll_weight = 1.0 if loss_type == "orpo" else 0.0
    if nll_weight:
        if chosen_nll is None:
            if chosen_counts is None:
                raise ValueError("the NLL term needs chosen_counts (or chosen_nll)")
            chosen_nll = -policy_chosen_logps.sum() / chosen_counts.sum().clamp(min=1)
        loss = loss + nll_weight * chosen_nll
        metrics["nll_loss"] = chosen_nll.detach()

    metrics |= _reward_metrics(loss_type, beta, (chosen_scores, rejected_scores), (chosen, rejected))
    return loss, metrics


def _orpo(chosen, rejected, beta: float, metrics: dict):
    """ORPO's odds-ratio term per pair, in at least fp32 as TRL computes it; the log-probs it used too."""
    at_least_fp32 = torch.promote_types(chosen.dtype, torch.float32)
    chosen, rejected = chosen.to(at_least_fp32), rejected.to(at_least_fp32)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return chosen, rejected, -beta * ratio


def _reward_metrics(loss_type: str, beta: float, scores: tuple, logps: tuple) -> dict:
    """rewards/* and logps/* as TRL logs them (kto: no accuracy; a side its batch lacks has no metric)."""
    chosen_rewards, rejected_rewards = (beta * s.detach() for s in scores)
    metrics = {}
    if loss_type != "kto":
        metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
        metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean()
    for side, rewards, side_logps in zip(
        ("chosen", "rejected"), (chosen_rewards, rejected_rewards), logps, strict=True
    ):
        if rewards.numel():  # rather than the NaN mean of nothing
            metrics[f"rewards/{side}"] = rewards.mean()
            metrics[f"logps/{side}"] = side_logps.detach().mean()
    if loss_type == "kto" and all(side.numel() for side in logps):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


# ---------------------------------------------------------------------------- from hidden states


def _chosen_count(n_seq, num_chosen):
    if num_chosen is None:
        if n_seq % 2:
            raise ValueError(f"chosen then rejected rows: need an even number of sequences, got {n_seq}")
        return n_seq // 2
    if not 0 <= num_chosen <= n_seq:
        raise ValueError(f"num_chosen must be in [0, {n_seq}], got {num_chosen}")
    return num_chosen


def _nll_term(token_fn, hidden, weight, labels, nll_labels, seq_ids, n_chosen, head):
    """One pass for the log-probs (``labels``) and the chosen rows' NLL (``nll_labels``, e.g. prompt and
    completion for TRL's ORPO): the union of the two label sets, then a mask for each. Returns
    (token log-probs on ``labels``' tokens, chosen NLL)."""
    ignore_index = head["ignore_index"]
    if nll_labels.shape != labels.shape:
        raise ValueError(f"nll_labels must have the labels' shape {tuple(labels.shape)}, got {tuple(nll_labels.shape)}")
    if seq_ids is None:
        rows = torch.arange(labels.shape[0], device=labels.device)
        chosen_tokens = (rows < n_chosen)[:, None].expand(labels.shape)
    else:
        chosen_tokens = (seq_ids < n_chosen).reshape(labels.shape)
    kept, nll_kept = labels != ignore_index, chosen_tokens & (nll_labels != ignore_index)
    if bool((kept & nll_kept & (labels != nll_labels)).any()):  # one host sync
        raise ValueError("nll_labels and labels name different tokens at the same position")
    union = torch.where(kept, labels, torch.where(nll_kept, nll_labels, ignore_index))
    token_logps = token_fn(hidden, weight, union, **head)
    zero = torch.zeros_like(token_logps)
    chosen_nll = -torch.where(nll_kept, token_logps, zero).sum() / nll_kept.sum().clamp(min=1)
    return torch.where(kept, token_logps, zero), chosen_nll


def _preference_from_hidden(
    token_fn,
    hidden,
    weight,
    labels,
    bias,
    *,
    cu_seqlens,
    num_chosen,
    ref_chosen_logps,
    ref_rejected_logps,
    ref_hidden,
    ref_weight,
    nll_labels,
    head_options,
    lora_in,
    lora_b,
    loss_options,
):
    ignore_index = head_options["ignore_index"]
    n_seq, seq_ids = _sequence_ids(hidden, labels, cu_seqlens)
    n_chosen = _chosen_count(n_seq, num_chosen)
    if ref_hidden is not None:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("give the reference as ref_hidden or as ref_*_logps, not both")
        if ref_hidden.shape != hidden.shape:
            raise ValueError(
                f"ref_hidden must have hidden's shape {tuple(hidden.shape)}, got {tuple(ref_hidden.shape)}"
            )
        ref_head = weight if ref_weight is None else ref_weight
        with torch.no_grad():  # the reference: no head adapter, no gradient
            ref_tokens = token_fn(ref_hidden, ref_head, labels, bias, lora_in=None, lora_b=None, **head_options)
            ref_logps, _ = _per_sequence(ref_tokens, labels, seq_ids, n_seq, ignore_index)
        ref_chosen_logps, ref_rejected_logps = ref_logps[:n_chosen], ref_logps[n_chosen:]
    head = {"bias": bias, "lora_in": lora_in, "lora_b": lora_b, **head_options}
    if nll_labels is None:
        token_logps = token_fn(hidden, weight, labels, **head)
    else:
        if "chosen_nll" in loss_options:
            raise ValueError("give the chosen NLL as nll_labels or as chosen_nll, not both")
        token_logps, loss_options["chosen_nll"] = _nll_term(
            token_fn, hidden, weight, labels, nll_labels, seq_ids, n_chosen, head
        )
    logps, counts = _per_sequence(token_logps, labels, seq_ids, n_seq, ignore_index)
    return preference_loss(
        logps[:n_chosen],
        logps[n_chosen:],
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_counts=counts[:n_chosen],
        rejected_counts=counts[n_chosen:],
        **loss_options,
    )


def fused_linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    num_chosen: int | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    nll_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    lora_in: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    **loss_options,
):
    """A preference loss straight from the policy's hidden states and lm_head: ``sequence_logps`` over the batch
    (chosen sequences first, then rejected; ``num_chosen`` of them chosen, default half), then
    ``preference_loss(**loss_options)`` (loss_type, beta, label_smoothing, simpo_gamma, nll_weight, chosen_nll,
    kto's KL log-probs and weights). The reference: ``ref_*_logps`` precomputed, or ``ref_hidden`` (the same batch
    through the backbone with adapters disabled, no grad) with head ``ref_weight`` (default ``weight``).
    ``nll_labels``: labels of the NLL term where they differ from ``labels`` (TRL's ORPO: prompt and completion),
    read on the chosen rows only. Returns (loss, metrics) as ``preference_loss``.
    """
    return _preference_from_hidden(
        _token_logps,
        hidden,
        weight,
        labels,
        bias,
        cu_seqlens=cu_seqlens,
        num_chosen=num_chosen,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        nll_labels=nll_labels,
        head_options={
            "ignore_index": ignore_index,
            "softcap": softcap,
            "logit_scale": logit_scale,
            "chunk_size": chunk_size,
        },
        lora_in=lora_in,
        lora_b=lora_b,
        loss_options=loss_options,
    )


def fused_linear_preference_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    num_chosen: int | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    nll_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    lora_in: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    **loss_options,
):
    """``fused_linear_preference_loss`` on ``sequence_logps_reference``: the [N, V] logits materialised in fp32."""
    return _preference_from_hidden(
        _token_logps_reference,
        hidden,
        weight,
        labels,
        bias,
        cu_seqlens=cu_seqlens,
        num_chosen=num_chosen,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        nll_labels=nll_labels,
        head_options={
            "ignore_index": ignore_index,
            "softcap": softcap,
            "logit_scale": logit_scale,
            "chunk_size": chunk_size,
        },
        lora_in=lora_in,
        lora_b=lora_b,
        loss_options=loss_options,
    )
