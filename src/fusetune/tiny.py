"""The embedded default model: a tiny Llama config and a character tokenizer.

Both are written to ``src/fusetune/assets/tiny_llama/`` as an ordinary Hugging Face
model folder without weights, so the real loading code reads them. The files
are generated deterministically; ``python -m fusetune.tiny`` writes them again.
"""

import argparse
import json
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
    ``scripts/bench.py --tiny``: ``families.shrink_values``, the self-check's small sizes (one layer of each
    kind, the family's own variants kept), but with routing as sparse as training's (two of four experts)."""
    from .families import shrink_values

    return shrink_values(config, every_expert=False)


def write_tiny_llama(folder: Path = TINY_LLAMA) -> Path:
    tokenizer = build_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config = build_config(tokenizer).to_dict()
    config.pop("transformers_version", None)  # keep the file stable across versions
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fusetune.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=TINY_LLAMA, help=f"where (default: {TINY_LLAMA})")
    print(write_tiny_llama(parser.parse_args().folder))
