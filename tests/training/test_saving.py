"""Saving a trained tiny Llama: the GGUF file read back tensor by tensor, Unsloth's save_pretrained_merged (three
save_methods, each reloaded), push_to_hub_merged against a local fake of the hub's HTTP endpoints, and refusals."""

import base64
import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from fusetune import FastModel
from fusetune.errors import FusetuneError

LAYER_TENSORS = {  # GGUF name in block i -> Hugging Face name in layer i (written out here, not taken from gguf)
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",  # qwen2
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama with LoRA on every projection, its adapters and base weights random (as if trained)."""
    torch.manual_seed(0)
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)  # norms that are not all ones
    return model, tokenizer


def reference_merge(model) -> dict[str, torch.Tensor]:
    """W + scaling * B @ A for every LoRA layer, the other weights as they are: Hugging Face names, float32."""
    merged = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            merged[f"{name}.weight"] = module.base_layer.weight + module.scaling["default"] * delta
    for name, p in model.base_model.model.named_parameters():
        if "lora_" not in name and "base_layer" not in name:
            merged[name] = p
    return {k: v.detach().float().clone() for k, v in merged.items()}


def hf_name(gguf_name: str) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if gguf_name in fixed or gguf_name == "output.weight":
        return fixed.get(gguf_name, "lm_head.weight")
    _, block, rest = gguf_name.split(".", 2)
    return f"model.layers.{block}.{LAYER_TENSORS[rest]}"


def hf_rows(rows: int, heads: int) -> torch.Tensor:
    """For each row of a GGUF llama Q/K matrix, the Hugging Face row it holds: a head's even rows are its first
    half, its odd rows its second half (llama.cpp rotates pairs (2i, 2i+1); Hugging Face rotates (i, i + d/2))."""
    d = rows // heads
    j = torch.arange(d)
    within = torch.where(j % 2 == 0, j // 2, j // 2 + d // 2)
    return (torch.arange(heads)[:, None] * d + within).reshape(-1)


def field(reader, key):
    value = reader.fields[key].contents()
    return value


def test_the_interleaved_rows_give_llama_cpp_the_rope_that_hugging_face_computes():
    """The fact the reordering rests on: interleaved RoPE on the reordered Q equals rotate-half RoPE on HF's Q."""
    from fusetune.gguf_export import interleave_rope_rows

    heads, d, hidden, pos = 3, 8, 12, 5
    w, x = torch.randn(heads * d, hidden), torch.randn(hidden)
    angle = pos * 10000.0 ** (-torch.arange(0, d, 2) / d)
    cos, sin = angle.cos(), angle.sin()
    q = (w @ x).view(heads, d)  # Hugging Face: pairs (i, i + d/2)
    a, b = q[:, : d // 2], q[:, d // 2 :]
    hf = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=1)
    p = (interleave_rope_rows(w, heads) @ x).view(heads, d // 2, 2)  # llama.cpp: pairs (2i, 2i + 1)
    cpp = torch.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 1] * cos + p[..., 0] * sin], dim=-1)
    torch.testing.assert_close(cpp.reshape(-1)[hf_rows(heads * d, heads).argsort()], hf.reshape(-1))


@pytest.mark.parametrize("quantization, asked", [("f16", "f16"), ("q8_0", "fast_quantized")])  # Unsloth's name too
def test_gguf_reads_back_as_the_merged_model(trained, quantization, asked, tmp_path):
    model, tokenizer = trained
    reference = reference_merge(model)
    live = copy.deepcopy(model.state_dict())
    path = model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method=asked)
    assert path == str(tmp_path / f"model-{quantization}.gguf")
    for name, value in model.state_dict().items():  # the user's model is not merged in place
        assert torch.equal(value, live[name]), name

    reader = gguf.GGUFReader(path)
    config = model.config
    expected = {
        "general.architecture": "llama",
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": 192,
        "llama.block_count": 4,
        "llama.feed_forward_length": 512,
        "llama.attention.head_count": 6,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 32,
        "llama.vocab_size": 128,
        "general.file_type": {"f16": 1, "q8_0": 7}[quantization],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id,
        "tokenizer.ggml.unknown_token_id": tokenizer.unk_token_id,
        "tokenizer.chat_template": tokenizer.chat_template,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)

    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    n = len(tokenizer)
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(n))) + [f"[PAD{i}]" for i in range(n, 128)]
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>",)}
    for i, kind in enumerate(types):
        want = "UNUSED" if i >= n else "UNKNOWN" if i == tokenizer.unk_token_id else "CONTROL" if i in special else None
        assert kind == gguf.TokenType[want] if want else kind in (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL), i
    assert sum(t == gguf.TokenType.NORMAL for t in types) == len(tokenizer.get_vocab()) - 7  # seven special tokens

    assert_tensors_match(reader, reference, quantization, heads={"q_proj": 6, "k_proj": 2})


def assert_tensors_match(reader, reference: dict, quantization: str, heads: dict) -> None:
    """Every tensor of the file, dequantized (Q/K rows back in Hugging Face's order where ``heads`` names them),
    against ``reference``: f32 vectors exactly, f16 matrices to f16 rounding, q8_0 within its error."""
    seen = set()
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        seen.add(name)
        want = reference[name]
        got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(want.shape)
        if name.split(".")[-2] in heads and want.ndim == 2:
            got = got[hf_rows(want.shape[0], heads[name.split(".")[-2]]).argsort()]  # back to Hugging Face's order
        if want.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(got, want), name
        elif quantization == "f16":
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16, name
            torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
            blocks, got_blocks = want.reshape(-1, 32), got.reshape(-1, 32)
            bound = blocks.abs().amax(dim=1, keepdim=True) / 127  # half a step, plus the f16 scale's rounding
            assert ((got_blocks - blocks).abs() <= bound).all(), name
            assert (got_blocks - blocks).abs().max() > 0, name  # really quantized
    assert seen == set(reference)


def sentencepiece_bpe():
    """A SentencePiece-style BPE tokenizer: byte-fallback pieces <0x00>..<0xFF>, then pieces in merge order."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581", "a", "b", "\u2581a", "ab"]
    merges = [("\u2581", "a"), ("a", "b")]
    backend = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip


@pytest.mark.parametrize("family", ["mistral", "qwen2", "llama3-rope"])
def test_other_families_read_back(family, tiny_tokenizer, tmp_path):
    """mistral: llama.cpp's llama architecture; qwen2: its own, Q/K rows as they are, q/k/v biases, a tied head;
    a llama with llama3 RoPE scaling: the frequency factors as a rope_freqs tensor."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    build = {
        "mistral": lambda: MistralForCausalLM(MistralConfig(**{**SMALL, "vocab_size": 320})),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)),
        "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters=LLAMA3_ROPE)),
    }
    model = build[family]()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    tokenizer = sentencepiece_bpe() if family == "mistral" else tiny_tokenizer
    path = FastModel.save_gguf(model, tokenizer, str(tmp_path / "m.gguf"), quantization_method="f16")
    reader = gguf.GGUFReader(path)
    if family == "mistral":  # SentencePiece BPE (byte fallback), as Llama 2 and Mistral ship it
        assert field(reader, "tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in reader.fields
        types, scores = field(reader, "tokenizer.ggml.token_type"), field(reader, "tokenizer.ggml.scores")
        assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, 6]  # 6: BYTE
        assert types[3:259] == [gguf.TokenType.BYTE] * 256 and types[259:264] == [gguf.TokenType.NORMAL] * 5
        assert types[264:] == [gguf.TokenType.UNUSED] * (320 - 264)  # padded to the embedding's rows
        assert scores[259:264] == [-259.0, -260.0, -261.0, -262.0, -263.0]  # the earlier piece merges first
        assert field(reader, "tokenizer.ggml.add_bos_token") is True
    arch = "qwen2" if family == "qwen2" else "llama"
    assert field(reader, "general.architecture") == arch and field(reader, f"{arch}.attention.head_count_kv") == 2
    reference = {k: v.detach().float() for k, v in model.state_dict().items()}
    if family == "qwen2":
        del reference["lm_head.weight"]  # tied: llama.cpp reads token_embd as the head
        assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= set(reference)
    if family == "llama3-rope":
        factors = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
        assert len(factors) == 1
        # Llama 3.1's rule: wavelengths under 64/4 keep their frequency, those over 64/1 are slowed 8 times, and
        # between the two the slow-down blends smoothly: 1 / ((1 - s) / 8 + s), s = (64 / wavelength - 1) / (4 - 1)
        wavelength = 2 * np.pi * 500000.0 ** (np.arange(0, 16, 2) / 16)
        s = np.clip((64 / wavelength - 1) / 3, 0, 1)
        np.testing.assert_allclose(factors[0].data, 1 / ((1 - s) / 8 + s), rtol=1e-5)
        assert factors[0].data[0] == 1 and factors[0].data[-1] == pytest.approx(8)  # both regimes are present
        reader.tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    heads = {} if family == "qwen2" else {"q_proj": 4, "k_proj": 2}
    assert_tensors_match(reader, reference, "f16", heads)


def test_unsupported_families_and_types_are_refused_by_name(trained, tmp_path):
    model, tokenizer = trained
    with pytest.raises(FusetuneError, match=r"^GGUF export: quantization 'q4_k_m' is not supported \(supported: f16, "):
        model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method="q4_k_m")
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    with pytest.raises(FusetuneError) as refused:
        FastModel.save_gguf(Gemma3ForCausalLM(config), tokenizer, str(tmp_path / "g.gguf"))
    line = "GGUF export: model type 'gemma3_text' is not supported (supported: llama, mistral, qwen2)"
    assert str(refused.value) == line
    assert not list(tmp_path.iterdir())


def test_save_pretrained_merged_writes_what_each_save_method_names(trained, tmp_path):
    from peft import PeftModel

    model, tokenizer = trained
    reference = reference_merge(model)
    ids = torch.randint(7, 103, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=ids).logits

    merged = model.save_pretrained_merged(str(tmp_path / "merged"), tokenizer, save_method="merged_16bit")
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert plain.dtype == torch.bfloat16 and AutoTokenizer.from_pretrained(merged).get_vocab() == tokenizer.get_vocab()
    weights = {k: v.float() for k, v in plain.state_dict().items()}
    assert set(weights) == set(reference)
    for name, want in reference.items():
        torch.testing.assert_close(weights[name], want.bfloat16().float(), rtol=0, atol=0, msg=name)

    lora = tmp_path / "lora"
    assert model.save_pretrained_merged(str(lora), tokenizer, save_method="lora") == str(lora)
    assert (lora / "adapter_config.json").is_file() and (lora / "tokenizer.json").is_file()
    base = AutoModelForCausalLM.from_config(model.config)  # the live model's base weights, then the saved adapter
    base_weights = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v
        for k, v in model.state_dict().items()
        if "lora_" not in k
    }
    base.load_state_dict(base_weights)
    reloaded = PeftModel.from_pretrained(base, lora).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits)

    with pytest.raises(FusetuneError) as refused:
        model.save_pretrained_merged(str(tmp_path / "x"), tokenizer, save_method="merged_8bit")
    assert str(refused.value) == "save_method: expected one of merged_16bit, merged_4bit, lora, got 'merged_8bit'"
    if not torch.cuda.is_available():
        with pytest.raises(FusetuneError, match=r"^save_method='merged_4bit' re-quantizes with bitsandbytes, which"):
            model.save_pretrained_merged(str(tmp_path / "x"), tokenizer, save_method="merged_4bit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit needs CUDA")
def test_merged_4bit_is_the_merge_requantized_to_nf4(trained, tmp_path):
    import bitsandbytes as bnb

    model, tokenizer = trained
    merged = model.save_pretrained_merged(str(tmp_path / "m4"), tokenizer, save_method="merged_4bit")
    four_bit = AutoModelForCausalLM.from_pretrained(merged, device_map={"": 0})
    assert isinstance(four_bit.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    ids = torch.randint(7, 103, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids.to(model.device)).logits.float().cpu()
        got = four_bit(input_ids=ids.cuda()).logits.float().cpu()
    assert ((got - want).norm() / want.norm()).item() < 0.2  # nf4: about 1.5 significant digits per weight


class FakeHub(BaseHTTPRequestHandler):
    """The hub's endpoints that create_repo and upload_folder call: every file uploaded inline ("regular")."""

    repos: dict = {}
    requests: list = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append((self.path, self.headers.get("Authorization")))
        host = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            self.repos[repo] = {"visibility": request.get("visibility"), "files": {}}
            return self._reply({"url": f"{host}/{repo}", "name": repo, "id": repo})
        prefix, _, rest = self.path.removeprefix("/api/models/").rpartition("/")
        repo, _, endpoint = prefix.rpartition("/")
        if endpoint == "preupload":
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})  # fmt: skip
        if endpoint == "commit":
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.repos[repo]["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply({"commitUrl": f"{host}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_push_to_hub_merged_uploads_the_merged_folder(trained, tmp_path, monkeypatch):
    from huggingface_hub import constants

    model, tokenizer = trained
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        url = model.push_to_hub_merged(
            "me/tiny-merged", tokenizer, save_method="merged_16bit", token="hf_x", private=True
        )
    finally:
        server.shutdown()
    assert url == f"{endpoint}/me/tiny-merged/commit/{'1' * 40}"
    repo = FakeHub.repos["me/tiny-merged"]
    assert repo["visibility"] == "private" and {auth for _, auth in FakeHub.requests} == {"Bearer hf_x"}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(repo["files"])
    (tmp_path / "model.safetensors").write_bytes(repo["files"]["model.safetensors"])
    uploaded = load_file(tmp_path / "model.safetensors")
    for name, want in reference_merge(model).items():
        if name != "lm_head.weight" or name in uploaded:
            assert torch.equal(uploaded[name].float(), want.bfloat16().float()), name
    assert np.isclose(json.loads(repo["files"]["config.json"])["hidden_size"], 192)
