"""Attention layouts and modality-mutual attention (MMA) through the model.

References: AKI's dense mask written straight from its description, the backbone's own SDPA causal
attention, uncached generation, and single-row (unpadded) forwards.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mllm.attention.layout import compute_layout, dense_mask
from mllm.builder import AttentionSpec, ModelSpec, ProjectorSpec, TextSpec, VisionSpec, build_model_and_processor

IMG, TXT = 1, 0


def aki_mask(modality: list[int], assistant_start: int) -> torch.Tensor:
    """AKI ("Seeing is Understanding"): causal, plus image tokens see the text after the image up to
    (not including) the assistant turn. Written loop by loop, independently of the layout code."""
    T = len(modality)
    mask = torch.zeros(T, T, dtype=torch.bool)
    image_end = max(i for i, m in enumerate(modality) if m == IMG) + 1
    for q in range(T):
        for k in range(T):
            mask[q, k] = k <= q or (modality[q] == IMG and image_end <= k < assistant_start)
    return mask


def single_turn() -> tuple[list[int], int]:
    # <|user|> \n [img x4] \n What color ? <|end|> \n <|assistant|> \n red <|end|>
    modality = [TXT, TXT] + [IMG] * 4 + [TXT] * 6 + [TXT, TXT, TXT, TXT]
    return modality, 12


def test_mma_aki_equals_aki_dense_mask():
    modality, assistant = single_turn()
    starts = torch.zeros(1, len(modality), dtype=torch.bool)
    starts[0, assistant] = True
    layout = compute_layout(None, torch.tensor([modality]), starts, mode="mma_aki")
    assert torch.equal(dense_mask(layout)[0], aki_mask(modality, assistant))


def test_mma_is_aki_plus_a_bidirectional_image_span():
    modality, assistant = single_turn()
    starts = torch.zeros(1, len(modality), dtype=torch.bool)
    starts[0, assistant] = True
    got = dense_mask(compute_layout(None, torch.tensor([modality]), starts, mode="mma"))[0]
    image = torch.tensor(modality, dtype=torch.bool)
    want = aki_mask(modality, assistant) | (image[:, None] & image[None, :])
    assert torch.equal(got, want)
    assert not torch.equal(got, aki_mask(modality, assistant))  # the span really is bidirectional


def test_layout_without_assistant_turn_or_image_is_causal_and_padding_is_empty():
    T = 8
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    text_only = compute_layout(None, torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, dtype=torch.bool), "mma")
    assert torch.equal(dense_mask(text_only)[0], causal)
    # Left padding (3 pads): pad rows see nothing, real rows start at the first real token.
    attention_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    layout = compute_layout(attention_mask, torch.zeros(1, T, dtype=torch.long), None, "causal")
    assert layout.kv_start.tolist() == [[0, 1, 2, 3, 3, 3, 3, 3]]
    assert layout.kv_end.tolist() == [[0, 1, 2, 4, 5, 6, 7, 8]]


def test_packed_documents_and_many_images_turns():
    # doc A: img img q q [A] a a [U..] img q [A] a | doc B: q [A] a
    modality = [1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assist = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0]
    docs = [0] * 12 + [1] * 3
    layout = compute_layout(None, torch.tensor([modality]), torch.tensor([assist], dtype=torch.bool), "mma",
                            document_ids=torch.tensor([docs]))
    start, end = layout.kv_start[0].tolist(), layout.kv_end[0].tolist()
    assert start[:12] == [0] * 12 and start[12:] == [12] * 3
    assert end[0] == end[1] == 4  # first image sees its question up to the first assistant turn
    assert end[8] == 10  # the second image sees the second question only
    assert end[2:8] == list(range(3, 9)) and end[12:] == [13, 14, 15]  # text stays causal


# ---- through the model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec(tokenizer_dir):
    return ModelSpec(
        vision=VisionSpec(type="clip", config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                               "num_attention_heads": 2, "image_size": 48, "patch_size": 16}),
        projector=ProjectorSpec(depth=2),
        text=TextSpec(config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}),
        tokenizer=str(tokenizer_dir),
    )


@pytest.fixture(scope="module")
def shapes_images(tiny, synth_world):
    return tiny.images(synth_world, 2)


def build(spec, mode, backend, seed=0):
    spec = copy.deepcopy(spec)
    spec.attention = AttentionSpec(mode=mode, backend=backend)
    torch.manual_seed(seed)
    model, processor = build_model_and_processor(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # away from the init, so masks matter
    return model.eval(), processor


def conversation(answer: str = "red", question: str = "What color is the circle?"):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def encode(processor, messages, images):
    sample = processor.encode_conversation(messages, len(images))
    return {"input_ids": torch.tensor([sample["input_ids"]]), "pixel_values": processor.preprocess_images(images),
            "attention_mask": torch.ones(1, len(sample["input_ids"]), dtype=torch.long)}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_causal_through_our_path_equals_backbone_sdpa(spec, shapes_images, backend):
    ours, processor = build(spec, "causal", backend)
    theirs, _ = build(spec, "causal", "sdpa")
    theirs.load_state_dict(ours.state_dict())
    assert ours.model.language_model.config._attn_implementation == "mllm_interval"
    assert theirs.model.language_model.config._attn_implementation != "mllm_interval"
    batch = encode(processor, conversation(), shapes_images[:1])
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)


def test_mma_backends_agree(spec, shapes_images):
    reference, processor = build(spec, "mma", "reference")
    batch = encode(processor, conversation(), shapes_images[:1])
    with torch.no_grad():
        want = reference(**batch).logits
        for backend in ("sdpa", "flex", "triton"):
            other, _ = build(spec, "mma", backend)
            other.load_state_dict(reference.state_dict())
            torch.testing.assert_close(other(**batch).logits, want, atol=1e-5, rtol=1e-5, msg=backend)
        causal, _ = build(spec, "causal", "sdpa")
        causal.load_state_dict(reference.state_dict())
        assert (causal(**batch).logits - want).abs().max() > 1e-3  # MMA really changes the result


def image_states(model, batch):
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    image = batch["input_ids"][0] == model.config.image_token_id
    return [h[0, image] for h in out.hidden_states]


def test_answer_tokens_never_leak_into_image_states(spec, shapes_images):
    model, processor = build(spec, "mma", "reference")
    base = image_states(model, encode(processor, conversation("red"), shapes_images[:1]))
    other_answer = image_states(model, encode(processor, conversation("blue"), shapes_images[:1]))
    other_question = image_states(model, encode(processor, conversation("red", "What shape is at the top?"),
                                                shapes_images[:1]))
    for a, b in zip(base, other_answer):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # ...while the question does reach them (otherwise the test above could not fail).
    assert max((a - b).abs().max() for a, b in zip(base[1:], other_question[1:])) > 1e-4


def test_mma_generation_cached_equals_uncached_and_padding_is_neutral(spec, shapes_images):
    model, processor = build(spec, "mma", "sdpa")
    prompts = [processor.apply_chat_template(conversation()[:1], add_generation_prompt=True, tokenize=False),
               processor.apply_chat_template(
                   [{"role": "user", "content": [{"type": "text", "text": "Look closely at this picture."},
                                                 {"type": "image"}, {"type": "text", "text": "How many?"}]}],
                   add_generation_prompt=True, tokenize=False)]
    inputs = processor(images=shapes_images[:2], text=prompts)  # left-padded batch
    inputs.pop("modality_ids")
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, min_new_tokens=6)
    cached = model.generate(**inputs, use_cache=True, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    # Row 0 alone (no padding) gives the same continuation as inside the padded batch.
    alone = processor(images=shapes_images[:1], text=prompts[:1])
    alone.pop("modality_ids")
    single = model.generate(**alone, use_cache=True, **kwargs)
    assert torch.equal(single[0, -6:], cached[0, -6:])
