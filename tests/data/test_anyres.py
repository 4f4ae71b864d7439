"""data.image_aspect `anyres` (LLaVA-NeXT): a padded thumbnail plus tiles of the tower's input size.

Checked against references built here: grid choice and token counts for wide / tall / square images; the
crops in pixel_values equal the image regions computed from the raw pixels (normalised by hand); in a
tiny model every crop's features land in its own token span (the tower run on that crop alone gives them)
and packed rows give every sample the loss of the padded batch; batched generation equals one prompt at
a time; eval asks multi-image questions with their images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.builder import set_generation_defaults
from mllm.data.sources import LlavaJsonSource
from mllm.modeling import IGNORE_INDEX
from mllm.processing import llava_to_messages, pad_to_square, select_grid
from mllm.train.evaluate import evaluate, vqa_items
from mllm.train.objectives import LMObjective

N = 9  # image tokens per crop of the tiny CLIP tower (48 / 16) ** 2
TILE = 48


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: any misplaced, flipped or reordered crop changes the numbers."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = {  # name: (image, expected grid (columns, rows))
    "wide": (noise(96, 48, 1), (2, 1)),  # exactly 2 x 1 tiles
    "tall": (noise(48, 144, 2), (1, 2)),  # 1:3 fitted onto a 1 x 2 canvas, bars left and right
    "square": (noise(96, 96, 3), (2, 2)),  # exactly 2 x 2 tiles
    "small": (noise(48, 48, 4), (2, 2)),  # square: the only grid without bars, upscaled x2
    "panorama": (noise(1000, 480, 5), (2, 1)),  # large: aspect 2.08 fits 2 x 1 best
}


def runs(values, target):
    """Lengths of the maximal runs of `target` in `values`."""
    out, length = [], 0
    for v in [*values, None]:
        if v == target:
            length += 1
        elif length:
            out.append(length)
            length = 0
    return out


def collapse(sample: dict, image_id: int) -> dict:
    """The sample with every run of image tokens shortened to one token (in all three lists)."""
    keep = [i for i, t in enumerate(sample["input_ids"]) if t != image_id or i == 0 or sample["input_ids"][i - 1] != t]
    return {k: [sample[k][i] for i in keep] for k in ("input_ids", "labels", "modality_ids")}


@pytest.fixture
def processor(tiny, tokenizer):
    processor = tiny.processor(tokenizer, tiny.config())
    processor.configure_images("anyres")
    assert processor.num_image_tokens == N and processor.tile_size == (TILE, TILE)
    return processor


def normalise(pixels: np.ndarray, processor) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] as CLIP normalises: (x / 255 - mean) / std."""
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 - mean) / std


# ---------------------------------------------------------------------------------------- grids and counts


@pytest.mark.parametrize("name", list(IMAGES))
def test_grid_and_token_count_per_image_shape(processor, name):
    image, grid = IMAGES[name]
    assert processor.image_grid(image) == grid
    crops = 1 + grid[0] * grid[1]
    assert processor.crops_per_image([image]) == [crops]
    assert processor.image_token_counts([image]) == [crops * N]
    assert processor.preprocess_images([image]).shape == (crops, 3, TILE, TILE)


def test_grid_ties_prefer_less_upscaling_then_the_bigger_canvas():
    grids = [[1, 1], [2, 2]]  # a square image fits both without bars
    assert select_grid((48, 48), grids, (TILE, TILE)) == (1, 1)  # 2 x 2 would upscale it x2
    assert select_grid((200, 200), grids, (TILE, TILE)) == (2, 2)  # both shrink it: keep more detail
    assert select_grid((100, 52), [[1, 1], [2, 1], [1, 2]], (TILE, TILE)) == (2, 1)


def test_expansion_follows_each_image_in_training_and_inference(processor, tokenizer):
    messages = llava_to_messages([{"from": "human", "value": "<image>\nand <image>\nand <image>\nSame?"},
                                  {"from": "gpt", "value": "no"}])
    images = [IMAGES[n][0] for n in ("square", "wide", "tall")]
    got = processor.encode_conversation(messages, images=images)
    image_id = processor.image_token_id
    assert runs(got["input_ids"], image_id) == [5 * N, 3 * N, 3 * N]
    assert got["modality_ids"] == [int(t == image_id) for t in got["input_ids"]]
    assert all(label == IGNORE_INDEX for label, t in zip(got["labels"], got["input_ids"]) if t == image_id)
    # Apart from the image runs' lengths, exactly the one-crop encoding.
    processor.configure_images("resize")
    assert collapse(got, image_id) == collapse(processor.encode_conversation(messages, 3), image_id)
    processor.configure_images("anyres")
    # Inference: the images are spread over the prompts in order.
    prompts = ["<|user|>\n<image>\nWhat?<|end|>\n<|assistant|>\n",
               "<|user|>\n<image>\nand <image>\nSame?<|end|>\n<|assistant|>\n"]
    batch = processor(images=images, text=prompts)
    assert [runs(row.tolist(), image_id) for row in batch["input_ids"]] == [[5 * N], [3 * N, 3 * N]]
    assert batch["pixel_values"].shape[0] == 5 + 3 + 3
    with pytest.raises(ValueError, match="pass the images"):
        processor.encode_conversation(messages, 3)


# ---------------------------------------------------------------------------------------- crops


def test_crops_are_the_thumbnail_then_the_tiles_row_major(processor):
    fill = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    for name, regions in [("wide", [(0, 0), (0, 48)]), ("square", [(0, 0), (0, 48), (48, 0), (48, 48)])]:
        image = IMAGES[name][0]
        pixels = np.asarray(image)
        got = processor.preprocess_images([image])
        thumbnail = processor.image_processor(images=[pad_to_square(image, fill)], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(got[0], thumbnail[0])
        for crop, (top, left) in zip(got[1:], regions, strict=True):  # (row, column) offsets, row-major
            torch.testing.assert_close(crop, normalise(pixels[top:top + TILE, left:left + TILE], processor),
                                       atol=1e-5, rtol=0)


def test_a_tall_image_is_fitted_on_mean_colour_bars_then_cut(processor):
    image = IMAGES["tall"][0]  # 48 x 144 -> scaled by 2/3 to 32 x 96, centred on a 48 x 96 canvas
    fill = np.array([int(x * 255) for x in processor.image_processor.image_mean], dtype=np.uint8)
    canvas = np.broadcast_to(fill, (96, 48, 3)).copy()
    canvas[:, 8:40] = np.asarray(image.resize((32, 96), Image.Resampling.BICUBIC))
    got = processor.preprocess_images([image])
    assert got.shape == (3, 3, TILE, TILE)
    torch.testing.assert_close(got[1], normalise(canvas[:48], processor), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[2], normalise(canvas[48:], processor), atol=1e-5, rtol=0)
    assert got[1][:, :, :7].abs().max() < 0.03  # the bars normalise to ~0 (mean colour, truncated as LLaVA)


# ---------------------------------------------------------------------------------------- model


@pytest.fixture
def gallery(tmp_path):
    """LLaVA JSON records over the images above, one or two per conversation."""
    (tmp_path / "img").mkdir()
    for name, (image, _) in IMAGES.items():
        image.save(tmp_path / "img" / f"{name}.png")

    def entry(id_, names, question, answer):
        return {"id": id_, "image": [f"img/{n}.png" for n in names], "kind": "vqa", "question_types": ["t"],
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}

    entries = [entry("one", ["wide"], "<image>\nWhat is it?", "red"),
               entry("two", ["tall", "square"], "<image>\nand <image>\nSame?", "no"),
               entry("small", ["small"], "<image>\nHow many?", "two")]
    (tmp_path / "gallery.json").write_text(json.dumps(entries))
    return tmp_path / "gallery.json", [e["image"] for e in entries]


@pytest.fixture(scope="module")
def model(tiny):
    # The interval layout (reference backend) keeps packed documents apart, so padded and packed compare.
    return tiny.model(attention={"mode": "causal", "backend": "reference"})


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_each_crop_lands_in_its_span_and_packing_matches_padding(gallery, model, tiny, tokenizer, packed):
    path, _ = gallery
    processor = tiny.processor(tokenizer, model.config)
    processor.configure_images("anyres")
    objective = LMObjective(model, processor, 4096, packing=packed)
    source = LlavaJsonSource(path)
    samples = [objective.encode(source[i]) for i in range(3)]
    assert [s["pixel_values"].shape[0] for s in samples] == [3, 3 + 5, 5]
    assert [runs(s["input_ids"], processor.image_token_id) for s in samples] == [[3 * N], [3 * N, 5 * N], [5 * N]]
    rows = [[1], [0, 2]]
    batch = objective.collate(samples, rows=rows) if packed else objective.collate(samples)
    order = [i for row in rows for i in row] if packed else [0, 1, 2]  # the samples' row-major order
    names = {0: ["wide"], 1: ["tall", "square"], 2: ["small"]}
    crops = [crop for i in order for n in names[i] for crop in processor.image_crops(IMAGES[n][0])]
    assert batch["pixel_values"].shape[0] == len(crops) == 16

    inner = model.model
    with torch.no_grad():
        features = inner.encode_images(batch["pixel_values"])  # [16, N, D]
        merged = inner.merge_image_features(batch["input_ids"], inner.get_input_embeddings()(batch["input_ids"]),
                                            features)
        at = (batch["input_ids"] == model.config.image_token_id).nonzero()  # row-major
        spans = merged[at[:, 0], at[:, 1]].reshape(len(crops), N, -1)
        for span, crop in zip(spans, crops):
            alone = processor.image_processor(images=[crop], return_tensors="pt")["pixel_values"]
            torch.testing.assert_close(span, inner.encode_images(alone)[0])

        # The whole forward: each sample's summed loss equals its loss alone in a padded batch of one.
        batch.pop("keys")
        labels = batch.pop("labels")
        logits = model(**batch).logits
        per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                      ignore_index=IGNORE_INDEX, reduction="none")
        if packed:
            docs = batch["document_ids"][:, 1:]
            got = [per_token[r][docs[r] == d].sum() for r, row in enumerate(rows) for d in range(len(row))]
        else:
            got = list(per_token.sum(1))
        for i, loss in zip(order, got):
            alone = LMObjective(model, processor, 4096).collate([samples[i]])
            alone.pop("keys")
            alone_labels = alone.pop("labels")
            want = torch.nn.functional.cross_entropy(model(**alone).logits[:, :-1].transpose(1, 2),
                                                     alone_labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
            torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------- generation and eval


def generate(model, inputs):
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


def test_batched_generation_equals_one_prompt_at_a_time(tiny, tokenizer):
    model = tiny.model(seed=1)
    set_generation_defaults(model, tokenizer)
    processor = tiny.processor(tokenizer, model.config)
    processor.configure_images("anyres")
    prompts = ["<|user|>\n<image>\nWhat color?<|end|>\n<|assistant|>\n",
               "<|user|>\n<image>\nand <image>\nSame?<|end|>\n<|assistant|>\n"]
    per_prompt = [[IMAGES["small"][0]], [IMAGES["tall"][0], IMAGES["wide"][0]]]
    batch = processor(images=[im for ims in per_prompt for im in ims], text=prompts)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is exercised
    batch.pop("modality_ids")
    tokens, logits = generate(model, batch)
    for i, (prompt, images) in enumerate(zip(prompts, per_prompt)):
        single = processor(images=images, text=[prompt])
        single.pop("modality_ids")
        single_tokens, single_logits = generate(model, single)
        assert torch.equal(single_tokens[0], tokens[i])
        torch.testing.assert_close(single_logits[0], logits[i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("aspect", ["resize", "anyres"])
def test_eval_asks_multi_image_questions_with_their_images(tmp_path, tiny, tokenizer, aspect):
    (tmp_path / "img").mkdir()
    for name in ("wide", "tall", "square"):
        IMAGES[name][0].save(tmp_path / "img" / f"{name}.png")
    entries = [  # the second image comes in the second question: the first question is asked without it
        {"id": "two", "image": ["img/wide.png", "img/tall.png"], "kind": "vqa", "question_types": ["a", "b"],
         "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"},
                           {"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "one", "image": "img/square.png", "kind": "vqa", "question_types": ["a"],
         "conversations": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "two"}]},
    ]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(entries))
    model = tiny.model(seed=2)
    set_generation_defaults(model, tokenizer)
    processor = tiny.processor(tokenizer, model.config)
    processor.configure_images(aspect)

    items = list(vqa_items(LlavaJsonSource(path), 10, processor))
    pixels = {n: np.asarray(IMAGES[n][0]) for n in ("wide", "tall", "square")}
    assert [[next(n for n in pixels if np.array_equal(np.asarray(im), pixels[n])) for im in item[1]]
            for item in items] == [["wide"], ["wide", "tall"], ["square"]]
    assert [item[0].count("<image>") for item in items] == [1, 2, 1]
    report = evaluate(model, processor, str(path), batch_size=3, max_new_tokens=2)
    assert report["n"] == 3 and report["per_type"]["a"]["n"] == 2
