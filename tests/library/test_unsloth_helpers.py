"""The helpers of Unsloth's notebooks under fusetune.compat.unsloth: get_chat_template, standardize_sharegpt,
train_on_responses_only, and for_inference followed by streamed generation."""

import contextlib
import io
import random

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TextStreamer

from fusetune.compat.unsloth import (
    FastLanguageModel,
    UnslothTrainer,
    UnslothTrainingArguments,
    get_chat_template,
    standardize_sharegpt,
    train_on_responses_only,
)
from fusetune.data.responses import Marker, response_mask
from fusetune.data.template_names import NAMED, template_text
from fusetune.errors import FusetuneError
from fusetune.loading import load_tokenizer
from fusetune.patching import is_applied, remove_kernels

LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
OTHER_TOKENS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]  # phi-3's are the tiny one's own
USER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
SHAREGPT_MAPPING = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}


def tokenizer_with(*tokens):
    """The tiny character tokenizer (103 ids; the tiny model embeds 128) with the given special tokens."""
    tokenizer = load_tokenizer("fusetune:tiny_llama")
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    return tokenizer


def words(rng, n=3):
    return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 5))) for _ in range(n))


def chats(count, rng):
    """Two-turn chats of fresh random words."""
    return [
        [
            {"role": "user", "content": words(rng)},
            {"role": "assistant", "content": words(rng)},
            {"role": "user", "content": words(rng)},
            {"role": "assistant", "content": words(rng)},
        ]
        for _ in range(count)
    ]


@pytest.fixture(autouse=True)
def unpatch_kernels():
    yield
    remove_kernels()


# get_chat_template


@pytest.mark.parametrize("name", sorted(NAMED))
def test_every_known_name_installs_a_real_template_that_renders(name):
    tokenizer = tokenizer_with(*LLAMA3_TOKENS, *OTHER_TOKENS)
    named = NAMED[name]
    assert get_chat_template(tokenizer, chat_template=name) is tokenizer
    assert tokenizer.chat_template == template_text(named)
    assert tokenizer.eos_token == (named.stop or "<|end|>")  # the end of a turn; mistral keeps the tokenizer's
    text = tokenizer.apply_chat_template(chats(1, random.Random(name))[0], tokenize=False)
    assert text.count(named.stop or tokenizer.eos_token) >= 2


def test_llama_31_is_the_models_own_template_and_ends_answers_with_eot():
    tokenizer = tokenizer_with(*LLAMA3_TOKENS)
    get_chat_template(tokenizer, "llama-3.1")
    chat = chats(1, random.Random(1))[0]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert "Cutting Knowledge Date" in text  # Llama 3.1's system header, as its own template writes it
    assert text.endswith(ASSISTANT + chat[3]["content"] + "<|eot_id|>")
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    kept = tokenizer_with(*LLAMA3_TOKENS)
    get_chat_template(kept, "llama-3.1", map_eos_token=False)
    assert kept.eos_token == "<|end|>"


def test_a_mapping_reads_sharegpt_turns_as_they_are():
    chat = chats(1, random.Random(2))[0]
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in chat]
    plain, mapped = tokenizer_with(*LLAMA3_TOKENS), tokenizer_with(*LLAMA3_TOKENS)
    get_chat_template(plain, "llama-3")
    get_chat_template(mapped, "llama-3", mapping=SHAREGPT_MAPPING)
    expected = plain.apply_chat_template(chat, tokenize=False)
    assert mapped.apply_chat_template(sharegpt, tokenize=False) == expected
    assert mapped.apply_chat_template(chat, tokenize=False) == expected  # role/content still reads


def test_unknown_names_and_missing_tokens_are_refused_in_one_line():
    with pytest.raises(FusetuneError, match=r"no template named 'vicuna'; known: llama-3, .*llama-3\.1, .*chatml"):
        get_chat_template(tokenizer_with(), "vicuna")
    missing = r"get_chat_template\('qwen-2.5'\): the tokenizer has no tokens <\|im_start\|>, <\|im_end\|>, so "
    with pytest.raises(FusetuneError, match=missing + r".* or pass \(jinja_text, stop_token\)$"):
        get_chat_template(tokenizer_with(), "qwen-2.5")
    with pytest.raises(FusetuneError, match="mapping takes string values for the keys role, content"):
        get_chat_template(tokenizer_with(*LLAMA3_TOKENS), "llama-3", mapping={"speaker": "from"})


def test_a_custom_template_and_its_stop_token():
    tokenizer = tokenizer_with()
    custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
    get_chat_template(tokenizer, (custom, "<|user|>"))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "user: hi<|end|>"
    assert tokenizer.eos_token == "<|user|>"  # the stop token given (an odd one: the test sees it moved)
    get_chat_template(tokenizer, (custom, "eos_token"))
    assert tokenizer.eos_token == "<|user|>"  # "eos_token": the tokenizer's own, left as it is
    with pytest.raises(FusetuneError, match=r"a custom template\): the tokenizer has no token <\|im_end\|>"):
        get_chat_template(tokenizer, (custom, "<|im_end|>"))


# standardize_sharegpt


def test_standardize_sharegpt_maps_roles_and_keeps_other_columns():
    rng = random.Random(3)
    said = [words(rng) for _ in range(5)]
    turns = [("system", said[0]), ("human", said[1]), ("gpt", said[2])]
    rows = [
        {"conversations": [{"from": f, "value": v} for f, v in turns], "id": 7},
        {"conversations": [{"role": "user", "content": said[3]}, {"role": "assistant", "content": said[4]}], "id": 8},
    ]
    out = standardize_sharegpt(Dataset.from_list(rows))
    assert out.column_names == ["conversations", "id"] and out["id"] == [7, 8]
    assert out[0]["conversations"] == [
        {"role": "system", "content": said[0]},
        {"role": "user", "content": said[1]},
        {"role": "assistant", "content": said[2]},
    ]
    assert out[1]["conversations"] == rows[1]["conversations"]
    alone = standardize_sharegpt(Dataset.from_list([{"conversations": rows[0]["conversations"]}] * 3))
    assert alone.column_names == ["conversations"] and alone["conversations"] == [out[0]["conversations"]] * 3


def test_standardize_sharegpt_names_the_bad_record():
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    bad = {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}
    with pytest.raises(FusetuneError, match=r"^standardize_sharegpt: record 2: message 2 has from 'bot', not one"):
        standardize_sharegpt(Dataset.from_list([good, good, bad]))
    with pytest.raises(FusetuneError, match=r"no 'conversations' column \(it has \['messages'\]\)"):
        standardize_sharegpt(Dataset.from_list([{"messages": good["conversations"]}]))


# train_on_responses_only


@pytest.fixture(scope="module")
def llama31():
    """The tiny model from FastModel (kernels patched) and a tokenizer with Llama 3's turn tokens and template."""
    torch.manual_seed(0)
    model, _ = FastLanguageModel.from_pretrained("fusetune:tiny_llama", max_seq_length=256, random_init=True)
    tokenizer = get_chat_template(tokenizer_with(*LLAMA3_TOKENS), "llama-3.1")
    yield model, tokenizer
    remove_kernels()


def trainer_on(model, tokenizer, records, tmp_path, **args):
    config = UnslothTrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True, **args
    )
    dataset = Dataset.from_list(records)
    return UnslothTrainer(
        model=model, args=config, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer
    )


def expected_mask(tokenizer, chat) -> tuple[list[int], list[bool]]:
    """The rendered chat's tokens piece by piece (one token per character or marker), each answer and its
    <|eot_id|> marked."""
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    ids, mask = [], []
    for n, piece in enumerate(text.split(ASSISTANT)):
        answer = piece.index("<|eot_id|>") + len("<|eot_id|>") if n else 0
        for part, trained in ((piece[:answer], True), (piece[answer:], False)):
            part_ids = tokenizer.encode(part, add_special_tokens=False)
            ids, mask = ids + part_ids, mask + [trained] * len(part_ids)
        if n < text.count(ASSISTANT):
            marker = tokenizer.encode(ASSISTANT, add_special_tokens=False)
            ids, mask = ids + marker, mask + [False] * len(marker)
    return ids, mask


def test_responses_only_trains_exactly_the_assistant_turns(llama31, tmp_path):
    model, tokenizer = llama31
    rng = random.Random(torch.randint(1 << 30, ()).item())
    records = [{"messages": chat} for chat in chats(4, rng)]
    trainer = trainer_on(model, tokenizer, records, tmp_path)
    assert train_on_responses_only(trainer) is trainer
    for dataset in (trainer.train_dataset, trainer.eval_dataset):
        for record, row in zip(records, dataset, strict=True):
            ids, mask = expected_mask(tokenizer, record["messages"])
            assert row["input_ids"] == ids
            assert [label != -100 for label in row["labels"]] == mask
            assert all(label == token for label, token, keep in zip(row["labels"], ids, mask, strict=True) if keep)
    trained = tokenizer.decode([t for t, keep in zip(ids, mask, strict=True) if keep])
    answers = record["messages"][1]["content"], record["messages"][3]["content"]
    assert trained == "".join(f"{answer}<|eot_id|>" for answer in answers)

    # the loss the trainer computes (fusetune's fused loss head) is the mean over those tokens only
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert trainer._uses_fused_loss(trainer.model)
    loss = trainer.compute_loss(trainer.model, batch)
    ids, mask = expected_mask(tokenizer, records[0]["messages"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    targets = torch.tensor([t if keep else -100 for t, keep in zip(ids, mask, strict=True)])
    expected = F.cross_entropy(logits[:-1], targets[1:], ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    everything = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    assert abs(everything.item() - expected.item()) > 1e-3  # the choice of tokens shows in the loss
    assert trainer.train().global_step == 1


def test_a_record_without_a_marker_is_refused_by_index(llama31, tmp_path):
    model, tokenizer = llama31
    rng = random.Random(5)
    records = [{"messages": chat} for chat in chats(3, rng)]
    records[2]["messages"] = records[2]["messages"][:1]  # a user turn alone: no assistant header
    records[2]["messages"].append({"role": "system", "content": "x"})
    trainer = trainer_on(model, tokenizer, records, tmp_path)
    with pytest.raises(FusetuneError, match=r"^train_on_responses_only: train record 2: no response_part '<\|start_"):
        train_on_responses_only(trainer)
    with pytest.raises(FusetuneError, match=r"train record 0: no instruction_part '### Instruction:\\n'"):
        train_on_responses_only(trainer, instruction_part="### Instruction:\n")


def test_no_response_tokens_anywhere_is_refused(llama31, tmp_path):
    model, tokenizer = llama31
    trainer = trainer_on(model, tokenizer, [{"messages": c} for c in chats(2, random.Random(6))], tmp_path)
    before = trainer.train_dataset
    # every answer's tokens run from <|eot_id|> to the next header, which opens an instruction: none
    with pytest.raises(FusetuneError, match="no response tokens are left in the train dataset .* train on nothing"):
        train_on_responses_only(trainer, instruction_part="<|start_header_id|>", response_part="<|eot_id|>")
    assert trainer.train_dataset is before


def test_a_marker_merged_with_its_neighbour_is_still_found():
    tokenizer = tokenizer_with(*LLAMA3_TOKENS)
    tokenizer.add_tokens(["\n\n", "\n\n\n"])  # an answer that opens with a newline merges with the marker's end

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    def marker(text):
        return Marker(text, tuple(tokenizer.encode(text, add_special_tokens=False)))

    text = f"{USER}hi<|eot_id|>{ASSISTANT}\nyo<|eot_id|>{USER}more<|eot_id|>{ASSISTANT}sure<|eot_id|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("\n\n\n") in ids  # the first answer's marker merged
    mask = response_mask(ids, marker(USER), marker(ASSISTANT), decode)
    trained = [tokenizer.decode([t]) for t, keep in zip(ids, mask, strict=True) if keep]
    assert "".join(trained) == "\n\n\nyo<|eot_id|>sure<|eot_id|>"  # the merged token holds the answer's newline
    assert trained[0] == "\n\n\n"
    # packed: two documents in a row; the second one's opening is not the first one's answer
    doc = tokenizer.encode(f"<s>sys<|eot_id|>{USER}a<|eot_id|>{ASSISTANT}b<|eot_id|>", add_special_tokens=False)
    mask = response_mask(doc + doc, marker(USER), marker(ASSISTANT), decode, [0, len(doc), 2 * len(doc)])
    assert "".join(tokenizer.decode([t]) for t, keep in zip(doc + doc, mask, strict=True) if keep) == "b<|eot_id|>" * 2


# for_inference and streamed generation


def test_for_inference_streams_the_greedy_answer_and_for_training_returns(tmp_path):
    torch.manual_seed(torch.randint(1 << 30, ()).item())
    model, tokenizer = FastLanguageModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    assert is_applied(model)
    assert FastLanguageModel.for_inference(model) is model
    assert not any(module.training for module in model.modules())
    prompt = tokenizer(words(random.Random(7)), return_tensors="pt")
    # text only: no special tokens, no ids past the tokenizer's (the model embeds 128)
    suppress = [*tokenizer.all_special_ids, *range(len(tokenizer), model.config.vocab_size)]
    greedy = {"max_new_tokens": 16, "do_sample": False, "suppress_tokens": suppress}
    plain = model.generate(**prompt, **greedy, return_dict_in_generate=True)
    assert plain.past_key_values is not None  # the KV cache was used
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        streamed = model.generate(**prompt, **greedy, streamer=TextStreamer(tokenizer, skip_prompt=True))
    answer = tokenizer.decode(plain.sequences[0, prompt.input_ids.shape[1] :])
    assert torch.equal(streamed, plain.sequences)
    assert len(answer) == 16 and printed.getvalue() == answer + "\n"
    assert FastLanguageModel.for_training(model) is model
    assert model.training and not model.base_model.model.config.use_cache
