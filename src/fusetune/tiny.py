"""The embedded default model: a tiny Llama config and a character tokenizer.

Both are written to ``src/fusetune/assets/tiny_llama/`` as an ordinary Hugging Face
model folder without weights, so the real loading code reads them. The files
are generated deterministically; ``python -m fusetune.tiny`` writes them again.
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, PreTrainedTokenizerFast

ASSETS = Path(__file__).parent / "assets"
TINY_LLAMA = ASSETS / "tiny_llama"

SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = [chr(i) for i in range(32, 127)] + ["\n"]

# Assistant turns sit inside {% generation %} so TRL's assistant_only_loss can find them.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every printable ASCII character is one token."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """About 2M parameters: 4 layers, hidden 192, grouped-query attention."""
    return LlamaConfig(
        vocab_size=128,  # the 103 tokens, padded to a multiple of 64
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def shrunk(config: dict) -> dict:
    """A shipped architecture's config.json (``assets/archs/NAME``) at toy size, for CPU tests and
    ``scripts/bench.py --tiny``: 2 layers (one of each kind where layers differ: linear and full attention,
    sliding and global, RoPE and none), hidden 128, vocabulary 256, the family's own variants kept (partial
    rotary, rope scaling, q/k norms, softcapping, tied embeddings). A composite config shrinks its text part."""
    if "text_config" in config:
        return {**config, "text_config": shrunk(config["text_config"])}
    small = dict(config)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = 32
    small.update(
        hidden_size=4 * head_dim,  # Phi-3 takes its head size from these two
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4 if kv == heads else (1 if kv == 1 else 2),
        head_dim=head_dim,
        vocab_size=256,
    )
    for key, small_id in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if config.get(key) is not None:
            small[key] = small_id
    if config.get("layer_types"):
        small["layer_types"] = [config["layer_types"][0], config["layer_types"][-1]]
    elif config.get("sliding_window_pattern"):  # Gemma 3: every n-th layer global, the others sliding
        small.pop("sliding_window_pattern")
        small["layer_types"] = ["sliding_attention", "full_attention"]
    if config.get("sliding_window"):
        small["sliding_window"] = min(config["sliding_window"], 16)
    if config.get("no_rope_layers"):  # SmolLM3: 0 marks a layer without RoPE
        small.update(no_rope_layers=[1, 0], no_rope_layer_interval=2)
    for key in ("linear_num_key_heads", "linear_num_value_heads"):  # Qwen3.5's gated delta-net layers
        if key in config:
            small[key] = 2 if key == "linear_num_key_heads" else 4
    for key in ("linear_key_head_dim", "linear_value_head_dim"):
        if key in config:
            small[key] = 16
    rope = small.get("rope_parameters") or small.get("rope_scaling")
    partial = (rope or {}).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    half = int(head_dim * partial) // 2  # rotary frequencies per head
    if rope and "mrope_section" in rope:
        rope = {**rope, "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
    if rope and "long_factor" in rope:  # Phi-3 longrope: one factor per frequency
        rope = {**rope, "long_factor": rope["long_factor"][:half], "short_factor": rope["short_factor"][:half]}
    if rope:
        small["rope_parameters" if "rope_parameters" in small else "rope_scaling"] = rope
    return small


def write_tiny_llama(folder: Path = TINY_LLAMA) -> Path:
    tokenizer = build_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config = build_config(tokenizer).to_dict()
    config.pop("transformers_version", None)  # keep the file stable across versions
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


if __name__ == "__main__":
    print(write_tiny_llama(Path(sys.argv[1]) if len(sys.argv) > 1 else TINY_LLAMA))
