"""Multi-image samples: LLaVA `"image": [a, b]` and shard `KEY.0.png, KEY.1.png` records keep placeholder
order through decoding, preprocessing, padded and packed collation, into the model's image-token spans;
a placeholder / image count mismatch is a counted, keyed rejection."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from mllm.data.loader import MixtureStream, StageLoader
from mllm.data.packing import collate_packed
from mllm.data.shards import add_member
from mllm.data.sources import LlavaJsonSource, WebDatasetSource
from mllm.processing import ImageCountMismatchError
from mllm.train.objectives import LMObjective

TWO = "<image>\nand\n<image>\nWhich one has more shapes?"


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def gallery(tmp_path, tiny, synth_world):
    """Three distinct shapes-world images as files, and a LLaVA JSON using them one, two at a time."""
    images = tiny.images(synth_world, 3)
    (tmp_path / "img").mkdir()
    for name, image in zip("abc", images):
        image.save(tmp_path / "img" / f"{name}.png")
    def turns(question, answer):
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    entries = [
        {"id": "two", "image": ["img/a.png", "img/b.png"], "conversations": turns(TWO, "the first")},
        {"id": "interleaved", "image": ["img/c.png", "img/a.png"],
         "conversations": turns("Look: <image> then <image>. Same?", "no")},
        {"id": "mismatch", "image": ["img/a.png", "img/b.png"], "conversations": turns("<image>\nWhat?", "x")},
        {"id": "one", "image": "img/c.png", "conversations": turns("<image>\nWhat?", "shapes")},
    ]
    (tmp_path / "multi.json").write_text(json.dumps(entries))
    return tmp_path, dict(zip("abc", images))


@pytest.fixture
def objective(tiny, tokenizer):
    return LMObjective(None, tiny.processor(tokenizer, tiny.config()), 512)


def test_llava_list_of_images_keeps_their_order(gallery):
    folder, _ = gallery
    source = LlavaJsonSource(folder / "multi.json")
    files = {name: (folder / "img" / f"{name}.png").read_bytes() for name in "abc"}
    assert source[0].images == [files["a"], files["b"]]
    assert source[1].images == [files["c"], files["a"]]
    assert source[3].images == [files["c"]] and source[3].more_image_bytes == ()


def test_shard_numbered_images_keep_their_order_and_bad_numbering_is_reported(tmp_path, gallery):
    folder, _ = gallery
    files = [(folder / "img" / f"{name}.png").read_bytes() for name in "ab"]
    meta = json.dumps({"id": "k", "conversations": [{"from": "human", "value": TWO}, {"from": "gpt", "value": "x"}]})
    shard = tmp_path / "multi-000000.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "k.1.png", files[1])  # member order does not matter, the number does
        add_member(tar, "k.0.png", files[0])
        add_member(tar, "k.json", meta.encode())
        add_member(tar, "gap.0.png", files[0])
        add_member(tar, "gap.2.png", files[1])
        add_member(tar, "gap.json", meta.replace('"k"', '"gap"').encode())
        add_member(tar, "both.png", files[0])
        add_member(tar, "both.0.png", files[1])
        add_member(tar, "both.json", meta.replace('"k"', '"both"').encode())
    source = WebDatasetSource([shard])
    assert len(source) == 1 and source[0].images == files
    problems = {p.key: p.message for p in source.problems}
    assert set(problems) == {"gap", "both"}
    assert "without gaps" in problems["gap"] and "KEY.0.png" in problems["both"]


def test_encode_preprocesses_images_in_placeholder_order(gallery, objective):
    folder, images = gallery
    source = LlavaJsonSource(folder / "multi.json")
    sample = objective.encode(source[1])  # images [c, a]
    expected = torch.cat([objective.processor.preprocess_images([images[n]]) for n in "ca"])
    assert sample["pixel_values"].shape[0] == 2 and torch.equal(sample["pixel_values"], expected)
    with pytest.raises(ImageCountMismatchError, match=r"mismatch: the conversation has 1 <image> placeholder\(s\) but "
                                                      r"2 image\(s\)"):
        objective.encode(source[2])


def test_mismatched_image_count_is_a_counted_rejection_with_its_key(gallery, objective):
    folder, _ = gallery
    stream = MixtureStream([LlavaJsonSource(folder / "multi.json")], [1.0], seed=0)
    loader = StageLoader(stream, objective.encode, objective.collate, micro_batch_size=4, grad_accum=1)
    (batch,) = loader.next_step()
    assert sorted(batch["keys"]) == ["interleaved", "one", "two"]
    assert loader.rejected == {"ImageCountMismatchError": 1}
    assert loader.rejected_keys == {"ImageCountMismatchError": ["mismatch"]}
    assert batch["pixel_values"].shape[0] == 5


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.model()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_model_sees_each_image_in_its_own_placeholder_span(gallery, model, tiny, tokenizer, packed):
    folder, images = gallery
    objective = LMObjective(model, tiny.processor(tokenizer, model.config), 512, packing=packed)
    source = LlavaJsonSource(folder / "multi.json")
    samples = [objective.encode(source[i]) for i in (3, 0, 1)]  # images: c | a, b | c, a
    expected_order = "cabca"
    batch = collate_packed(samples, 10_000, 0, rows=[[1], [0, 2]]) if packed else objective.collate(samples)
    if packed:  # rows: [two], [one, interleaved] -> row-major order of the placeholders: a b | c c a
        expected_order = "abcca"
    with torch.no_grad():
        inner = model.model
        features = inner.encode_images(batch["pixel_values"])  # [n_images, tokens, D]
        merged = inner.merge_image_features(batch["input_ids"], inner.get_input_embeddings()(batch["input_ids"]),
                                            features)
        image_positions = (batch["input_ids"] == model.config.image_token_id).nonzero()  # row-major
        spans = merged[image_positions[:, 0], image_positions[:, 1]].reshape(len(expected_order), -1, merged.shape[-1])
        for span, name in zip(spans, expected_order):
            alone = inner.encode_images(objective.processor.preprocess_images([images[name]]))[0]
            torch.testing.assert_close(span, alone)
