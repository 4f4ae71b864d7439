"""`MLLMProcessor` against a reference encoding built here piece by piece from the chat format.

The reference tokenizes each piece of the template on its own ("<|role|>\\n", each text item, each
image as N image tokens + "\\n", "<|end|>", "\\n") and labels exactly the assistant's text and its
"<|end|>". Our byte-level BPE never merges across these boundaries (special tokens are split out
first, and "\\n" is its own pre-token), so the reference must equal the processor's output exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from mllm.modeling import IGNORE_INDEX
from mllm.processing import (
    ImageCountMismatchError,
    MLLMProcessor,
    SampleError,
    SampleTooLongError,
    llava_to_messages,
)
from mllm.tokenizer import IMAGE_TOKEN

N = 9  # image tokens per image of the tiny CLIP tower: (48 / 16) ** 2 patches, CLS dropped


@pytest.fixture
def processor(tiny, tokenizer):
    processor = tiny.processor(tokenizer, tiny.config("clip"))
    assert processor.num_image_tokens == N
    return processor


def reference_encoding(tokenizer, messages, n_image_tokens):
    """input_ids / labels / modality_ids assembled piece by piece (see the module docstring)."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    ids, labels, modality = [], [], []

    def add(tokens, train=False, image=False):
        ids.extend(tokens)
        labels.extend(tokens if train else [IGNORE_INDEX] * len(tokens))
        modality.extend([int(image)] * len(tokens))

    for message in messages:
        train = message["role"] == "assistant"
        add(enc(f"<|{message['role']}|>\n"))
        content = message["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for item in items:
            if item["type"] == "image":
                add([image_id] * n_image_tokens, image=True)
                add(enc("\n"), train=train)
            else:
                add(enc(item["text"]), train=train)
        add([end_id], train=train)
        add(enc("\n"))
    return {"input_ids": ids, "labels": labels, "modality_ids": modality}


MULTI_IMAGE_MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and "},
                                 {"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": "How many shapes are there?"},
    {"role": "assistant", "content": "two"},
]


def spans(values, target):
    """(start, length) of each maximal run of `target` in `values`."""
    out, start = [], None
    for i, v in enumerate([*values, None]):
        if v == target and start is None:
            start = i
        elif v != target and start is not None:
            out.append((start, i - start))
            start = None
    return out


# ---------------------------------------------------------------------------------------- training


def test_multi_image_multi_turn_matches_reference(processor, tokenizer):
    got = processor.encode_conversation(MULTI_IMAGE_MULTI_TURN, num_images=2)
    want = reference_encoding(tokenizer, MULTI_IMAGE_MULTI_TURN, N)
    assert got == want

    image_id = processor.image_token_id
    # Two images -> two runs of exactly N image tokens, and modality 1 exactly there.
    assert [length for _, length in spans(got["input_ids"], image_id)] == [N, N]
    assert got["modality_ids"] == [int(t == image_id) for t in got["input_ids"]]
    # Targets: the answers and their <|end|> only, in order; never an image or a prompt token.
    targets = [t for t in got["labels"] if t != IGNORE_INDEX]
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert targets == (tokenizer.encode("red", add_special_tokens=False) + [end_id]
                       + tokenizer.encode("two", add_special_tokens=False) + [end_id])
    assert all(label == IGNORE_INDEX or label == token for label, token in zip(got["labels"], got["input_ids"]))
    # Collapsing the image runs gives back the chat template's own tokenization.
    collapsed = [t for i, t in enumerate(got["input_ids"]) if t != image_id or got["input_ids"][i - 1] != image_id]
    assert collapsed == tokenizer.apply_chat_template(MULTI_IMAGE_MULTI_TURN, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def test_llava_samples_match_reference(processor, tokenizer, synth_world):
    entries = json.loads((synth_world / "llava" / "train_vqa.json").read_text())[:20]
    for entry in entries:
        messages = llava_to_messages(entry["conversations"])
        got = processor.encode_conversation(messages, num_images=1, sample_id=entry["id"])
        assert got == reference_encoding(tokenizer, messages, N)
        answers = [t["value"] for t in entry["conversations"] if t["from"] == "gpt"]
        assert len(answers) >= 1
        target_text = tokenizer.decode([t for t in got["labels"] if t != IGNORE_INDEX])
        assert target_text == "".join(a + "<|end|>" for a in answers)


def test_placeholder_image_mismatch_names_the_sample(processor):
    with pytest.raises(ImageCountMismatchError, match=r"sample vqa-17: .* 2 <image> placeholder\(s\) but 1 image"):
        processor.encode_conversation(MULTI_IMAGE_MULTI_TURN, num_images=1, sample_id="vqa-17")
    text_only = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(ImageCountMismatchError, match=r"sample s0: .* 0 <image> placeholder\(s\) but 1 image"):
        processor.encode_conversation(text_only, num_images=1, sample_id="s0")


def test_too_long_raises_and_never_truncates(processor):
    length = len(processor.encode_conversation(MULTI_IMAGE_MULTI_TURN, num_images=2)["input_ids"])
    fits = processor.encode_conversation(MULTI_IMAGE_MULTI_TURN, num_images=2, max_length=length)
    assert len(fits["input_ids"]) == len(fits["labels"]) == len(fits["modality_ids"]) == length
    with pytest.raises(SampleTooLongError, match=rf"sample long-1: {length} tokens > max_length {length - 1}"):
        processor.encode_conversation(MULTI_IMAGE_MULTI_TURN, num_images=2, max_length=length - 1,
                                      sample_id="long-1")
    assert issubclass(SampleTooLongError, SampleError) and issubclass(ImageCountMismatchError, SampleError)


def test_sample_without_assistant_turn_is_rejected(processor):
    with pytest.raises(SampleError, match="sample q: no assistant turn"):
        processor.encode_conversation([{"role": "user", "content": "hi"}], num_images=0, sample_id="q")


# ---------------------------------------------------------------------------------------- LLaVA turns


@pytest.mark.parametrize(
    ("value", "content"),
    [
        ("<image>\nWhat is it?", [{"type": "image"}, {"type": "text", "text": "What is it?"}]),
        ("Look: <image>\nWhat is it?", [{"type": "text", "text": "Look: "}, {"type": "image"},
                                        {"type": "text", "text": "What is it?"}]),
        ("What is it?\n<image>", [{"type": "text", "text": "What is it?\n"}, {"type": "image"}]),
        ("<image>\n<image>\nCompare.", [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]),
        ("No image here.", [{"type": "text", "text": "No image here."}]),
    ],
)
def test_llava_to_messages(value, content, tokenizer):
    conversations = [{"from": "human", "value": value}, {"from": "gpt", "value": "a red circle"}]
    messages = llava_to_messages(conversations)
    assert messages == [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
    ]
    # The template renders each image as "<image>\n": the LLaVA text comes back (plus a final "\n").
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    want = value if not value.endswith(IMAGE_TOKEN) else value + "\n"
    assert rendered == f"<|user|>\n{want}<|end|>\n<|assistant|>\na red circle<|end|>\n"


def test_llava_to_messages_roles_and_errors():
    messages = llava_to_messages([{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a"}])
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    with pytest.raises(SampleError, match="turn 1: unknown speaker 'bot'"):
        llava_to_messages([{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}])


# ---------------------------------------------------------------------------------------- inference


PROMPTS = [
    "<|user|>\n<image>\nWhat color?<|end|>\n<|assistant|>\n",
    "<|system|>\nBe brief.<|end|>\n<|user|>\n<image>\nand <image>\nWhich shapes are the same?<|end|>\n<|assistant|>\n",
]


def test_call_left_pads_and_keeps_image_tokens(processor, tokenizer, tiny, synth_world):
    images = tiny.images(synth_world, 3)
    batch = processor(images=images, text=PROMPTS)
    image_id = processor.image_token_id

    rows = []
    for prompt in PROMPTS:  # reference: tokenize, then expand each <image> to N tokens
        row = []
        for token in tokenizer.encode(prompt, add_special_tokens=False):
            row.extend([token] * N if token == image_id else [token])
        rows.append(row)
    width = max(map(len, rows))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["modality_ids"].shape == (2, width)
    for i, row in enumerate(rows):
        pad = width - len(row)
        assert pad == 0 or i == 0  # the first prompt is the short one
        assert batch["input_ids"][i, pad:].tolist() == row
        assert batch["input_ids"][i, :pad].tolist() == [tokenizer.pad_token_id] * pad
        assert batch["attention_mask"][i].tolist() == [0] * pad + [1] * len(row)
        assert batch["modality_ids"][i].tolist() == [0] * pad + [int(t == image_id) for t in row]
    assert width - len(rows[0]) > 0  # padding really happened
    assert [len(spans(r.tolist(), image_id)) for r in batch["input_ids"]] == [1, 2]
    assert int((batch["input_ids"] == image_id).sum()) == 3 * N
    want_pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert batch["pixel_values"].shape == (3, 3, 48, 48)
    assert torch.equal(batch["pixel_values"], want_pixels)

    right = processor(images=images, text=PROMPTS, padding_side="right")
    assert right["input_ids"][0, : len(rows[0])].tolist() == rows[0]
    assert right["attention_mask"][0].tolist() == [1] * len(rows[0]) + [0] * (width - len(rows[0]))


def test_call_rejects_placeholder_image_mismatch(processor, tiny, synth_world):
    with pytest.raises(ImageCountMismatchError, match=r"3 <image> placeholder\(s\) but 2 image"):
        processor(images=tiny.images(synth_world, 2), text=PROMPTS)
    with pytest.raises(ImageCountMismatchError, match=r"1 <image> placeholder\(s\) but 0 image"):
        processor(text=PROMPTS[0])


# ---------------------------------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tiny, tokenizer, synth_world, tmp_path):
    # "full" keeps CLS: 10 tokens per image, not the constructor's default, so a lost value shows.
    processor = tiny.processor(tokenizer, tiny.config("clip", vision_feature_select_strategy="full"))
    assert processor.num_image_tokens == N + 1
    processor.save_pretrained(tmp_path)
    loaded = MLLMProcessor.from_pretrained(tmp_path)

    assert (loaded.num_image_tokens, loaded.image_token, loaded.image_token_id) == (
        processor.num_image_tokens, processor.image_token, processor.image_token_id)
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.chat_template == processor.chat_template
    assert loaded.encode_conversation(MULTI_IMAGE_MULTI_TURN, 2) == processor.encode_conversation(
        MULTI_IMAGE_MULTI_TURN, 2)
    images = tiny.images(synth_world, 3)
    want, got = processor(images=images, text=PROMPTS), loaded(images=images, text=PROMPTS)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
