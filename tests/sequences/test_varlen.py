"""fusetune.sequences.varlen, packed and padding-free batches: documents never see each other, through our
attention and TRL.

Isolation is checked against a reference that never packs: each document run alone through the
model's own attention (SDPA, or eager for Gemma 2). ||a - b|| / ||b|| <= 1e-5 in fp32 on CPU,
1e-2 in bf16 for the CUDA varlen kernel.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from fusetune import testing
from fusetune.loading import load_model
from fusetune.patching import apply_kernels, remove_kernels
from fusetune.sequences import varlen
from fusetune.sequences.varlen import MASKED, VARLEN, enable_varlen_attention
from fusetune.training.trainer import FastSFTConfig, FastSFTTrainer

from ..kernels.tiny_models import COMMON, EXTRA, FAMILIES, tiny_model

LENGTHS = [7, 3, 12, 1, 9]  # awkward: a one-token document, and one longer than a short sliding window
FP32_TOL = 1e-5
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def pack(docs):
    input_ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    return input_ids, position_ids


def packed_labels(input_ids, position_ids):
    """Every token is a target except each document's first (as TRL's padding-free collator does)."""
    labels = input_ids.clone()
    labels[position_ids == 0] = -100
    return labels


def cu_seq_lens(lengths, device="cpu"):
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)


def documents(vocab, lengths=LENGTHS, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def model_pair(family, **overrides):
    """(reference, ours): two identical tiny models, the first on the family's own attention."""
    if not overrides:
        return tiny_model(family), tiny_model(family)
    models = []
    for _ in range(2):
        config = AutoConfig.for_model(family, **COMMON, **{**EXTRA[family], **overrides})
        config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
        torch.manual_seed(0)
        models.append(AutoModelForCausalLM.from_config(config))
    return tuple(models)


def assert_isolated(reference, ours, docs, tol, use_cache=False, **packed_kwargs):
    device = next(ours.parameters()).device
    input_ids, position_ids = pack(docs)
    with torch.no_grad():
        packed = ours(
            input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=use_cache, **packed_kwargs
        ).logits[0]
        start = 0
        for doc in docs:
            alone = reference(input_ids=doc[None].to(device)).logits[0]
            err = rel(packed[start : start + len(doc)], alone)
            assert err <= tol, f"document of {len(doc)} tokens at {start}: relative error {err:.2e}"
            start += len(doc)


@pytest.fixture(autouse=True)
def fresh_calls():
    testing.reset_attention_calls()


# ------------------------------------------------------------------ the attention function alone


class Attention(torch.nn.Module):
    """What transformers' attention modules expose to an attention function."""

    def __init__(self, heads, kv_heads):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = heads // kv_heads


def reference_attention(q, k, v, lengths, scaling, window=None, softcap=None):
    """Each document on its own, explicit math in float64. [1, h, s, d] -> [1, s, h, d]."""
    q, k, v = (t.double() for t in (q, k, v))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        scores = q[:, :, sl] @ k[:, :, sl].transpose(-1, -2) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        i = torch.arange(n)
        allowed = i[:, None] >= i[None, :]
        if window is not None:
            allowed &= i[:, None] - i[None, :] < window
        outs.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v[:, :, sl])
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


def qkv(lengths, heads, kv_heads, dim, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(lengths)
    return tuple(
        torch.randn(1, h, s, dim, generator=g).to(device=device, dtype=dtype) for h in (heads, kv_heads, kv_heads)
    )


@pytest.mark.parametrize("layout", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize(
    "heads,kv_heads,window,softcap,scaling",
    [(4, 4, None, None, None), (6, 2, None, None, 0.3), (6, 2, 4, None, None), (4, 1, 5, 20.0, 0.2)],
)
def test_masked_attention_matches_each_document_alone(layout, heads, kv_heads, window, softcap, scaling):
    dim = 16
    q, k, v = qkv(LENGTHS, heads, kv_heads, dim)
    scaling_used = scaling if scaling is not None else dim**-0.5
    kwargs = {"sliding_window": window, "softcap": softcap}
    if layout == "cu_seq_lens":
        kwargs |= {"cu_seq_lens_q": cu_seq_lens(LENGTHS), "max_length_q": max(LENGTHS)}
    else:
        kwargs["position_ids"] = pack([torch.zeros(n) for n in LENGTHS])[1]
    out, weights = varlen.masked_attention_forward(
        Attention(heads, kv_heads), q, k, v, None, scaling=scaling_used, **kwargs
    )
    assert weights is None and out.shape == (1, sum(LENGTHS), heads, dim)
    expected = reference_attention(q, k, v, LENGTHS, scaling_used, window, softcap)
    assert rel(out, expected) <= FP32_TOL
    assert varlen.calls == {"masked": 1}
    if window is not None:  # the window changes the answer: it is not silently dropped
        assert rel(out, reference_attention(q, k, v, LENGTHS, scaling_used, None, softcap)) > 1e-3


def test_rows_of_a_batch_are_separate_documents():
    """Two rows whose positions continue across the row boundary still never attend across it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 8, 16, generator=g) for h in (4, 2, 2))
    position_ids = torch.tensor([list(range(8)), [8, 9, 10, 0, 1, 2, 3, 4]])  # row 1 starts as if continuing row 0
    out, _ = varlen.masked_attention_forward(Attention(4, 2), q, k, v, None, scaling=0.25, position_ids=position_ids)
    for row, lengths in ((0, [8]), (1, [3, 5])):
        expected = reference_attention(q[row : row + 1], k[row : row + 1], v[row : row + 1], lengths, 0.25)
        assert rel(out[row : row + 1], expected) <= FP32_TOL


def fake_varlen_kernel(api):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn, with the signature of one torch release.

    It checks the call against that release's contract (packed [T, H, D] tensors, int32
    boundaries, no GQA before 2.12) and computes each document's attention in float64.
    """

    def check_and_attend(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window=None, gqa=False):
        assert q.ndim == k.ndim == v.ndim == 3 and q.shape[0] == k.shape[0] == cu_q[-1].item()
        assert q.dtype == k.dtype == v.dtype, "one dtype for q, k and v"
        assert cu_q.dtype == torch.int32 and cu_q.ndim == 1 and cu_k is cu_q
        assert isinstance(max_q, int) and max_q == max_k == cu_q.diff().max().item()
        assert gqa or q.shape[1] == k.shape[1], "GQA needs enable_gqa (or repeated key/value heads)"
        lengths = cu_q.diff().tolist()
        scaling = scale if scale is not None else q.shape[-1] ** -0.5
        left = window[0] if window is not None else -1
        out = reference_attention(
            *(t.transpose(0, 1)[None] for t in (q, k, v)), lengths, scaling, left + 1 if left >= 0 else None
        )
        return out[0].to(q.dtype)

    if api == "2.10":

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            assert is_causal
            return check_and_attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)

    elif api == "2.11":

        def varlen_attn(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
        ):
            assert window_size[1] == 0, "not causal"
            return check_and_attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size)

    else:

        def varlen_attn(
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            *,
            return_aux=None,
            scale=None,
            window_size=(-1, -1),
            enable_gqa=False,
            seqused_k=None,
            block_table=None,
            num_splits=None,
        ):
            assert window_size[1] == 0, "not causal"
            return check_and_attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, enable_gqa)

    return varlen_attn


def use_fake_kernel(monkeypatch, api):
    kernel = fake_varlen_kernel(api)
    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    monkeypatch.setattr(varlen, "_VARLEN_PARAMS", frozenset(inspect.signature(kernel).parameters))
    monkeypatch.setattr(varlen, "KERNEL_DEVICES", ("cpu",))
    monkeypatch.setattr(varlen, "FLASH_DTYPES", (torch.float32, torch.bfloat16))


@pytest.mark.parametrize("api", ["2.10", "2.11", "2.12"])
@pytest.mark.parametrize("layout", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("heads,kv_heads,window,scaling", [(4, 4, None, None), (6, 2, None, 0.3), (6, 2, 4, 0.2)])
def test_varlen_kernel_call_on_each_torch_api(monkeypatch, api, layout, heads, kv_heads, window, scaling):
    """The plumbing around the CUDA kernel (layout, boundaries, GQA, scale, window), run on CPU."""
    use_fake_kernel(monkeypatch, api)
    dim = 16
    q, k, v = qkv(LENGTHS, heads, kv_heads, dim)
    scaling_used = scaling if scaling is not None else dim**-0.5
    if layout == "cu_seq_lens":
        kwargs = {"cu_seq_lens_q": cu_seq_lens(LENGTHS), "max_length_q": max(LENGTHS)}
    else:
        kwargs = {"position_ids": pack([torch.zeros(n) for n in LENGTHS])[1]}
    out, _ = varlen.varlen_attention_forward(
        Attention(heads, kv_heads), q, k, v, None, scaling=scaling_used, sliding_window=window, **kwargs
    )
    expected = reference_attention(q, k, v, LENGTHS, scaling_used, window)
    assert rel(out, expected) <= FP32_TOL
    path = "masked" if window is not None and api == "2.10" else "varlen"  # 2.10 has no sliding window
    assert varlen.calls == {path: 1}


# ------------------------------------------------------------------ whole models


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_match_separate_forwards(family):
    reference, ours = model_pair(family)
    assert enable_varlen_attention(ours, backend="masked") == MASKED  # CPU models: the masked path
    assert_isolated(reference, ours, documents(COMMON["vocab_size"]), FP32_TOL)
    assert varlen.calls["masked"] == COMMON["num_hidden_layers"] and not varlen.calls["sdpa"]
    # With a KV cache transformers drops packing from its own masks; ours reads the positions regardless.
    assert_isolated(reference, ours, documents(COMMON["vocab_size"]), FP32_TOL, use_cache=True)


def test_auto_follows_the_training_device(monkeypatch):
    """On a CUDA host, a run on the CPU (use_cpu=True) gets the masked path, and says why."""
    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_kernel("2.12"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _, ours = model_pair("llama")
    assert enable_varlen_attention(ours, device=torch.device("cpu")) == MASKED
    assert varlen._why_masked("cpu") == "training runs on cpu"
    for device in (None, "cuda", torch.device("cuda", 1)):
        assert enable_varlen_attention(ours, device=device) == VARLEN


def test_varlen_kernel_under_autocast(monkeypatch):
    """With fp32 weights under autocast, RoPE leaves q and k in fp32 and v in bf16: the kernel gets bf16."""
    use_fake_kernel(monkeypatch, "2.12")
    q, k, _ = qkv(LENGTHS, 6, 2, 16)
    v = qkv(LENGTHS, 6, 2, 16, seed=1)[2].bfloat16()
    kwargs = {"cu_seq_lens_q": cu_seq_lens(LENGTHS), "max_length_q": max(LENGTHS)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = varlen.varlen_attention_forward(Attention(6, 2), q, k, v, None, scaling=0.25, **kwargs)
    assert out.dtype == torch.bfloat16 and varlen.calls == {"varlen": 1}
    assert rel(out, reference_attention(q, k, v, LENGTHS, 0.25)) <= 1e-2


@pytest.mark.parametrize("api,layout", [("2.11", "position_ids"), ("2.12", "cu_seq_lens")])
def test_models_reach_the_varlen_kernel_path(monkeypatch, api, layout):
    """Model-level wiring of the kernel path (kwargs, boundaries cached per batch), on a CPU fake kernel."""
    use_fake_kernel(monkeypatch, api)
    reference, ours = model_pair("qwen2")
    assert enable_varlen_attention(ours, backend="varlen") == VARLEN
    extra = {"cu_seq_lens_q": cu_seq_lens(LENGTHS), "max_length_q": max(LENGTHS)} if layout == "cu_seq_lens" else {}
    assert_isolated(reference, ours, documents(COMMON["vocab_size"]), FP32_TOL, **extra)
    assert varlen.calls == {"varlen": COMMON["num_hidden_layers"]}


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_shorter_than_a_document(family):
    reference, ours = model_pair(family, sliding_window=4)
    enable_varlen_attention(ours, backend="masked")
    assert_isolated(reference, ours, documents(COMMON["vocab_size"]), FP32_TOL)


def test_collator_boundaries_give_the_same_logits_as_positions():
    reference, ours = model_pair("llama")
    enable_varlen_attention(ours, backend="masked")
    cu = cu_seq_lens(LENGTHS)
    extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS)}
    assert_isolated(reference, ours, documents(COMMON["vocab_size"]), FP32_TOL, **extra)


def test_packed_loss_is_the_token_weighted_mean_of_document_losses():
    torch.manual_seed(0)
    reference = load_model("fusetune:tiny_llama", torch.float32, random_init=True)
    ours = load_model("fusetune:tiny_llama", torch.float32, random_init=True)
    ours.load_state_dict(reference.state_dict())
    enable_varlen_attention(ours, backend="masked")
    docs = documents(reference.config.vocab_size)
    input_ids, position_ids = pack(docs)
    labels = packed_labels(input_ids, position_ids)
    with torch.no_grad():
        packed = ours(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False).loss
        losses = [reference(input_ids=d[None], labels=d[None]).loss for d in docs if len(d) > 1]
    counts = [len(d) - 1 for d in docs if len(d) > 1]
    expected = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    assert abs(packed.item() - expected.item()) <= FP32_TOL * abs(expected.item())


def test_no_gradient_crosses_a_document_boundary():
    _, ours = model_pair("llama")
    enable_varlen_attention(ours, backend="masked")
    docs = documents(COMMON["vocab_size"])
    input_ids, position_ids = pack(docs)
    embeds = ours.get_input_embeddings()(input_ids).detach().requires_grad_()
    logits = ours(inputs_embeds=embeds, position_ids=position_ids, use_cache=False).logits
    start = sum(LENGTHS[:2])  # the third document
    logits[0, start : start + LENGTHS[2]].sum().backward()
    grad = embeds.grad[0].abs().sum(-1)
    assert grad[start : start + LENGTHS[2]].min() > 0
    assert grad[:start].max() == 0 and grad[start + LENGTHS[2] :].max() == 0


def test_the_mask_is_built_once_per_batch(monkeypatch):
    """Every layer, and the gradient-checkpointing recompute, reuse the mask of the forward."""
    built = []
    original = varlen._document_mask
    monkeypatch.setattr(varlen, "_document_mask", lambda *a: built.append(1) or original(*a))
    reference, ours = model_pair("llama")
    enable_varlen_attention(ours, backend="masked")
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours.train()
    input_ids, position_ids = pack(documents(COMMON["vocab_size"]))
    loss = ours(input_ids=input_ids, position_ids=position_ids, labels=packed_labels(input_ids, position_ids)).loss
    loss.backward()
    assert len(built) == 1 and varlen.calls["masked"] == 2 * COMMON["num_hidden_layers"]
    ours(input_ids=input_ids, position_ids=position_ids.clone())  # a new batch: a new mask
    assert len(built) == 2
    one_document = torch.arange(input_ids.shape[1])[None]
    with torch.no_grad():  # one document per row: causal SDPA, no mask
        assert rel(ours(input_ids=input_ids, position_ids=one_document).logits, reference(input_ids).logits) <= FP32_TOL
    assert len(built) == 2


def test_padded_batches_and_generation_keep_transformers_semantics():
    reference, ours = model_pair("llama")
    enable_varlen_attention(ours, backend="masked")
    input_ids = torch.randint(0, COMMON["vocab_size"], (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        a = ours(input_ids=input_ids, attention_mask=attention_mask).logits
        b = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    assert rel(a[0], b[0]) <= FP32_TOL and rel(a[1, :6], b[1, :6]) <= FP32_TOL
    left = torch.ones_like(input_ids)
    left[1, :3] = 0  # left padding, as for generation
    gen = dict(attention_mask=left, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids, **gen), reference.generate(input_ids, **gen))
    assert varlen.calls["sdpa"] > 0


def test_peft_wrapped_model():
    reference, ours = model_pair("llama")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    reference = get_peft_model(reference, lora)
    torch.manual_seed(1)
    ours = get_peft_model(ours, lora)
    assert enable_varlen_attention(ours, backend="masked") == MASKED
    assert ours.get_base_model().config._attn_implementation == MASKED
    assert_isolated(reference, ours, documents(COMMON["vocab_size"]), FP32_TOL)


def test_unknown_backend_is_refused():
    from fusetune.errors import FusetuneError

    with pytest.raises(FusetuneError, match="unknown varlen backend"):
        enable_varlen_attention(tiny_model("llama"), backend="flash")


# ------------------------------------------------------------------ through TRL


def completion_rows():
    return [{"prompt": f"Q{i}: " + "ab" * i, "completion": " A" + "z" * (i + 1)} for i in range(6)]


def conversation_rows():
    return [
        {
            "messages": [
                {"role": "user", "content": "hi" * (i + 1)},
                {"role": "assistant", "content": "yo" + "x" * i},
                {"role": "user", "content": "more"},
                {"role": "assistant", "content": "ok" * (i + 1)},
            ]
        }
        for i in range(4)
    ]


def trl_batch(tokenizer, tmp_path, rows, kernels=None, use_cpu=True, **config):
    torch.manual_seed(0)
    model = load_model("fusetune:tiny_llama", torch.float32, random_init=True)
    if kernels is not None:
        apply_kernels(model, kernels)
    args = FastSFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        use_cpu=use_cpu,
        report_to=[],
        save_strategy="no",
        max_steps=2,
        logging_steps=1,
        seed=0,
        **config,
    )
    trainer = FastSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return trainer, next(iter(trainer.get_train_dataloader()))


def segments(batch):
    """(start, end) of each document in the single padding-free row, from the position restarts."""
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
    spans = list(zip(starts[:-1], starts[1:], strict=True))
    for a, b in spans:
        assert torch.equal(positions[a:b], torch.arange(b - a)), "positions do not count up within a document"
    assert batch["cu_seq_lens_q"].tolist() == starts
    assert batch["max_length_q"] == max(b - a for a, b in spans)
    return spans


@pytest.mark.parametrize("mode", [{"packing": True, "max_length": 48}, {"padding_free": True, "max_length": None}])
def test_trl_padding_free_batches_keep_completion_only_labels(mode, tiny_tokenizer, tmp_path):
    _, batch = trl_batch(tiny_tokenizer, tmp_path, completion_rows(), **mode)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    spans = segments(batch)
    assert len(spans) > 1
    prompts = {r["prompt"]: r["completion"] for r in completion_rows()}
    for a, b in spans:
        ids, labels = batch["input_ids"][0, a:b], batch["labels"][0, a:b]
        text = tiny_tokenizer.decode(ids)
        prompt = next(p for p in sorted(prompts, key=len, reverse=True) if text.startswith(p))
        n_prompt = len(tiny_tokenizer(prompt)["input_ids"])
        assert (labels[:n_prompt] == -100).all(), f"prompt tokens trained in {text!r}"
        assert torch.equal(labels[n_prompt:], ids[n_prompt:]), f"completion tokens not trained in {text!r}"
        assert tiny_tokenizer.decode(ids[n_prompt:]).startswith(prompts[prompt])


def test_trl_packing_with_assistant_only_loss(tiny_tokenizer, tmp_path):
    _, batch = trl_batch(
        tiny_tokenizer, tmp_path, conversation_rows(), packing=True, max_length=128, assistant_only_loss=True
    )
    replies = {r["messages"][0]["content"]: r["messages"][1::2] for r in conversation_rows()}
    spans = segments(batch)
    assert len(spans) == len(replies)
    for a, b in spans:
        ids, labels = batch["input_ids"][0, a:b], batch["labels"][0, a:b]
        text = tiny_tokenizer.decode(ids)
        user = text.split("<|user|>")[1].split("<|end|>")[0]
        trained = tiny_tokenizer.decode(ids[labels != -100])
        assert trained == "".join(m["content"] + "<|end|>" for m in replies[user]), text


def test_trl_packed_batch_loss_and_training_through_varlen(tiny_tokenizer, tmp_path):
    """TRL's packed batch through our attention and the patched loss head: the loss equals the
    documents' token-weighted mean, and a short run trains."""
    try:
        trainer, batch = trl_batch(
            tiny_tokenizer, tmp_path, completion_rows(), kernels="reference", packing=True, max_length=48
        )
        model = trainer.model
        reference = load_model("fusetune:tiny_llama", torch.float32, random_init=True)
        reference.load_state_dict(model.state_dict())
        assert enable_varlen_attention(model, backend="masked") == MASKED
        with torch.no_grad():
            packed = model(**batch, use_cache=False).loss
            total, count = 0.0, 0
            for a, b in segments(batch):
                labels = batch["labels"][:, a:b]
                n = int((labels[:, 1:] != -100).sum())
                total += reference(input_ids=batch["input_ids"][:, a:b], labels=labels).loss.item() * n
                count += n
        assert abs(packed.item() - total / count) <= FP32_TOL * total / count
        assert varlen.calls["masked"] == model.config.num_hidden_layers
        trainer.train()
    finally:
        remove_kernels()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert varlen.calls["masked"] > model.config.num_hidden_layers and not varlen.calls["sdpa"]


# ------------------------------------------------------------------ the CUDA varlen kernel


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["position_ids", "cu_seq_lens"])
def test_cuda_varlen_isolation_bf16(layout):
    if varlen.varlen_attn is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    reference, ours = (m.to("cuda", torch.bfloat16) for m in model_pair("llama"))
    assert enable_varlen_attention(ours) == VARLEN
    extra = {}
    if layout == "cu_seq_lens":
        extra = {"cu_seq_lens_q": cu_seq_lens(LENGTHS, "cuda"), "max_length_q": max(LENGTHS)}
    assert_isolated(reference, ours, documents(COMMON["vocab_size"]), 1e-2, **extra)
    assert varlen.calls == {"varlen": COMMON["num_hidden_layers"]}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, None), (8, 2, None), (8, 2, 5)])
def test_cuda_varlen_kernel_forward_and_backward_bf16(heads, kv_heads, window):
    if varlen.varlen_attn is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    lengths = [70, 1, 130, 33]
    q, k, v = (t.requires_grad_() for t in qkv(lengths, heads, kv_heads, 64, "cuda", torch.bfloat16))
    out, _ = varlen.varlen_attention_forward(
        Attention(heads, kv_heads),
        q,
        k,
        v,
        None,
        scaling=0.125,
        sliding_window=window,
        cu_seq_lens_q=cu_seq_lens(lengths, "cuda"),
        max_length_q=max(lengths),
    )
    assert varlen.calls == {"varlen": 1}
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    expected = reference_attention(q64, k64, v64, lengths, 0.125, window)
    assert rel(out.cpu(), expected) <= 1e-2
    grad = torch.randn_like(expected)
    out.backward(grad.to("cuda", torch.bfloat16))
    expected.backward(grad)
    for name, got, want in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert rel(got.grad.cpu(), want.grad) <= 1e-2, name


@pytest.mark.gpu
@needs_cuda
def test_cuda_masked_path_fp32():
    """fp32 on CUDA (no flash kernel): the masked path, off cuDNN attention."""
    reference, ours = (m.to("cuda") for m in model_pair("qwen2"))
    assert enable_varlen_attention(ours, backend="masked") == MASKED
    assert_isolated(reference, ours, documents(COMMON["vocab_size"]), 1e-4)
    assert varlen.calls == {"masked": COMMON["num_hidden_layers"]}


@pytest.mark.gpu
@needs_cuda
def test_cuda_trl_packing_trains_through_the_varlen_kernel(tiny_tokenizer, tmp_path):
    """FastSFTTrainer with packing on the GPU (bf16 autocast): attention runs on the varlen kernel."""
    if varlen.varlen_attn is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    trainer, _ = trl_batch(tiny_tokenizer, tmp_path, completion_rows(), use_cpu=False, packing=True, max_length=48)
    assert trainer.args.bf16 or trainer.args.fp16
    assert enable_varlen_attention(trainer.model) == VARLEN
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert varlen.calls["varlen"] > 0 and not varlen.calls["masked"] and not varlen.calls["sdpa"]
