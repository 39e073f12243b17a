"""The model folders the scenarios load: random weights from a shipped config (or the NF4 folder saved from
them), with a tokenizer of the config's vocabulary (Unsloth needs a local folder with one). The parent decides
what to build (prepare_folder) and a job subprocess builds it (prepare), once per scratch folder."""

import json
import shutil
import time
from pathlib import Path

from .runner import log
from .shapes import arch_folder, scenario_config
from .variants import bnb_config

FORMAT = 1  # bump when a prepared scratch folder must be rebuilt


def prepare_folder(runner, sc: dict, gpu: dict, args) -> tuple[Path | None, str, dict]:
    """The model folder a scenario loads (building it, or the bf16 one it derives from, if missing)."""
    arch = sc["arch"] + ("-tiny" if sc.get("shrink") else f"-{sc['layers']}l" if sc.get("layers") else "")
    want_nf4 = sc.get("quant") == "nf4" and args.qlora_source == "nf4"
    setup = {}
    plan = [("bf16", arch, None)] + ([("nf4", f"{arch}-nf4", "nf4")] if want_nf4 else [])
    specs = [
        {
            "format": FORMAT,
            "arch": sc["arch"],
            "shrink": sc.get("shrink"),
            "layers": sc.get("layers"),
            "seed": args.seed,
            "cuda": gpu["cuda"],
            "quant": quant,
            "folder": str(runner.scratch / name),
            "source": str(runner.scratch / arch),
            "config": scenario_config(sc),
            "arch_folder": str(arch_folder(sc["arch"])),
        }
        for _, name, quant in plan
    ]

    def ready(spec: dict) -> dict | None:
        found = Path(spec["folder"]) / "bench_source.json"
        stored = json.loads(found.read_text()) if found.exists() else {}
        return stored if stored and all(stored.get(k) == v for k, v in marker(spec).items()) else None

    if want_nf4 and ready(specs[-1]):  # the bf16 folder it came from is not needed again
        plan, specs = plan[-1:], specs[-1:]
    folder = None
    for (kind, name, _), spec in zip(plan, specs, strict=True):
        folder = Path(spec["folder"])
        stored = ready(spec)
        if stored:
            setup[kind] = {"reused": True, **stored.get("info", {})}
            continue
        log(f"preparing {folder} ...")
        info = runner.call("prepare", spec, f"prepare-{name}", timeout=args.timeout)
        if info.get("status") == "failed" or info.get("status") == "skipped":
            return None, kind, {kind: info}
        setup[kind] = {"reused": False, **info}
        log(f"  {name}: {json.dumps({k: round(v, 1) for k, v in info.items() if isinstance(v, float)})}")
    source = "nf4" if want_nf4 else "bf16"
    return folder, source, setup


def prepare(spec: dict) -> dict:
    """Write a model folder: random bf16 weights from a shipped config (or, with ``source``, the NF4 one)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec["folder"])
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    info = {}
    cuda = spec["cuda"]
    dtype = torch.bfloat16 if cuda else torch.float32
    start = time.perf_counter()
    if spec.get("quant") == "nf4":  # quantize the bf16 folder on load, then save the 4-bit weights
        model = AutoModelForCausalLM.from_pretrained(
            spec["source"], dtype=dtype, device_map={"": 0}, quantization_config=bnb_config(torch, dtype)
        )
        torch.cuda.synchronize()
        info["quantize_on_load_s"] = time.perf_counter() - start
        mid = time.perf_counter()
        model.save_pretrained(tmp, safe_serialization=True)
        info["save_s"] = time.perf_counter() - mid
        AutoTokenizer.from_pretrained(spec["source"]).save_pretrained(tmp)
    else:
        cfg = spec["config"]  # the parent's arch_config: a multimodal arch's language model
        config = AutoConfig.for_model(**cfg)
        torch.manual_seed(spec["seed"])
        with torch.device("cuda" if cuda else "cpu"):  # initialise the random weights on the GPU: fast
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if cuda:
            torch.cuda.synchronize()
        info["build_s"] = time.perf_counter() - start
        mid = time.perf_counter()
        model.save_pretrained(tmp, safe_serialization=True)
        info["save_s"] = time.perf_counter() - mid
        if spec["arch"] == "tiny":
            AutoTokenizer.from_pretrained(spec["arch_folder"]).save_pretrained(tmp)
        elif cfg.get("model_type") == "llama":
            write_llama3_tokenizer(tmp, cfg)
        else:
            write_word_tokenizer(tmp, cfg)
    info["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    info["total_s"] = time.perf_counter() - start
    (tmp / "bench_source.json").write_text(json.dumps({**marker(spec), "info": info}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return info


def marker(spec: dict) -> dict:
    return {k: spec.get(k) for k in ("format", "arch", "seed", "cuda", "quant", "shrink", "layers")}


def write_llama3_tokenizer(folder: Path, cfg: dict) -> None:
    """A word-level tokenizer with exactly the config's vocabulary and Llama 3's special ids (no real text)."""
    vocab_size, first_special = cfg["vocab_size"], 128000
    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, first_special)}}
    specials = {first_special + i: f"<|reserved_special_token_{i}|>" for i in range(vocab_size - first_special)}
    specials.update(
        {
            128000: "<|begin_of_text|>",
            128001: "<|end_of_text|>",
            128004: "<|finetune_right_pad_id|>",
            128009: "<|eot_id|>",
        }
    )
    vocab.update({token: i for i, token in specials.items()})
    roles = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|finetune_right_pad_id|>"}
    save_word_level(folder, cfg, vocab, list(specials.values()), roles, unk="<unk>")


def write_word_tokenizer(folder: Path, cfg: dict) -> None:
    """A word-level tokenizer with exactly the config's vocabulary, its bos/eos/pad at the config's ids."""
    names, roles = {}, {}
    for role in ("bos", "eos", "pad"):
        token_id = cfg.get(f"{role}_token_id")
        token_id = token_id[0] if isinstance(token_id, list) else token_id
        if token_id is not None and token_id < cfg["vocab_size"]:
            roles[role] = names.setdefault(token_id, f"<{role}>")  # roles that share an id share its token
    vocab = {names.get(i, f"t{i}"): i for i in range(cfg["vocab_size"])}
    save_word_level(folder, cfg, vocab, list(names.values()), roles, unk=roles.get("eos", "t0"))


def save_word_level(folder: Path, cfg: dict, vocab: dict, specials: list[str], roles: dict, unk: str) -> None:
    """Save a whitespace-split word-level tokenizer of ``vocab``: ``specials`` special, ``roles`` (bos, eos,
    pad) naming their tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **{f"{role}_token": token for role, token in roles.items()},
        unk_token=unk,
        model_max_length=cfg.get("max_position_embeddings", 131072),
    )
    fast.save_pretrained(folder)
