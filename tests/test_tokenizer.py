"""Byte-level BPE tokenizer: special-token layout, round trips, reload, chat template and masks."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mllm.data import synth
from mllm.tokenizer import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    ensure_special_tokens,
    load_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synth.generate(out, seed=0, n_train=300, n_heldout=20)
    return out


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([str(world / "corpus.txt")], str(out), vocab_size=512), out


def vqa_messages(entry: dict) -> list[dict]:
    """LLaVA turns -> chat messages with typed content for the image turn."""
    messages = []
    for turn in entry["conversations"]:
        if turn["from"] == "human" and turn["value"].startswith("<image>\n"):
            text = turn["value"].removeprefix("<image>\n")
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": turn["value"]})
    return messages


def test_special_tokens_come_first(trained):
    tok, _ = trained
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert len(tok) <= 512


def test_no_automatic_bos_eos(trained):
    tok, _ = trained
    ids = tok("red circle")["input_ids"]
    assert ids == tok.encode("red circle", add_special_tokens=False)
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


def test_special_tokens_are_atomic(trained):
    tok, _ = trained
    ids = tok.encode("<image>\nWhat shape is at the top?<|end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids[-1] == tok.convert_tokens_to_ids("<|end|>")


def test_corpus_text_round_trips(world, trained):
    tok, _ = trained
    lines = (world / "corpus.txt").read_text().splitlines()
    for text in set(lines) | {"top left", "bottom right", " leading space", "Ünïcode ✓ not in corpus"}:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_reload_gives_identical_ids_and_template(world, trained):
    tok, out = trained
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert load_tokenizer(out).get_vocab() == tok.get_vocab()
    assert reloaded.chat_template == tok.chat_template == CHAT_TEMPLATE
    assert reloaded.all_special_tokens == tok.all_special_tokens
    texts = (world / "corpus.txt").read_text().splitlines()[:200] + ["<image>\n<|user|>x<|end|>"]
    assert [reloaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    entry = json.loads((world / "llava" / "train_vqa.json").read_text())[0]
    assert reloaded.apply_chat_template(vqa_messages(entry)) == tok.apply_chat_template(vqa_messages(entry))


def test_training_is_deterministic(world, trained, tmp_path):
    _, out = trained
    train_tokenizer([str(world / "corpus.txt")], str(tmp_path), vocab_size=512)
    assert (tmp_path / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_chat_template_renders_typed_content(trained):
    tok, _ = trained
    typed = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text = tok.apply_chat_template(typed, tokenize=False)
    assert text == (
        "<|system|>\nBe brief.<|end|>\n"
        "<|user|>\n<image>\nWhat color is the circle?<|end|>\n"
        "<|assistant|>\nred<|end|>\n"
    )
    plain = [typed[0], {"role": "user", "content": "<image>\nWhat color is the circle?"}, typed[2] | {"content": "red"}]
    assert tok.apply_chat_template(plain, tokenize=False) == text
    prompt = tok.apply_chat_template(typed[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")


def test_chat_template_rejects_unknown_role(trained):
    tok, _ = trained
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_exactly_answers_and_end(world, trained):
    tok, _ = trained
    end_id = tok.convert_tokens_to_ids("<|end|>")
    for entry in json.loads((world / "llava" / "train_vqa.json").read_text())[:50]:
        messages = vqa_messages(entry)
        out = tok.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
        ids, mask = out["input_ids"], out["assistant_masks"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        # Each answer tokenizes inside the template exactly as on its own, followed by <|end|>.
        expected = [i for a in answers for i in tok.encode(a, add_special_tokens=False) + [end_id]]
        assert [i for i, m in zip(ids, mask) if m] == expected
        # One contiguous masked span per assistant turn, each decoding to "answer<|end|>".
        spans, current = [], []
        for i, m in zip(ids, mask):
            if m:
                current.append(i)
            elif current:
                spans.append(current)
                current = []
        assert [tok.decode(s) for s in spans] == [a + "<|end|>" for a in answers]
        assert [tok.decode(s, skip_special_tokens=True) for s in spans] == answers
        assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 1


def foreign_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-like tokenizer that knows none of our tokens and has no chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["a red circle at top left"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def test_ensure_special_tokens_adds_missing_once():
    tok = foreign_tokenizer()
    size = len(tok)
    assert not tok.chat_template
    assert ensure_special_tokens(tok) == 5
    assert len(tok) == size + 5
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == "<|endoftext|>"  # existing special tokens are kept
    ids = tok.encode("<image>\n<|user|>", add_special_tokens=False)
    assert tok.convert_ids_to_tokens([ids[0], ids[-1]]) == [IMAGE_TOKEN, "<|user|>"]
    assert ensure_special_tokens(tok) == 0  # idempotent
    assert len(tok) == size + 5


def test_ensure_special_tokens_keeps_an_existing_template(trained):
    tok = foreign_tokenizer()
    tok.chat_template = "{{ messages[0]['content'] }}"
    ensure_special_tokens(tok)
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    assert ensure_special_tokens(trained[0]) == 0
