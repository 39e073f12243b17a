"""GGUF export through the ``gguf`` package (llama.cpp's own Python writer): one file that llama.cpp runs.

Families: llama and mistral (llama.cpp's ``llama`` architecture) and qwen2; others are refused by name. Types: ``f16``
(every matrix in f16) and ``q8_0`` (matrices whose rows are a multiple of 32 long in blocks of 32 int8 values with an
f16 scale; other matrices f16). Norms, biases and other 1-D tensors stay f32, as llama.cpp keeps them.

llama.cpp's ``llama`` architecture applies RoPE to interleaved pairs (0,1), (2,3), ... of each head, where Hugging
Face's Llama rotates halves (i, i + head_dim/2). So the rows of each Q and K head are reordered on the way out
(``interleave_rope_rows``): row i of a head's first half goes to 2i, row i of its second half to 2i + 1. qwen2 runs as
rotate-half (NEOX) in llama.cpp and is written as it is.

The tokenizer travels in the file: the HF tokenizer's byte-level BPE as ``gpt2`` (tokens, merges), its SentencePiece BPE
(byte fallback) as ``llama`` (tokens, scores), with token types, bos/eos/pad/unk ids and the chat template.
"""

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from .errors import FusetuneError

log = logging.getLogger(__name__)

QUANTIZATIONS = ("f16", "q8_0")
# model_type -> (the gguf architecture's name, whether Q/K rows are reordered for llama.cpp's interleaved RoPE)
FAMILIES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
BLOCK = 32  # q8_0's block length


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A Q or K projection (heads * head_dim rows), each head's rotate-half rows in llama.cpp's interleaved order."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotate_half_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``interleave_rope_rows``: a GGUF llama Q or K matrix back in Hugging Face's row order."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def check_exportable(model_type: str, quantization: str) -> tuple[str, bool]:
    """(gguf architecture, reorder Q/K) for ``model_type``; one line refusing a family or a type the writer lacks."""
    if quantization not in QUANTIZATIONS:
        raise FusetuneError(
            f"GGUF export: quantization '{quantization}' is not supported (supported: {', '.join(QUANTIZATIONS)}); "
            "for k-quants such as q4_k_m, run llama.cpp's llama-quantize on the f16 file"
        )
    if model_type not in FAMILIES:
        raise FusetuneError(
            f"GGUF export: model type '{model_type}' is not supported (supported: {', '.join(FAMILIES)})"
        )
    return FAMILIES[model_type]


def save_gguf(model, tokenizer, path: str | Path, quantization: str = "q8_0", token: str | None = None) -> Path:
    """Write ``model`` (LoRA adapters merged in, on a copy) and ``tokenizer`` as one GGUF file at ``path``."""
    from peft import PeftModel

    from .merging import merged_copy
    from .modules import base_model, is_quantized

    config = base_model(model).config.get_text_config()
    arch, reorder = check_exportable(config.model_type, quantization)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_quantized(model) and not isinstance(model, PeftModel):
        raise FusetuneError(
            "GGUF export: the model's weights are quantized (bitsandbytes) and it has no adapters to "
            "merge into a 16-bit reload; export the 16-bit model it was loaded from"
        )
    source = merged_copy(model, token=token) if isinstance(model, PeftModel) else model
    _write(source.state_dict(), config, tokenizer, path, arch, reorder, quantization)
    return path


def _write(state: dict, config, tokenizer, path: Path, arch: str, reorder: bool, quantization: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)  # tensors wait on disk, not in memory
    _add_model_metadata(writer, config, quantization)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the embedding as the head when there is no output tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FusetuneError(f"GGUF export: tensor {hf_name} has no GGUF name in architecture {arch}")
        tensor = tensor.detach().float().cpu()
        projection = hf_name.rsplit(".", 2)[-2]
        if reorder and tensor.ndim == 2 and projection in heads:
            tensor = interleave_rope_rows(tensor, heads[projection])
        _add_tensor(writer, name, tensor.numpy(), quantization)
    if (freq_factors := _rope_freq_factors(config)) is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freq_factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tensor(writer, name: str, array: np.ndarray, quantization: str) -> None:
    import gguf

    if array.ndim == 1:
        writer.add_tensor(name, array.astype(np.float32))
    elif quantization == "q8_0" and array.shape[-1] % BLOCK == 0:
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(array, q8_0), raw_dtype=q8_0)
    else:
        writer.add_tensor(name, array.astype(np.float16))


def _rope(config) -> tuple[float, dict]:
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), parameters


def _rope_freq_factors(config) -> np.ndarray | None:
    """llama3 RoPE scaling as llama.cpp reads it: per frequency, the default inverse frequency over the scaled one."""
    theta, parameters = _rope(config)
    if parameters.get("rope_type", "default") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = _head_dim(config)
    default = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (default / scaled.double()).float().numpy()


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_model_metadata(writer, config, quantization: str) -> None:
    import gguf

    theta, parameters = _rope(config)
    rope_type = parameters.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise FusetuneError(
            f"GGUF export: rope_type '{rope_type}' is not supported (supported: default, linear, llama3)"
        )
    writer.add_name(getattr(config, "_name_or_path", "") or config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = _head_dim(config)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(parameters["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantization]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _add_tokenizer(writer, tokenizer, rows: int) -> None:
    """The vocabulary padded to the embedding's ``rows`` (unused ``[PADn]`` entries), as llama.cpp needs one per row."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FusetuneError(f"GGUF export: {type(tokenizer).__name__} is not a fast (tokenizer.json) tokenizer")
    model = json.loads(backend.to_str())["model"]
    if model["type"] != "BPE":
        raise FusetuneError(f"GGUF export: tokenizer model '{model['type']}' is not supported (supported: BPE)")
    sentencepiece = bool(model.get("byte_fallback"))
    vocab = tokenizer.get_vocab()
    if len(vocab) > rows or max(vocab.values()) >= rows:
        raise FusetuneError(f"GGUF export: the tokenizer has ids beyond the model's {rows} embedding rows")
    by_id = {i: piece for piece, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        piece = by_id.get(i)
        tokens.append(piece if piece is not None else f"[PAD{i}]")
        if piece is None:
            types.append(gguf.TokenType.UNUSED)
        elif i == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and BYTE_TOKEN.fullmatch(piece):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if sentencepiece:  # SentencePiece BPE numbers its pieces by score: higher id, later merge
        writer.add_token_scores([-float(i) if t == gguf.TokenType.NORMAL else 0.0 for i, t in enumerate(types)])
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for name in ("bos", "eos", "unk", "pad"):
        if (i := getattr(tokenizer, f"{name}_token_id")) is not None:
            getattr(writer, f"add_{name}_token_id")(i)
    ids = tokenizer("a").input_ids  # whether the tokenizer adds bos / eos itself
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(ids) and ids[-1] == tokenizer.eos_token_id)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
