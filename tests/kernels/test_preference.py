"""The fused linear preference loss against its materialised reference, and its losses against TRL's trainers."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fusetune_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_reference
from fusetune_kernels.preference import (
    LOSS_TYPES,
    REFERENCE_FREE,
    fused_linear_preference_loss,
    fused_linear_preference_loss_reference,
    preference_loss,
    sequence_logps,
    sequence_logps_reference,
)

from .conftest import DEVICE, TOLERANCE, needs_triton_backend
from .parity import assert_close

IGNORE = -100
BETA = {"sigmoid": 0.1, "hinge": 0.05, "ipo": 0.1, "robust": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}
OPTIONS = {"robust": {"label_smoothing": 0.2}, "simpo": {"simpo_gamma": 0.7, "nll_weight": 0.5}}


def make_batch(n_seq, seq_len, hidden_size, vocab, dtype):
    """Padded [S, T] rows: a random prompt (ignored), then label tokens with random holes, then padding."""
    hidden = torch.randn(n_seq, seq_len, hidden_size, device=DEVICE).to(dtype)
    weight = (2.0 * torch.randn(vocab, hidden_size, device=DEVICE) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n_seq, seq_len), device=DEVICE)
    for row in labels:
        prompt = int(torch.randint(1, seq_len // 2, ()))
        pad = int(torch.randint(0, seq_len // 3, ()))
        row[:prompt] = IGNORE
        row[seq_len - pad :] = IGNORE
    labels[torch.rand(labels.shape, device=DEVICE) < 0.3] = IGNORE  # many ignored tokens inside completions
    labels[:, -1] = torch.where(labels[:, -2] == IGNORE, labels[:, -1], IGNORE)
    labels[0, seq_len // 2] = 5  # at least one label token in every row that matters
    labels[n_seq // 2, seq_len // 2] = 7
    return hidden, weight, labels


def loss_kwargs(loss_type, n_seq):
    options = {"loss_type": loss_type, "beta": BETA[loss_type], **OPTIONS.get(loss_type, {})}
    if loss_type == "kto":
        options["policy_kl_logps"] = -30 + 5 * torch.randn(n_seq, device=DEVICE)
        options["ref_kl_logps"] = options["policy_kl_logps"] - 3 + torch.randn(n_seq, device=DEVICE)
        options["desirable_weight"], options["undesirable_weight"] = 1.0, 1.33
    return options


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity(loss_type, dtype, small_blocks):
    """Loss, metrics and the gradients of hidden and (every other case) a trained head against the float64
    reference; several chunks, odd lengths, many ignored tokens; kto with 3 desirable rows of 5."""
    needs_triton_backend()
    n_seq = 5 if loss_type == "kto" else 4
    hidden, weight, labels = make_batch(n_seq, 13, 40, 600, dtype)
    train_head = LOSS_TYPES.index(loss_type) % 2 == (dtype == torch.float32)
    options = loss_kwargs(loss_type, n_seq)
    if loss_type == "kto":
        options["num_chosen"] = 3
    ref_from_hidden = loss_type not in REFERENCE_FREE and dtype == torch.float32
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden) if loss_type not in REFERENCE_FREE else None
    ref_weight = weight + (0.1 * torch.randn_like(weight) if train_head else 0)

    def run(fn, cast):
        h = cast(hidden).requires_grad_()
        w = cast(weight).requires_grad_(train_head)
        extra = {}
        if ref_hidden is not None:
            rh = cast(ref_hidden).requires_grad_()
            if ref_from_hidden:
                extra = {"ref_hidden": rh, "ref_weight": cast(ref_weight)}
            else:
                with torch.no_grad():
                    ref, _ = sequence_logps_reference(rh, cast(ref_weight), labels)
                chosen_rows = options.get("num_chosen", n_seq // 2)
                extra = {"ref_chosen_logps": ref[:chosen_rows].float(), "ref_rejected_logps": ref[chosen_rows:].float()}
        loss, metrics = fn(h, w, labels, chunk_size=8, **extra, **options)
        loss.backward()
        if ref_from_hidden:
            assert rh.grad is None, "the reference got a gradient"
        return loss, metrics, h.grad, w.grad

    loss, metrics, dh, dw = run(fused_linear_preference_loss, lambda t: t.detach().clone())
    ref_loss, ref_metrics, ref_dh, ref_dw = run(fused_linear_preference_loss_reference, lambda t: t.detach().double())
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, dtype, "loss")
    assert metrics.keys() == ref_metrics.keys()
    scale = ref_metrics["logps/chosen"].abs()  # metrics near 0 are compared against the log-probs' size
    for name, value in metrics.items():
        assert not value.requires_grad, name
        if name != "rewards/accuracies":
            torch.testing.assert_close(
                value.double(), ref_metrics[name].double(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale
            )
    assert_close(dh, ref_dh, dtype, "dhidden")
    if train_head:
        assert dw.dtype == dtype
        assert_close(dw, ref_dw, dtype, "dweight")
    else:
        assert dw is None


@pytest.mark.parametrize("train_head", [False, True], ids=["frozen_head", "trained_head"])
def test_packed_matches_padded(train_head):
    """cu_seqlens over odd-length sequences packed in one row gives the padded batch's log-probs, counts and
    gradients; a sequence without label tokens has log-prob 0 and count 0."""
    needs_triton_backend()
    lengths = [7, 3, 11, 5]
    hidden, weight, labels = make_batch(4, 11, 24, 300, torch.float32)
    labels[1] = IGNORE  # no label token at all
    h_pad = hidden.detach().clone().requires_grad_()
    w_pad = weight.detach().clone().requires_grad_(train_head)
    logps, counts = sequence_logps(h_pad, w_pad, labels, chunk_size=4)
    rows = [slice(0, n) for n in lengths]
    h_packed = torch.cat([hidden[i, r] for i, r in enumerate(rows)]).unsqueeze(0).requires_grad_()
    w_packed = weight.detach().clone().requires_grad_(train_head)
    packed_labels = torch.cat([labels[i, r] for i, r in enumerate(rows)]).unsqueeze(0)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    # The padded rows' tails beyond each length must not count: ignore them there too.
    for i, n in enumerate(lengths):
        labels[i, n:] = IGNORE
    logps, counts = sequence_logps(h_pad, w_pad, labels, chunk_size=4)
    packed_logps, packed_counts = sequence_logps(h_packed, w_packed, packed_labels, cu_seqlens=cu_seqlens, chunk_size=4)
    assert torch.equal(packed_counts, counts) and counts[1] == 0 and (counts[[0, 2, 3]] > 0).all()
    torch.testing.assert_close(packed_logps, logps, rtol=1e-6, atol=0)
    assert logps[1] == 0 and (logps[[0, 2, 3]] < 0).all()
    grad = torch.randn(4, device=DEVICE)
    (logps * grad).sum().backward()
    (packed_logps * grad).sum().backward()
    packed_dh = h_packed.grad[0]
    for i, r in enumerate(rows):
        torch.testing.assert_close(packed_dh[: lengths[i]], h_pad.grad[i, r], rtol=1e-6, atol=1e-7)
        packed_dh = packed_dh[lengths[i] :]
    if train_head:
        torch.testing.assert_close(w_packed.grad, w_pad.grad, rtol=1e-5, atol=1e-7)
    ref_logps, ref_counts = sequence_logps_reference(
        h_packed.detach().double(), weight.double(), packed_labels, cu_seqlens=cu_seqlens
    )
    assert torch.equal(ref_counts, counts)
    assert_close(packed_logps, ref_logps, torch.float32, "packed logps")


def test_zero_label_sequence():
    """Sums allow an empty sequence (sigmoid: finite loss and gradients); simpo and orpo, which average,
    refuse it in one line; ipo counts it as one token, as TRL does."""
    needs_triton_backend()
    hidden, weight, labels = make_batch(4, 9, 16, 200, torch.float32)
    labels[3] = IGNORE
    h = hidden.requires_grad_()
    ref = torch.randn(4, device=DEVICE) - 20
    loss, _ = fused_linear_preference_loss(h, weight, labels, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and (h.grad[3] == 0).all()
    loss, _ = fused_linear_preference_loss(
        hidden, weight, labels, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:], loss_type="ipo"
    )
    assert torch.isfinite(loss)
    for loss_type in ("simpo", "orpo"):
        with pytest.raises(ValueError, match="rejected sequence has no label token"):
            fused_linear_preference_loss(hidden, weight, labels, loss_type=loss_type)
        with pytest.raises(ValueError, match="rejected sequence has no label token"):
            fused_linear_preference_loss_reference(hidden, weight, labels, loss_type=loss_type)


def test_layout_chosen_then_rejected():
    """The first half of the rows is chosen, the second rejected (num_chosen moves the split for kto), each with
    its own token counts: the fused loss is preference_loss over the halves of sequence_logps."""
    needs_triton_backend()
    hidden, weight, labels = make_batch(6, 9, 16, 200, torch.float32)
    ref = torch.randn(6, device=DEVICE) - 20
    logps, counts = sequence_logps_reference(hidden.double(), weight.double(), labels)
    loss, metrics = fused_linear_preference_loss(
        hidden, weight, labels, ref_chosen_logps=ref[:3], ref_rejected_logps=ref[3:], loss_type="ipo"
    )
    expected, expected_metrics = preference_loss(
        logps[:3], logps[3:], ref[:3], ref[3:], "ipo", chosen_counts=counts[:3], rejected_counts=counts[3:]
    )
    swapped, _ = preference_loss(
        logps[3:], logps[:3], ref[3:], ref[:3], "ipo", chosen_counts=counts[3:], rejected_counts=counts[:3]
    )
    assert_close(loss, expected, torch.float32, "loss")
    assert_close(metrics["logps/chosen"], expected_metrics["logps/chosen"], torch.float32, "logps/chosen")
    assert (expected - swapped).abs() > 1e-3
    kl = {"policy_kl_logps": ref - 1, "ref_kl_logps": ref - 2}
    loss, metrics = fused_linear_preference_loss(
        hidden,
        weight,
        labels,
        ref_chosen_logps=ref[:4],
        ref_rejected_logps=ref[4:],
        loss_type="kto",
        num_chosen=4,
        **kl,
    )
    expected, _ = preference_loss(logps[:4], logps[4:], ref[:4], ref[4:], "kto", **kl)
    assert_close(loss, expected, torch.float32, "kto loss")
    # The reference from hidden states: its own head, no head adapter, no gradient.
    ref_hidden, ref_weight = hidden + 0.2 * torch.randn_like(hidden), weight + 0.1 * torch.randn_like(weight)
    lora = {"lora_in": torch.randn(6, 9, 2, device=DEVICE), "lora_b": 0.3 * torch.randn(200, 2, device=DEVICE)}
    loss, _ = fused_linear_preference_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, **lora)
    ref_logps, _ = sequence_logps_reference(ref_hidden, ref_weight, labels)
    expected, _ = fused_linear_preference_loss(
        hidden, weight, labels, ref_chosen_logps=ref_logps[:3], ref_rejected_logps=ref_logps[3:], **lora
    )
    assert_close(loss, expected, torch.float32, "loss with ref_hidden")
    _, metrics = preference_loss(logps[:0], logps, ref[:0], ref, "kto", **kl)  # no desirable row in this batch
    assert "rewards/chosen" not in metrics and "rewards/margins" not in metrics
    assert all(torch.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_orpo_nll_over_prompt_and_completion(packed, small_blocks):
    """nll_labels (TRL's ORPO: the NLL over the chosen rows' prompt and completion) in the same pass: the NLL is
    fused_linear_cross_entropy's mean over the chosen rows' nll_labels, the odds use labels only, the
    rejected rows' nll_labels are not read; gradients match the reference."""
    needs_triton_backend()
    hidden, weight, labels = make_batch(4, 11, 24, 400, torch.float32)
    prompt = (labels == IGNORE) & (torch.rand(labels.shape, device=DEVICE) < 0.7)
    nll_labels = torch.where(prompt, torch.randint(0, 400, labels.shape, device=DEVICE), labels)
    layout = {}
    if packed:
        hidden, labels, nll_labels = hidden.flatten(0, 1), labels.flatten(), nll_labels.flatten()
        layout = {"cu_seqlens": torch.arange(0, 45, 11, device=DEVICE)}
    results = []
    for fn, cast in (
        (fused_linear_preference_loss, torch.clone),
        (fused_linear_preference_loss_reference, torch.Tensor.double),
    ):
        h, w = cast(hidden).requires_grad_(), cast(weight).requires_grad_()
        loss, metrics = fn(h, w, labels, nll_labels=nll_labels, loss_type="orpo", beta=0.2, chunk_size=8, **layout)
        loss.backward()
        results.append((loss, metrics["nll_loss"], h.grad, w.grad))
    for name, fast, slow in zip(["loss", "nll_loss", "dhidden", "dweight"], *results, strict=True):
        assert_close(fast, slow, torch.float32, name)
    h64 = hidden.double().reshape(4, 11, -1)
    chosen_nll = fused_linear_cross_entropy_reference(h64[:2], weight.double(), nll_labels.reshape(4, 11)[:2])
    logps, counts = sequence_logps_reference(h64, weight.double(), labels.reshape(4, 11))
    expected, _ = preference_loss(
        logps[:2], logps[2:], loss_type="orpo", beta=0.2, chosen_counts=counts[:2], rejected_counts=counts[2:],
        chosen_nll=chosen_nll,
    )  # fmt: skip
    assert_close(results[0][0], expected, torch.float32, "loss against TRL's definition")
    assert_close(results[0][1], chosen_nll, torch.float32, "nll against TRL's definition")
    with pytest.raises(ValueError, match="different tokens"):
        fused_linear_preference_loss(hidden, weight, labels, nll_labels=labels.roll(1), loss_type="orpo", **layout)


def test_reference_logps_match_cross_entropy():
    # log_softmax + gather per sequence = minus the summed per-token cross-entropy of the FLCE reference.
    hidden, weight, labels = make_batch(3, 10, 16, 120, torch.float64)
    bias = torch.randn(120, dtype=torch.float64, device=DEVICE)
    logps, counts = sequence_logps_reference(hidden, weight, labels, bias, softcap=4.0, logit_scale=0.5)
    per_token = fused_linear_cross_entropy_reference(
        hidden, weight, labels, bias, reduction="none", softcap=4.0, logit_scale=0.5
    )
    torch.testing.assert_close(logps, -per_token.sum(-1), rtol=1e-12, atol=0)
    assert torch.equal(counts, (labels != IGNORE).sum(-1))


def test_head_adapter_softcap_and_bias(small_blocks):
    # The FLCE options pass through: a LoRA term on the head (policy only), a softcap, a bias.
    needs_triton_backend()
    hidden, weight, labels = make_batch(4, 9, 24, 500, torch.float32)
    bias = 0.5 * torch.randn(500, device=DEVICE)
    lora_in, lora_b = torch.randn(4, 9, 3, device=DEVICE), 0.3 * torch.randn(500, 3, device=DEVICE)
    ref_hidden = hidden + 0.2 * torch.randn_like(hidden)
    results = []
    for fn, cast in (
        (fused_linear_preference_loss, torch.clone),
        (fused_linear_preference_loss_reference, torch.Tensor.double),
    ):
        inputs = [cast(t.detach()).requires_grad_() for t in (hidden, lora_in, lora_b)]
        loss, _ = fn(
            inputs[0], cast(weight), labels, cast(bias), ref_hidden=cast(ref_hidden), softcap=3.0, chunk_size=8,
            lora_in=inputs[1], lora_b=inputs[2], beta=0.2,
        )  # fmt: skip
        loss.backward()
        results.append([loss] + [t.grad for t in inputs])
    for name, fast, slow in zip(["loss", "dhidden", "dlora_in", "dlora_b"], *results, strict=True):
        assert_close(fast, slow, torch.float32, name)


def test_saved_for_backward_per_label_token():
    """The docstring's claim: the graph holds H*e + 8 bytes a label token for a frozen head, H*e + 20 for a
    trained one (a padded batch: the per-sequence sums keep nothing), far below the reference's V*4 a token."""
    needs_triton_backend()
    hidden_size, vocab = 32, 2000
    hidden, weight, labels = make_batch(4, 16, hidden_size, vocab, torch.bfloat16)
    n_label, n_tokens = int((labels != IGNORE).sum()), labels.numel()
    ref = torch.randn(4, device=DEVICE) - 30
    for train_head, per_label in ((False, hidden_size * 2 + 8), (True, hidden_size * 2 + 20)):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_(train_head)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(keep_in(saved), lambda t: t):
            loss, _ = fused_linear_preference_loss(h, w, labels, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:])
        made_in_forward = find_node(loss.grad_fn, "FusedLinearCrossEntropy").grads or ()
        held = {(t.data_ptr(), t.numel() * t.element_size()) for t in (*saved, *made_in_forward) if t is not None}
        held_bytes = sum(size for ptr, size in held if ptr not in (h.data_ptr(), w.data_ptr()))
        claim = n_label * per_label + 256  # + the per-sequence values, a few floats
        assert n_label * per_label <= held_bytes <= claim, (train_head, held_bytes, claim)
        assert held_bytes < n_tokens * vocab * 4 / 20


def keep_in(saved):
    def pack(tensor):
        saved.append(tensor)
        return tensor

    return pack


def find_node(fn, name):
    seen, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if name in type(node).__name__:
            return node
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    raise AssertionError(f"no {name} node in the graph")


def test_bad_inputs():
    hidden, weight, labels = make_batch(4, 6, 8, 50, torch.float32)
    ref = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="loss_type"):
        fused_linear_preference_loss(hidden, weight, labels, loss_type="dpo", **ref)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        fused_linear_preference_loss(hidden, weight, labels)
    with pytest.raises(ValueError, match="reference-free"):
        fused_linear_preference_loss(hidden, weight, labels, loss_type="simpo", **ref)
    with pytest.raises(ValueError, match="not both"):
        fused_linear_preference_loss(hidden, weight, labels, ref_hidden=hidden, **ref)
    with pytest.raises(ValueError, match="even number"):
        fused_linear_preference_loss(hidden[:3], weight, labels[:3], loss_type="orpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_preference_loss(hidden, weight, labels, loss_type="robust", label_smoothing=0.5, **ref)
    with pytest.raises(ValueError, match="kto needs policy_kl_logps"):
        fused_linear_preference_loss(hidden, weight, labels, loss_type="kto", **ref)
    with pytest.raises(ValueError, match="cu_seqlens"):
        sequence_logps(hidden.flatten(0, 1), weight, labels.flatten(), cu_seqlens=torch.tensor([0, 5, 23]))
    with pytest.raises(ValueError, match="hidden .S, T, H."):
        sequence_logps(hidden.flatten(0, 1), weight, labels.flatten())


# ---------------------------------------------------------------------------- against TRL's own code


def trl_stub(trainer_cls, **attributes):
    """A TRL trainer object without __init__: just the attributes its loss code reads, one process."""
    trainer = object.__new__(trainer_cls)
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t, unwrap_model=lambda m: m
    )
    defaults = {"accelerator": accelerator, "aux_loss_enabled": False, "_metrics": {"train": defaultdict(list)}}
    defaults.update(_total_train_tokens=0, _tp_size=1)
    for key, value in {**defaults, **attributes}.items():
        setattr(trainer, key, value)
    return trainer


class FusedHeadOutputs:
    """Stands in for the model: returns the given per-token log-probs as TRL's fused_lm_head outputs."""

    training = True

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.per_token_logps)
        return SimpleNamespace(log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def completion_batch(n_seq, length):
    """TRL-style rows: completion_mask over input_ids (prompt first), and per-token log-probs of the shifted
    completion tokens (0 elsewhere); ours are their sums and counts."""
    completion_mask = torch.zeros(n_seq, length, dtype=torch.long)
    for row in completion_mask:
        start, stop = int(torch.randint(1, length // 2, ())), int(torch.randint(length - 3, length + 1, ()))
        row[start:stop] = 1
    per_token = -torch.rand(n_seq, length - 1, dtype=torch.float64) * 4 * completion_mask[:, 1:]
    inputs = {
        "input_ids": torch.randint(0, 50, (n_seq, length)),
        "attention_mask": torch.ones(n_seq, length, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    return inputs, per_token, per_token.sum(1), completion_mask.sum(1)


def assert_metrics_match(ours, trl_metrics, names):
    for name in names:
        assert ours[name].item() == pytest.approx(float(trl_metrics[name]), rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_losses_match_trl(loss_type):
    from trl.trainer.dpo_trainer import DPOTrainer

    beta, smoothing = 0.2, (0.15 if loss_type == "robust" else 0.0)
    inputs, per_token, logps, counts = completion_batch(6, 12)
    ref = logps + torch.randn(6, dtype=torch.float64)
    inputs.update(ref_chosen_logps=ref[:3], ref_rejected_logps=ref[3:])
    trainer = trl_stub(
        DPOTrainer, model=FusedHeadOutputs(per_token), precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=smoothing, use_weighting=False,
    )  # fmt: skip
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    loss, metrics = preference_loss(
        logps[:3], logps[3:], ref[:3], ref[3:], loss_type, beta, label_smoothing=smoothing,
        chosen_counts=counts[:3], rejected_counts=counts[3:],
    )  # fmt: skip
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    names = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ]
    assert_metrics_match(metrics, trl_metrics, names)
    assert 0 < metrics["rewards/accuracies"] < 1 or loss_type != "sigmoid"


def test_simpo_matches_trl_cpo():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    beta, gamma, smoothing, cpo_alpha = 2.0, 0.6, 0.1, 0.4
    _, per_token, logps, counts = completion_batch(8, 10)
    trainer = trl_stub(
        CPOTrainer, alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=smoothing
    )
    averages = logps / counts
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(averages[:4], averages[4:])
    chosen_nll = -per_token[:4].sum() / counts[:4].sum()  # CrossEntropyLoss(mean) over the chosen label tokens
    trl_loss = losses.mean() + cpo_alpha * chosen_nll
    loss, metrics = preference_loss(
        logps[:4], logps[4:], loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=smoothing,
        nll_weight=cpo_alpha, chosen_counts=counts[:4], rejected_counts=counts[4:],
    )  # fmt: skip
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    trl_metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
        "logps/chosen": averages[:4].mean(),
        "logps/rejected": averages[4:].mean(),
        "nll_loss": chosen_nll,
    }
    assert_metrics_match(metrics, trl_metrics, trl_metrics)


def test_orpo_matches_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    beta = 0.25
    _, per_token, logps, counts = completion_batch(6, 10)
    trainer = trl_stub(ORPOTrainer, beta=beta)
    averages = logps / counts
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = trainer.odds_ratio_loss(
        averages[:3], averages[3:]
    )
    chosen_nll = -per_token[:3].sum() / counts[:3].sum()
    trl_loss = chosen_nll - losses.mean()
    loss, metrics = preference_loss(
        logps[:3], logps[3:], loss_type="orpo", beta=beta, chosen_counts=counts[:3], rejected_counts=counts[3:]
    )
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6)  # TRL computes the odds in fp32
    trl_metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "log_odds_ratio": log_odds_ratio,
        "log_odds_chosen": log_odds_chosen,
        "nll_loss": chosen_nll,
    }
    for name, value in trl_metrics.items():
        assert metrics[name].item() == pytest.approx(value.item(), rel=1e-6), name


def test_kto_matches_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    beta, n_seq = 0.3, 7
    inputs, per_token, logps, _ = completion_batch(n_seq, 11)
    desirable = torch.tensor([True, False, True, True, False, False, True])
    ref = logps + torch.randn(n_seq, dtype=torch.float64)
    kl_logps = logps.flip(0) - 2
    ref_kl_logps = kl_logps - 2 * torch.rand(n_seq, dtype=torch.float64)
    inputs.update(label=desirable, ref_logps=ref, ref_KL_logps=ref_kl_logps)
    trainer = trl_stub(
        KTOTrainer, model=FusedHeadOutputs(per_token), precompute_ref_logps=True, calculate_KL=True, beta=beta,
        loss_type="kto", desirable_weight=1.2, undesirable_weight=0.8,
    )  # fmt: skip
    trainer._compute_kl_logps = lambda model, batch: kl_logps
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    loss, metrics = preference_loss(
        logps[desirable], logps[~desirable], ref[desirable], ref[~desirable], "kto", beta,
        policy_kl_logps=kl_logps, ref_kl_logps=ref_kl_logps, desirable_weight=1.2, undesirable_weight=0.8,
    )  # fmt: skip
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["kl"] > 0
    assert_metrics_match(
        metrics,
        trl_metrics,
        ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"],
    )
